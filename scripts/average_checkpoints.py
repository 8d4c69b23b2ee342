#!/usr/bin/env python3
"""Average the weights of the last checkpoints of a run, for every moe_fairseq method.

    python scripts/average_checkpoints.py --inputs ckpt/checkpoint_1_400.pt ckpt/checkpoint_1_500.pt \
        --output ckpt/averaged.pt
    python scripts/average_checkpoints.py --inputs ckpt --num-update-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs ckpt --num-epoch-checkpoints 5 \
        --checkpoint-upper-bound 30 --output avg.pt

Flags are spelled as in fairseq's scripts/average_checkpoints.py, which cannot read
checkpoints on torch >= 2.6. Floating-point weights are averaged (in float64), integer and
boolean buffers come from the newest checkpoint, the optimizer state is left out; see
``moe_fairseq/checkpoint_averaging.py``. Decode the output with fairseq-generate --path.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_fairseq  # noqa: E402,F401  (the checkpoint allowlist, one-line errors)
from moe_fairseq.checkpoint_averaging import (  # noqa: E402
    AveragingError,
    average_checkpoints,
    last_checkpoints,
    save_atomically,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True,
                   help="checkpoint files, or one folder with --num-*-checkpoints")
    p.add_argument("--output", required=True, help="the averaged checkpoint to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int, metavar="N",
                       help="average the last N checkpoint<epoch>.pt of the --inputs folder")
    group.add_argument("--num-update-checkpoints", type=int, metavar="N",
                       help="average the last N checkpoint_<epoch>_<update>.pt of the folder")
    p.add_argument("--checkpoint-upper-bound", type=int, metavar="K",
                   help="with --num-*-checkpoints: ignore checkpoints past epoch/update K")
    args = p.parse_args(argv)
    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    try:
        if n is not None:
            if len(args.inputs) != 1:
                p.error("--num-epoch-checkpoints/--num-update-checkpoints take one --inputs folder")
            if n < 1:
                p.error(f"the number of checkpoints must be >= 1, got {n}")
            paths = last_checkpoints(args.inputs[0], n, args.num_update_checkpoints is not None,
                                     args.checkpoint_upper_bound)
        else:
            if args.checkpoint_upper_bound is not None:
                p.error("--checkpoint-upper-bound needs --num-epoch-checkpoints or "
                        "--num-update-checkpoints")
            paths = args.inputs
        state = average_checkpoints(paths)
        save_atomically(state, args.output)
    except AveragingError as exc:
        print(f"average_checkpoints.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"averaged {len(paths)} checkpoints into {args.output}:")
    for path in paths:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
