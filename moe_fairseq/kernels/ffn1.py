"""``gather_ffn1``: the experts' first layer, with the gather of tokens into rows fused
into the GEMM's loads and bias + activation into its epilogue::

    H[r] = act(X[slot[r] % T] @ W1[e(r)] + b1[e(r)])

Backward (no atomics):

- dA = dH * act'(.) is formed on the fly in the loads of both backward kernels;
- dX: per-row ``dA[r] @ W1[e]^T`` stored at slot ``slot[r]`` of a ``[k * T, d]`` stack,
  then summed over the k slots of each token;
- dW1[e] = X_e^T dA_e and db1[e] = sum of dA_e, in one per-expert pass (``xty``).

With a row mask, masked rows are zeroed by ``where`` in every backward load.

The launches are the custom ops ``moe_fairseq::gather_ffn1`` (forward, differentiable),
``ffn1_dx`` and ``ffn1_dw`` (see :mod:`.ops`); this module checks the arguments.
"""

from typing import Optional

from torch import Tensor

from .host import DEFAULT_CONFIG, SUPPORTED_DTYPES, BlockConfig, activation_code, \
    check_routing_args, check_same_device
from .ops import config_list, gather_ffn1_op


def gather_ffn1(x: Tensor, w1: Tensor, b1: Tensor, offsets: Tensor, slot: Tensor,
                num_slots: int, activation: str = "relu", row_mask: Optional[Tensor] = None,
                config: Optional[BlockConfig] = None) -> Tensor:
    """``H [N, f]``: row r is ``act(x[slot[r] % T] @ w1[e] + b1[e])``, e its expert.

    Args:
        x: ``[T, d]`` tokens.
        w1: ``[E, d, f]``; b1: ``[E, f]``; same dtype as x (fp32, fp16 or bf16).
        offsets: ``[E]`` int32, cumulative row counts: expert e owns rows
            ``[offsets[e-1], offsets[e])`` (``torch.cumsum(sizes, 0).int()``, as
            ``torch._grouped_mm``'s ``offs``); ``offsets[-1]`` must equal N.
        slot: ``[N]`` int64, each row's slot ``j * T + t`` (the dispatch plan's
            ``assignment_index``): the row reads token ``t = slot % T``, and in
            backward its dX lands in slot ``slot[r]`` of a ``[k * T, d]`` stack. Slots
            must be distinct and ``< num_slots * T``.
        num_slots: k, slots per token.
        activation: ``"relu"``, ``"gelu"`` (exact erf) or ``"linear"``.
        row_mask: optional ``[N]`` bool; rows with False take no part in backward
            (their dA and their x rows in dW1 are forced to 0 even if not finite).
            Their forward output is still computed.
        config: tile sizes (:class:`BlockConfig`).
    """
    config = config or DEFAULT_CONFIG
    E, d, f = w1.shape
    if x.dim() != 2 or x.size(1) != d or b1.shape != (E, f):
        raise ValueError(f"gather_ffn1: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"b1 {tuple(b1.shape)} do not fit x [T, d], w1 [E, d, f], b1 [E, f]")
    if x.dtype not in SUPPORTED_DTYPES or w1.dtype != x.dtype or b1.dtype != x.dtype:
        raise ValueError(f"gather_ffn1: dtypes x {x.dtype}, w1 {w1.dtype}, b1 {b1.dtype}: "
                         f"all must be one of {SUPPORTED_DTYPES}")
    activation_code(activation)  # a clear error for an unknown name
    check_same_device(x.device, w1=w1, b1=b1)
    check_routing_args(offsets, slot, slot.numel(), E, x.device, row_mask)
    h, _ = gather_ffn1_op(x, w1, b1, offsets, slot, num_slots, activation, row_mask,
                          config_list(config))
    return h
