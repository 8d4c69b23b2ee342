"""The MoE feed-forward block: router -> dispatcher -> expert bank -> combine.

The layer knows nothing about the routing method: it asks its router for one
:class:`~moe_fairseq.routers.base.Routing` per pass, lets the dispatcher group the
kept assignments by expert, runs the expert bank once per pass and adds the gated
outputs back. On the fused path (``--moe-kernels``, :meth:`MoELayer.uses_fused_kernels`)
the bank runs gather, experts and combine as two Triton kernels on the dispatcher's
plan instead (:meth:`ExpertBank.fused_ffn <.expert_bank.ExpertBank.fused_ffn>`).
After each forward, :attr:`MoELayer.stats` holds the routing losses (differentiable,
for the criterion) and detached statistics (for logging).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .dispatcher import SortDispatcher, gather_rows, scatter_rows
from .expert_bank import ExpertBank
from .expert_output_masking import mask_expert_outputs
from ..options import KERNEL_CHOICES, MoEConfigError
from ..parallel.expert_parallel import expert_parallel_group, scale_expert_grads
from ..parallel.dispatcher import AllToAllDispatcher, build_local_expert_bank
from ..routers import Router, build_router
from ..routers.base import count_tokens, entropy_of
from .similarity_loss import SimilarityLoss


@dataclass
class MoEStats:
    """What one forward of one MoE layer reports. Counts are 0-dim tensors.

    - ``losses``: mean over passes of each routing loss (differentiable);
    - ``tokens``: routed (non-padding) tokens;
    - ``assignments`` / ``dropped``: token-expert assignments requested / dropped
      for capacity, summed over passes;
    - ``expert_load``: ``[E]`` assignments requested per expert;
    - ``first_choice_load``: ``[E]`` tokens whose first choice is each expert (all passes);
    - ``entropy_sum``: sum over routed tokens (and passes) of the routing entropy
      in nats, with ``entropy_count`` the number of terms;
    - ``expert_passes``: token-pass count (= tokens for single-pass routers);
      ``expert_passes / tokens`` is SMoE's "requested capacity";
    - ``pass_tokens``: ``[num_passes]`` tokens routed at each pass;
    - ``token_passes``: multi-pass routers only, passes of each position of the
      input, shaped like the input without its last dim (0 for padding);
    - ``sentence_passes`` / ``sentence_tokens``: ``[batch]`` sums of
      ``token_passes`` and of routed tokens per sentence, filled in by the
      transformer layer (it knows which dim is the batch);
    - ``first_expert``: only when the layer's ``record_first_expert`` is set
      (analysis tools): each position's first-choice expert at the first pass,
      shaped like the input without its last dim, -1 for padding;
    - ``first_probs``: with ``first_expert``, the router probabilities of the first
      pass (fp32, detached), shaped like the input with E as its last dim (rows of
      padding: 0); None for a router that gives no probabilities;
    - CMR layers only (``--moe-cmr``, filled in by the transformer layer, which owns
      the gate): ``cmr_gate_sum`` (differentiable, sum of the CMR gate g over the
      non-padding tokens: the budget term's numerator), ``cmr_tokens`` (its
      denominator), and ``[batch]`` ``sentence_cmr_gate`` (detached) /
      ``sentence_cmr_tokens`` per sentence, for the per-language gate shares.
    """

    losses: Dict[str, Tensor] = field(default_factory=dict)
    tokens: Optional[Tensor] = None
    assignments: Optional[Tensor] = None
    dropped: Optional[Tensor] = None
    expert_load: Optional[Tensor] = None
    first_choice_load: Optional[Tensor] = None
    entropy_sum: Optional[Tensor] = None
    entropy_count: Optional[Tensor] = None
    expert_passes: Optional[Tensor] = None
    pass_tokens: Optional[Tensor] = None
    token_passes: Optional[Tensor] = None
    sentence_passes: Optional[Tensor] = None
    sentence_tokens: Optional[Tensor] = None
    first_expert: Optional[Tensor] = None
    first_probs: Optional[Tensor] = None
    cmr_gate_sum: Optional[Tensor] = None
    cmr_tokens: Optional[Tensor] = None
    sentence_cmr_gate: Optional[Tensor] = None
    sentence_cmr_tokens: Optional[Tensor] = None

    @classmethod
    def zeros(cls, tokens, num_experts: int, num_passes: int, num_rows: int,
              device) -> "MoEStats":
        """Empty counts before the first pass; ``tokens``: routed tokens (int or 0-dim
        tensor), ``num_rows``: rows of the layer's input (multi-pass routers track
        each row's passes)."""
        zero = torch.zeros((), dtype=torch.long, device=device)
        return cls(
            tokens=zero + tokens,
            assignments=zero.clone(),
            dropped=zero.clone(),
            expert_load=torch.zeros(num_experts, dtype=torch.long, device=device),
            first_choice_load=torch.zeros(num_experts, dtype=torch.long, device=device),
            entropy_sum=torch.zeros((), dtype=torch.float32, device=device),
            entropy_count=zero.clone(),
            expert_passes=zero.clone(),
            pass_tokens=torch.zeros(num_passes, dtype=torch.long, device=device),
            # Passes each token went through (multi-pass routers only): dynamic capacity.
            token_passes=(torch.zeros(num_rows, dtype=torch.long, device=device)
                          if num_passes > 1 else None),
        )

    @classmethod
    def of_fused_pass(cls, routing, plan) -> "MoEStats":
        """The counts of a layer's only pass, routed and planned by the fused kernels:
        views of what they wrote (``plan.sizes``, ``routing.block_counts``), no launch.
        Not to be added to in place: the fields share memory."""
        E = plan.requested.numel()
        tokens = plan.sizes[3 * E + 2]
        return cls(
            tokens=tokens,
            assignments=plan.sizes[3 * E],
            dropped=plan.sizes[3 * E + 1],
            expert_load=plan.requested,
            first_choice_load=routing.block_counts[-1, 0, :E],
            entropy_sum=routing.entropy_sum,
            entropy_count=tokens,
            expert_passes=tokens,
            pass_tokens=plan.sizes[3 * E + 2:],
        )

    def record_pass(self, pass_index: int, routing, plan, pos: Optional[Tensor]) -> None:
        """Count one routing pass; ``pos`` = its tokens' rows (None = every token)."""
        n = routing.token_count
        self.assignments += plan.requested.sum()
        self.dropped += plan.requested.sum() - plan.group_sizes.sum()
        self.expert_load += plan.requested
        first = routing.expert_index[:, 0]  # -1 = padding or no expert
        self.first_choice_load.scatter_add_(0, first.clamp_min(0), (first >= 0).long())
        self.expert_passes += n
        self.pass_tokens[pass_index] += n
        if self.token_passes is not None:
            self.token_passes = (self.token_passes + 1 if pos is None
                                 else self.token_passes.index_add(0, pos, torch.ones_like(pos)))
        if routing.probs is not None and routing.probs.size(0) > 0:
            self.entropy_sum += entropy_of(routing.probs.detach(), routing.token_mask) * n
            self.entropy_count += n

    @property
    def starved_fraction(self) -> Tensor:
        """Share of experts given < 10% of their fair share of assignments (MoEC's
        "sparse data allocation")."""
        load = self.expert_load.float()
        return (load < 0.1 * load.mean()).float().mean()

    @property
    def load_cv(self) -> Tensor:
        """Coefficient of variation (std / mean, population std) of ``expert_load``."""
        load = self.expert_load.float()
        mean = load.mean()
        return torch.where(mean > 0, load.std(unbiased=False) / mean.clamp_min(1e-9), mean * 0)

    @property
    def collapsed(self) -> Tensor:
        """Routing collapse: the router is sure (mean routing entropy below
        ``COLLAPSE_ENTROPY`` of its maximum, log E) and one expert is the first choice of
        at least ``COLLAPSE_SHARE`` of the tokens. An undecided router that happens to
        rank one expert first (near-uniform probabilities at the start of training,
        which the balance loss soon spreads) is not collapsed."""
        if self.first_choice_load is None or self.entropy_sum is None:
            return torch.tensor(False)  # stats built by hand, without first choices
        load = self.first_choice_load.float()
        total = load.sum()
        E = load.numel()
        entropy = self.entropy_sum / self.entropy_count.clamp_min(1)
        sure = entropy < COLLAPSE_ENTROPY * math.log(max(E, 2))
        return (total > 0) & (E > 1) & sure & (load.max() >= COLLAPSE_SHARE * total)


# MoEStats.collapsed: share of the tokens' first choices one expert takes, and mean
# routing entropy as a share of log E.
COLLAPSE_SHARE = 0.9
COLLAPSE_ENTROPY = 0.1


class MoELayer(nn.Module):
    """A sparse MoE FFN block.

    Args:
        router: any :class:`Router`.
        experts: the :class:`ExpertBank` of the experts this process runs (all
            ``router.num_experts`` of them unless the dispatcher shards experts).
        dispatcher: default :class:`SortDispatcher` (every expert local).
        kernels: ``--moe-kernels``, ``auto``, ``triton`` or ``torch`` (see
            :meth:`uses_fused_kernels`); a plain attribute, settable later.
        eom: ``--moe-eom``, the expert output masking rate (``expert_output_masking.py``).
    """

    def __init__(self, router: Router, experts: ExpertBank, dispatcher=None,
                 kernels: str = "auto", eom: float = 0.0):
        super().__init__()
        dispatcher = dispatcher or SortDispatcher(router.num_experts)
        if dispatcher.num_experts != router.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts, dispatcher {dispatcher.num_experts}"
            )
        if dispatcher.num_local_experts != experts.num_experts:
            raise ValueError(
                f"dispatcher sends to {dispatcher.num_local_experts} local experts, "
                f"expert bank has {experts.num_experts}"
            )
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher
        self.stats: Optional[MoEStats] = None
        self.padding = "auto"  # see routes_padded_batch
        self.kernels = kernels  # see uses_fused_kernels
        self.eom = eom
        # Set by the criterion when --moe-similarity-loss-wt > 0: the layer then adds
        # losses["similarity"] (first pass, a bounded token sample; see similarity_loss.py).
        self.similarity: Optional[SimilarityLoss] = None
        # Analysis tools set this to get MoEStats.first_expert (a [tokens] tensor).
        self.record_first_expert = False
        # Whether the last forward mixed tokens' own vectors into the output (MoEC).
        self.mixed_input = False
        # Running count of assignments per expert, for analysis tools
        # (reset with reset_expert_load); not saved in checkpoints.
        self.register_buffer(
            "expert_load_total", torch.zeros(router.num_experts, dtype=torch.long), persistent=False
        )

    def __getstate__(self):
        # The last forward's stats hold graph-attached losses, which deepcopy and
        # pickle refuse (fairseq's --store-ema deep-copies the model): a copy starts
        # without them, as a fresh layer would.
        state = self.__dict__.copy()
        state["stats"] = None
        return state

    @property
    def num_experts(self) -> int:
        """Experts the router chooses from (all ranks together)."""
        return self.router.num_experts

    def reset_expert_load(self) -> None:
        self.expert_load_total.zero_()

    @property
    def returns_block_output(self) -> bool:
        """True when the layer's output is the transformer block's whole output
        (a ``stream_output`` router): the block then adds no residual, dropout or
        norm of its own."""
        return bool(getattr(self.router, "stream_output", False))

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
        dropout: Optional[nn.Module] = None,
    ) -> Tensor:
        """x ``[..., d]``, padding_mask ``[...]`` (True = padding) -> ``[..., d_out]``.

        ``d_out`` is the experts' output width: ``d`` for FFN experts; an expert bank
        may map to another width (the cluster study's classifiers: 2), in which case
        multi-pass and stream-output routers and output mixing do not apply.

        Padding positions are not routed: they use no capacity, do not enter the
        routing losses and get a zero output. ``residual`` ``[..., d]`` is what the
        caller adds the output to (default ``x``); multi-pass routers continue
        from ``residual + y`` (see :class:`~moe_fairseq.routers.base.Router`).
        ``dropout``: applied to each pass's output before it joins the stream,
        only when the layer returns the block output (``returns_block_output``);
        otherwise the caller drops out the returned sum.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        stream = None
        if self.router.num_passes > 1 or self.returns_block_output:
            stream = flat if residual is None else residual.reshape(-1, shape[-1])
        token_pos = None  # rows of the tokens when padding is removed before routing
        if padding_mask is not None and self.routes_padded_batch(x):
            # The router sees every row and gives padding no expert: no host sync.
            token_mask = ~padding_mask.reshape(-1).to(torch.bool)
            out = self._route_and_compute(flat, stream, dropout, token_mask=token_mask)
            if self.mixed_input:
                # Padding outputs 0: output mixing would hand it x back. Without mixing
                # it already is 0 (its slots have no expert and a zero combine).
                out = torch.where(token_mask.unsqueeze(1), out, torch.zeros_like(out))
        elif padding_mask is not None:
            # Gathering the tokens needs their count on the host (nonzero): a sync.
            token_pos = (~padding_mask.reshape(-1).to(torch.bool)).nonzero().squeeze(1)
            if stream is not None:
                stream = gather_rows(stream, token_pos)
            out = self._route_and_compute(gather_rows(flat, token_pos), stream, dropout)
            out = scatter_rows(out, token_pos, flat.size(0))
        else:
            out = self._route_and_compute(flat, stream, dropout)
        # Per-token statistics back to the input's positions (padding: 0 passes,
        # expert -1, probabilities 0).
        for name, fill in (("token_passes", 0), ("first_expert", -1), ("first_probs", 0)):
            values = getattr(self.stats, name)
            if values is not None:
                if token_pos is not None:
                    values = values.new_full((flat.size(0), *values.shape[1:]), fill).index_copy(
                        0, token_pos, values)
                setattr(self.stats, name, values.view(*shape[:-1], *values.shape[1:]))
        return out.reshape(*shape[:-1], out.size(-1))

    def routes_padded_batch(self, x: Tensor) -> bool:
        """Whether padding is masked inside the router rather than removed before it.

        Masking needs a single-pass router that accepts a ``token_mask``. ``padding``
        ``auto`` masks on CUDA, where removal (``nonzero``) would wait for the host,
        and removes elsewhere: on CPU removal is cheaper and keeps CPU results
        bit-identical to earlier versions (masked sums round in another order).
        ``mask`` / ``remove`` force one way (tests).
        """
        if not (self.router.accepts_token_mask and self.router.num_passes == 1
                and not self.returns_block_output):
            return False
        return self.padding == "mask" or (self.padding == "auto" and x.is_cuda)

    def fused_path_blocker(self, x: Tensor) -> Optional[str]:
        """Why the fused kernels cannot compute this layer's experts on tokens like
        ``x`` (None: they can), as a phrase for an error message.

        They need every expert in this process (the :class:`SortDispatcher`: an
        expert-parallel dispatcher moves rows between ranks), an expert bank that
        offers them (:meth:`ExpertBank.fused_unsupported`), and kernels that run on
        x's device and dtype (``moe_fairseq.kernels.unavailable_reason``).
        """
        if not isinstance(self.dispatcher, SortDispatcher):
            return (f"its experts are not all in this process ({type(self.dispatcher).__name__} "
                    "moves rows between ranks)")
        unsupported = getattr(self.experts, "fused_unsupported", None)
        if unsupported is None:
            return f"its expert bank ({type(self.experts).__name__}) has no fused path"
        reason = unsupported()
        if reason is not None:
            return reason
        from .. import kernels  # Triton is imported only to check a real device

        return kernels.unavailable_reason(x.device, x.dtype)

    def uses_fused_kernels(self, x: Tensor) -> bool:
        """Whether this forward runs dispatch + experts + combine as the fused Triton
        kernels, by ``self.kernels`` (``--moe-kernels``):

        - ``torch``: never (the PyTorch path: gather, grouped GEMMs, combine);
        - ``auto``: on CUDA tensors in fp16 / bf16 when :meth:`fused_path_blocker` finds
          nothing. fp32 keeps the PyTorch path (the kernels' fp32 dots are exact,
          slow), and so does the CPU, whose results stay bit-identical;
        - ``triton``: always, fp32 included; a :class:`MoEConfigError` naming the flag
          and the reason when the kernels cannot run here (CPU tensors need
          ``TRITON_INTERPRET=1``; ``meta`` tensors run their shape functions).
        """
        mode = self.kernels
        if mode == "torch":
            return False
        if mode == "auto":
            # Cheap tests first: on CPU auto never looks for Triton.
            return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                    and self.fused_path_blocker(x) is None)
        if mode == "triton":
            reason = self.fused_path_blocker(x)
            if reason is not None:
                raise MoEConfigError(f"--moe-kernels triton cannot run this MoE layer on "
                                     f"{x.device.type} {x.dtype} tokens: {reason}; use "
                                     "--moe-kernels auto (a checkpoint trained with triton: "
                                     "--model-overrides \"{'moe_kernels': 'auto'}\")")
            return True
        raise MoEConfigError(f"--moe-kernels must be one of {list(KERNEL_CHOICES)}, got {mode!r}")

    def _route_and_compute(self, tokens: Tensor, stream: Optional[Tensor] = None,
                           dropout: Optional[nn.Module] = None,
                           token_mask: Optional[Tensor] = None) -> Tensor:
        """tokens ``[T, d]`` -> sum over passes of the gated expert outputs ``[T, d]``
        (or, for a ``stream_output`` router, the block output ``[T, d]``).

        ``stream`` ``[T, d]``: the tokens' residual streams, for multi-pass routers.
        ``token_mask`` ``[T]`` bool (single-pass routers only): False rows are padding.
        """
        E = self.num_experts
        P = self.router.num_passes
        T = tokens.size(0)
        device = tokens.device
        # A collective dispatcher must run every pass on every rank, even a pass
        # with no local token, or the ranks' all-to-alls would not pair up.
        run_empty_passes = getattr(self.dispatcher, "collective", False)
        stream_output = self.returns_block_output
        track_stream = P > 1 or stream_output
        if track_stream and stream is None:
            stream = tokens
        stats: Optional[MoEStats] = None  # made at pass 0, from its routing and plan
        total: Optional[Tensor] = None
        # [T] pass at which each token is routed next (>= P: done); None until a
        # multi-pass router's first pass says where its tokens go.
        due: Optional[Tensor] = None
        losses: Dict[str, list] = {}
        mixed = False  # whether some pass mixed tokens' own vectors into the output
        similarity: Optional[Tensor] = None
        routed_passes = 0  # passes with at least one token: the losses' denominator
        fused = self.uses_fused_kernels(tokens)
        for pass_index in range(P):
            if pass_index == 0:
                pos, h, s = None, tokens, stream
            else:
                if due is None:
                    break
                pos = (due == pass_index).nonzero().squeeze(1)
                if pos.numel() == 0 and not run_empty_passes:
                    continue
                s = self.router.pass_stream(gather_rows(stream, pos), pass_index)
                h = self.router.pass_input(s, pass_index)
            routing = None
            if fused and P == 1:
                # Routing, losses and plan in a few kernels, when the router has them.
                routing = self.router.fused_route(h, token_mask)
            if routing is None:
                routing = self.router(h, pass_index, token_mask=token_mask)
            plan = mask_expert_outputs(self.dispatcher.plan(routing), self.eom, self.training)
            if fused:
                y = self.experts.fused_ffn(h, plan)  # [T_pass, d]
            else:
                rows, local_sizes = self.dispatcher.dispatch(h, plan)
                rows = self.experts(rows, local_sizes)
                y = self.dispatcher.combine(rows, plan)  # [T_pass, d]
            if plan.input_weight is not None:
                mixed = True
                # Output mixing: the token's own vector fills the unused gate mass.
                y = y + plan.input_weight.to(y.dtype).unsqueeze(1) * h
            if stream_output and dropout is not None:
                y = dropout(y)

            # Empty passes add their (zero, graph-connected) losses but do not
            # count, so a rank's losses do not depend on how many ranks there are.
            routed_passes += int(h.size(0) > 0)  # sizes are host ints: no sync
            for name, value in routing.losses.items():
                losses.setdefault(name, []).append(value)
            if (stats is None and P == 1 and plan.sizes is not None
                    and routing.entropy_sum is not None and plan.num_tokens > 0):
                stats = MoEStats.of_fused_pass(routing, plan)
            else:
                if stats is None:
                    stats = MoEStats.zeros(count_tokens(tokens, token_mask), E, P, T, device)
                stats.record_pass(pass_index, routing, plan, pos)
            if pass_index == 0 and self.similarity is not None and routing.probs is not None:
                similarity = self.similarity(routing.probs, h, token_mask)
            if pass_index == 0 and self.record_first_expert:
                stats.first_expert = routing.expert_index[:, 0].detach().clone()
                if routing.probs is not None and routing.probs.size(1) == E:
                    stats.first_probs = routing.probs.detach().float().clone()

            if not stream_output:
                y_all = y if pos is None else scatter_rows(y, pos, T)
                total = y_all if total is None else total + y_all
            if track_stream:
                stream = s + y if pos is None else stream.index_copy(0, pos, s + y)
            if routing.next_pass is not None:
                next_pass = routing.next_pass.to(torch.long)
                if bool((next_pass <= pass_index).any()):
                    raise RuntimeError(
                        f"{type(self.router).__name__} sent a token from pass {pass_index} "
                        "back to an earlier or the same pass"
                    )
                due = next_pass if pos is None else due.index_copy(0, pos, next_pass)
            elif pos is not None:  # these tokens are done
                due = due.index_fill(0, pos, P)
        # One pass: its losses as they are (the same value as the mean, no launches).
        stats.losses = {
            name: v[0] if len(v) == 1 else torch.stack(v).sum() / max(routed_passes, 1)
            for name, v in losses.items()
        }
        if similarity is not None:  # one value per layer, from the first pass
            stats.losses["similarity"] = similarity
        self.expert_load_total += stats.expert_load.detach()
        self.stats = stats
        self.mixed_input = mixed
        return self.router.finish_stream(stream) if stream_output else total


def build_moe_layer(
    options,
    embed_dim: int,
    ffn_dim: int,
    activation_fn: str,
    activation_dropout: float,
) -> MoELayer:
    """Build the MoE block of one transformer layer from parsed :class:`MoEOptions`.

    Under distributed training the experts are sharded over the data-parallel
    ranks (see ``parallel/expert_parallel.py``); otherwise every expert is local.
    """
    router = build_router(options, embed_dim)
    ffn_dim = options.expert_ffn_dim or ffn_dim
    group, rank, world = expert_parallel_group()
    bank_kwargs = dict(activation_fn=activation_fn, activation_dropout=activation_dropout,
                       sublayers=options.expert_sublayers)
    if world == 1:
        experts = ExpertBank(options.expert_count, embed_dim, ffn_dim, **bank_kwargs)
        return MoELayer(router, experts, kernels=options.kernels, eom=options.eom)
    experts = build_local_expert_bank(options.expert_count, embed_dim, ffn_dim, rank, world,
                                      **bank_kwargs)
    scale_expert_grads(experts.parameters(), world)
    # --moe-kernels auto falls back to the PyTorch path here (see fused_path_blocker).
    return MoELayer(router, experts, AllToAllDispatcher(options.expert_count, group),
                    kernels=options.kernels, eom=options.eom)
