#!/usr/bin/env python3
"""Average the weights of the last checkpoints of a run, for every moe_fairseq method.

    python scripts/average_checkpoints.py --inputs ckpt/checkpoint_1_400.pt ckpt/checkpoint_1_500.pt \
        --output ckpt/averaged.pt
    python scripts/average_checkpoints.py --inputs ckpt --num-update-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs ckpt --num-epoch-checkpoints 5 \
        --checkpoint-upper-bound 30 --output avg.pt

Flags are spelled as in fairseq's scripts/average_checkpoints.py, which cannot read
checkpoints on torch >= 2.6. Floating-point weights are averaged (in float64); integer and
boolean buffers and all other fields come from the newest checkpoint (most updates), the
optimizer state is left out; missing folders of --output are created; --output is never
one of the inputs and replaces a training checkpoint only with --force; see
``moe_fairseq/conversion/averaging.py``. Decode the output with fairseq-generate --path.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_fairseq  # noqa: E402,F401  (the checkpoint allowlist, one-line errors)
from moe_fairseq.atomic_files import exit_on_sigterm  # noqa: E402
from moe_fairseq.conversion.averaging import (  # noqa: E402
    AveragingError,
    average_checkpoints,
    check_output,
    last_checkpoints,
)
from moe_fairseq.conversion.checkpoint_output import save_checkpoint  # noqa: E402


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
    p.add_argument("--force", action="store_true",
                   help="replace --output even if it is a training checkpoint "
                        "(checkpoint_last.pt, checkpoint_best.pt, ... or a file with optimizer "
                        "state); an input is never replaced")
    args = p.parse_args(argv)
    by_updates = args.num_update_checkpoints is not None
    n = args.num_update_checkpoints if by_updates else args.num_epoch_checkpoints
    flag = "--num-update-checkpoints" if by_updates else "--num-epoch-checkpoints"
    if n is not None and len(args.inputs) != 1:
        p.error(f"{flag} takes one --inputs folder, got {len(args.inputs)} paths")
    if n is not None and n < 1:
        p.error(f"{flag} must be >= 1, got {n}")
    if n is None and args.checkpoint_upper_bound is not None:
        p.error("--checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints")
    exit_on_sigterm()  # a killed run removes its temp file
    try:
        if n is not None:
            paths = last_checkpoints(args.inputs[0], n, by_updates, args.checkpoint_upper_bound)
        else:
            paths = args.inputs
        check_output(args.output, paths, args.force)  # before the (long) reading
        state = average_checkpoints(paths)
        save_checkpoint(state, args.output)
    except AveragingError as exc:
        print(f"average_checkpoints.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"averaged {len(paths)} checkpoints into {args.output}:")
    for path in paths:
        print(f"  {path}")
    print(f"other fields (cfg, extra_state, integer/boolean buffers) from the newest: "
          f"{state['extra_state']['averaged_checkpoints']['fields_from']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
