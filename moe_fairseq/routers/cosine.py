"""MoEC's cosine router with expert clusters (Xie et al. 2022, arXiv 2207.09094).

Scores ``s_e = cos(W_red x, w_e) / tau``: the token is projected to a small routing
space (``--moec-routing-dim``, 32 by default), ``w_e`` are the rows of an ``[E, r]``
gate matrix (orthogonal init, gain 0.1) and ``tau`` is a learnable temperature
(init 0.07). The token goes to its top-1 (top-k) experts by ``s``; second-expert
policies and capacity are :class:`TopKRouter`'s.

Experts form ``G = --moec-clusters`` clusters of contiguous global expert indices
(``E / G`` experts each). As in the authors' code (xy980523/MoEc_model,
``unilm/modules/gdmoe/top1gate.py``, read and re-implemented here):

- the routing losses use probabilities at the FIXED temperature 0.07,
  ``P = softmax(cos / 0.07)``, so they send no gradient to ``tau``;
- ``balance = n * sum_e mean_t(P[t, e]) * (f_e + 1e-6)``, ``f_e`` the share of
  tokens whose first choice is e and ``n`` the experts scored (the survivors of
  expert dropout, else E);
- ``moec_var = n * var_coef * Var / T`` where Var is computed, like theirs, on the
  SUMS over the T tokens ``me_e = sum_t P[t, e]`` (see :func:`moec_variance`). Their
  loss is ``n * (sum_e me_e * ce_e + var_coef * Var)`` added to the summed CE; ours is
  divided by T because the criterion multiplies every routing loss by the batch's
  token count: both terms then have the authors' strength at any batch size;
- cluster-level expert dropout (training only): every ``--moec-dropout-interval``
  forward calls a new set of experts is kept in each cluster; dropped experts get
  ``-inf`` scores, so their tokens are re-routed among the survivors, and capacity
  and losses count the survivors only;
- output mixing (``--moec-output-mixing``): the gate of the chosen expert is
  ``a = sigmoid(s_e)`` and the layer outputs ``a * FFN_e(x) + (1 - a) * x``
  (``x`` itself for a token dropped for capacity); without it the gate is the
  softmax probability ``softmax(s)_e`` as for the linear router.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Routing, count_tokens
from .losses import first_choice_share, masked_mean, masked_sum, router_z_loss
from .top_k import TopKRouter, mask_padding

VAR_TYPES = ("cluster", "global", "gap")
MIN_TAU = 1e-4
# The authors compute the routing losses at this fixed temperature (their
# TEMPERATURE_FOR_L_UAX), not with the learnable tau.
LOSS_TEMPERATURE = 0.07


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
                  kept: Optional[Tensor] = None, token_mask: Optional[Tensor] = None,
                  num_kept: Optional[int] = None) -> Tensor:
    """MoEC's variance term ``Var`` (before the ``n * var_coef / T`` factor).

    probs: ``[T, E]`` fixed-temperature routing probabilities (differentiable);
    ``me_e = sum_t probs[t, e]`` (a sum over tokens, as the authors compute it).
    ``kept``: ``[E]`` bool, the experts scored (None = all); the others are left
    out. Every cluster keeps the same number of experts, so the authors'
    "contiguous blocks of the surviving columns" are the clusters' survivors.
    ``token_mask``: ``[T]`` bool, the rows that are tokens (None = all).
    ``num_kept``: how many ``kept`` are true, when the caller knows (else counted).

    - ``cluster`` (their coef_type 1): ``(1/G) sum_g`` unbiased variance of ``me``
      over the kept experts of cluster g (0 for a cluster with fewer than two);
    - ``global`` (coef_type 0): unbiased variance of ``me`` over the kept experts;
    - ``gap`` (coef_type 2): the ``cluster`` value divided by ``exp(dif)``, where
      the kept experts' mean probabilities ``me / T`` are sorted in descending
      order and cut into G chunks, and ``dif`` is the first chunk's mean minus
      the second's.
    """
    if probs.size(0) == 0:
        return probs.sum() * 0.0
    E = probs.size(1)
    if token_mask is None:
        T = probs.size(0)
    else:
        T = token_mask.sum().to(probs.dtype).clamp_min(1.0)
    me = masked_sum(probs, token_mask)
    if kept is None:
        kept = torch.ones(E, dtype=torch.bool, device=probs.device)
    if var_type == "global":
        return _masked_unbiased_var(me, kept)
    per_cluster = _masked_unbiased_var(me.view(clusters, -1), kept.view(clusters, -1))
    var = per_cluster.mean()
    if var_type == "cluster":
        return var
    if var_type == "gap":
        # The kept experts' means, largest first: dropped ones sort last and are cut
        # (a boolean index would sync with the host).
        n_kept = int(kept.sum()) if num_kept is None else num_kept
        mean = (me / T).masked_fill(~kept, float("-inf"))
        chunks = mean.sort(descending=True).values[:n_kept].view(clusters, -1).mean(dim=1)
        return var / torch.exp(chunks[0] - chunks[1])
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
        normalize_before_dropping: bool = False,
        eval_second_expert_policy: str = "all",
        capacity_rule: str = "joint",
        routing_dim: int = 32,
        clusters: int = 1,
        var_coef: float = 0.0,
        var_type: str = "cluster",
        expert_dropout: float = 0.0,
        dropout_interval: int = 1,
        seed: int = 1,
        output_mixing: bool = False,
        batch_prioritized: bool = False,
    ):
        super().__init__(
            embed_dim, num_experts, top_k, capacity_factor, eval_capacity_token_fraction,
            second_expert_policy, normalize_gates, jitter_eps, normalize_before_dropping,
            eval_second_expert_policy, capacity_rule, batch_prioritized,
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
        if output_mixing and top_k != 1:
            raise ValueError("--moec-output-mixing needs --moe-top-k 1 (one gate a per token)")
        self.output_mixing = output_mixing
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
        self._host_calls: Optional[int] = None  # see _step_dropout

    # ------------------------------------------------------------------ scores

    def temperature(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.tau.to(dtype).clamp_min(MIN_TAU)

    def dropout_active(self) -> bool:
        return self.training and self.expert_dropout > 0

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
        # A host copy of the counter: reading the buffer on a GPU every call would
        # sync; it is read once after construction or a checkpoint load.
        if self._host_calls is None:
            self._host_calls = int(self.dropout_calls)
        calls = self._host_calls
        if calls % self.dropout_interval == 0:
            kept = self.sample_kept(calls // self.dropout_interval)
            self.kept_experts.copy_(kept, non_blocking=True)
        self.dropout_calls += 1
        self._host_calls = calls + 1

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_calls = None  # dropout_calls may change: read it again
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ routing

    def num_scored(self) -> int:
        """Experts the router can choose now: the survivors of expert dropout."""
        if self.dropout_active():
            return int(self.clusters * kept_per_cluster(self.cluster_size, self.expert_dropout))
        return self.num_experts

    def fused_route(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Optional[Routing]:
        # Cosine scores, clusters and output mixing have no kernel: the torch route.
        return None

    def route(self, x: Tensor, pass_index: int = 0, token_mask: Optional[Tensor] = None) -> Routing:
        if self.dropout_active():
            self._step_dropout()
        cos = self.cosine(x)  # [T, E]
        kept = self.kept_experts if self.dropout_active() else None
        scores = self._scores(cos)
        probs = torch.softmax(scores, dim=-1)
        first = probs.argmax(dim=-1)
        index = [first]
        if self.top_k == 2:
            second, _ = self._second_choice(scores, probs, first)
            index.append(second)
        expert_index = torch.stack(index, dim=1)
        chosen = expert_index.clamp_min(0)
        if self.output_mixing:
            gate = torch.sigmoid(scores.gather(1, chosen))
        else:
            gate = probs.gather(1, chosen)
        gate = torch.where(expert_index >= 0, gate, torch.zeros_like(gate))
        expert_index, gate = mask_padding(expert_index, gate, token_mask)
        gate, after_drop = self.normalized_gates(gate)
        n = self.num_scored()
        losses = self.moec_losses(cos, first, kept, n, token_mask)
        losses["z"] = router_z_loss(scores, token_mask)
        return Routing(
            expert_index, gate, self.capacity(count_tokens(x, token_mask), n), losses,
            probs, normalize_after_drop=after_drop, mix_input=self.output_mixing,
            token_mask=token_mask, priority=self.priority_of(probs),
        )

    def _scores(self, cos: Tensor) -> Tensor:
        scores = cos / self.temperature(cos.dtype)
        if self.dropout_active():
            scores = scores.masked_fill(~self.kept_experts, float("-inf"))
        return scores

    def logits(self, x: Tensor) -> Tensor:
        """Routing scores ``cos / tau`` ``[T, E]`` (fp32); in training with expert
        dropout, dropped experts get -inf."""
        return self._scores(self.cosine(x))

    def cosine(self, x: Tensor) -> Tensor:
        """x ``[T, d]`` -> fp32 ``cos(W_red x, w_e)`` ``[T, E]``."""
        h = self.router_input(x)
        h = F.normalize(F.linear(h, self.w_reduce.weight.to(h.dtype)), dim=-1)
        w = F.normalize(self.wg.weight.to(h.dtype), dim=-1)
        return F.linear(h, w)

    def moec_losses(self, cos: Tensor, first: Tensor, kept: Optional[Tensor], n: int,
                    token_mask: Optional[Tensor] = None) -> dict:
        """The authors' ``l_aux`` split in two named terms, divided by T (module docstring).

        cos ``[T, E]``; first ``[T]`` first choices; kept ``[E]`` bool or None; n experts
        scored; token_mask ``[T]`` bool or None (False rows are padding, left out).
        """
        if cos.size(0) == 0:
            zero = cos.sum() * 0.0
            return {"balance": zero, **({"moec_var": zero} if self.var_coef else {})}
        scores = cos / LOSS_TEMPERATURE
        if kept is not None:
            scores = scores.masked_fill(~kept, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        share, T = first_choice_share(first, self.num_experts, token_mask, p.dtype)
        # Dropped experts' terms are masked out (not indexed out: no host sync).
        terms = masked_mean(p, token_mask) * (share + 1e-6)
        if kept is not None:
            terms = torch.where(kept, terms, torch.zeros_like(terms))
        losses = {"balance": n * torch.sum(terms)}
        if self.var_coef:
            var = moec_variance(p, self.clusters, self.var_type, kept, token_mask, num_kept=n)
            losses["moec_var"] = n * self.var_coef * var / T
        return losses

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, routing_dim={self.routing_dim}, "
            f"clusters={self.clusters}, var_coef={self.var_coef}, var_type={self.var_type}, "
            f"expert_dropout={self.expert_dropout}, dropout_interval={self.dropout_interval}, "
            f"output_mixing={self.output_mixing}"
        )
