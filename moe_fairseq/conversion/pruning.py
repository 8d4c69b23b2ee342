"""Language-specific expert pruning for deployment (after Koishekenov et al., ACL 2023,
arXiv 2212.09811): route a data split of the directions to serve, keep in each MoE layer
the experts that carry most of the routing, and drop the others from the checkpoint.

The statistic is each expert's share of the token-expert assignments on the split
(``RoutingCounts`` load, every top-k slot, before capacity dropping), per MoE layer,
summed over the chosen directions. ``keep`` keeps the K most used experts of every layer;
``keep_mass`` keeps, per layer, the fewest experts whose shares add up to at least that
fraction (so layers may keep different numbers: the pruned model records them in
``--moe-layer-expert-counts``). A layer always keeps at least ``--moe-top-k`` experts.

The router keeps its rows of the kept experts, in their original order: its softmax is
then taken over the kept experts only, which is the same as masking the pruned experts'
logits to -inf (the kept experts' relative probabilities are unchanged). Keeping every
expert changes nothing, bit for bit.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..errors import OneLineError
from ..layer.moe_layer import MoELayer

PRUNABLE_ROUTERS = ("TopKRouter", "CosineRouter")


class PruningError(OneLineError):
    """A model or a request that cannot be pruned; names the flag."""


def choose_experts(load: Tensor, min_keep: int, keep: Optional[int] = None,
                   keep_mass: Optional[float] = None) -> List[int]:
    """Expert indices to keep (ascending) from ``load [E]``: the ``keep`` largest, or
    the fewest whose share reaches ``keep_mass``; never fewer than ``min_keep``. Ties go
    to the lower index."""
    E = load.numel()
    order = sorted(range(E), key=lambda e: (-float(load[e]), e))
    if keep is not None:
        n = keep
    else:
        total = float(load.sum())
        n, mass = 0, 0.0
        while n < E and (total <= 0 or mass < keep_mass * total - 1e-12):
            mass += float(load[order[n]])
            n += 1
    return sorted(order[: max(n, min_keep)])


def check_prunable_checkpoint(path: str) -> None:
    """Before any work: ``path`` is a readable MoE checkpoint (its recorded settings,
    read memory-mapped)."""
    from ..args_version import is_moe_namespace
    from ..fairseq_fixes.checkpoint_fit import checkpoint_settings

    args = checkpoint_settings(path, "MOE_CKPT")
    if not is_moe_namespace(args):
        arch = getattr(args, "arch", None) or getattr(args, "_name", "?")
        raise PruningError(f"MOE_CKPT {path} is a dense model (--arch {arch}): it has no experts "
                           "to prune; give an MoE checkpoint (scripts/upcycle.py turns a dense "
                           "one into an MoE model)")


def check_prunable(model) -> None:
    for name, m in model.named_modules():
        if not isinstance(m, MoELayer):
            continue
        router = m.router
        kind = type(router).__name__
        if kind not in PRUNABLE_ROUTERS:
            raise PruningError(f"{name}: expert pruning supports the linear and cosine routers, "
                               f"not {kind} (SMoE's strata are set for all layers at once)")
        if kind == "CosineRouter" and (router.clusters > 1 or router.expert_dropout > 0):
            raise PruningError(f"{name}: MoEC with --moec-clusters {router.clusters} / "
                               f"--moec-expert-dropout {router.expert_dropout} cannot lose experts "
                               "(clusters must stay equal); prune a one-cluster model")
        if m.experts.num_shards != 1:
            raise PruningError("prune in one process (the checkpoint holds every expert)")


def _slice(module: nn.Module, name: str, index: Tensor) -> None:
    t = getattr(module, name)
    sliced = t.data.index_select(0, index).clone()
    if isinstance(t, nn.Parameter):
        p = nn.Parameter(sliced, requires_grad=t.requires_grad)
        if hasattr(t, "expert"):
            p.expert = t.expert
        setattr(module, name, p)
    else:
        module._buffers[name] = sliced


def prune_layer(layer: MoELayer, kept: List[int]) -> None:
    """Keep experts ``kept`` (ascending) of ``layer``: expert bank, router rows, counts."""
    E = layer.num_experts
    index = torch.tensor(kept, dtype=torch.long)
    bank = layer.experts
    for name in list(bank._parameters):
        _slice(bank, name, index)
    bank.num_experts = len(kept)
    router = layer.router
    _slice(router.wg, "weight", index)  # [E, d]: the linear gate / MoEC's expert embeddings
    if "kept_experts" in router._buffers:
        _slice(router, "kept_experts", index)
    router.num_experts = len(kept)
    if hasattr(router, "cluster_size"):
        router.cluster_size = len(kept)
    dispatcher = layer.dispatcher
    dispatcher.num_experts = len(kept)
    if hasattr(dispatcher, "num_local_experts"):
        dispatcher.num_local_experts = len(kept)
    layer.expert_load_total = torch.zeros(len(kept), dtype=torch.long)


def prune_model(model, kept: Dict[str, List[int]]) -> List[int]:
    """Prune every MoE layer of ``model`` to ``kept[name]``; the experts per MoE layer
    in module order (for ``--moe-layer-expert-counts``)."""
    check_prunable(model)
    counts = []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer):
            prune_layer(m, kept[name])
            counts.append(len(kept[name]))
    return counts
