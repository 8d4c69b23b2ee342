"""The linear top-k router after its GEMM, in three kernels: routing, losses, backward.

From fp32 logits ``[T, E]`` (``W x``, a GEMM left to cuBLAS), one program per block of
``ROUTE_BLOCK_T`` tokens computes what :class:`~moe_fairseq.routers.top_k.TopKRouter`
does in ~50 small torch launches (softmax, two argmaxes, gathers, the losses' sums,
the entropy statistic):

- :func:`route_top_k` -- probabilities, top-k experts (second choice by argmax of the
  logits, plus Gumbel noise from a given uniform ``[T, E]`` for ``sampling``), their
  gates (optionally normalised over the k slots), each token's ``logsumexp``, and per
  block: the count of each slot's choices per expert (bin E = no expert: padding) and
  fp32 partial sums (probabilities per expert, entropy, ``lse^2``) over the tokens.
  Partial sums per block rather than atomics: deterministic, and the block counts'
  running sum over blocks (one ``torch.cumsum``) is what the dispatch plan's counting
  sort needs (``kernels/plan.py``).
- :func:`router_losses` -- one program: the balance loss ``E sum_e f_e p_e`` (f: share
  of first choices, p: mean probability), the z-loss ``mean lse^2`` and the entropy sum,
  from the blocks' partials.
- :func:`route_top_k_backward` -- the logits' gradient from the gates', the
  probabilities' (if any) and the two losses' gradients, softmax backward included.

Padding (``token_mask`` False) gets expert -1, gate 0, and stays out of every sum, as in
the torch router.
"""

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from .common import block_e, mask_arg
from .host import ROUTE_BLOCK_T
# torch.finfo(torch.float32).eps: the clamp of the gate normalisations
FP32_EPS = tl.constexpr(1.1920928955078125e-07)


@triton.jit
def _token_block(pid, mask_ptr, T, E, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """Program ``pid``'s tokens: rows (int64), row and column bounds, the ``[BLOCK_T,
    BLOCK_E]`` tile mask and offsets into a ``[T, E]`` tensor, and which rows are tokens
    (in range and, with a mask, not padding)."""
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    tile = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * E + cols[None, :]
    if HAS_MASK:
        tok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        tok = row_ok
    return rows, row_ok, cols, col_ok, tile, offs, tok


@triton.jit
def _route_kernel(
    logits_ptr, noise_ptr, mask_ptr,
    probs_ptr, index_ptr, gates_ptr, lse_ptr, counts_ptr, fpart_ptr,
    T, E,
    K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_NOISE: tl.constexpr,
    NORM_BEFORE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, row_ok, cols, col_ok, tile, offs, tok = _token_block(pid, mask_ptr, T, E, HAS_MASK,
                                                               BLOCK_T, BLOCK_E)
    logits = tl.load(logits_ptr + offs, mask=tile, other=0.0)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    peak = tl.max(logits, 1)
    p = tl.exp(logits - peak[:, None])
    total = tl.sum(p, 1)
    probs = p / total[:, None]
    lse = peak + tl.log(total)
    tl.store(probs_ptr + offs, probs, mask=tile)
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    first = tl.argmax(probs, 1, tie_break_left=True)
    g1 = tl.max(probs, 1)
    e1 = tl.where(tok, first, -1)
    gate1 = tl.where(tok, g1, 0.0)
    bins = tl.arange(0, BLOCK_B)
    key1 = tl.where(tok, first, E)
    hit1 = (key1[:, None] == bins[None, :]) & row_ok[:, None]
    count_base = counts_ptr + pid * (K * (E + 1))
    tl.store(count_base + bins, tl.sum(hit1.to(tl.int32), 0), mask=bins < E + 1)
    if K == 2:
        scores = logits
        if HAS_NOISE:
            u = tl.load(noise_ptr + offs, mask=tile, other=0.5)
            u = tl.minimum(tl.maximum(u, 1e-9), 1.0 - 1e-9)
            scores = logits - tl.log(-tl.log(u))
        scores = tl.where(cols[None, :] == first[:, None], float("-inf"), scores)
        second = tl.argmax(scores, 1, tie_break_left=True)
        g2 = tl.sum(tl.where(cols[None, :] == second[:, None], probs, 0.0), 1)
        gate2 = tl.where(tok, g2, 0.0)
        if NORM_BEFORE:
            denom = tl.maximum(gate1 + gate2, FP32_EPS)
            gate1 = gate1 / denom
            gate2 = gate2 / denom
        tl.store(index_ptr + rows * 2 + 1, tl.where(tok, second, -1).to(tl.int64), mask=row_ok)
        tl.store(gates_ptr + rows * 2 + 1, gate2, mask=row_ok)
        key2 = tl.where(tok, second, E)
        hit2 = (key2[:, None] == bins[None, :]) & row_ok[:, None]
        tl.store(count_base + (E + 1) + bins, tl.sum(hit2.to(tl.int32), 0), mask=bins < E + 1)
    tl.store(index_ptr + rows * K, e1.to(tl.int64), mask=row_ok)
    tl.store(gates_ptr + rows * K, gate1, mask=row_ok)

    # Partial sums over this block's tokens: probabilities per expert, entropy, lse^2.
    ftile = tok[:, None] & col_ok[None, :]
    part = fpart_ptr + pid * (E + 2)
    tl.store(part + cols, tl.sum(tl.where(ftile, probs, 0.0), 0), mask=col_ok)
    ent = -tl.sum(tl.where(ftile, probs * tl.log(tl.maximum(probs, 1e-9)), 0.0), 1)
    tl.store(part + E, tl.sum(tl.where(tok, ent, 0.0), 0))
    tl.store(part + E + 1, tl.sum(tl.where(tok, lse * lse, 0.0), 0))


@triton.jit
def _losses_kernel(
    fpart_ptr, cum_ptr, balance_ptr, z_ptr, entropy_ptr, num_blocks, E,
    K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    prob_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    ent = tl.zeros([BLOCK_NB], dtype=tl.float32)
    lse2 = tl.zeros([BLOCK_NB], dtype=tl.float32)
    for start in range(0, num_blocks, BLOCK_NB):
        blocks = start + tl.arange(0, BLOCK_NB)
        b_ok = blocks < num_blocks
        rowp = fpart_ptr + blocks.to(tl.int64) * (E + 2)
        part = tl.load(rowp[:, None] + cols[None, :], mask=b_ok[:, None] & col_ok[None, :],
                       other=0.0)
        prob_sum += tl.sum(part, 0)
        ent += tl.load(rowp + E, mask=b_ok, other=0.0)
        lse2 += tl.load(rowp + E + 1, mask=b_ok, other=0.0)
    # Running counts: the last block's row holds the totals; slot 0 = first choices.
    first = tl.load(cum_ptr + (num_blocks - 1) * (K * (E + 1)) + cols, mask=col_ok,
                    other=0).to(tl.float32)
    n = tl.maximum(tl.sum(first, 0), 1.0)
    balance = E * tl.sum((first / n) * (prob_sum / n), 0)
    tl.store(balance_ptr, balance)
    tl.store(z_ptr, tl.sum(lse2, 0) / n)
    tl.store(entropy_ptr, tl.sum(ent, 0))


@triton.jit
def _route_backward_kernel(
    probs_ptr, lse_ptr, index_ptr, mask_ptr, gates_grad_ptr, probs_grad_ptr, balance_grad_ptr,
    z_grad_ptr, cum_ptr, out_ptr, T, E, num_blocks,
    K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GATES_GRAD: tl.constexpr,
    HAS_PROBS_GRAD: tl.constexpr, HAS_BALANCE_GRAD: tl.constexpr, HAS_Z_GRAD: tl.constexpr,
    NORM_BEFORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, row_ok, cols, col_ok, tile, offs, tok = _token_block(pid, mask_ptr, T, E, HAS_MASK,
                                                               BLOCK_T, BLOCK_E)
    probs = tl.load(probs_ptr + offs, mask=tile, other=0.0)
    # dL/dprobs, then the softmax backward.
    grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_PROBS_GRAD:
        grad += tl.load(probs_grad_ptr + offs, mask=tile, other=0.0)
    if HAS_GATES_GRAD:
        # Padding rows' gates were replaced by 0: no gradient reaches their probabilities.
        e1 = tl.load(index_ptr + rows * K, mask=row_ok, other=-1)
        d1 = tl.load(gates_grad_ptr + rows * K, mask=row_ok, other=0.0)
        if K == 2:
            e2 = tl.load(index_ptr + rows * 2 + 1, mask=row_ok, other=-1)
            d2 = tl.load(gates_grad_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
            if NORM_BEFORE:
                # gate_j = g_j / max(g_1 + g_2, eps)
                g1 = tl.sum(tl.where(cols[None, :] == e1[:, None], probs, 0.0), 1)
                g2 = tl.sum(tl.where(cols[None, :] == e2[:, None], probs, 0.0), 1)
                s = g1 + g2
                denom = tl.maximum(s, FP32_EPS)
                dot = tl.where(s >= FP32_EPS, (d1 * g1 + d2 * g2) / (denom * denom), 0.0)
                d1 = d1 / denom - dot
                d2 = d2 / denom - dot
            grad += tl.where((cols[None, :] == e2[:, None]) & tok[:, None], d2[:, None], 0.0)
        grad += tl.where((cols[None, :] == e1[:, None]) & tok[:, None], d1[:, None], 0.0)
    cum_last = cum_ptr + (num_blocks - 1) * (K * (E + 1))
    first = tl.load(cum_last + cols, mask=col_ok, other=0).to(tl.float32)
    n = tl.maximum(tl.sum(first, 0), 1.0)
    if HAS_BALANCE_GRAD:
        # balance = E sum_e f_e mean_t p_te: d/dp_te = E f_e / n for every token t.
        gb = tl.load(balance_grad_ptr)
        grad += tl.where(tok[:, None], (gb * E / (n * n)) * first[None, :], 0.0)
    dlogits = probs * (grad - tl.sum(probs * grad, 1)[:, None])
    if HAS_Z_GRAD:
        # z = mean_t lse_t^2: d/dlogit_te = 2 lse_t p_te / n.
        gz = tl.load(z_grad_ptr)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        dlogits += tl.where(tok, (2.0 * gz / n) * lse, 0.0)[:, None] * probs
    tl.store(out_ptr + offs, dlogits, mask=tile)


def _bins(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts + 1))


def route_top_k(logits: Tensor, token_mask: Optional[Tensor], noise: Optional[Tensor],
                top_k: int, normalize_before: bool, probs: Tensor, index: Tensor, gates: Tensor,
                lse: Tensor, counts: Tensor, fpart: Tensor) -> None:
    """Launch the routing kernel into the given outputs (see :mod:`.routing_ops`)."""
    T, E = logits.shape
    grid = (triton.cdiv(T, ROUTE_BLOCK_T),)
    dummy = logits
    _route_kernel[grid](
        logits, dummy if noise is None else noise, mask_arg(token_mask, dummy),
        probs, index, gates, lse, counts, fpart, T, E,
        K=top_k, HAS_MASK=token_mask is not None, HAS_NOISE=noise is not None,
        NORM_BEFORE=normalize_before, BLOCK_T=ROUTE_BLOCK_T, BLOCK_E=block_e(E),
        BLOCK_B=_bins(E))


def router_losses(fpart: Tensor, cum: Tensor, balance: Tensor, z: Tensor,
                  entropy: Tensor) -> None:
    """Launch the one-program losses kernel into three 0-dim fp32 outputs."""
    num_blocks, K, bins = cum.shape
    E = bins - 1
    _losses_kernel[(1,)](fpart, cum, balance, z, entropy, num_blocks, E, K=K, BLOCK_E=block_e(E),
                         BLOCK_NB=min(256, max(2, triton.next_power_of_2(num_blocks))))


def route_top_k_backward(probs: Tensor, lse: Tensor, index: Tensor, token_mask: Optional[Tensor],
                         gates_grad: Optional[Tensor], probs_grad: Optional[Tensor],
                         balance_grad: Optional[Tensor], z_grad: Optional[Tensor], cum: Tensor,
                         normalize_before: bool, out: Tensor) -> None:
    """Launch the backward kernel into ``out`` (the logits' gradient ``[T, E]``); the
    losses' gradients are 0-dim tensors (None: that loss reached no objective)."""
    T, E = probs.shape
    num_blocks, K, _ = cum.shape

    def arg(t):
        return probs if t is None else t

    _route_backward_kernel[(triton.cdiv(T, ROUTE_BLOCK_T),)](
        probs, lse, index, mask_arg(token_mask, probs), arg(gates_grad), arg(probs_grad),
        arg(balance_grad), arg(z_grad), cum, out, T, E, num_blocks,
        K=K, HAS_MASK=token_mask is not None, HAS_GATES_GRAD=gates_grad is not None,
        HAS_PROBS_GRAD=probs_grad is not None, HAS_BALANCE_GRAD=balance_grad is not None,
        HAS_Z_GRAD=z_grad is not None, NORM_BEFORE=normalize_before,
        BLOCK_T=ROUTE_BLOCK_T, BLOCK_E=block_e(E))
