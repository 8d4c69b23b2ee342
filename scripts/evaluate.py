#!/usr/bin/env python3
"""Decode and score every direction of a prepare_bible.py data folder.

    python scripts/evaluate.py --data data/bible_m4 --checkpoints runs/moe/checkpoint_best.pt \
        --beam 5 --batch-size 64 --moe-eval-capacity-token-fraction 1.0 --cpu \
        --output-dir results/m4
    python scripts/evaluate.py --data data/bible_m4 --checkpoints runs/ \
        --output-dir results/m4        # every runs/*/checkpoint_best.pt, side by side

Writes results.md and results.json; see ``moe_fairseq/bible/evaluate.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fairseq.bible.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
