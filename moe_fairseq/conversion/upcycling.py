"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): an MoE model whose
experts start as copies of a trained dense transformer's FFNs.

Every MoE layer of the new model replaces a dense layer's ``fc1``/``fc2``; all other
weights (embeddings, attention, norms) are copied as they are. The router of each MoE
layer is set up so that, in eval mode and before any training, the MoE model computes
what the dense model computes (``upcycle_router``):

- **linear** (top-k): with top-2 gates normalised to sum to 1 (``--moe-normalize-gates``,
  the default for top-2) a token's output is ``(g1 FFN(x) + g2 FFN(x)) / (g1 + g2) =
  FFN(x)`` whatever the router says, so the router keeps its random initialisation (the
  paper's recipe). Otherwise (top-1, or unnormalised top-2) the router starts at zero:
  every expert gets probability 1/E, a token's gates sum to G = k/E, and the expert
  copies' output layer (``fc2`` weight and bias) is scaled by 1/G.
- **cosine** (MoEC): every expert's routing embedding starts equal to the first one, so
  every expert scores the same and gets probability 1/E; normalised top-2 gates need no
  scaling, otherwise the copies are scaled by 1/G as above. With
  ``--moec-output-mixing`` (the MoEC presets) the layer adds ``(1 - g) x`` with
  ``g = sigmoid(cos / tau)`` strictly between 0 and 1, which no copy of the FFN can
  cancel: the outputs are *not* equal (:func:`exactness_problems` says so).
- **stratified** (SMoE): stratum 0's experts are the copies; later strata's experts keep
  the dense ``fc1`` but start with a zero output layer (they add exactly 0 until they
  learn); the first stratum's gate starts at zero, so ties send a token's top-k to
  experts 0..k-1 (torch's argmax takes the first maximum); the copies are scaled by
  1/G0, G0 the gate mass those picks put on stratum 0. With ``--smoe-stratum-norm
  gate-input`` or ``none`` the layer then returns the dense FFN's output exactly. The
  SMoE presets' ``post-ln`` strata normalise the block's output with LayerNorms of their
  own (initialised from the dense layer's ``final_layer_norm``): equal outputs are not
  possible there, and :func:`exactness_problems` says so.

``noise`` > 0 multiplies every expert weight by ``1 + noise * N(0, 1)`` (seeded) to
break the symmetry between the copies; the outputs then differ from the dense model's
by design.
"""

import re
from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..errors import OneLineError
from ..layer.moe_layer import MoELayer

UPCYCLABLE_ROUTERS = ("TopKRouter", "CosineRouter", "StratifiedRouter")


class UpcyclingError(OneLineError):
    """A dense checkpoint and an MoE configuration that cannot be upcycled."""


def _tie_gate_mass(top_k: int, num_experts: int, normalized: bool, copies: int) -> float:
    """Gate mass a token puts on experts ``0..copies-1`` when its router scores every
    expert the same: the top-k picks are experts 0..k-1, each with gate 1/E (1/k when
    normalised)."""
    per_slot = 1.0 / top_k if normalized else 1.0 / num_experts
    return per_slot * min(top_k, copies)


def upcycle_router(layer: MoELayer) -> Dict[str, object]:
    """Set ``layer.router`` up as the module docstring says; returns the rule:
    ``scale`` (of the copies' output layer), ``copies`` (how many experts, from 0, are
    copies; the rest get a zero output layer) and ``exact`` (None, or why outputs differ)."""
    router = layer.router
    name = type(router).__name__
    if name not in UPCYCLABLE_ROUTERS:
        raise UpcyclingError(f"--moe-router: upcycling supports the linear, cosine and stratified "
                             f"routers, not {name}")
    E = router.num_experts
    with torch.no_grad():
        if name == "StratifiedRouter":
            gate = router.gates[0]
            gate.wg.weight.zero_()
            copies = router.strata[0]
            mass = _tie_gate_mass(gate.top_k, E, bool(gate.normalize_gates), copies)
            exact = None
            if router.stratum_norm == "post-ln":
                exact = ("--smoe-stratum-norm post-ln normalises the block output with LayerNorms "
                         "of its own; use --smoe-stratum-norm gate-input (or none) for outputs "
                         "equal to the dense model's")
            return dict(scale=1.0 / mass, copies=copies, exact=exact, router=name, experts=E,
                        how="first stratum's gate at zero (ties: top-k = experts 0..k-1)")
        normalized = bool(router.normalize_gates) and router.top_k == 2
        if name == "CosineRouter":
            router.wg.weight.copy_(router.wg.weight[:1].expand_as(router.wg.weight))
            mass = 1.0 if normalized else _tie_gate_mass(router.top_k, E, False, E)
            exact = None
            if router.output_mixing:
                exact = ("--moec-output-mixing adds (1 - g) x with 0 < g < 1, which copies of "
                         "the FFN cannot cancel; pass --no-moec-output-mixing for outputs equal "
                         "to the dense model's")
            return dict(scale=1.0 / mass, copies=E, exact=exact, router=name, experts=E,
                        how="every expert's routing embedding = expert 0's (uniform probabilities)")
        if normalized:  # any router: the gates sum to 1
            return dict(scale=1.0, copies=E, exact=None, router=name, experts=E,
                        how="random init kept (normalised top-2 gates sum to 1)")
        router.wg.weight.zero_()
        return dict(scale=1.0 / _tie_gate_mass(router.top_k, E, False, E), copies=E, exact=None,
                    router=name, experts=E, how="zero router (every expert gets 1/E)")


def exactness_problems(model, rules: Dict[str, dict]) -> List[str]:
    """Why the upcycled model's outputs may differ from the dense model's (empty: equal
    in eval mode): the routers' rules and the inference settings of its MoE layers."""
    problems = [r["exact"] for r in rules.values() if r["exact"]]
    for m in model.modules():
        if not isinstance(m, MoELayer):
            continue
        r = m.router
        for g in (r.gates if type(r).__name__ == "StratifiedRouter" else [r]):
            frac = getattr(g, "eval_capacity_token_fraction", 1.0)
            if 0 < frac < 1:
                problems.append(f"--moe-eval-capacity-token-fraction {frac} drops tokens at "
                                "inference; use 1.0")
            if getattr(g, "top_k", 1) == 2 and getattr(g, "eval_second_expert_policy", "all") != "all":
                problems.append("--moe-eval-second-expert-policy must be 'all'")
    return sorted(set(problems))


def describe_rules(rules: Dict[str, dict]) -> List[str]:
    """One line per MoE layer: what its router and experts start as."""
    lines = []
    for name, r in rules.items():
        copies = f"experts 0-{r['copies'] - 1}" if r["copies"] < r["experts"] else "every expert"
        rest = (f", experts {r['copies']}-{r['experts'] - 1} with a zero output layer"
                if r["copies"] < r["experts"] else "")
        lines.append(f"{name.removesuffix('.moe')}: {r['router']}: {r['how']}; {copies} = the "
                     f"dense FFN with its output layer scaled by {r['scale']:g}{rest}")
    return lines


def _dense_key(moe_param: str) -> Optional[tuple]:
    """``encoder.layers.3.moe.experts.w1`` -> (``encoder.layers.3.fc1``, ``w1``)."""
    m = re.fullmatch(r"(.*)\.moe\.experts\.(w1|b1|w2|b2)", moe_param)
    if m is None:
        return None
    fc = "fc1" if m.group(2) in ("w1", "b1") else "fc2"
    return f"{m.group(1)}.{fc}", m.group(2)


def upcycle(moe_model, dense_state: Dict[str, Tensor], noise: float = 0.0,
            seed: int = 1) -> Dict[str, dict]:
    """Load the dense weights into ``moe_model`` (built with the dense model's widths),
    its routers set up by :func:`upcycle_router`. ``dense_state``: the dense checkpoint's
    ``model`` dict. Returns each MoE layer's rule (``upcycle_router``)."""
    rules = {}
    for name, m in moe_model.named_modules():
        if isinstance(m, MoELayer):
            if m.experts.sublayers != 1:
                raise UpcyclingError("--moec-expert-sublayers: upcycling needs one FFN per "
                                     f"expert (the dense layer's), got {m.experts.sublayers}")
            if m.experts.num_shards != 1:
                raise UpcyclingError("upcycling runs in one process (the checkpoint then "
                                     "loads on any number of ranks)")
            rules[name] = upcycle_router(m)
    state = moe_model.state_dict()
    used = set()
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        found = _dense_key(key)
        if found is not None:
            fc, part = found
            layer = key[: key.index(".moe.") + len(".moe")]
            rule = rules[layer]
            w_key, b_key = f"{fc}.weight", f"{fc}.bias"
            for k in (w_key, b_key):
                if k not in dense_state:
                    raise UpcyclingError(f"the dense checkpoint has no {k} for the MoE layer "
                                         f"{layer}: is it a transformer of the same depth?")
            dense = dense_state[w_key].t() if part in ("w1", "w2") else dense_state[b_key]
            if tuple(dense.shape) != tuple(value.shape[1:]):
                raise UpcyclingError(
                    f"{key}: an expert is {tuple(value.shape[1:])}, the dense {fc} gives "
                    f"{tuple(dense.shape)}; the MoE model must keep the dense widths "
                    "(leave --moe-expert-ffn-dim unset)")
            used.update((w_key, b_key))
            copy = dense.to(value.dtype).unsqueeze(0).expand_as(value).clone()
            if part in ("w2", "b2"):
                copy[: rule["copies"]] *= rule["scale"]
                copy[rule["copies"]:] = 0.0  # later SMoE strata: no output until trained
            if noise > 0:
                copy = copy * (1.0 + noise * torch.randn(copy.shape, generator=generator,
                                                         dtype=copy.dtype))
            state[key] = copy
        elif key in dense_state:
            if tuple(dense_state[key].shape) != tuple(value.shape):
                raise UpcyclingError(f"{key}: the dense checkpoint has shape "
                                     f"{tuple(dense_state[key].shape)}, the MoE model "
                                     f"{tuple(value.shape)}: build it with the dense model's "
                                     "dimensions")
            state[key] = dense_state[key].to(value.dtype).clone()
            used.add(key)
        else:
            state[key] = _new_parameter(key, value, dense_state)
    left = sorted(k for k in dense_state if k not in used and not _dropped_dense_key(k, state))
    if left:
        raise UpcyclingError(f"the MoE model has no place for {len(left)} dense weight(s), e.g. "
                             f"{left[0]}: upcycle into an MoE architecture of the same shape")
    moe_model.load_state_dict(state, strict=True)
    return rules


def _new_parameter(key: str, value: Tensor, dense_state: Dict[str, Tensor]) -> Tensor:
    """A weight the dense model does not have: routers keep what upcycle_router set;
    SMoE's post-ln strata norms start as the dense layer's final_layer_norm."""
    m = re.fullmatch(r"(.*)\.moe\.router\.norms\.\d+\.(weight|bias)", key)
    if m is not None:
        dense = dense_state.get(f"{m.group(1)}.final_layer_norm.{m.group(2)}")
        if dense is not None and dense.shape == value.shape:
            return dense.to(value.dtype).clone()
    return value


def _dropped_dense_key(key: str, moe_state: Dict[str, Tensor]) -> bool:
    """Dense weights the MoE model drops on purpose: a post-norm layer whose MoE block
    returns the block output has no final_layer_norm (it went to the strata norms)."""
    m = re.fullmatch(r"(.*)\.final_layer_norm\.(weight|bias)", key)
    return m is not None and any(k.startswith(f"{m.group(1)}.moe.router.norms.") for k in moe_state)
