"""Fixes the plugin applies to fairseq itself when it is imported.

Each module patches one fairseq behaviour and has an idempotent ``install()``:

- ``checkpoint_compat``: fairseq checkpoints load on torch >= 2.6 through an allowlist;
  checkpoint copies are atomic;
- ``batching``: fairseq main no longer drops an epoch's last batch;
- ``ddp_cpu``: ``--ddp-backend c10d`` runs on CPU processes;
- ``precision``: ``--bf16`` trains on GPUs instead of fairseq's TPU path, ``--fp16``
  trains on CPU;
- ``nan_detector``: a diverging run ends on ``FloatingPointError: gradients are Nan/Inf``,
  not on a crash inside fairseq's NaN detector.
"""

from . import batching, checkpoint_compat, ddp_cpu, nan_detector, precision


def install_all() -> None:
    checkpoint_compat.install()
    batching.install()
    ddp_cpu.install()
    precision.install()
    nan_detector.install()
