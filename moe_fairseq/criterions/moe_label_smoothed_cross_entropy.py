"""``moe_label_smoothed_cross_entropy``: label-smoothed CE plus the MoE routing losses.

loss = CE_ls + sample_size * (gate_wt * combine_layers gate_loss + z_wt * combine_layers z_loss
                             + similarity_wt * combine_layers similarity_loss)

A layer's gate loss is the sum of its router's losses other than ``z`` (the
balance loss for the linear router; methods such as MoEC add terms of their own,
e.g. ``moec_var``). The sample-similarity loss of Krishnamurthy et al. is asked of
every MoE layer only when ``--moe-similarity-loss-wt`` > 0 (it costs an ``[S, S]``
pair matrix per layer, S = ``--moe-similarity-sample-tokens``; see
``similarity_loss.py``) and works with any router.
``--moe-gate-loss-combine-method`` (fairseq MoE branch spelling) combines the
layers' gate losses, and likewise their z- and similarity losses: ``average``
(the default, as fairseq's MoE criterion: the mean over the MoE layers that ran
in this forward) or ``sum``. The default is ``None`` on the
command line, meaning ``average``, so that an architecture preset can choose
(the MoEC presets use ``sum``, the MoEC authors' recipe). The routing losses are
batch means, so they are scaled by ``sample_size`` to keep their weight
independent of how fairseq normalizes the summed CE.

Logged (all logging outputs can be summed; losses are per-batch values, shown
as their mean over batches):
``moe_gate_loss`` (exactly what ``--moe-gate-loss-wt`` multiplies),
``moe_similarity_loss`` (exactly what ``--moe-similarity-loss-wt`` multiplies),
``moe_z_loss`` (exactly what ``--moe-router-z-loss-wt`` multiplies), one key per
method-specific routing loss (``moec_var`` -> ``moec_var_loss``; any loss named
``moec_*``/``smoe_*`` -> ``<name>_loss``), combined over layers the same way and
included in ``moe_gate_loss`` (so ``moe_gate_loss - moec_var_loss`` is the
balance part), ``moe_overflow`` (dropped / requested token-expert assignments),
``moe_load_cv`` (mean over layers of the coefficient of variation of expert
load), ``moe_starved_experts`` (mean over layers of the share of experts given
less than 10% of their fair share: MoEC's "sparse data allocation"),
``moe_route_entropy`` (mean per-token routing entropy, nats), ``moe_collapsed`` (share
of MoE layer-batches whose router is sure (entropy < 10% of log E) and sends >= 90% of
the tokens first to one expert; a warning is logged when its moving average over
updates reaches 0.5, see ``MoEStats.collapsed``).

With CMR layers (``--moe-cmr``): ``cmr_gate_loss`` (the budget term
``|share - --cmr-gate-loss-p|`` that ``--cmr-gate-loss-wt`` multiplies, as fairseq names
it), ``cmr_gate_share`` (mean CMR gate over the CMR layers' non-padding tokens: the MoE
share of their FFN output) and, with target-language tokens, ``cmr_gate_share_<lang>``
(``layer/cmr_share.py``).

Multi-pass routers (SMoE) also log their dynamic capacity, over their layers:
``smoe_requested_capacity`` (mean expert passes per token, 1..L),
``smoe_stratum<i>_share`` (share of tokens that reach stratum i; the shares sum
to the requested capacity) and, when the batch carries target-language tokens
(``translation_multi_simple_epoch`` with ``--decoder-langtok`` or
``--encoder-langtok tgt``), ``smoe_rc_<lang>``: the requested capacity of the
sentences translated into ``<lang>`` (encoder and decoder tokens together).
"""

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional


import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from omegaconf import II

from ..analysis import tensorboard_routing

from ..layer.moe_layer import COLLAPSE_SHARE, MoELayer, MoEStats
from ..options import MoEConfigError
from ..layer.similarity_loss import SimilarityLoss
from ..layer.requested_capacity import capacity_counts, capacity_summary, is_count_key
from ..layer.cmr_share import cmr_counts, cmr_layers, cmr_summary, is_cmr_count_key

logger = logging.getLogger(__name__)


@dataclass
class MoERoutingLossConfig(FairseqDataclass):
    """The routing-loss flags every MoE criterion takes."""

    moe_gate_loss_wt: float = field(
        default=0.01,
        metadata={"help": "weight of the gate loss (load balancing plus method-specific "
                          "routing losses), combined over MoE layers by "
                          "--moe-gate-loss-combine-method"},
    )
    moe_gate_loss_combine_method: Optional[str] = field(
        default=None,
        metadata={"help": "how the MoE layers' gate losses and z-losses are combined: "
                          "average (mean over the layers that ran) or sum "
                          "(default average, as fairseq's MoE criterion; moec presets: sum)"},
    )
    moe_router_z_loss_wt: float = field(
        default=0.0,
        metadata={"help": "weight of the router z-loss (ST-MoE), combined over MoE layers "
                          "by --moe-gate-loss-combine-method"},
    )
    moe_similarity_loss_wt: float = field(
        default=0.0,
        metadata={"help": "weight of the sample-similarity loss L_s (Krishnamurthy et al. "
                          "2023), computed in every MoE layer on a bounded token sample; "
                          "0 = off (not computed)"},
    )
    moe_similarity_beta_s: float = field(
        default=1e-7,
        metadata={"help": "L_s weight of the same-expert term (default 1e-7, the authors' "
                          "choice for the softmax gate)"},
    )
    moe_similarity_beta_d: float = field(
        default=1e-2,
        metadata={"help": "L_s weight of the different-expert term (default 1e-2, the "
                          "authors' choice for the softmax gate)"},
    )
    moe_similarity_sample_tokens: int = field(
        default=256,
        metadata={"help": "tokens per MoE layer and batch that L_s is computed on (an even "
                          "stride over the batch); its cost grows with the square of this"},
    )
    moe_log_per_layer: bool = field(
        default=False,
        metadata={"help": "also log each MoE layer's load CV and starved-expert share "
                          "(moe_l<i>_load_cv, moe_l<i>_starved; i counts MoE layers in "
                          "module order, encoder first)"},
    )
    cmr_gate_loss_wt: float = field(
        default=0.0,
        metadata={"help": "--moe-cmr: weight of the CMR budget term |(sum of the CMR gates "
                          "over the CMR layers' non-padding tokens) / (their count) - "
                          "--cmr-gate-loss-p| (fairseq's NLLB criterion; NLLB sweeps: 0.1); "
                          "0 = off"},
    )
    cmr_gate_loss_p: float = field(
        default=1.0,
        metadata={"help": "--moe-cmr: the share of the FFN output the budget term steers the "
                          "MoE layers to (fairseq's default 1.0; NLLB sweeps: 0.8)"},
    )
    # With --tensorboard-logdir the criterion also collects the routing views
    # (expert-load histograms, I(expert; target language)); see analysis/tensorboard_routing.py.
    tensorboard_logdir: Optional[str] = II("common.tensorboard_logdir")


@dataclass
class MoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig,
                                         MoERoutingLossConfig):
    pass


COMBINE_METHODS = ("average", "sum")
DEFAULT_COMBINE_METHOD = "average"  # fairseq's MoE criterion

# Method-specific losses carry their method's flag prefix and are logged on their
# own (moec_var -> moec_var_loss); the common ones are only logged inside
# moe_gate_loss (balance) or as moe_z_loss (z).
METHOD_PREFIXES = ("moec_", "smoe_")
LOSS_LOG_PREFIXES = ("moe_",) + METHOD_PREFIXES
# Losses weighed by flags of their own, not by --moe-gate-loss-wt.
SEPARATE_LOSSES = ("z", "similarity")


def is_gate_loss(name: str) -> bool:
    return name not in SEPARATE_LOSSES


def loss_log_key(name: str) -> Optional[str]:
    """Logged key of a method-specific routing loss; None for the common ones."""
    return f"{name}_loss" if name.startswith(METHOD_PREFIXES) else None


def resolve_combine_method(method: Optional[str]) -> str:
    """``--moe-gate-loss-combine-method``: None means average; anything else is refused."""
    if method is None:
        return DEFAULT_COMBINE_METHOD
    if method not in COMBINE_METHODS:
        raise MoEConfigError(
            f"--moe-gate-loss-combine-method must be one of {list(COMBINE_METHODS)}, "
            f"got {method!r}"
        )
    return method


def combine_layer_losses(stats: List[MoEStats], names, method: str):
    """Sum over layers of the losses whose name passes ``names`` (a predicate),
    divided by the number of layers (all of ``stats``) for ``average``.
    A tensor when some layer has such a loss, else 0.0."""
    total = 0.0
    for s in stats:
        for name, value in s.losses.items():
            if names(name):
                total = total + value
    if method == "average" and stats:
        total = total / len(stats)
    return total


def similarity_loss_from_flags(wt, beta_s, beta_d, sample_tokens):
    """(weight, :class:`SimilarityLoss` or None when the weight is 0); bad values
    are refused with the flag's name."""
    for flag, value in (("--moe-similarity-loss-wt", wt), ("--moe-similarity-beta-s", beta_s),
                        ("--moe-similarity-beta-d", beta_d)):
        if not (value >= 0 and math.isfinite(value)):
            raise MoEConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 2:
        raise MoEConfigError(
            f"--moe-similarity-sample-tokens must be an integer >= 2, got {sample_tokens}")
    if wt == 0:
        return 0.0, None
    return wt, SimilarityLoss(beta_s, beta_d, sample_tokens)


def moe_layer_stats(model) -> List[MoEStats]:
    """Stats of every MoE layer's last forward, in module order."""
    return [m.stats for m in model.modules() if isinstance(m, MoELayer) and m.stats is not None]


@register_criterion("moe_label_smoothed_cross_entropy", dataclass=MoELabelSmoothedCrossEntropyConfig)
class MoELabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    # Read by criterions/guard.py: this criterion adds the routing losses.
    collects_moe_losses = True

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0,
                 report_accuracy=False, moe_gate_loss_wt=0.01, moe_router_z_loss_wt=0.0,
                 moe_log_per_layer=False, moe_gate_loss_combine_method=None,
                 moe_similarity_loss_wt=0.0, moe_similarity_beta_s=1e-7,
                 moe_similarity_beta_d=1e-2, moe_similarity_sample_tokens=256,
                 cmr_gate_loss_wt=0.0, cmr_gate_loss_p=1.0, tensorboard_logdir=None):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.combine_method = resolve_combine_method(moe_gate_loss_combine_method)
        for flag, value in (("--moe-gate-loss-wt", moe_gate_loss_wt),
                            ("--moe-router-z-loss-wt", moe_router_z_loss_wt)):
            if not (value >= 0 and math.isfinite(value)):  # nan fails both
                raise MoEConfigError(f"{flag} must be a finite number >= 0, got {value}")
        self.gate_loss_wt = moe_gate_loss_wt
        self.z_loss_wt = moe_router_z_loss_wt
        self.similarity_wt, self.similarity = similarity_loss_from_flags(
            moe_similarity_loss_wt, moe_similarity_beta_s, moe_similarity_beta_d,
            moe_similarity_sample_tokens)
        if not (cmr_gate_loss_wt >= 0 and math.isfinite(cmr_gate_loss_wt)):
            raise MoEConfigError(f"--cmr-gate-loss-wt must be a finite number >= 0, "
                                 f"got {cmr_gate_loss_wt}")
        if not 0 <= cmr_gate_loss_p <= 1:
            raise MoEConfigError(f"--cmr-gate-loss-p must be in [0, 1], got {cmr_gate_loss_p}")
        self.cmr_wt = cmr_gate_loss_wt
        self.cmr_p = cmr_gate_loss_p
        self.log_per_layer = moe_log_per_layer
        self.tensorboard_routing = bool(tensorboard_logdir)

    def forward(self, model, sample, reduce=True):
        # The TensorBoard routing views need each token's first expert (training only).
        tb_views = self.tensorboard_routing and model.training
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        for _, m in layers:
            m.stats = None  # only this forward's layers count
            m.similarity = self.similarity
            if tb_views:
                m.record_first_expert = True
        net_output = model(**sample["net_input"])
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]

        stats = moe_layer_stats(model)
        moe_logs = self.moe_logging_output(stats, self.combine_method)
        moe_logs.update(capacity_counts(stats, self.task, sample))
        moe_logs.update(cmr_counts(stats, self.task, sample))
        if tb_views:
            moe_logs.update(tensorboard_routing.routing_logging_output(layers, self.task, sample))
        if self.log_per_layer:
            for i, s in enumerate(stats):
                moe_logs[f"moe_l{i}_load_cv"] = float(s.load_cv)
                moe_logs[f"moe_l{i}_starved"] = float(s.starved_fraction)
        if stats:
            gate = combine_layer_losses(stats, is_gate_loss, self.combine_method)
            z = combine_layer_losses(stats, lambda k: k == "z", self.combine_method)
            loss = loss + sample_size * (self.gate_loss_wt * gate + self.z_loss_wt * z)
            if self.similarity is not None:
                sim = combine_layer_losses(stats, lambda k: k == "similarity", self.combine_method)
                loss = loss + sample_size * self.similarity_wt * sim
            cmr = self.cmr_budget_loss(stats)
            if cmr is not None:
                moe_logs["cmr_loss"] = float(cmr.detach())
                moe_logs["cmr_batches"] = 1
                if self.cmr_wt > 0:
                    loss = loss + sample_size * self.cmr_wt * cmr

        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            **moe_logs,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def cmr_budget_loss(self, stats: List[MoEStats]):
        """fairseq's CMR budget term over every CMR layer of the forward:
        ``|sum g / max(non-padding tokens, 1e-5) - p|`` (differentiable); None without
        CMR layers (a weight > 0 then is a configuration error)."""
        layers = cmr_layers(stats)
        if not layers:
            if self.cmr_wt > 0:
                raise MoEConfigError(f"--cmr-gate-loss-wt {self.cmr_wt} needs a model with "
                                     "--moe-cmr (it weighs the CMR gates' budget term)")
            return None
        # At least fp32, as fairseq sums them (fp16 would overflow; fp64 stays fp64).
        used = sum(s.cmr_gate_sum.to(torch.promote_types(s.cmr_gate_sum.dtype, torch.float32))
                   for s in layers)
        total = sum(s.cmr_tokens.to(used.dtype) for s in layers)
        return (used / total.clamp_min(1e-5) - self.cmr_p).abs()

    @staticmethod
    def moe_logging_output(stats: List[MoEStats],
                           combine_method: str = DEFAULT_COMBINE_METHOD) -> Dict[str, float]:
        """Summable per-batch MoE numbers; empty for a model without MoE layers.
        Each loss is combined over layers with ``combine_method``, as in the loss."""
        if not stats:
            return {}
        combine_method = resolve_combine_method(combine_method)

        def combined(names) -> float:
            value = combine_layer_losses(stats, names, combine_method)
            return float(value.detach()) if hasattr(value, "detach") else float(value)

        out: Dict[str, float] = {"moe_batches": 1, "moe_layers": len(stats)}
        names = sorted({k for s in stats for k in s.losses})
        out["moe_gate_loss"] = combined(is_gate_loss)
        if "z" in names:
            out["moe_z_loss"] = combined(lambda k: k == "z")
        if "similarity" in names:
            out["moe_similarity_loss"] = combined(lambda k: k == "similarity")
        for name in names:
            key = loss_log_key(name)
            if key is not None:
                out[key] = combined(lambda k, name=name: k == name)
        out["moe_assignments"] = sum(int(s.assignments) for s in stats)
        out["moe_dropped"] = sum(int(s.dropped) for s in stats)
        out["moe_load_cv_sum"] = sum(float(s.load_cv) for s in stats)
        out["moe_starved_sum"] = sum(float(s.starved_fraction) for s in stats)
        out["moe_entropy_sum"] = sum(float(s.entropy_sum) for s in stats)
        out["moe_entropy_count"] = sum(int(s.entropy_count) for s in stats)
        out["moe_collapsed_layers"] = sum(int(s.collapsed) for s in stats)
        return out

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        tensorboard_routing.accumulate(logging_outputs)

        def total(key):
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        batches = total("moe_batches")
        if batches == 0:
            return
        loss_keys = sorted({k for log in logging_outputs for k in log
                            if k.startswith(LOSS_LOG_PREFIXES) and k.endswith("_loss")})
        for key in loss_keys:
            metrics.log_scalar(key, total(key) / batches, batches, round=4)
        assignments = total("moe_assignments")
        if assignments > 0:
            metrics.log_scalar("moe_overflow", total("moe_dropped") / assignments, assignments, round=4)
        layer_batches = total("moe_layers")
        metrics.log_scalar("moe_load_cv", total("moe_load_cv_sum") / max(layer_batches, 1),
                           layer_batches, round=3)
        metrics.log_scalar("moe_starved_experts", total("moe_starved_sum") / max(layer_batches, 1),
                           layer_batches, round=3)
        per_layer = sorted({k for log in logging_outputs for k in log
                            if re.match(r"moe_l\d+_(load_cv|starved)$", k)})
        for key in per_layer:
            metrics.log_scalar(key, total(key) / batches, batches, round=3)
        count = total("moe_entropy_count")
        if count > 0:
            metrics.log_scalar("moe_route_entropy", total("moe_entropy_sum") / count, count, round=3)
        if layer_batches > 0:
            collapsed = total("moe_collapsed_layers") / layer_batches
            metrics.log_scalar("moe_collapsed", collapsed, layer_batches, round=3)
            cls.warn_on_collapse(collapsed, total("moe_entropy_sum") / max(count, 1))
        cls.reduce_requested_capacity(logging_outputs, total)
        cls.reduce_cmr(logging_outputs, total)

    # reduce_metrics runs once per update: the warning follows a moving average of the
    # collapsed share, with hysteresis, so that it fires once per episode, not per update.
    _collapse_average = 0.0
    _collapse_reported = False

    @classmethod
    def warn_on_collapse(cls, collapsed: float, route_entropy: float) -> None:
        """A warning when the moving average (over ~10 updates) of the collapsed share
        of MoE layer-batches reaches 0.5; an info line when it falls below 0.25."""
        base = MoELabelSmoothedCrossEntropyCriterion  # one state for every subclass
        base._collapse_average = 0.9 * base._collapse_average + 0.1 * collapsed
        if base._collapse_average >= 0.5 and not base._collapse_reported:
            logger.warning(
                "routing collapse: in %.0f%% of recent MoE layer-batches the router sends >= "
                "%.0f%% of the tokens first to one expert (moe_route_entropy %.3f nats); raise "
                "--moe-gate-loss-wt, lower --lr, or add --moe-router-z-loss-wt",
                100 * base._collapse_average, 100 * COLLAPSE_SHARE, route_entropy)
            base._collapse_reported = True
        elif base._collapse_average < 0.25 and base._collapse_reported:
            logger.info("routing collapse over: %.0f%% of recent MoE layer-batches collapsed",
                        100 * base._collapse_average)
            base._collapse_reported = False

    @staticmethod
    def reduce_requested_capacity(logging_outputs, total) -> None:
        keys = {k for log in logging_outputs for k in log if is_count_key(k)}
        summary = capacity_summary({k: total(k) for k in keys})
        if summary is None:
            return
        metrics.log_scalar("smoe_requested_capacity", summary["requested_capacity"],
                           summary["tokens"], round=3)
        for i, share in enumerate(summary["stratum_share"]):
            metrics.log_scalar(f"smoe_stratum{i}_share", share, summary["tokens"], round=3)
        for lang, rc in summary["by_target_language"].items():
            metrics.log_scalar(f"smoe_rc_{lang}", rc, summary["language_tokens"][lang], round=3)

    @staticmethod
    def reduce_cmr(logging_outputs, total) -> None:
        cmr_batches = total("cmr_batches")
        if cmr_batches:
            metrics.log_scalar("cmr_gate_loss", total("cmr_loss") / cmr_batches, cmr_batches,
                               round=4)
        keys = {k for log in logging_outputs for k in log if is_cmr_count_key(k)}
        summary = cmr_summary({k: total(k) for k in keys})
        if summary is None:
            return
        metrics.log_scalar("cmr_gate_share", summary["gate_share"], summary["tokens"], round=3)
        for lang, share in summary["by_target_language"].items():
            metrics.log_scalar(f"cmr_gate_share_{lang}", share,
                               summary["language_tokens"][lang], round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
