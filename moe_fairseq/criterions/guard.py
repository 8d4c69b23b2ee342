"""An MoE model must be trained by a criterion that adds its routing losses.

Copying a fairseq recipe keeps ``--criterion label_smoothed_cross_entropy``; with an
MoE architecture that trains without load balancing and without a word, and the
router collapses onto few experts. Training stops at start-up instead, naming the
criterion to use. (Training without balance on purpose: ``--moe-gate-loss-wt 0``.) A
criterion of one's own that adds the routing losses says so with the class attribute
``collects_moe_losses = True`` (ours inherit it).
"""

from ..layer.moe_layer import MoELayer
from ..options import MoEConfigError

MOE_CRITERIA = ("moe_label_smoothed_cross_entropy", "moe_cross_entropy")


def require_moe_criterion(model, criterion, criterion_name: str) -> None:
    if getattr(criterion, "collects_moe_losses", False):
        return
    if not any(isinstance(m, MoELayer) for m in model.modules()):
        return
    smoothing = "label_smoothed" in (criterion_name or "")
    use = MOE_CRITERIA[0] if smoothing else MOE_CRITERIA[1]
    raise MoEConfigError(
        f"--criterion {criterion_name} ignores the MoE routing losses (no load balancing) "
        f"of this MoE model; use --criterion {use} (the MoE criteria: {', '.join(MOE_CRITERIA)}; "
        "--moe-gate-loss-wt 0 trains without balancing on purpose)"
    )


def install() -> None:
    """Check when fairseq's trainer is built (model and criterion both exist). Idempotent."""
    from fairseq.trainer import Trainer

    if getattr(Trainer.__init__, "_moe_fairseq_guard", False):
        return
    original_init = Trainer.__init__

    def __init__(self, cfg, task, model, criterion, *args, **kwargs):
        name = getattr(getattr(cfg, "criterion", None), "_name", None) or type(criterion).__name__
        require_moe_criterion(model, criterion, name)
        original_init(self, cfg, task, model, criterion, *args, **kwargs)

    __init__._moe_fairseq_guard = True
    Trainer.__init__ = __init__
