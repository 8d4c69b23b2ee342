"""moe_fairseq: sparse Mixture-of-Experts for fairseq, loaded with ``--user-dir``.

Importing the package registers the ``moe_transformer*`` architectures and the
``moe_label_smoothed_cross_entropy`` criterion, makes fairseq checkpoints load on
torch >= 2.6 through an allowlist, keeps fairseq from dropping the last batch of an
epoch, lets ``--ddp-backend c10d`` run on CPU processes (all in ``fairseq_fixes``),
teaches fairseq's
trainer to save and load experts sharded over ranks (see ``expert_parallel``), lets
``--bf16`` train on GPUs instead of fairseq's TPU path (``fairseq_fixes``), and
prints bad flags and unreadable checkpoints as one line (``errors``), and adds expert-load
histograms and I(expert; target language) to fairseq's TensorBoard logging
(``analysis/tensorboard_routing``).
"""

from . import errors, fairseq_fixes
from .parallel import expert_parallel
from .analysis import tensorboard_routing

fairseq_fixes.install_all()
expert_parallel.install()
errors.install_excepthook()
tensorboard_routing.install()

from . import criterions, models  # noqa: E402,F401  (registration side effects)

__version__ = "0.1.0"
