"""Errors a user fixes by changing a flag or a file, and how a run ends on them.

Such an error is printed as one line, ``moe_fairseq: error: ...``, naming the flag or
file and what is allowed, without a traceback (``install_excepthook``). A diverging
run (``FloatingPointError`` from fairseq's trainer) keeps its traceback, which tells
where, and gets one last line that says what happened and what to try.
"""

import sys


class OneLineError(Exception):
    """Bad input a user can fix; the message names the flag or file."""


class CheckpointError(OneLineError):
    """A checkpoint file that cannot be read: missing, empty, truncated or foreign."""


DIVERGED = (
    "moe_fairseq: error: training diverged: gradients are Nan/Inf. fairseq saved the "
    "state before this update as crash.pt in --save-dir and named the first module "
    "with a NaN in the WARNING lines above; lower --lr, raise --warmup-updates, set "
    "--clip-norm, or add --moe-router-z-loss-wt 0.001"
)


def _hook(previous_hook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, OneLineError):
            print(f"moe_fairseq: error: {exc}", file=sys.stderr)
            return
        previous_hook(exc_type, exc, tb)
        if issubclass(exc_type, FloatingPointError):
            print(DIVERGED, file=sys.stderr)

    hook._moe_fairseq = True
    return hook


def install_excepthook() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported."""
    if not getattr(sys.excepthook, "_moe_fairseq", False):
        sys.excepthook = _hook(sys.excepthook)
