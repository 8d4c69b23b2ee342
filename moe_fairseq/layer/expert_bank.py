"""A bank of E expert FFNs run as one grouped matrix product.

Weights are stored stacked (``w1 [E, d, f]``, ``w2 [E, f, d]``) so that the rows
of all experts, laid out contiguously by the dispatcher, go through each FFN
matrix in a single ``torch._grouped_mm`` call on GPUs where the dtype and shapes
support it, and through a loop of per-expert ``addmm`` over contiguous slices
elsewhere (always on CPU, where it is faster), which wastes no FLOPs on padding.

With ``sublayers = N > 1`` each expert is instead N post-LN residual FFN
sublayers applied in sequence (the MoEC authors' ``--moe-sublayers`` experts),
with parameters stacked ``[E, N, ...]``; see :class:`ExpertBank`.

The layer's fused path (``--moe-kernels``) does not call :meth:`ExpertBank.forward`:
:meth:`ExpertBank.fused_ffn` runs dispatch, experts and combine as two Triton kernels
on the dispatch plan (``moe_fairseq/kernels``).

Every parameter carries ``param.expert = True`` so data-parallel gradient
averaging can leave experts out when they are sharded across ranks.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq import utils

LN_EPS = 1e-5  # LayerNorm eps of the sublayers (fairseq's LayerNorm default)

# fairseq activations the fused kernels compute in their epilogue ("gelu" is fairseq's
# exact erf GELU; gelu_accurate / gelu_fast are the tanh form, which they do not have).
FUSED_ACTIVATIONS = ("relu", "gelu", "linear")

_GROUPED_MM_OK: Dict[Tuple[str, torch.dtype, int, int], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, d: int, f: int) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here, empty groups included.

    Probed once per (device type, dtype, d, f) on a tiny problem: support depends on
    the build, the GPU generation, the dtype and dimension alignment.
    """
    key = (device.type, dtype, d, f)
    if key not in _GROUPED_MM_OK:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                x = torch.randn(8, d, device=device, dtype=dtype, requires_grad=True)
                w = torch.randn(3, d, f, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([3, 3, 8], device=device, dtype=torch.int32)
                y = torch._grouped_mm(x, w, offs=offs)
                y.float().sum().backward()
                ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]]).float()
                tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
                ok = bool(torch.allclose(y.float(), ref, rtol=tol, atol=tol * d))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


class ExpertBank(nn.Module):
    """E expert FFNs run together.

    ``sublayers == 1`` (default): two-layer FFNs ``y = W2_e act(W1_e x + b1_e) + b2_e``,
    parameters ``w1 [E, d, f]``, ``b1 [E, f]``, ``w2 [E, f, d]``, ``b2 [E, d]``.

    ``sublayers = N > 1``: expert e applies N post-LN residual sublayers in turn,
    for n = 0 .. N-1::

        x <- LayerNorm_{e,n}(x + W2_{e,n} act(W1_{e,n} x + b1_{e,n}) + b2_{e,n})

    with parameters ``w1 [E, N, d, f]``, ``b1 [E, N, f]``, ``w2 [E, N, f, d]``,
    ``b2 [E, N, d]``, ``ln_weight [E, N, d]``, ``ln_bias [E, N, d]`` (LayerNorm over
    d, eps ``LN_EPS``). Dim 0 is always the expert dim.
    """

    def __init__(
        self,
        num_experts: int,
        embed_dim: int,
        ffn_dim: int,
        activation_fn: str = "relu",
        activation_dropout: float = 0.0,
        sublayers: int = 1,
    ):
        super().__init__()
        if sublayers < 1:
            raise ValueError(f"sublayers must be >= 1, got {sublayers}")
        self.num_experts = num_experts
        self.embed_dim = embed_dim
        self.ffn_dim = ffn_dim
        self.sublayers = sublayers
        self.activation_name = activation_fn  # what the fused kernels are told
        self.activation_fn = utils.get_activation_fn(activation_fn)
        self.activation_dropout = activation_dropout
        if sublayers == 1:
            # The original layout: keeps old checkpoints loadable.
            self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
            self.b1 = nn.Parameter(torch.empty(num_experts, ffn_dim))
            self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
            self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        else:
            E, N = num_experts, sublayers
            self.w1 = nn.Parameter(torch.empty(E, N, embed_dim, ffn_dim))
            self.b1 = nn.Parameter(torch.empty(E, N, ffn_dim))
            self.w2 = nn.Parameter(torch.empty(E, N, ffn_dim, embed_dim))
            self.b2 = nn.Parameter(torch.empty(E, N, embed_dim))
            self.ln_weight = nn.Parameter(torch.empty(E, N, embed_dim))
            self.ln_bias = nn.Parameter(torch.empty(E, N, embed_dim))
        for p in self.parameters():
            p.expert = True
        self.reset_parameters()
        # "auto" probes grouped_mm; "loop" forces the per-expert path (tests, benchmarks).
        self.impl = "auto"
        # Grouped path: per-row biases by a one-hot GEMM ("matmul") or by
        # repeat_interleave ("repeat", the earlier way; kept for benchmarks).
        self.bias_impl = "matmul"
        # Expert parallelism: this bank holds experts [shard_rank * E_l, (shard_rank + 1) * E_l)
        # of num_shards * E_l experts in all (E_l = self.num_experts).
        self.shard_rank = 0
        self.num_shards = 1

    def extra_repr(self) -> str:
        s = (f"num_experts={self.num_experts}, embed_dim={self.embed_dim}, "
             f"ffn_dim={self.ffn_dim}, sublayers={self.sublayers}")
        if self.num_shards > 1:
            s += f", shard={self.shard_rank}/{self.num_shards}"
        return s

    def keep_shard(self, rank: int, world: int) -> "ExpertBank":
        """Keep only this rank's contiguous block of ``E / world`` experts.

        Call it right after construction: every rank then starts from exactly the
        experts a single process with the same seed would hold.
        """
        if self.num_experts % world:
            raise ValueError(f"{self.num_experts} experts cannot be split over {world} ranks")
        local = self.num_experts // world
        lo = rank * local
        # Every parameter has the expert dim first, whatever the layout.
        for name in list(self._parameters):
            p = nn.Parameter(getattr(self, name).data[lo:lo + local].clone())
            p.expert = True
            p.expert_shard = (rank, world)
            setattr(self, name, p)
        self.num_experts, self.shard_rank, self.num_shards = local, rank, world
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints always hold every expert (consolidated at save time):
        # a sharded bank takes its own block, whatever world size wrote them.
        if self.num_shards > 1:
            for name in self._parameters:
                key = prefix + name
                full = state_dict.get(key)
                if full is not None and full.size(0) == self.num_experts * self.num_shards:
                    lo = self.shard_rank * self.num_experts
                    state_dict[key] = full[lo:lo + self.num_experts]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self):
        # Each expert starts like fairseq's nn.Linear fc1/fc2: U(-1/sqrt(fan_in), +).
        if self.sublayers == 1:
            for w, b, fan_in in ((self.w1, self.b1, self.embed_dim),
                                 (self.w2, self.b2, self.ffn_dim)):
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)
                nn.init.uniform_(b, -bound, bound)
            return
        # MoEC sublayers: fc1 and fc2's bias as nn.Linear, fc2's weight zero (each
        # sublayer starts as LN(x + b2)), LN affine the identity. w2 draws no numbers.
        bound1 = 1.0 / math.sqrt(self.embed_dim)
        nn.init.uniform_(self.w1, -bound1, bound1)
        nn.init.uniform_(self.b1, -bound1, bound1)
        nn.init.zeros_(self.w2)
        bound2 = 1.0 / math.sqrt(self.ffn_dim)
        nn.init.uniform_(self.b2, -bound2, bound2)
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)

    def _act(self, h: Tensor) -> Tensor:
        h = self.activation_fn(h)
        if self.activation_dropout > 0:
            h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return h

    def use_grouped_mm(self, rows: Tensor) -> bool:
        # No rows: the loop path keeps every parameter in the graph. CPU: the loop
        # of addmm measured faster than CPU _grouped_mm (1.3x in fp32 at 4096
        # tokens, d=256, f=1024, 8 experts), whose backward also rejects a
        # broadcast (stride-0) gradient.
        if self.impl == "loop" or rows.size(0) == 0 or rows.device.type == "cpu":
            return False
        return grouped_mm_supported(rows.device, rows.dtype, self.embed_dim, self.ffn_dim)

    def _row_onehot(self, group_sizes: Tensor, rows: Tensor) -> Tensor:
        """``[N, E]`` one-hot of each row's expert, in the rows' dtype."""
        n = rows.size(0)
        experts = torch.arange(group_sizes.numel(), device=rows.device)
        owner = torch.repeat_interleave(experts, group_sizes, output_size=n)
        return (owner.unsqueeze(1) == experts.unsqueeze(0)).to(rows.dtype)

    def _add_bias(self, h: Tensor, onehot: Tensor, bias: Tensor, group_sizes: Tensor) -> Tensor:
        """``h [N, k] + bias[expert of row]`` with ``bias [E, k]``.

        One GEMM with beta = 1 (``h + onehot @ bias``): no ``[N, k]`` copy of the
        biases, and the bias gradient is ``onehot^T @ grad``, a small GEMM, instead
        of the atomic scatter-add that indexing or ``repeat_interleave`` would do
        backward into E rows.
        """
        if self.bias_impl == "repeat":
            return h + bias.repeat_interleave(group_sizes, dim=0, output_size=h.size(0))
        return torch.addmm(h, onehot, bias)

    def forward(self, rows: Tensor, group_sizes: Tensor) -> Tensor:
        """rows ``[N, d]`` grouped by expert, group_sizes ``[E]`` (sum N) -> ``[N, d]``."""
        if self.sublayers > 1:
            return self._forward_sublayers(rows, group_sizes)
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if rows.dtype != w1.dtype:
            w1, b1, w2, b2 = (p.to(rows.dtype) for p in (w1, b1, w2, b2))
        if self.use_grouped_mm(rows):
            offs = torch.cumsum(group_sizes, 0).to(torch.int32)
            onehot = self._row_onehot(group_sizes, rows)
            h = torch._grouped_mm(rows, w1, offs=offs)
            h = self._act(self._add_bias(h, onehot, b1, group_sizes))
            return self._add_bias(torch._grouped_mm(h, w2, offs=offs), onehot, b2, group_sizes)
        outs = []
        # unbind once: indexing w1[e] per expert would make backward write a full
        # [E, d, f] zero tensor per expert.
        per_expert = zip(torch.split(rows, group_sizes.tolist()), w1.unbind(0), b1.unbind(0),
                         w2.unbind(0), b2.unbind(0))
        for chunk, w1e, b1e, w2e, b2e in per_expert:
            if chunk.size(0) == 0:
                continue
            h = self._act(torch.addmm(b1e, chunk, w1e))
            outs.append(torch.addmm(b2e, h, w2e))
        if not outs:
            # Keep every expert parameter in the graph so backward sees the same
            # parameters on every step (and, later, on every rank).
            return rows.new_zeros(0, self.embed_dim) + 0.0 * (
                w1.sum() + b1.sum() + w2.sum() + b2.sum()
            )
        return torch.cat(outs, dim=0)

    def fused_unsupported(self) -> Optional[str]:
        """Why :meth:`fused_ffn` cannot stand for this bank's forward (None: it can), as
        a phrase for an error message. The kernels compute two-layer FFNs with a relu,
        exact gelu or no activation, and no activation dropout."""
        if self.sublayers > 1:
            return f"its experts have {self.sublayers} sublayers (--moec-expert-sublayers)"
        if self.activation_name not in FUSED_ACTIVATIONS:
            return (f"its activation {self.activation_name!r} is not one of "
                    f"{list(FUSED_ACTIVATIONS)}")
        if self.activation_dropout > 0 and self.training:
            return (f"activation dropout {self.activation_dropout:g} in training "
                    "(--activation-dropout)")
        return None

    def fused_ffn(self, x: Tensor, plan) -> Tensor:
        """Dispatch, experts and combine in two fused kernels (``moe_fairseq.kernels``).

        x ``[T, d]`` tokens, plan: a :class:`~.dispatcher.SortDispatcher` plan of them
        (``num_tokens == T``) -> ``[T, d]``, token t's sum over its kept rows of
        ``gate * FFN_e(x[t])``: what ``combine(self(*dispatch(x, plan)), plan)`` gives,
        without materialising the rows. Only when :meth:`fused_unsupported` is None
        and ``kernels.available(x.device, x.dtype)``.
        """
        from .. import kernels  # imports Triton only when a kernel runs

        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if x.dtype != w1.dtype:
            w1, b1, w2, b2 = (p.to(x.dtype) for p in (w1, b1, w2, b2))
        offsets = plan.offsets  # the fused plan's
        if offsets is None:
            offsets = torch.cumsum(plan.rows_per_expert, 0).to(torch.int32)
        slot = plan.assignment_index
        h = kernels.gather_ffn1(x, w1, b1, offsets, slot, plan.num_slots, self.activation_name,
                                row_mask=plan.row_mask)
        return kernels.ffn2_combine(h, w2, b2, plan.row_gates, offsets, slot, plan.num_tokens,
                                    plan.num_slots, row_mask=plan.row_mask)

    def _forward_sublayers(self, rows: Tensor, group_sizes: Tensor) -> Tensor:
        """Experts of ``sublayers > 1`` post-LN sublayers.

        rows ``[N_rows, d]`` grouped by expert, group_sizes ``[E]`` int64 (sum N_rows)
        -> ``[N_rows, d]``.
        """
        names = ("w1", "b1", "w2", "b2", "ln_weight", "ln_bias")
        params = [getattr(self, name) for name in names]
        if rows.dtype != params[0].dtype:
            params = [p.to(rows.dtype) for p in params]
        w1, b1, w2, b2, ln_w, ln_b = params
        d = self.embed_dim
        if self.use_grouped_mm(rows):
            offs = torch.cumsum(group_sizes, 0).to(torch.int32)
            onehot = self._row_onehot(group_sizes, rows)
            x = rows
            for n in range(self.sublayers):
                # grouped_mm wants each [E, d, f] weight contiguous.
                h = self._add_bias(torch._grouped_mm(x, w1[:, n].contiguous(), offs=offs),
                                   onehot, b1[:, n], group_sizes)
                h = self._act(h)
                y = self._add_bias(torch._grouped_mm(h, w2[:, n].contiguous(), offs=offs),
                                   onehot, b2[:, n], group_sizes)
                # LayerNorm's affine differs per expert: normalise, then apply it per row.
                x = F.layer_norm(x + y, (d,), eps=LN_EPS)
                x = self._add_bias(x * (onehot @ ln_w[:, n]), onehot, ln_b[:, n], group_sizes)
            return x
        outs = []
        # unbind once (see forward): per-expert [N, ...] views, then per sublayer.
        per_expert = zip(torch.split(rows, group_sizes.tolist()), *(p.unbind(0) for p in params))
        for chunk, *expert_params in per_expert:
            if chunk.size(0) == 0:
                continue
            x = chunk
            for w1n, b1n, w2n, b2n, gn, bn in zip(*(p.unbind(0) for p in expert_params)):
                h = self._act(torch.addmm(b1n, x, w1n))
                x = F.layer_norm(x + torch.addmm(b2n, h, w2n), (d,), gn, bn, LN_EPS)
            outs.append(x)
        if not outs:
            # As in forward: every parameter stays in the graph.
            return rows.new_zeros(0, d) + 0.0 * sum(p.sum() for p in params)
        return torch.cat(outs, dim=0)
