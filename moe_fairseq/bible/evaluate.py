"""Decode every direction of a translation data folder and score it.

Used by ``scripts/evaluate.py``; run it with ``--help`` for the flags.

``--data`` is either the output folder of ``prepare_bible.py`` (with
``manifest.json``) or any fairseq multilingual data-bin, as ``fairseq-preprocess``
writes it for ``translation_multi_simple_epoch`` (``dict.<lang>.txt`` and
``test.<src>-<tgt>.<lang>.bin/.idx``).

For each model (a checkpoint, every matching checkpoint under a folder, or a
folder of ready hypotheses) and each direction (the manifest's, or for a
data-bin the ``test.X-Y.X.idx`` files it holds, or ``--directions``):

1. each checkpoint's embedding sizes are compared with the data's dictionaries
   (dictionary file + fairseq's special symbols + the language tokens the
   multilingual task adds); a checkpoint trained on other data stops with one line;
2. ``fairseq-generate`` (``translation_multi_simple_epoch``, the language pairs,
   ``bin/langs.txt`` (or the data-bin's ``langs.txt``, else its ``dict.<lang>.txt``
   languages), ``--gen-subset test``) without post-processing, so the ``H-``
   lines hold SentencePiece pieces;
3. the hypotheses are put back in test order (by sample id) and decoded with
   the data's ``spm.model`` (a data-bin: ``--spm-model``, an ``spm.model`` next to
   it or in its parent, else ``--post-process``);
4. sacrebleu scores them against the references: BLEU and chrF. With a manifest
   the references are the raw text, and for xx->en also WEB + the other English
   versions (multi-reference). A data-bin's references are its binarized test
   targets, decoded the same way as the hypotheses (``results.md``/``results.json``
   say how).
   A hypothesis file must have one line per reference line (else one error line
   names both files); empty hypotheses are scored as empty translations, with a
   warning naming the file and lines, and counted in ``results.json``
   (``empty_hypotheses``).

Writes ``results.md`` (one row per direction, side-by-side columns per model,
averages for en->xx, xx->en, each resource level and all) and
``results.json`` (every score with its sacrebleu signature), and keeps each
model's detokenized hypotheses as ``<output>/<model>/<src>-<tgt>.hyp``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import BibleDataError, run_as_command
from . import significance
from .scoring import score_direction, tokenizer_for

METRICS = ("bleu", "chrf", "bleu_multi", "chrf_multi")
METRIC_LABELS = {"bleu": "BLEU", "chrf": "chrF", "bleu_multi": "BLEU-multi",
                 "chrf_multi": "chrF-multi"}
_H_LINE = re.compile(r"^H-(\d+)\t[^\t]*\t?(.*)$")
#: fairseq --post-process values offered for data-bins without a SentencePiece model.
POST_PROCESS = ("sentencepiece", "subword_nmt", "none")
_DICT_FILE = re.compile(r"^dict\.([^.]+)\.txt$")
_TEST_IDX = re.compile(r"^test\.([^.\-]+)-([^.\-]+)\.([^.]+)\.idx$")
#: the flags of fairseq's multilingual task that replace the per-language dictionaries:
#: with one of them in --generate-args the vocabulary check cannot predict the sizes.
_DICT_FLAGS = ("--fixed-dictionary", "--source-dict", "--target-dict")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Decode every direction of a prepare_bible.py data folder, or of any "
        "fairseq multilingual data-bin, with fairseq-generate and score with sacrebleu (BLEU, "
        "chrF; multi-reference for xx->en of prepare_bible.py data).",
    )
    p.add_argument("--data", required=True,
                   help="output folder of prepare_bible.py (with manifest.json), or a fairseq "
                        "multilingual data-bin (dict.<lang>.txt, test.<src>-<tgt>.<lang>.bin/.idx "
                        "as fairseq-preprocess writes them)")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="PATH",
                   help="checkpoint files, or folders searched (recursively) for "
                        "--checkpoint-glob; one model per checkpoint")
    p.add_argument("--checkpoint-glob", default="checkpoint_best.pt",
                   help="file name pattern looked for in checkpoint folders (default %(default)s)")
    p.add_argument("--hypotheses", action="append", default=[], metavar="NAME=DIR",
                   help="score ready detokenized hypotheses DIR/<src>-<tgt>.hyp as model NAME "
                        "(repeatable; no decoding)")
    p.add_argument("--names", nargs="+", help="model names, one per checkpoint found, in order")
    p.add_argument("--directions",
                   help="comma list such as de-en,en-de (default: all; for a data-bin, those "
                        "with test.<src>-<tgt>.<src>.idx files; <tgt>-<src> reads the same files)")
    p.add_argument("--output-dir", required=True, help="where results.md/json and hypotheses go")
    g = p.add_argument_group("decoding (fairseq-generate)")
    g.add_argument("--beam", type=int, default=5)
    g.add_argument("--lenpen", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, help="sentences per batch (default 64 unless "
                   "--max-tokens is given)")
    g.add_argument("--max-tokens", type=int, help="tokens per batch")
    g.add_argument("--moe-eval-capacity-token-fraction", type=float, metavar="F",
                   help="override the MoE inference capacity (passed as --model-overrides); "
                        "default: the checkpoint's own")
    g.add_argument("--user-dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="fairseq --user-dir (default: this moe_fairseq package)")
    g.add_argument("--cpu", action="store_true", help="decode on the CPU")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--encoder-langtok", choices=("src", "tgt", "none"), default="tgt",
                   help="as in training (default %(default)s)")
    g.add_argument("--no-decoder-langtok", action="store_true",
                   help="the model was trained without --decoder-langtok")
    g.add_argument("--generate-args", default="",
                   help="extra fairseq-generate arguments, one shell-quoted string")
    g.add_argument("--one-process", action="store_true",
                   help="decode every direction of a checkpoint in this process, loading the "
                        "model once (fairseq-generate's loop and settings; default: one "
                        "fairseq-generate process per direction)")
    g.add_argument("--reuse", action="store_true",
                   help="keep hypotheses already in --output-dir instead of decoding again")
    b = p.add_argument_group("data-bins without manifest.json (references are the binarized "
                             "test targets)")
    b.add_argument("--spm-model", metavar="FILE",
                   help="SentencePiece model that decodes hypotheses and references (default: "
                        "spm.model, or the only *.model file, in the data-bin or its parent)")
    b.add_argument("--post-process", choices=POST_PROCESS,
                   help="without a SentencePiece model: how fairseq's token strings become text "
                        "(default: sentencepiece if the dictionary holds '\u2581' pieces, else "
                        "none: scored as they are)")
    b.add_argument("--langs", metavar="LIST",
                   help="comma list of the model's languages, in training order (fairseq "
                        "--langs; default: the data-bin's langs.txt, else its dict.<lang>.txt "
                        "languages, sorted)")
    s = p.add_argument_group("scoring")
    s.add_argument("--tokenize", help="sacrebleu tokenizer for every direction (default: 13a; "
                   "zh for Chinese, char for Japanese)")
    s.add_argument("--baseline", metavar="NAME",
                   help="model the others are compared with by paired bootstrap (default: the "
                        "model named dense, else the first)")
    s.add_argument("--bootstrap", type=int, default=significance.DEFAULT_SAMPLES, metavar="N",
                   help="paired bootstrap resamples per direction for 95%% intervals of each "
                        "model's gap to --baseline (BLEU, chrF, single reference; the same "
                        "draws as sacrebleu --paired-bs); 0: none (default %(default)s)")
    s.add_argument("--bootstrap-seed", type=int, default=significance.DEFAULT_SEED,
                   metavar="S", help="seed of the resample draws (default %(default)s, "
                                     "sacrebleu's)")
    s.add_argument("--samples", type=int, default=3, metavar="K",
                   help="sample translations per direction written to samples.md (source, "
                        "reference, every model's output; the same lines for every model); "
                        "0: none (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------


def load_manifest(data: str) -> dict:
    path = os.path.join(data, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BibleDataError(
            f"{data} has no manifest.json: pass the --out folder of prepare_bible.py"
        ) from None
    except ValueError as exc:
        raise BibleDataError(f"{path} is not valid JSON ({exc})") from None
    if not manifest.get("complete") or "directions" not in manifest:
        raise BibleDataError(f"{path} is incomplete: rerun prepare_bible.py")
    return manifest


def _dict_langs(folder: str) -> List[str]:
    return sorted(m.group(1) for m in map(_DICT_FILE.match, os.listdir(folder)) if m)


def open_data(args) -> dict:
    """The manifest of ``--data``: prepare_bible.py's own, or for a fairseq data-bin
    without one, a manifest read from its files (``"data_bin"`` set, see
    :func:`data_bin_manifest`)."""
    data = args.data
    if not os.path.isdir(data):
        raise BibleDataError(f"--data {data} " + ("is not a folder" if os.path.exists(data)
                                                  else "does not exist"))
    if os.path.isfile(os.path.join(data, "manifest.json")):
        given = [flag for flag, value in (("--spm-model", args.spm_model),
                                          ("--post-process", args.post_process),
                                          ("--langs", args.langs)) if value is not None]
        if given:
            # The manifest fixes these (spm.model, raw references, bin/langs.txt);
            # silently ignoring them would score something else than asked.
            raise BibleDataError(
                f"{', '.join(given)} applies to data-bins without manifest.json; "
                f"{os.path.join(data, 'manifest.json')} fixes the SentencePiece model, "
                "references and languages")
        return load_manifest(data)
    if _dict_langs(data):
        return data_bin_manifest(args, data)
    sub = os.path.join(data, "bin")
    if os.path.isdir(sub) and _dict_langs(sub):
        raise BibleDataError(
            f"--data {data} has no manifest.json (did prepare_bible.py finish?): rerun "
            f"prepare_bible.py, or pass --data {sub} to score its binarized test data")
    raise BibleDataError(
        f"--data {data} has no manifest.json (the --out folder of prepare_bible.py) and no "
        "dict.<lang>.txt files (a fairseq-preprocess data-bin)")


def _test_pairs(bin_dir: str) -> List[str]:
    """``src-tgt`` for every binarized test pair with both sides' ``.idx`` and ``.bin``."""
    names = set(os.listdir(bin_dir))
    pairs = []
    for name in sorted(names):
        m = _TEST_IDX.match(name)
        if m and m.group(3) == m.group(1):
            src, tgt = m.group(1), m.group(2)
            stems = [f"test.{src}-{tgt}.{lang}" for lang in (src, tgt)]
            if all(f"{stem}.{ext}" in names for stem in stems for ext in ("idx", "bin")):
                pairs.append(f"{src}-{tgt}")
    return pairs


def _single_pivot(directions: Sequence[str]) -> Optional[str]:
    """The one language in every direction (English-centric data), if there is one."""
    common = set.intersection(*(set(d.split("-")) for d in directions))
    return common.pop() if len(common) == 1 else None


def data_bin_manifest(args, data: str) -> dict:
    """What evaluate.py needs of a fairseq-preprocess data-bin, in the manifest's keys.

    Directions: the ``test.X-Y.X.idx`` files (``--directions`` may also ask for Y-X,
    which fairseq reads from the same files). Languages (the order fixes the language
    tokens' ids, so it must be the training order): ``--langs``, else ``langs.txt``,
    else the ``dict.<lang>.txt`` languages sorted (what fairseq infers from
    ``--lang-pairs`` when a model was trained without ``--langs``/``--lang-dict``)."""
    bin_dir = os.path.abspath(data)
    pairs = _test_pairs(bin_dir)
    if args.directions:
        directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    else:
        directions = pairs
    if not directions:
        raise BibleDataError(
            f"--data {data} has no binarized test data (test.<src>-<tgt>.<src>.idx and .bin, "
            "both sides), which evaluate.py decodes and scores")
    files = {}
    for d in directions:
        if d.count("-") != 1 or not all(d.split("-")):
            raise BibleDataError(f"--directions {d}: not a direction such as de-en")
        src, tgt = d.split("-")
        pair = d if d in pairs else f"{tgt}-{src}" if f"{tgt}-{src}" in pairs else None
        if pair is None:
            raise BibleDataError(
                f"--directions {d}: {data} has no test files for it (test.{d}.{src}.idx or "
                f"test.{tgt}-{src}.{src}.idx, both sides); the data has: "
                f"{', '.join(pairs) or 'none'}")
        files[d] = os.path.join(bin_dir, f"test.{pair}.{tgt}")
        for lang in (src, tgt):
            if not os.path.isfile(os.path.join(bin_dir, f"dict.{lang}.txt")):
                raise BibleDataError(f"{os.path.join(bin_dir, f'dict.{lang}.txt')} not found: "
                                     f"fairseq needs it for {d}")
    manifest: dict = {
        "data_bin": bin_dir,
        "directions": directions,
        "lang_pairs": ",".join(dict.fromkeys(pairs + directions)),
        "reference_files": files,
        "levels": {},
        "pivot": {"lang": _single_pivot(directions)},
    }
    langs_txt = os.path.join(bin_dir, "langs.txt")
    if args.langs:
        manifest["langs"] = [x.strip() for x in args.langs.split(",") if x.strip()]
        manifest["langs_from"] = "--langs"
    elif os.path.isfile(langs_txt):
        manifest["lang_dict"] = langs_txt
        manifest["langs_from"] = langs_txt
    else:
        manifest["langs"] = _dict_langs(bin_dir)
        manifest["langs_from"] = "dict.<lang>.txt files"
    langs = language_list(data, manifest)
    for d in directions:
        missing = [lang for lang in d.split("-") if lang not in langs]
        if missing:
            raise BibleDataError(
                f"--directions {d}: {', '.join(missing)} not in the language list of "
                f"{manifest['langs_from']} ({','.join(langs)})")
    parent = os.path.dirname(bin_dir)
    if os.path.isfile(os.path.join(parent, "manifest.json")):
        # The parent's raw references are the text itself (no <unk>) plus the extra
        # English versions: worth telling, not worth guessing the user's intent.
        print(f"evaluate.py: note: {parent} is a prepare_bible.py folder: --data {parent} "
              "scores against its raw references (multi-reference for xx->en)", file=sys.stderr)
    return manifest


def language_list(data: str, manifest: dict) -> List[str]:
    """The language list fairseq's multilingual task gets (``--langs`` or the lines of
    ``--lang-dict``, as ``MultilingualDatasetManager.load_langs`` reads them)."""
    if "langs" in manifest:
        return list(manifest["langs"])
    path = os.path.join(data, manifest.get("lang_dict", "bin/langs.txt"))
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise BibleDataError(f"language list {path} cannot be read ({exc.strerror})") from None


def pick_directions(manifest: dict, wanted: Optional[str]) -> List[str]:
    if "data_bin" in manifest:  # data_bin_manifest checked --directions already
        return list(manifest["directions"])
    all_dirs = list(manifest["directions"])
    if not wanted:
        return all_dirs
    chosen = [d.strip() for d in wanted.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in all_dirs]
    if unknown:
        raise BibleDataError(
            f"unknown direction(s) {', '.join(unknown)}; the data has: {', '.join(all_dirs)}"
        )
    return chosen


def find_checkpoints(paths: Sequence[str], pattern: str) -> List[str]:
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            hits = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                hits += [os.path.join(root, f) for f in sorted(files) if fnmatch.fnmatch(f, pattern)]
            if not hits:
                raise BibleDataError(f"no checkpoint matching {pattern!r} under {path}")
            found += hits
        else:
            raise BibleDataError(f"checkpoint not found: {path}")
    return found


def default_name(checkpoint: str) -> str:
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
    if stem in ("checkpoint_best", "checkpoint_last") and parent:
        return parent if stem == "checkpoint_best" else f"{parent}/last"
    return f"{parent}/{stem}" if parent else stem


def _unique(names: List[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 1
        out.append(name)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "model"


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def reference_path(data: str, manifest: dict, direction: str) -> str:
    if "reference_files" in manifest:  # a data-bin: the binarized test targets
        return manifest["reference_files"][direction] + ".bin"
    src, tgt = direction.split("-")
    pivot = manifest["pivot"]["lang"]
    xx = tgt if src == pivot else src
    return os.path.join(data, "raw", f"test.{pivot}-{xx}.{tgt}")


def references(data: str, manifest: dict, direction: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """Primary reference and, for xx->en, the extra English ones (as long as the primary:
    multi-reference scoring pairs them line by line)."""
    src, tgt = direction.split("-")
    pivot = manifest["pivot"]["lang"]
    ref_path = reference_path(data, manifest, direction)
    if not os.path.isfile(ref_path):
        raise BibleDataError(f"reference for {direction} not found: {ref_path} "
                             "(rerun prepare_bible.py)")
    ref = read_lines(ref_path)
    extra: Dict[str, List[str]] = {}
    if tgt == pivot:
        for version in manifest.get("extra_refs", {}).get("versions", {}):
            path = os.path.join(data, "raw", f"test.{src}-{pivot}.ref-{version}")
            if os.path.isfile(path):
                lines = read_lines(path)
                if len(lines) != len(ref):
                    raise BibleDataError(
                        f"{path} has {len(lines)} lines but the reference {ref_path} has "
                        f"{len(ref)}: the references must hold the same verses (rerun "
                        "prepare_bible.py)")
                extra[version] = lines
    return ref, extra


# ---------------------------------------------------------------------------
# Data-bins without manifest: dictionaries, references, detokenizing
# ---------------------------------------------------------------------------


def bin_dir(data: str, manifest: dict) -> str:
    return manifest.get("data_bin") or os.path.join(data, "bin")


def load_dictionary(path: str):
    from fairseq.data import Dictionary

    try:
        return Dictionary.load(path)
    except FileNotFoundError:
        raise BibleDataError(f"{path} not found: fairseq needs it for this direction") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise BibleDataError(f"{path} is not a fairseq dictionary ({exc})") from None


def _dictionary_tokens(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def find_spm_model(folder: str) -> Optional[str]:
    """``spm.model``, else the only ``*.model`` file, in ``folder`` or its parent."""
    for place in (folder, os.path.dirname(folder)):
        names = sorted(n for n in os.listdir(place)
                       if n.endswith(".model") and os.path.isfile(os.path.join(place, n)))
        if "spm.model" in names:
            return os.path.join(place, "spm.model")
        if len(names) == 1:
            return os.path.join(place, names[0])
    return None


def data_bin_detokenizer(args, manifest: dict):
    """``(function over token strings, description)`` for a data-bin: the
    SentencePiece model (``--spm-model`` or found next to the data) if the target
    dictionaries are its pieces, else fairseq's ``--post-process`` rule."""
    from fairseq.data.data_utils import post_process

    if args.spm_model and args.post_process:
        raise BibleDataError("give --spm-model or --post-process, not both")
    folder = manifest["data_bin"]
    tokens: List[str] = []
    for lang in sorted({d.split("-")[1] for d in manifest["directions"]}):
        tokens += _dictionary_tokens(os.path.join(folder, f"dict.{lang}.txt"))
    if args.spm_model and not os.path.isfile(args.spm_model):
        raise BibleDataError(f"--spm-model {args.spm_model} not found")
    path = None if args.post_process else (args.spm_model or find_spm_model(folder))
    if path:
        import sentencepiece as spm

        flag = "--spm-model " if args.spm_model else ""
        try:
            sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as exc:
            raise BibleDataError(f"{flag}{path} is not a SentencePiece model ({exc}); pass "
                                 "--spm-model or --post-process") from None
        # A model found by name may belong to other data: its pieces must be the
        # dictionary's (symbols such as <unk> and language tokens aside).
        pieces = [t for t in tokens if not (t.startswith("<") and t.endswith(">"))
                  and not (t.startswith("__") and t.endswith("__"))]
        known = sum(sp.piece_to_id(t) != sp.unk_id() for t in pieces)
        if pieces and known < 0.9 * len(pieces):
            what = (f"{known} of the {len(pieces)} dictionary entries are pieces of {path}")
            if args.spm_model:
                raise BibleDataError(f"--spm-model {path} does not fit the data: {what}")
            print(f"evaluate.py: note: not decoding with {path}: {what}", file=sys.stderr)
        else:
            return (lambda lines: detokenize(lines, sp)), {"spm_model": os.path.abspath(path)}
    symbol = args.post_process or (
        "sentencepiece" if any("\u2581" in t for t in tokens) else "none")
    return (lambda lines: [post_process(line, symbol) for line in lines]), {"post_process": symbol}


def describe_detokenizer(info: dict) -> str:
    if "spm_model" in info:
        return f"decoded with the SentencePiece model {info['spm_model']}"
    if info["post_process"] == "none":
        return "scored as fairseq writes them (no post-processing)"
    return f"post-processed as fairseq's --post-process {info['post_process']} does"


def binarized_references(data: str, manifest: dict, direction: str, detok) -> Tuple[List[str], int]:
    """The binarized test targets of ``direction`` as text, and how many <unk> they hold
    (fairseq-preprocess maps what its dictionary lacks to <unk>: the text is lost)."""
    from fairseq.data import data_utils

    tgt = direction.split("-")[1]
    dictionary = load_dictionary(os.path.join(bin_dir(data, manifest), f"dict.{tgt}.txt"))
    prefix = manifest["reference_files"][direction]
    log = logging.getLogger(data_utils.__name__)
    level = log.level
    log.setLevel(logging.WARNING)  # its "loaded N examples" line is noise on stderr here
    try:
        dataset = data_utils.load_indexed_dataset(prefix, dictionary)
    except (OSError, ValueError, RuntimeError, IndexError) as exc:
        raise BibleDataError(f"{prefix}.idx/.bin cannot be read ({exc})") from None
    finally:
        log.setLevel(level)
    if dataset is None:
        raise BibleDataError(f"{prefix}.idx/.bin cannot be read as fairseq binarized data")
    lines, unknown = [], 0
    for i in range(len(dataset)):
        ids = dataset[i]
        unknown += int((ids == dictionary.unk()).sum())
        lines.append(dictionary.string(ids))
    return detok(lines), unknown


def data_bin_references(manifest: dict, detok_info: dict, unknown: Dict[str, int]) -> dict:
    """How a data-bin's references were obtained, for results.json and results.md."""
    total = sum(unknown.values())
    description = (
        f"References: the binarized test targets of {manifest['data_bin']} "
        "(test.<src>-<tgt>.<tgt>, no manifest.json), "
        f"{describe_detokenizer(detok_info)}, like the hypotheses decoded from checkpoints; "
        + (f"they hold {total} <unk> (text fairseq-preprocess's dictionary lacks)."
           if total else "they hold no <unk>."))
    return {"source": "binarized test targets", "files": dict(manifest["reference_files"]),
            "detokenizer": detok_info, "unknown_tokens": unknown, "description": description}


# ---------------------------------------------------------------------------
# Checkpoint against data: vocabulary sizes
# ---------------------------------------------------------------------------

#: embedding -> which side's dictionary sizes it
EMBEDDINGS = (("encoder.embed_tokens.weight", 0), ("decoder.embed_tokens.weight", 1))


def checkpoint_vocabulary(path: str) -> Dict[str, int]:
    """Rows of the checkpoint's token embeddings; the file is memory-mapped, weights
    only: the shapes are read, not the tensors."""
    import pickle
    import zipfile

    from ..fairseq_fixes.checkpoint_compat import describe_load_error, load_plain_state

    try:
        state = load_plain_state(path)
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError,
            pickle.UnpicklingError) as exc:
        raise BibleDataError(describe_load_error(path, exc)) from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise BibleDataError(f"checkpoint {path} holds no model weights: not a fairseq checkpoint")
    return {key: int(model[key].shape[0]) for key, _ in EMBEDDINGS
            if key in model and getattr(model[key], "dim", lambda: 0)() == 2}


def _option(tokens: Sequence[str], flag: str) -> Optional[str]:
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def check_vocabulary(args, data: str, manifest: dict, checkpoint: str,
                     directions: Sequence[str]) -> None:
    """Stop with one line if ``checkpoint`` was trained with other dictionaries than
    the data's (fairseq-generate would fail on a size mismatch with a long dump, or
    with the same size decode nonsense: sizes are what can be checked).

    The task's dictionary for a language is ``dict.<lang>.txt`` plus fairseq's special
    symbols, plus one token per language of the language list (and ``<mask>`` for
    --lang-tok-style mbart): ``augment_dictionary`` of fairseq's multilingual data
    manager, applied here as fairseq does."""
    from fairseq.data.multilingual.multilingual_utils import augment_dictionary

    tokens = shlex.split(args.generate_args)
    if any(_option(tokens, flag) is not None for flag in _DICT_FLAGS):
        return
    style = _option(tokens, "--lang-tok-style") or "multilingual"
    shapes = checkpoint_vocabulary(checkpoint)
    langs = language_list(data, manifest)
    sizes: Dict[str, Tuple[int, int, int, str]] = {}
    for d in directions:
        sides = d.split("-")
        for key, side in EMBEDDINGS:
            lang = sides[side]
            if key not in shapes:
                continue
            if lang not in sizes:
                path = os.path.join(bin_dir(data, manifest), f"dict.{lang}.txt")
                dictionary = load_dictionary(path)
                n_file = len(dictionary)
                augment_dictionary(dictionary, langs, style, ("main",), None)
                sizes[lang] = (len(dictionary), n_file - dictionary.nspecial,
                               dictionary.nspecial, path)
            n, entries, special, path = sizes[lang]
            if shapes[key] != n:
                raise BibleDataError(
                    f"checkpoint {checkpoint} was trained with a vocabulary of {shapes[key]} "
                    f"entries ({key}), --data {args.data} gives {n} ({path}: {entries} entries "
                    f"+ {special} special + {n - entries - special} language tokens): score "
                    "it on the data it was trained on")


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def generate_command(args, data: str, manifest: dict, checkpoint: str, direction: str) -> List[str]:
    src, tgt = direction.split("-")
    cmd = [
        sys.executable, "-m", "fairseq_cli.generate", bin_dir(data, manifest),
        "--path", checkpoint,
        "--task", "translation_multi_simple_epoch",
        "--lang-pairs", manifest["lang_pairs"],
        *(["--langs", ",".join(manifest["langs"])] if "langs" in manifest else
          ["--lang-dict", os.path.join(data, manifest.get("lang_dict", "bin/langs.txt"))]),
        "--source-lang", src, "--target-lang", tgt,
        "--gen-subset", "test",
        # fairseq main's batch_by_size drops the indices left over after the last
        # full multiple of --required-batch-size-multiple (default 8): up to 7
        # test sentences. moe_fairseq.fairseq_fixes.batching patches that when the plugin
        # is loaded; multiple 1 keeps every sentence with any --user-dir too.
        "--required-batch-size-multiple", "1",
        "--beam", str(args.beam), "--lenpen", str(args.lenpen),
        "--user-dir", args.user_dir,
    ]
    if args.encoder_langtok != "none":
        cmd += ["--encoder-langtok", args.encoder_langtok]
    if not args.no_decoder_langtok:
        cmd.append("--decoder-langtok")
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    if args.batch_size or not args.max_tokens:
        cmd += ["--batch-size", str(args.batch_size or 64)]
    if args.moe_eval_capacity_token_fraction is not None:
        overrides = {"moe_eval_capacity_token_fraction": args.moe_eval_capacity_token_fraction}
        cmd += ["--model-overrides", repr(overrides)]
    if args.cpu:
        cmd.append("--cpu")
    if args.fp16:
        cmd.append("--fp16")
    cmd += shlex.split(args.generate_args)
    return cmd


def parse_generate_output(text: str, expected: int) -> List[str]:
    """Piece strings of the ``H-`` lines, in sample-id order; all ``expected`` ids must be there."""
    hyps: Dict[int, str] = {}
    for line in text.splitlines():
        m = _H_LINE.match(line)
        if m:
            hyps.setdefault(int(m.group(1)), m.group(2))
    missing = [i for i in range(expected) if i not in hyps]
    if missing or len(hyps) != expected:
        raise BibleDataError(
            f"fairseq-generate gave {len(hyps)} hypotheses for {expected} test lines "
            f"(missing ids {missing[:5]}...)"
        )
    return [hyps[i] for i in range(expected)]


def detokenize(pieces: Sequence[str], sp) -> List[str]:
    """SentencePiece-decode piece strings; unknown pieces become sp's unknown symbol."""
    return [sp.decode([sp.piece_to_id(p) for p in line.split()]) for line in pieces]


def decode(args, data: str, manifest: dict, checkpoint: str, direction: str, n: int,
           log_path: str, detok) -> List[str]:
    cmd = generate_command(args, data, manifest, checkpoint, direction)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log_path, "w", encoding="utf-8") as f:
        f.write("# " + " ".join(shlex.quote(c) for c in cmd) + "\n" + proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-12:])
        raise BibleDataError(
            f"fairseq-generate failed for {direction} with {checkpoint} (log: {log_path}):\n{tail}"
        )
    return detok(parse_generate_output(proc.stdout, n))


def decode_in_process(args, data: str, manifest: dict, models: List[dict],
                      directions: Sequence[str], refs: dict, detok) -> Dict[Tuple[str, str], List[str]]:
    """``--one-process``: every direction of each checkpoint decoded in this process
    (``bible/decode.py``), skipping hypotheses ``--reuse`` keeps. Writes each
    direction's H-lines to ``<model>/<direction>.generate.txt`` as the per-process path
    does; returns detokenized hypotheses by (model, direction)."""
    from .decode import decode_directions

    out: Dict[Tuple[str, str], List[str]] = {}
    for model in models:
        if "checkpoint" not in model:
            continue
        out_dir = os.path.join(args.output_dir, _safe(model["name"]))
        os.makedirs(out_dir, exist_ok=True)
        todo = [d for d in directions
                if not (args.reuse and os.path.isfile(os.path.join(out_dir, f"{d}.hyp")))]
        argv = {d: generate_command(args, data, manifest, model["checkpoint"], d)[3:]
                for d in todo}
        t0 = time.time()
        for d, result in decode_directions(argv).items():
            n = len(refs[d][0])
            if len(result["pieces"]) != n or result["ids"] != list(range(n)):
                raise BibleDataError(f"decoding {d} with {model['checkpoint']} gave "
                                     f"{len(result['pieces'])} hypotheses for {n} test lines")
            with open(os.path.join(out_dir, f"{d}.generate.txt"), "w", encoding="utf-8") as f:
                f.write("# one process: " + " ".join(shlex.quote(c) for c in argv[d]) + "\n")
                f.writelines(f"H-{i}\t{p}\n" for i, p in enumerate(result["pieces"]))
            out[model["name"], d] = detok(result["pieces"])
            model.setdefault("decoding", {})[d] = {"tokens": result["tokens"],
                                                   "seconds": round(result["seconds"], 3)}
        if todo:
            model["decode_seconds"] = round(time.time() - t0, 2)
    return out


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _flat(scores: dict) -> Dict[str, Optional[float]]:
    multi = scores.get("multi") or {}
    return {"bleu": scores["bleu"], "chrf": scores["chrf"],
            "bleu_multi": multi.get("bleu"), "chrf_multi": multi.get("chrf")}


def averages(rows: List[dict], models: List[str], levels: Dict[str, str], pivot: str) -> List[dict]:
    groups: List[Tuple[str, List[dict]]] = [
        (f"{pivot}→xx", [r for r in rows if r["src"] == pivot]),
        (f"xx→{pivot}", [r for r in rows if r["tgt"] == pivot]),
    ] if pivot else []  # a data-bin's directions may share no language
    for level in ("high", "low", "very_low"):
        groups.append((level, [r for r in rows if r["level"] == level]))
    groups.append(("all", rows))
    out = []
    for label, members in groups:
        if not members:
            continue
        scores = {}
        for model in models:
            avg = {}
            for metric in METRICS:
                values = [r["scores"][model][metric] for r in members
                          if r["scores"][model].get(metric) is not None]
                avg[metric] = sum(values) / len(values) if values else None
            scores[model] = avg
        out.append({"group": label, "directions": [r["direction"] for r in members],
                    "scores": scores})
    return out


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def sample_lines(refs: Sequence[str], k: int) -> List[int]:
    """``k`` line indices spread evenly over the test set, among lines whose reference
    has 6 to 30 words (all lines when fewer than ``k`` qualify): typical verses, not
    one-word headings or the longest genealogies."""
    if k <= 0 or not refs:
        return []
    pool = [i for i, r in enumerate(refs) if 6 <= len(r.split()) <= 30]
    if len(pool) < k:
        pool = list(range(len(refs)))
    k = min(k, len(pool))
    return sorted({pool[int((j + 0.5) * len(pool) / k)] for j in range(k)})


def source_lines(data: str, manifest: dict, direction: str) -> Optional[List[str]]:
    """The raw test source of a prepare_bible.py direction (None for a data-bin)."""
    if "reference_files" in manifest:
        return None
    src, tgt = direction.split("-")
    pivot = manifest["pivot"]["lang"]
    xx = tgt if src == pivot else src
    path = os.path.join(data, "raw", f"test.{pivot}-{xx}.{src}")
    return read_lines(path) if os.path.isfile(path) else None


def samples_markdown(results: dict) -> str:
    """samples.md: per direction, each sampled line's source, reference and outputs."""
    lines = [f"# Sample translations: {results['data']}", "",
             "The same test lines for every model, spread over the test set (references of "
             "6 to 30 words).", ""]
    names = [m["name"] for m in results["models"]]
    width = max(len(n) for n in ["source", "reference", *names])
    for direction, items in results["samples"].items():
        lines += [f"## {direction}", ""]
        for item in items:
            lines.append(f"Line {item['line'] + 1}:")
            lines.append("")
            lines.append("```")
            if item.get("source") is not None:
                lines.append(f"{'source':<{width}}  {item['source']}")
            lines.append(f"{'reference':<{width}}  {item['reference']}")
            for name in names:
                lines.append(f"{name:<{width}}  {item['outputs'][name]}")
            lines += ["```", ""]
    return "\n".join(lines)


def bootstrap_markdown(results: dict) -> List[str]:
    """The paired-bootstrap table: each model's gap to the baseline with its 95% interval
    per direction and per average (empty without a bootstrap)."""
    boot = results.get("bootstrap")
    if not boot:
        return []
    base = boot["baseline"]
    others = [m["name"] for m in results["models"] if m["name"] != base]
    header = ["Direction"] + [f"{label} {m} − {base}" for label in ("ΔBLEU", "ΔchrF")
                              for m in others]
    lines = ["", f"Paired bootstrap against **{base}** ({boot['samples']} resamples of each "
             f"direction's lines, seed {boot['seed']}, single reference): the gap and its 95% "
             "interval; `*` = the interval excludes 0 (a real gap at that level). Averages: "
             "the bootstrap of the unweighted mean over their directions.", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in [*results["directions"], *results["averages"]]:
        name = r.get("direction") or f"**avg {r['group']}**"
        cells = [name] + [significance.format_delta(r["bootstrap"][m][metric])
                          for metric in ("bleu", "chrf") for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    models = [m["name"] for m in results["models"]]
    has_multi = any(r["scores"][m].get("bleu_multi") is not None
                    for r in results["directions"] for m in models)
    metrics = [m for m in METRICS if has_multi or not m.endswith("_multi")]
    def col(metric, model):
        return METRIC_LABELS[metric] if len(models) == 1 else f"{METRIC_LABELS[metric]} {model}"
    refs = results.get("references")  # set for a data-bin without manifest: no levels
    level = [] if refs else ["Level"]
    header = ["Direction", *level, "Lines"] + [col(me, mo) for me in metrics for mo in models]
    title = f"Evaluation: {results['data']}" if refs else f"Bible benchmark: {results['data']}"
    lines = [f"# {title}", ""]
    for m in results["models"]:
        source = m.get("checkpoint") or m.get("hypotheses")
        lines.append(f"- **{m['name']}**: `{source}`")
    lead = ["---"] * (len(level) + 1) + ["---:"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(
        lead + ["---:"] * (len(header) - len(lead))) + "|"]
    for r in results["directions"]:
        cells = [r["direction"], *([r["level"]] if level else []), str(r["n"])]
        cells += [_fmt(r["scores"][mo].get(me)) for me in metrics for mo in models]
        lines.append("| " + " | ".join(cells) + " |")
    for a in results["averages"]:
        cells = [f"**avg {a['group']}**", *([""] if level else []), str(len(a["directions"]))]
        cells += [_fmt(a["scores"][mo].get(me)) for me in metrics for mo in models]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("Averages are unweighted means over directions (the Lines column of an "
             "average row counts directions).")
    if refs:
        notes += " " + refs["description"]
    else:
        notes += (" Multi-reference scores (xx→en only) use WEB plus "
                  + ", ".join(f"{v} ({n})" for v, n in results.get("extra_refs", {}).items())
                  + " as references.")
    lines += ["", notes]
    lines += bootstrap_markdown(results)
    lines += ["", "sacrebleu signatures:", ""]
    for sig in results["signatures"]:
        lines.append(f"- `{sig}`")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    data = args.data
    manifest = open_data(args)
    plain = "data_bin" in manifest  # a data-bin without manifest.json
    directions = pick_directions(manifest, args.directions)
    pivot = manifest["pivot"]["lang"]
    levels = manifest.get("levels", {})

    models: List[dict] = []
    checkpoints = find_checkpoints(args.checkpoints, args.checkpoint_glob) if args.checkpoints else []
    if args.names and len(args.names) != len(checkpoints):
        raise BibleDataError(
            f"--names gives {len(args.names)} name(s) for {len(checkpoints)} checkpoint(s): "
            + ", ".join(checkpoints)
        )
    names = list(args.names) if args.names else [default_name(c) for c in checkpoints]
    for name, ckpt in zip(names, checkpoints):
        models.append({"name": name, "checkpoint": os.path.abspath(ckpt)})
    for item in args.hypotheses:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise BibleDataError(f"--hypotheses wants NAME=DIR, got {item!r}")
        if not os.path.isdir(folder):
            raise BibleDataError(f"hypotheses folder not found: {folder}")
        models.append({"name": name, "hypotheses": os.path.abspath(folder)})
    if not models:
        raise BibleDataError("nothing to evaluate: give --checkpoints and/or --hypotheses")
    for m, name in zip(models, _unique([m["name"] for m in models])):
        m["name"] = name

    # Before any decoding: flags that would only fail after it.
    if args.bootstrap < 0:
        raise BibleDataError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.samples < 0:
        raise BibleDataError(f"--samples must be >= 0, got {args.samples}")
    if args.baseline is not None and args.baseline not in [m["name"] for m in models]:
        raise BibleDataError(f"--baseline {args.baseline} is not one of the models: "
                             + ", ".join(m["name"] for m in models))
    # Before any decoding: a checkpoint of other data fails in fairseq-generate only
    # after minutes of loading, with a size-mismatch dump.
    for ckpt in checkpoints:
        check_vocabulary(args, data, manifest, ckpt, directions)

    detok = None
    if plain:
        detok, detok_info = data_bin_detokenizer(args, manifest)
    elif checkpoints:
        import sentencepiece as spm

        spm_path = os.path.join(data, manifest.get("spm", {}).get("model", "spm.model"))
        if not os.path.isfile(spm_path):
            raise BibleDataError(f"SentencePiece model not found: {spm_path}")
        sp = spm.SentencePieceProcessor(model_file=spm_path)
        detok = lambda lines: detokenize(lines, sp)  # noqa: E731

    os.makedirs(args.output_dir, exist_ok=True)
    unknown: Dict[str, int] = {}
    if plain:
        refs = {}
        for d in directions:
            ref, unknown[d] = binarized_references(data, manifest, d, detok)
            refs[d] = (ref, {})
    else:
        refs = {d: references(data, manifest, d) for d in directions}
    rows = []
    for d in directions:
        src, tgt = d.split("-")
        xx = tgt if src == pivot else src
        rows.append({"direction": d, "src": src, "tgt": tgt, "level": levels.get(xx, ""),
                     "n": len(refs[d][0]), "scores": {}, "signatures": {}})

    t0 = time.time()
    row_hyps: Dict[str, Dict[str, List[str]]] = {}  # direction -> model -> hypotheses
    decoded: Dict[Tuple[str, str], List[str]] = {}  # (model, direction) -> --one-process output
    if args.one_process:
        decoded = decode_in_process(args, data, manifest, models, directions, refs, detok)
    jobs = [(m, r) for m in models for r in rows]
    bar = tqdm(jobs, desc="evaluate", unit="dir", disable=args.quiet, file=sys.stderr)
    for model, row in bar:
        d = row["direction"]
        bar.set_description(f"{model['name']} {d}")
        ref, extra = refs[d]
        if "hypotheses" in model:
            path = os.path.join(model["hypotheses"], f"{d}.hyp")
            if not os.path.isfile(path):
                raise BibleDataError(f"hypotheses for {d} not found: {path}")
            hyps = read_lines(path)
        else:
            out_dir = os.path.join(args.output_dir, _safe(model["name"]))
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"{d}.hyp")
            if args.reuse and os.path.isfile(path):
                hyps = read_lines(path)
            elif (model["name"], d) in decoded:
                hyps = decoded[model["name"], d]
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(h + "\n" for h in hyps)
            else:
                hyps = decode(args, data, manifest, model["checkpoint"], d, len(ref),
                              os.path.join(out_dir, f"{d}.generate.txt"), detok)
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(h + "\n" for h in hyps)
        if len(hyps) != len(ref):
            raise BibleDataError(
                f"{path} has {len(hyps)} lines but the reference "
                f"{reference_path(data, manifest, d)} has {len(ref)}: one hypothesis per "
                "reference line, in order")
        empty = [i + 1 for i, h in enumerate(hyps) if not h.strip()]
        row.setdefault("empty_hypotheses", {})[model["name"]] = len(empty)
        if empty:
            # Scored as they are (an empty line is a zero-length translation), but a
            # decoding that stopped early or lost its output should not pass unseen.
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            tqdm.write(f"evaluate.py: warning: {path}: {len(empty)} of {len(hyps)} hypotheses "
                       f"are empty (line{'s' if len(empty) > 1 else ''} {shown}); they are "
                       "scored as empty translations",
                       file=sys.stderr)
        row_hyps.setdefault(d, {})[model["name"]] = hyps
        scores = score_direction(hyps, ref, extra or None, tgt_lang=row["tgt"],
                                 tokenize=args.tokenize)
        row["scores"][model["name"]] = _flat(scores)
        row["signatures"] = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        if "multi" in scores:
            row["signatures"].update(bleu_multi=scores["multi"]["bleu_signature"],
                                     chrf_multi=scores["multi"]["chrf_signature"])
    bar.close()

    names = [m["name"] for m in models]
    signatures = sorted({s for r in rows for s in r["signatures"].values()})
    group_averages = averages(rows, names, levels, pivot)
    samples: Dict[str, List[dict]] = {}
    for row in rows:
        d = row["direction"]
        picked = sample_lines(refs[d][0], args.samples)
        if not picked:
            continue
        source = source_lines(data, manifest, d)
        samples[d] = [{"line": i, "source": None if source is None else source[i],
                       "reference": refs[d][0][i],
                       "outputs": {n: row_hyps[d][n][i] for n in names}} for i in picked]
    bootstrap = None
    if args.bootstrap and len(names) > 1:
        baseline = args.baseline or significance.default_baseline(names)
        per_direction = {}
        for row in rows:
            d = row["direction"]
            per_direction[d] = significance.paired_bootstrap(
                refs[d][0], row_hyps[d], baseline, tokenizer_for(row["tgt"], args.tokenize),
                n_samples=args.bootstrap, seed=args.bootstrap_seed, keep_samples=True)
            row["bootstrap"] = significance.without_samples(per_direction[d])
        for a in group_averages:
            a["bootstrap"] = significance.without_samples(significance.pool(
                [per_direction[d] for d in a["directions"]], baseline))
        bootstrap = {"baseline": baseline, "samples": args.bootstrap,
                     "seed": args.bootstrap_seed, "references": "single (the primary)"}
    results = {
        "data": os.path.abspath(data),
        "manifest_settings": manifest.get("settings"),
        "models": models,
        "decoding": {"beam": args.beam, "lenpen": args.lenpen, "batch_size": args.batch_size,
                     "one_process": args.one_process,
                     "max_tokens": args.max_tokens,
                     "moe_eval_capacity_token_fraction": args.moe_eval_capacity_token_fraction,
                     "encoder_langtok": args.encoder_langtok,
                     "decoder_langtok": not args.no_decoder_langtok,
                     "generate_args": args.generate_args},
        "extra_refs": manifest.get("extra_refs", {}).get("versions", {}),
        "directions": rows,
        "averages": group_averages,
        "bootstrap": bootstrap,
        "samples": samples,
        "signatures": signatures,
        "seconds": round(time.time() - t0, 1),
    }
    if plain:
        results["references"] = data_bin_references(manifest, detok_info, unknown)
        results["languages"] = {"langs": language_list(data, manifest),
                                "from": manifest["langs_from"]}
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    table = markdown(results)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    if samples:
        with open(os.path.join(args.output_dir, "samples.md"), "w", encoding="utf-8") as f:
            f.write(samples_markdown(results))
    if not args.quiet:
        print(table)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_as_command(run, "evaluate.py", argv)
