"""moe_fairseq: sparse Mixture-of-Experts for fairseq, loaded with ``--user-dir``.

Importing the package registers the ``moe_transformer*`` architectures and the
``moe_label_smoothed_cross_entropy`` criterion, makes fairseq checkpoints load on
torch >= 2.6 through an allowlist, keeps fairseq from dropping the last batch of an
epoch, lets ``--ddp-backend c10d`` run on CPU processes (all in ``fairseq_fixes``),
teaches fairseq's
trainer to save and load experts sharded over ranks (see ``expert_parallel``), lets
``--bf16`` train on GPUs instead of fairseq's TPU path (``fairseq_fixes``), and
prints MoE configuration errors as one line.
"""

import sys

from . import expert_parallel, fairseq_fixes
from .options import MoEConfigError

fairseq_fixes.install_all()
expert_parallel.install()

from . import criterions, models  # noqa: E402,F401  (registration side effects)


def _one_line_config_errors(previous_hook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, MoEConfigError):
            print(f"moe_fairseq: error: {exc}", file=sys.stderr)
            return
        previous_hook(exc_type, exc, tb)

    hook._moe_fairseq = True
    return hook


if not getattr(sys.excepthook, "_moe_fairseq", False):
    sys.excepthook = _one_line_config_errors(sys.excepthook)

__version__ = "0.1.0"
