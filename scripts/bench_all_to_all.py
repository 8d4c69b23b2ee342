#!/usr/bin/env python
"""Bytes on the wire of expert-parallel dispatch: exact splits vs capacity padding.

Spawns W gloo processes on CPU. Each rank holds the same ``TopKRouter`` (training
mode, so capacity applies) and routes its own random tokens ``N(0, 1)`` ``[T, d]``;
the router weight is ``N(0, 1/d)`` so logits are ``~N(0, 1)``. One MoE layer's
dispatch goes through ``AllToAllDispatcher`` (``plan``, ``dispatch``, identity
experts, ``combine``) while every ``all_to_all_single`` call is recorded, and each
rank reports, for the forward dispatch all-to-all of that layer:

- ``sent``: the bytes it actually handed to the collective (rows x d x dtype
  size; rows to itself included, the part that leaves the rank in parentheses);
- ``min``: its kept assignments x d x dtype size (requested ``T x k`` minus
  capacity drops), the least any design must move: ``ratio = sent / min``,
  which must be 1.00 (no padding);
- ``padded``: what a capacity-padded design (one ``[E, C, d]`` buffer per rank,
  GShard/fairseq style) sends: ``E x C x d x dtype size`` with C the layer's
  capacity, and its ratio to ``min`` (>= the capacity factor);
- the count exchange (``W x E_l`` int64, i.e. ``E x 8`` bytes) separately.

The combine all-to-all moves the same rows back (and backward mirrors both), so
every direction has the same ratio. The last line is ``ratio_vs_min=R``, the
largest ``sent / min`` over ranks (3 decimals).

Example::

    python scripts/bench_all_to_all.py --world 4 --tokens 4096 --embed-dim 256 \\
        --experts 8 --top-k 2 --capacity-factor 1.25
"""

import argparse
import os
import queue
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TIMEOUT_S = 300


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2, help="gloo processes W (default 2)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (default 4096)")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=8, help="global E, divisible by W")
    p.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--second-expert-policy", default="all",
                   choices=("all", "sampling", "random"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16"))
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


def _worker(rank, args, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        results.put((rank, _measure(rank, args)))
    finally:
        dist.destroy_process_group()


def _measure(rank, args):
    from moe_fairseq.parallel.dispatcher import AllToAllDispatcher
    from moe_fairseq.routers.top_k import TopKRouter

    dtype = getattr(torch, args.dtype)
    d, E, k = args.embed_dim, args.experts, args.top_k
    torch.manual_seed(args.seed)  # same router on every rank
    router = TopKRouter(d, E, top_k=k, capacity_factor=args.capacity_factor,
                        second_expert_policy=args.second_expert_policy)
    with torch.no_grad():
        router.wg.weight.normal_(0.0, d ** -0.5)
    router.train()
    dispatcher = AllToAllDispatcher(E)
    g = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)  # own tokens per rank
    x = torch.randn(args.tokens, d, generator=g).to(dtype)

    calls = []
    original = dist.all_to_all_single

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        calls.append((input.numel() * input.element_size(), input_split_sizes))
        return original(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = recording
    try:
        with torch.no_grad():
            routing = router(x)
            plan = dispatcher.plan(routing)
            rows, _ = dispatcher.dispatch(x, plan)
            y = dispatcher.combine(rows, plan)  # identity experts
    finally:
        dist.all_to_all_single = original
    counts_call, dispatch_call, combine_call = calls
    assert y.shape == x.shape
    size = torch.finfo(dtype).bits // 8
    kept = plan.num_assignments - plan.num_dropped
    peers = sum(n for r, n in enumerate(dispatch_call[1]) if r != rank)
    capacity = routing.capacity if routing.capacity is not None else args.tokens
    return dict(
        tokens=args.tokens,
        requested=plan.num_assignments,
        kept=kept,
        dropped=plan.num_dropped,
        capacity=capacity,
        sent_bytes=dispatch_call[0],
        peer_bytes=peers * d * size,
        combine_bytes=combine_call[0],
        min_bytes=kept * d * size,
        padded_bytes=E * capacity * d * size,
        count_bytes=counts_call[0],
        rows_sent=plan.rows_sent,
        rows_received=plan.rows_received,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.experts % args.world:
        sys.exit(f"--experts {args.experts} must be divisible by --world {args.world}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, args, init_file, results))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        got = {}
        try:
            for _ in procs:
                rank, res = results.get(timeout=TIMEOUT_S)
                got[rank] = res
        except queue.Empty:
            pass
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    if len(got) != args.world:
        sys.exit(f"only {len(got)} of {args.world} ranks reported (see errors above)")

    dt = args.dtype
    print(f"W={args.world} tokens/rank={args.tokens} d={args.embed_dim} E={args.experts} "
          f"(E_l={args.experts // args.world}) top-{args.top_k} "
          f"capacity_factor={args.capacity_factor} dtype={dt} "
          f"second_expert_policy={args.second_expert_policy}")
    print("per rank, forward dispatch all-to-all of one MoE layer (combine returns the same):")
    worst = 0.0
    for rank in range(args.world):
        r = got[rank]
        ratio = r["sent_bytes"] / r["min_bytes"] if r["min_bytes"] else (
            1.0 if r["sent_bytes"] == 0 else float("inf"))
        padded_ratio = r["padded_bytes"] / r["min_bytes"] if r["min_bytes"] else float("inf")
        worst = max(worst, ratio)
        print(
            f"rank {rank}: assignments {r['requested']} kept {r['kept']} dropped {r['dropped']}"
            f" | sent {r['sent_bytes']} B ({r['peer_bytes']} B to peers), "
            f"received (and sent back by combine) {r['combine_bytes']} B"
            f" | min {r['min_bytes']} B | ratio {ratio:.2f}"
            f" | padded E x C = {args.experts} x {r['capacity']}: {r['padded_bytes']} B, "
            f"ratio {padded_ratio:.2f}"
            f" | counts {r['count_bytes']} B"
        )
    print(f"ratio_vs_min={worst:.3f}")


if __name__ == "__main__":
    main()
