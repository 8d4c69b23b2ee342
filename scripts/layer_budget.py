#!/usr/bin/env python
"""What one forward + backward of the MoE layer's CUDA path launches and moves, on CPU.

Counts (``moe_fairseq/layer/op_budget.py``: meta tensors under a dispatch mode) at the
issue's shapes, bf16, d = 1024, expert FFN 4096:

- E16 top-2, capacity factor 1.25, 16,384 tokens;
- E16 top-2 dropless, 16,384 tokens;
- E64 top-2, capacity factor 1.25, 32,768 tokens;

each on today's path and the fused path (``--moe-kernels triton``: routing, plan and
FFN kernels), and the dense FFN of equal active FLOPs (``Linear(d, f) -> relu ->
Linear(f, d)`` on ``top_k * tokens`` tokens; also ``bench_moe_layer.py``'s reference,
hidden ``top_k * f`` on ``tokens`` tokens). Then, for the first shape: the padded-batch
and Gumbel-sampling variants, the per-phase tables of both paths, the top contributors
to launches and to bytes on today's path, and what plain-PyTorch rewrites of it would
save under the same shape model.

    python scripts/layer_budget.py [--top 15] [--all-ops]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_fairseq.layer.op_budget import GiB, Budget, dense_ffn_budget, layer_budget  # noqa: E402

D, F, K = 1024, 4096, 2
SHAPES = (
    ("E16 top-2 cf1.25 T16k", dict(experts=16, tokens=16384, capacity_factor=1.25)),
    ("E16 top-2 dropless T16k", dict(experts=16, tokens=16384, capacity_factor=0.0)),
    ("E64 top-2 cf1.25 T32k", dict(experts=64, tokens=32768, capacity_factor=1.25)),
)
# The targets for the fused path.
TARGET_LAUNCHES, TARGET_GIB = 40, 2.0


def row(name: str, b: Budget) -> str:
    return (f"{name:<34}{b.launches_outside_gemms:>9}{b.gemm_launches:>7}"
            f"{b.elementwise_bytes / GiB:>10.3f}{b.gemm_bytes / GiB:>10.3f}"
            f"{b.memory_bound_gemm_bytes / GiB:>10.3f}{b.elementwise_like_bytes / GiB:>10.3f}"
            f"{b.aten_ops:>9}")


HEADER = (f"{'':<34}{'launches':>9}{'GEMMs':>7}{'elem GiB':>10}{'GEMM GiB':>10}"
          f"{'mem-bd':>10}{'elem+mb':>10}{'aten ops':>9}")


def _site(*sites):
    return lambda r: r.site in sites


def _phase(phase, direction=None):
    return lambda r: r.phase == phase and direction in (None, r.direction)


# Reductions: each owns a set of today's records (launches and memory-bound GEMMs; the
# first candidate of a plan that matches a record owns it) and says what would
# replace them: (launches, bytes), bytes None = unchanged (negligible). Shapes: T
# tokens, N = k T dispatched rows, width d, element size b.
def candidates(T: int, d: int, k: int, b: int):
    N = k * T
    return {
        # plain PyTorch rewrites
        "stats": ("statistics: one stats vector per pass (a few launches), or only on "
                  "logging steps (0)", _phase("statistics"), 4, None),
        "router_cast": ("router x.float() copy and its backward cast: bf16 GEMM with fp32 "
                        "output (mm out_dtype, custom Function)",
                        lambda r: r.site == "routers/top_k.py:router_input" and r.name == "copy_",
                        0, 0),
        "topk": ("router top-2 by torch.topk (argmax, gather, scatter -inf, argmax, gather, "
                 "2 stacks; gather backwards)",
                 _site("routers/top_k.py:route", "routers/top_k.py:_second_choice"), 7, None),
        "bias_aug": ("biases as an extra K row of the expert weights ([E, d+8, f], ones "
                     "column written by the gather): the GEMMs add them, the weight-grad "
                     "GEMMs give their grads; needs a custom autograd Function for the bank",
                     _site("layer/expert_bank.py:_add_bias", "layer/expert_bank.py:_row_onehot"),
                     2, 2 * N * 8 * b),
        "combine_where": ("combine: where(mask, w, 0.) with a scalar (no zeros_like) and a "
                          "scatter_rows backward gathering grad[index % T] (no [k, T, d] copy)",
                          lambda r: r.phase == "combine" and (
                              (r.direction == "fwd" and r.name in ("zero_", "where"))
                              or (r.direction == "bwd" and r.name == "copy_"
                                  and r.site == "layer/dispatcher.py:scatter_rows")),
                          1, 2 * N * d * b),
    }


TORCH_PLAN = ("stats", "router_cast", "topk", "combine_where", "bias_aug")


def project(b: Budget, plan, T: int, d: int, k: int, elem: int):
    """[(title, today's launches, memory-bound GEMMs, bytes, new launches, new bytes)],
    launches left, bytes left (element-wise + memory-bound GEMMs)."""
    cands = candidates(T, d, k, elem)
    owned, rows = set(), []
    left_l, left_b = b.launches_outside_gemms, b.elementwise_like_bytes
    for key in plan:
        title, pred, new_l, new_b = cands[key]
        rs = [r for r in b.records if id(r) not in owned and pred(r)
              and (r.kind == "launch" or r.memory_bound)]
        owned.update(id(r) for r in rs)
        now_l = sum(r.kind == "launch" for r in rs)
        now_b = sum(r.bytes for r in rs)
        new_b = now_b if new_b is None else new_b
        rows.append((title, now_l, len(rs) - now_l, now_b, new_l, new_b))
        left_l += new_l - now_l
        left_b += new_b - now_b
    return rows, left_l, left_b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=15, help="rows of the top-contributor tables")
    p.add_argument("--all-ops", action="store_true", help="print every launch of the first shape")
    args = p.parse_args(argv)
    dtype = torch.bfloat16
    elem = torch.finfo(dtype).bits // 8

    print("One forward + backward, bf16, d=1024, f=4096 (CUDA path counted on meta tensors).")
    print("launches = outside the GEMMs; elem = their bytes read + written; mem-bd = operand")
    print("bytes of memory-bound GEMMs (< 64 flop/B: one-hot bias addmm, router); elem+mb = both.")
    print()
    print(HEADER)
    budgets = {}
    for name, kw in SHAPES:
        budgets[name] = b = layer_budget(dim=D, ffn=F, top_k=K, dtype=dtype, **kw)
        print(row(name, b))
        print(row(f"  fused (--moe-kernels triton)", layer_budget(
            dim=D, ffn=F, top_k=K, dtype=dtype, kernels="triton", **kw)))
        T = kw["tokens"]
        print(row(f"  dense {K}T={K * T} tok, h={F}", dense_ffn_budget(K * T, D, F, dtype)))
        print(row(f"  dense T={T} tok, h={K * F}", dense_ffn_budget(T, D, K * F, dtype)))
    first_name, first_kw = SHAPES[0]
    first = budgets[first_name]
    for variant, kw in (("padded", dict(padded=True)),
                        ("sampling", dict(second_expert_policy="sampling"))):
        print(row(f"{first_name} {variant}", layer_budget(dim=D, ffn=F, top_k=K, dtype=dtype,
                                                          **kw, **first_kw)))
        print(row(f"  fused (--moe-kernels triton)", layer_budget(
            dim=D, ffn=F, top_k=K, dtype=dtype, kernels="triton", **kw, **first_kw)))
    print(f"issue's targets: <= {TARGET_LAUNCHES} launches outside the GEMMs, "
          f"<= {TARGET_GIB} GiB element-wise traffic")

    print(f"\n{first_name}: by phase")
    print(first.table(("phase", "direction")))
    fused = layer_budget(dim=D, ffn=F, top_k=K, dtype=dtype, kernels="triton", **first_kw)
    print(f"\n{first_name}, fused path: every launch outside the GEMMs")
    for r in fused.records:
        if r.kind == "launch":
            print(f"  {r.direction} {r.phase:<10} {r.where:<42} {r.bytes / GiB:7.4f} GiB  "
                  f"{r.name}")
    print(f"\n{first_name}: top {args.top} by launches (function)")
    print(first.table(("phase", "site"), top=args.top, sort="launches", gemms="none"))
    print(f"\n{first_name}: top {args.top} by element-wise + memory-bound GEMM bytes (line; "
          "backward ops at the forward line that built them)")
    print(first.table(("direction", "where", "name"), top=args.top, gemms="memory_bound"))
    print(f"\n{first_name}: memory-bound GEMMs")
    for r in first.memory_bound_gemms:
        print(f"  {r.direction} {r.where:<42} {r.bytes / GiB:.4f} GiB  "
              f"{r.flops / max(r.bytes, 1):5.1f} flop/B  {r.describe()}")

    T = first_kw["tokens"]
    print(f"\n{first_name}: reductions under the same model (launches outside GEMMs; "
          "element-wise + memory-bound GEMM GiB)")
    for plan_name, plan in (("plain PyTorch", TORCH_PLAN),):
        rows, left_l, left_b = project(first, plan, T, D, K, elem)
        print(f"  {plan_name}:")
        for title, now_l, now_g, now_b, new_l, new_b in rows:
            gem = f" + {now_g} memory-bound GEMMs" if now_g else ""
            print(f"    {title}\n        {now_l}{gem} -> {new_l} launches, "
                  f"{now_b / GiB:.3f} -> {new_b / GiB:.3f} GiB")
        print(f"    => {first.launches_outside_gemms} -> {left_l} launches, "
              f"{first.elementwise_like_bytes / GiB:.3f} -> {left_b / GiB:.3f} GiB "
              f"(targets {TARGET_LAUNCHES}, {TARGET_GIB})")

    if args.all_ops:
        print(f"\n{first_name}: every launch")
        for r in first.records:
            if r.kind in ("launch", "gemm"):
                print(f"  {r.kind:<6} {r.direction} {r.phase:<13} {r.where:<44} "
                      f"{r.bytes / 2**20:9.2f} MiB  {r.describe()}")


if __name__ == "__main__":
    main()
