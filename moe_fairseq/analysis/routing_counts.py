"""What a model's routers did on a data split: counts per MoE layer and translation
direction, and the numbers of the routing report derived from them.

:class:`RoutingCounts` adds up, batch by batch, the :class:`~moe_fairseq.layer.moe_layer.MoEStats`
of every MoE layer (with ``record_first_expert`` set) under the batch's direction
(``src-tgt``). Everything the report shows is computed from these integer counts and
float sums by :meth:`RoutingCounts.summary`, so the report's numbers can be checked
against the layers' own counts:

- expert load: token-expert assignments per expert (all passes, before capacity
  dropping, as ``MoEStats.expert_load``), its share, coefficient of variation and the
  starved experts (< 10% of the fair share ``1/E``, MoEC's "sparse data allocation");
- ``[E, L]`` counts of (first-choice expert at the first pass, language), by target
  and by source language, rows normalised for the heat maps (``p(expert | language)``);
- I(expert; language) in bits and the specialization metrics of Krishnamurthy et al.
  (``analysis/specialization.py``): per-token gate entropy ``H_s`` and expert-usage
  entropy ``H_u`` of the first pass's router probabilities;
- SMoE (multi-pass routers): share of tokens reaching each stratum, requested capacity
  (expert passes per token) overall and per language;
- MoEC (clustered routers): load share per cluster and the spread (CV) of load
  within each cluster;
- CMR layers (``--moe-cmr``): the gate share, the mean CMR gate g over the layer's
  tokens (how much of their FFN output the MoE gives), overall and per language.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .specialization import (
    conditional_entropies_bits,
    marginal_entropies_bits,
    max_bits,
    mutual_information_bits,
    sample_entropy_bits,
    usage_entropy_bits,
)

STARVED_SHARE = 0.1  # of the fair share: as MoEStats.starved_fraction


@dataclass
class LayerInfo:
    """One MoE layer of a model: ``name`` (module path), ``num_experts``,
    ``router`` (class name), ``num_passes``, ``strata`` (experts per stratum, SMoE)
    and ``clusters`` (MoEC's expert clusters, 1 = none)."""

    name: str
    num_experts: int
    router: str
    num_passes: int = 1
    strata: Optional[List[int]] = None
    clusters: int = 1

    @classmethod
    def of(cls, name: str, layer) -> "LayerInfo":
        router = layer.router
        strata = getattr(router, "strata", None)
        return cls(name=name, num_experts=layer.num_experts, router=type(router).__name__,
                   num_passes=router.num_passes, strata=list(strata) if strata else None,
                   clusters=int(getattr(router, "clusters", 1) or 1))

    @property
    def short_name(self) -> str:
        """``encoder.layers.1.moe`` -> ``encoder.layers.1``."""
        return self.name[: -len(".moe")] if self.name.endswith(".moe") else self.name


class _LayerCounts:
    def __init__(self, info: LayerInfo, directions: int):
        E, D, P = info.num_experts, directions, info.num_passes
        self.info = info
        self.load = torch.zeros(E, D, dtype=torch.long)  # assignments, all passes
        self.first = torch.zeros(E, D, dtype=torch.long)  # first choices, first pass
        self.probs_sum = torch.zeros(E, D, dtype=torch.float64)
        self.gate_entropy_sum = torch.zeros(D, dtype=torch.float64)  # bits
        self.prob_tokens = torch.zeros(D, dtype=torch.long)  # tokens with probabilities
        self.tokens = torch.zeros(D, dtype=torch.long)
        self.passes = torch.zeros(D, dtype=torch.long)
        self.pass_tokens = torch.zeros(P, D, dtype=torch.long)
        self.cmr_gate = torch.zeros(D, dtype=torch.float64)  # sum of CMR gates
        self.cmr_tokens = torch.zeros(D, dtype=torch.long)


class RoutingCounts:
    """Routing counts of one model, per MoE layer and direction.

    Args:
        layers: the model's MoE layers, in module order.
        directions: ``src-tgt`` names; batches are added under one of them.
    """

    def __init__(self, layers: Sequence[LayerInfo], directions: Sequence[str]):
        if not layers:
            raise ValueError("a routing report needs at least one MoE layer")
        for d in directions:
            if d.count("-") != 1:
                raise ValueError(f"direction {d!r} is not of the form src-tgt")
        self.directions = list(directions)
        self.layers = [_LayerCounts(info, len(self.directions)) for info in layers]

    def add(self, layer_index: int, direction: str, stats) -> None:
        """Add one forward's :class:`MoEStats` of layer ``layer_index`` (recorded with
        ``record_first_expert``) to ``direction``."""
        c = self.layers[layer_index]
        d = self.directions.index(direction)
        E = c.info.num_experts
        if stats.first_expert is None:
            raise ValueError(f"{c.info.name}: stats without first_expert "
                             "(set the layer's record_first_expert before the forward)")
        c.load[:, d] += stats.expert_load.detach().cpu()
        c.tokens[d] += int(stats.tokens)
        c.passes[d] += int(stats.expert_passes)
        c.pass_tokens[:, d] += stats.pass_tokens.detach().cpu()
        if stats.cmr_gate_sum is not None:
            c.cmr_gate[d] += float(stats.cmr_gate_sum.detach())
            c.cmr_tokens[d] += int(stats.cmr_tokens)
        first = stats.first_expert.reshape(-1).cpu()
        routed = first >= 0
        c.first[:, d] += torch.bincount(first[routed], minlength=E)
        if stats.first_probs is not None:
            probs = stats.first_probs.reshape(-1, E).cpu()[routed].double()
            c.probs_sum[:, d] += probs.sum(0)
            c.gate_entropy_sum[d] += sample_entropy_bits(probs) * probs.size(0)
            c.prob_tokens[d] += probs.size(0)

    # ------------------------------------------------------------------ derived

    def languages(self, side: str) -> List[str]:
        """Target (``side="target"``) or source languages, in first-seen order."""
        i = 1 if side == "target" else 0
        out: List[str] = []
        for d in self.directions:
            lang = d.split("-")[i]
            if lang not in out:
                out.append(lang)
        return out

    def by_language(self, per_direction: Tensor, side: str) -> Tensor:
        """``[..., D]`` per-direction values summed into ``[..., L]`` per language."""
        langs = self.languages(side)
        i = 1 if side == "target" else 0
        out = per_direction.new_zeros(*per_direction.shape[:-1], len(langs))
        for d, name in enumerate(self.directions):
            out[..., langs.index(name.split("-")[i])] += per_direction[..., d]
        return out

    def ratio_by_language(self, numerator: Tensor, denominator: Tensor, side: str) -> dict:
        """``{lang: sum numerator / sum denominator}`` over each language's directions
        (``[D]`` per-direction values; languages with no denominator left out)."""
        num, den = self.by_language(numerator, side), self.by_language(denominator, side)
        return {lang: float(n) / int(d) for lang, n, d in
                zip(self.languages(side), num.tolist(), den.tolist()) if d > 0}

    def summary(self) -> dict:
        """Every number of the report, JSON-ready (see the module docstring)."""
        return {"directions": self.directions,
                "direction_tokens": {d: int(t) for d, t in
                                     zip(self.directions, self.layers[0].tokens.tolist())},
                "layers": [self._layer_summary(c) for c in self.layers]}

    def _layer_summary(self, c: _LayerCounts) -> dict:
        info = c.info
        E = info.num_experts
        load = c.load.sum(1)
        out = dict(name=info.short_name, router=info.router, num_experts=E,
                   tokens=int(c.tokens.sum()), **describe_load(load))
        out["first_choice"] = c.first.sum(1).tolist()
        for side in ("target", "source"):
            out[f"{side}_language"] = language_summary(
                self.by_language(c.first, side), self.languages(side))
        out["direction_mi_bits"] = mutual_information_bits(c.first)
        n = int(c.prob_tokens.sum())
        if n > 0:
            out["gate_entropy_bits"] = float(c.gate_entropy_sum.sum()) / n
            out["usage_entropy_bits"] = usage_entropy_bits((c.probs_sum.sum(1) / n)[None])
        else:
            out["gate_entropy_bits"] = out["usage_entropy_bits"] = None
        out["max_entropy_bits"] = max_bits(E)
        if info.num_passes > 1:
            out["strata"] = strata_summary(c, self)
        if info.clusters > 1:
            out["clusters"] = cluster_summary(load, info.clusters)
        if int(c.cmr_tokens.sum()) > 0:
            out["cmr"] = cmr_gate_summary(c, self)
        return out


def describe_load(load: Tensor) -> dict:
    """``load [E]`` assignments -> ``load``, ``load_share``, ``fair_share``, ``load_cv``
    (population std / mean) and ``starved`` (experts below 10% of the fair share)."""
    t = load.double()
    total = float(t.sum())
    E = t.numel()
    mean = total / E if E else 0.0
    share = (t / total).tolist() if total > 0 else [0.0] * E
    cv = float(t.std(unbiased=False) / mean) if mean > 0 else 0.0
    starved = [e for e in range(E) if total > 0 and float(t[e]) < STARVED_SHARE * mean]
    return dict(load=load.tolist(), load_share=share, fair_share=1.0 / E if E else 0.0,
                load_cv=cv, starved=starved)


def language_summary(counts: Tensor, names: List[str]) -> dict:
    """``counts [E, L]`` of (first-choice expert, language) -> the heat map (``share``,
    ``[L][E]``: each language's tokens over the experts) and I(expert; language)."""
    col = counts.sum(0)
    share = (counts.double() / col.clamp_min(1)[None, :]).t().tolist()
    h_expert, h_lang = marginal_entropies_bits(counts)
    mi = mutual_information_bits(counts)
    present = col > 0
    per_lang = conditional_entropies_bits(counts)
    return dict(languages=names, counts=counts.tolist(), share=share,
                tokens=col.tolist(), mi_bits=mi, h_language_bits=h_lang,
                mi_share=mi / h_lang if h_lang > 0 else 0.0, h_expert_bits=h_expert,
                expert_entropy_bits_by_language={
                    names[i]: float(per_lang[i]) for i in range(len(names)) if present[i]},
                top_expert={names[i]: int(counts[:, i].argmax()) for i in range(len(names))
                            if present[i]})


def strata_summary(c: _LayerCounts, counts: RoutingCounts) -> dict:
    """SMoE: tokens reaching each stratum (share of the layer's tokens) and requested
    capacity (passes per token) overall and per target / source language."""
    tokens = c.tokens.sum()
    out = dict(sizes=c.info.strata,
               share_reaching=(c.pass_tokens.sum(1).double() / tokens.clamp_min(1)).tolist(),
               requested_capacity=float(c.passes.sum()) / max(int(tokens), 1))
    for side in ("target", "source"):
        out[f"requested_capacity_by_{side}_language"] = counts.ratio_by_language(
            c.passes, c.tokens, side)
    return out


def cmr_gate_summary(c: _LayerCounts, counts: RoutingCounts) -> dict:
    """CMR: the mean gate g (the MoE layer's share of the FFN output) over the layer's
    tokens, overall and per target / source language."""
    out = dict(gate_share=float(c.cmr_gate.sum()) / max(int(c.cmr_tokens.sum()), 1))
    for side in ("target", "source"):
        out[f"gate_share_by_{side}_language"] = counts.ratio_by_language(
            c.cmr_gate, c.cmr_tokens, side)
    return out


def cluster_summary(load: Tensor, clusters: int) -> dict:
    """MoEC: ``load [E]`` over contiguous clusters -> load share per cluster and the
    CV of the load inside each cluster (0 = its experts share it evenly)."""
    per = load.double().view(clusters, -1)
    total = float(per.sum())
    means = per.mean(1)
    cv = torch.where(means > 0, per.std(1, unbiased=False) / means.clamp_min(1e-12),
                     torch.zeros_like(means))
    return dict(count=clusters, cluster_size=per.size(1),
                load_share=(per.sum(1) / total).tolist() if total > 0 else [0.0] * clusters,
                within_cluster_cv=cv.tolist())


def merge_summaries(summaries: Dict[str, dict]) -> List[str]:
    """Layer names of several models' summaries, in first-seen order (for side by side)."""
    names: List[str] = []
    for s in summaries.values():
        for layer in s["layers"]:
            if layer["name"] not in names:
                names.append(layer["name"])
    return names
