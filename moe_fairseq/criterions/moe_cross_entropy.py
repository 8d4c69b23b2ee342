"""``moe_cross_entropy``: cross-entropy plus the MoE routing losses, no label smoothing.

The name of fairseq's MoE-branch criterion, for recipes that train without label
smoothing. It is ``moe_label_smoothed_cross_entropy`` with epsilon 0 (the smoothed
loss then equals the NLL exactly), so it logs and weighs the routing losses the same
way and takes the same ``--moe-*`` flags.
"""

from dataclasses import dataclass, field, fields

from fairseq.criterions import register_criterion
from omegaconf import II

from .moe_label_smoothed_cross_entropy import (
    MoELabelSmoothedCrossEntropyCriterion,
    MoERoutingLossConfig,
)


@dataclass
class MoECrossEntropyConfig(MoERoutingLossConfig):
    sentence_avg: bool = II("optimization.sentence_avg")
    report_accuracy: bool = field(default=False, metadata={"help": "report accuracy metric"})
    ignore_prefix_size: int = field(default=0, metadata={"help": "Ignore first N tokens"})


@register_criterion("moe_cross_entropy", dataclass=MoECrossEntropyConfig)
class MoECrossEntropyCriterion(MoELabelSmoothedCrossEntropyCriterion):
    @classmethod
    def build_criterion(cls, cfg, task):
        flags = {f.name: getattr(cfg, f.name) for f in fields(MoECrossEntropyConfig)
                 if not f.name.startswith("_")}
        return cls(task, label_smoothing=0.0, **flags)
