#!/usr/bin/env python3
"""make gpu-compare: dense vs MoE vs SMoE vs MoEC for the same wall-clock budget each on the
Bible m4 benchmark; base models on one GPU within one 9-minute device call, tiny ones on
CPU (README, GPU comparison). The comparison is moe_fairseq/bible/compare.py's.

    python scripts/gpu_compare.py                    # CUDA: base models, 75 s each; CPU: tiny
    python scripts/gpu_compare.py --plan --data DIR  # the time budget only
    python scripts/gpu_compare.py --prepare-only --max-test-verses 200 --export DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fairseq.bible.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="gpu_compare.py"))
