#!/usr/bin/env python3
"""Decode and score every direction of a prepare_bible.py data folder, or of any
fairseq multilingual data-bin (fairseq-preprocess output, no manifest.json needed).

    python scripts/evaluate.py --data data/bible_m4 --checkpoints runs/moe/checkpoint_best.pt \
        --beam 5 --batch-size 64 --moe-eval-capacity-token-fraction 1.0 --cpu \
        --output-dir results/m4
    python scripts/evaluate.py --data data/bible_m4 --checkpoints runs/ \
        --output-dir results/m4        # every runs/*/checkpoint_best.pt, side by side
    python scripts/evaluate.py --data data-bin/wmt --checkpoints runs/m/checkpoint_best.pt \
        --directions de-en,en-de --spm-model data/spm.model --output-dir results/wmt

Writes results.md and results.json; see ``moe_fairseq/bible/evaluate.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fairseq.bible.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
