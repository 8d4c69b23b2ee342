#!/usr/bin/env python3
"""make quality: dense vs MoE vs SMoE vs MoEC trained on 2 CPU cores for the same wall-clock
budget each, at a size that translates, within 100 minutes in all (README, Translation
quality). The comparison is moe_fairseq/bible/compare.py's (the same as make
gpu-compare's); this front end gives it the CPU settings chosen by measurement.

    python scripts/quality.py [--plan] [any compare flag, which overrides the defaults]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_fairseq.bible.compare import QUALITY_ARGS, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(QUALITY_ARGS + sys.argv[1:], prog="quality.py"))
