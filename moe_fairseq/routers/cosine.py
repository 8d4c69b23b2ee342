"""MoEC's cosine router with expert clusters (Xie et al. 2022, arXiv 2207.09094).

Scores ``s_e = cos(W_red x, w_e) / tau``: the token is projected to a small routing
space (``--moec-routing-dim``, 32 by default), ``w_e`` are the rows of an ``[E, r]``
gate matrix (orthogonal init, gain 0.1) and ``tau`` is a learnable temperature
(init 0.07). ``probs = softmax(s)``; top-1/top-2 selection, second-expert policies,
capacity, balance loss and z-loss are :class:`TopKRouter`'s.

Experts form ``G = --moec-clusters`` clusters of contiguous global expert indices
(``E / G`` experts each). MoEC adds:

- ``moec_var``: ``E * var_coef * Var`` where Var measures how unevenly the mean
  routing probability ``me`` is spread over the experts *within* a cluster, so a
  cluster behaves as one wider unit (``--moec-var-type``, see :func:`moec_variance`);
- cluster-level expert dropout (training only): every ``--moec-dropout-interval``
  forward calls a new set of experts is kept in each cluster; dropped experts get
  ``-inf`` scores, so their tokens are re-routed among the survivors.

Not part of this router: the paper's output mixing ``y = a * FFN_e(x) + (1 - a) * x``
with ``a = sigmoid(s_e)``; the MoE layer scales the expert output by the gate
(the softmax probability) as for every router.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .top_k import TopKRouter

VAR_TYPES = ("cluster", "global", "gap")
MIN_TAU = 1e-4


def kept_per_cluster(cluster_size: int, p: float) -> int:
    """Experts kept in a cluster of ``cluster_size`` under expert dropout ``p``:
    ``max(1, int(round((1 - p) * cluster_size)))`` -- a cluster is never emptied."""
    return max(1, int(round((1.0 - p) * cluster_size)))


def _masked_unbiased_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance along the last dim of ``values`` over the entries where
    ``mask`` is true; rows with fewer than two such entries give 0."""
    m = mask.to(values.dtype)
    count = m.sum(-1)
    mean = (values * m).sum(-1) / count.clamp_min(1.0)
    sq = ((values - mean.unsqueeze(-1)) ** 2 * m).sum(-1)
    return torch.where(count >= 2, sq / (count - 1.0).clamp_min(1.0), torch.zeros_like(sq))


def moec_variance(probs: Tensor, clusters: int, var_type: str,
                  kept: Optional[Tensor] = None) -> Tensor:
    """MoEC's variance term (before the ``E * var_coef`` factor).

    probs: ``[T, E]`` router probabilities (differentiable); ``me_e`` is their mean
    over tokens. ``kept``: ``[E]`` bool, the experts not dropped (None = all); dropped
    experts are left out of the variances (their ``me`` is 0 by construction and
    would otherwise pull the survivors' mass towards 0).

    - ``cluster``: ``(1/G) sum_g var(me over the kept experts of cluster g)``
      (unbiased; a cluster with fewer than two kept experts contributes 0);
    - ``global``: unbiased variance of ``me`` over all kept experts;
    - ``gap``: the ``cluster`` value divided by ``exp(gap)``, where ``gap`` is the
      mean (over tokens) probability mass of the most likely cluster minus that of
      the second (cluster mass of a token = sum of its probs over the cluster).
    """
    if probs.size(0) == 0:
        return probs.sum() * 0.0
    E = probs.size(1)
    me = probs.mean(dim=0)
    if kept is None:
        kept = torch.ones(E, dtype=torch.bool, device=probs.device)
    if var_type == "global":
        return _masked_unbiased_var(me, kept)
    per_cluster = _masked_unbiased_var(me.view(clusters, -1), kept.view(clusters, -1))
    var = per_cluster.mean()
    if var_type == "cluster":
        return var
    if var_type == "gap":
        mass = probs.view(probs.size(0), clusters, -1).sum(-1).mean(dim=0)  # [G]
        top2 = mass.topk(2).values
        return var / torch.exp(top2[0] - top2[1])
    raise ValueError(f"--moec-var-type must be one of {list(VAR_TYPES)}, got {var_type!r}")


class CosineRouter(TopKRouter):
    """Cosine-similarity router of MoEC; see the module docstring.

    ``tau`` is stored raw (``self.tau``, init 0.07) and clamped to ``>= 1e-4`` where
    it is used (the clamp passes no gradient while ``tau`` is below the bound).

    Expert dropout state lives in two persistent buffers, so it survives
    checkpoints: ``dropout_calls`` (training forward calls so far) and
    ``kept_experts`` (``[E]`` bool). A new kept set is drawn when
    ``dropout_calls % dropout_interval == 0`` from a CPU generator seeded with
    ``(seed, dropout_calls // dropout_interval)``: every rank (the router is
    replicated under expert parallelism and uses global expert indices) draws the
    same set without communication. Every MoE layer draws the same set too.
    """

    def __init__(
        self,
        embed_dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        eval_capacity_token_fraction: float = 1.0,
        second_expert_policy: str = "sampling",
        normalize_gates: bool = False,
        jitter_eps: float = 0.0,
        routing_dim: int = 32,
        clusters: int = 1,
        var_coef: float = 0.0,
        var_type: str = "cluster",
        expert_dropout: float = 0.0,
        dropout_interval: int = 1,
        seed: int = 1,
    ):
        super().__init__(
            embed_dim, num_experts, top_k, capacity_factor, eval_capacity_token_fraction,
            second_expert_policy, normalize_gates, jitter_eps,
        )
        if routing_dim < 1:
            raise ValueError(f"--moec-routing-dim must be >= 1, got {routing_dim}")
        if clusters < 1 or num_experts % clusters != 0:
            raise ValueError(
                f"--moec-clusters {clusters} must be >= 1 and divide the number of "
                f"experts {num_experts}"
            )
        if var_type not in VAR_TYPES:
            raise ValueError(f"--moec-var-type must be one of {list(VAR_TYPES)}, got {var_type!r}")
        if var_type == "gap" and clusters < 2:
            raise ValueError("--moec-var-type gap needs --moec-clusters >= 2")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"--moec-expert-dropout must be in [0, 1), got {expert_dropout}")
        if dropout_interval < 1:
            raise ValueError(f"--moec-dropout-interval must be >= 1, got {dropout_interval}")
        self.routing_dim = routing_dim
        self.clusters = clusters
        self.cluster_size = num_experts // clusters
        self.var_coef = var_coef
        self.var_type = var_type
        self.expert_dropout = expert_dropout
        self.dropout_interval = dropout_interval
        self.seed = int(seed)
        if expert_dropout > 0:
            alive = clusters * kept_per_cluster(self.cluster_size, expert_dropout)
            if alive < top_k:
                raise ValueError(
                    f"--moec-expert-dropout {expert_dropout} keeps {alive} of {num_experts} "
                    f"experts ({clusters} clusters), fewer than --moe-top-k {top_k}"
                )

        # The linear gate of TopKRouter is replaced by W_red and the [E, r] gate matrix.
        self.w_reduce = nn.Linear(embed_dim, routing_dim, bias=False)
        self.wg = nn.Linear(routing_dim, num_experts, bias=False)
        nn.init.orthogonal_(self.wg.weight, gain=0.1)
        self.tau = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("dropout_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("kept_experts", torch.ones(num_experts, dtype=torch.bool))

    # ------------------------------------------------------------------ scores

    def temperature(self) -> Tensor:
        return self.tau.float().clamp_min(MIN_TAU)

    def cosine_logits(self, x: Tensor) -> Tensor:
        """x ``[T, d]`` -> fp32 ``cos(W_red x, w_e) / tau`` ``[T, E]`` (no dropout)."""
        h = F.normalize(F.linear(self.router_input(x), self.w_reduce.weight.float()), dim=-1)
        w = F.normalize(self.wg.weight.float(), dim=-1)
        return F.linear(h, w) / self.temperature()

    def dropout_active(self) -> bool:
        return self.training and self.expert_dropout > 0

    def logits(self, x: Tensor) -> Tensor:
        """Cosine logits; in training with expert dropout, dropped experts get -inf."""
        s = self.cosine_logits(x)
        if self.dropout_active():
            s = s.masked_fill(~self.kept_experts, float("-inf"))
        return s

    # ------------------------------------------------------------------ dropout

    def sample_kept(self, resample_index: int) -> Tensor:
        """The ``[E]`` bool kept set of resample ``resample_index`` (CPU), a pure
        function of ``(seed, resample_index)``."""
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + resample_index) % (2**63 - 1)
        )
        n = kept_per_cluster(self.cluster_size, self.expert_dropout)
        kept = torch.zeros(self.clusters, self.cluster_size, dtype=torch.bool)
        for c in range(self.clusters):
            kept[c, torch.randperm(self.cluster_size, generator=g)[:n]] = True
        return kept.view(-1)

    def _step_dropout(self) -> None:
        calls = int(self.dropout_calls)
        if calls % self.dropout_interval == 0:
            self.kept_experts.copy_(self.sample_kept(calls // self.dropout_interval))
        self.dropout_calls += 1

    # ------------------------------------------------------------------ routing

    def route(self, x: Tensor, pass_index: int = 0):
        if self.dropout_active():
            self._step_dropout()
        return super().route(x, pass_index)

    def extra_losses(self, logits: Tensor, probs: Tensor, first: Tensor) -> dict:
        # "balance" (TopKRouter's load_balance_loss) is E * sum_e me_e * ce_e with
        # me_e the MEAN of P[t, e] over tokens. The MoEC paper/code writes
        # me_e = sum_t P[t, e]; we use the mean so the balance loss has the linear
        # router's scale (1.0 when uniform) and --moe-gate-loss-wt means the same.
        # The variance below is over those means as well.
        if self.var_coef == 0:
            return {}
        kept = self.kept_experts if self.dropout_active() else None
        var = moec_variance(probs, self.clusters, self.var_type, kept)
        return {"moec_var": self.num_experts * self.var_coef * var}

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, routing_dim={self.routing_dim}, "
            f"clusters={self.clusters}, var_coef={self.var_coef}, var_type={self.var_type}, "
            f"expert_dropout={self.expert_dropout}, dropout_interval={self.dropout_interval}"
        )
