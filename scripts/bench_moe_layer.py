#!/usr/bin/env python
"""Micro-benchmark: MoE layer forward+backward vs. a dense FFN of equal active FLOPs.

What is compared (same tokens, same dtype, same device, one process):

- **MoE**: ``MoELayer(TopKRouter, ExpertBank)`` with ``E`` experts of FFN dim ``f``,
  top-``k`` routing, in *training mode* (so capacity applies), second-expert
  policy ``all`` by default (deterministic: every token visits its 2 best
  experts; ``--second-expert-policy sampling`` adds the Gumbel noise of fairseq's
  default). The timed step is ``layer(x)`` followed by ``backward`` of
  ``sum(out * g) + 0.01 * balance_loss + 0.001 * z_loss`` (``g`` a fixed random
  upstream gradient), i.e. what one transformer-layer FFN costs in training,
  router and routing losses included.
- **Dense**: ``Linear(d, k*f) -> relu -> Linear(k*f, d)`` on the same input, same
  upstream gradient. Its FLOPs equal the MoE's expert FLOPs *when no assignment
  is dropped*.

Inputs are ``N(0, 1)`` tokens ``[T, d]`` with ``requires_grad=True`` (as inside a
transformer). The router weight is ``N(0, 1/d)`` so logits are ``~N(0, 1)``:
routing is spread over all experts but not uniform.

Capacity: training capacity is ``ceil(capacity_factor * k * T / E)`` per expert
(default factor 1.25, the usual GShard/fairseq value). Assignments past
capacity are dropped, so the MoE may do *fewer* expert FLOPs than the dense
reference; the overflow (dropped / requested assignments) is printed next to the
timings. ``--capacity-factor 0`` is dropless routing (the router's own
``--moe-capacity-factor 0``: no capacity, nothing dropped), which gives an exact FLOP
match.

Timing: ``--warmup`` untimed MoE+dense steps, then ``--repeats`` timed steps of
each, **interleaved** (MoE, dense, dense, MoE, MoE, dense, ...: the order
alternates every repetition) so that load from other processes on a shared
machine hits both sides alike; the medians are reported. On CUDA each step is
bracketed by ``torch.cuda.synchronize()`` and timed with CUDA events. Parameter
gradients are reset to ``None`` outside the timed region.

Phase breakdown: a separate, instrumented MoE forward that calls the library's
pieces directly (``router``, ``dispatcher.plan``, ``dispatcher.dispatch``,
``experts``, ``dispatcher.combine``) with a device sync between pieces, then one
backward; medians over ``--repeats`` such passes. It is not part of the ratio.
``--profile`` additionally prints a ``torch.profiler`` op table of a few MoE steps.

Shared machines: on a CPU with other busy processes, the MoE step (hundreds of
small OpenMP-parallel ops: 8 experts x (addmm, relu, addmm) forward and their
backward) suffers far more than the dense step (a dozen large GEMMs), because
OpenMP worker threads spin-wait at every parallel region and lose their core
to the other processes. Interleaving does not cancel that asymmetry: on a
loaded 2-core machine the ratio can read 1.7-2.5x instead of ~0.95. The header
prints the 1-minute load average (this run included) and a warning when it
exceeds the core count; compare under load with ``--threads 1`` or with
``OMP_WAIT_POLICY=PASSIVE`` in the environment (read when torch loads, so it
must be set outside the script), both of which keep the ratio close to its
quiet-machine value.

The last line of output is exactly ``ratio_vs_dense=R`` (MoE median / dense
median, 3 decimals).

Example::

    python scripts/bench_moe_layer.py --device cpu --dtype float32 \\
        --tokens 4096 --embed-dim 256 --ffn-dim 1024 --experts 8 --top-k 2
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_fairseq.layer.moe_layer import MoELayer  # noqa: E402
from moe_fairseq.layer.expert_bank import ExpertBank  # noqa: E402
from moe_fairseq.routers.top_k import TopKRouter  # noqa: E402
from moe_fairseq.routers.stratified import StratifiedRouter, parse_strata  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BALANCE_WT, Z_WT = 0.01, 0.001


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024, help="per-expert FFN dim f")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=1.25,
        help="training capacity factor (0 = dropless routing)",
    )
    p.add_argument(
        "--second-expert-policy", default="all", choices=("all", "sampling", "random")
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--impl", default="auto", choices=("auto", "loop"), help="ExpertBank path")
    p.add_argument("--bias-impl", default="matmul", choices=("matmul", "repeat"),
                   help="grouped path: per-row expert biases by a one-hot GEMM or repeat_interleave")
    p.add_argument("--kernels", default="torch", choices=("torch", "triton", "both"),
                   help="the layer's expert path (--moe-kernels): today's PyTorch path, the "
                        "fused Triton path, or both timed in the same interleaved run")
    p.add_argument("--reference", action="store_true",
                   help="also time the bare reference: top-k, sort, gather, torch._grouped_mm, "
                        "relu, torch._grouped_mm, index_add (no capacity, biases, losses)")
    p.add_argument("--sync-check", action="store_true",
                   help="CUDA: run one step of each MoE path under "
                        "torch.cuda.set_sync_debug_mode('error') and report host syncs")
    p.add_argument("--count-kernels", action="store_true",
                   help="CUDA: count the kernels one fwd+bwd step of each path launches "
                        "(torch.profiler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler op table")
    p.add_argument("--no-phases", action="store_true", help="skip the instrumented phase pass")
    p.add_argument("--smoe-strata", default=None, metavar="N1,N2,...",
                   help="benchmark the SMoE stratified router with these strata (summing to "
                        "--experts) instead of the linear router; a token then makes 1..L "
                        "expert passes, so the dense reference matches one pass only")
    return p.parse_args(argv)


class DenseFFN(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def build(args, device, dtype):
    d, f, E, k = args.embed_dim, args.ffn_dim, args.experts, args.top_k
    cf = args.capacity_factor
    if args.smoe_strata:
        strata = parse_strata(args.smoe_strata)
        if sum(strata) != E:
            raise SystemExit(f"--smoe-strata {args.smoe_strata} must sum to --experts {E}")
        router = StratifiedRouter(d, strata, top_k=k, capacity_factor=cf,
                                  second_expert_policy=args.second_expert_policy)
        for gate in router.gates:
            nn.init.normal_(gate.wg.weight, std=d**-0.5)
    else:
        router = TopKRouter(d, E, top_k=k, capacity_factor=cf,
                            second_expert_policy=args.second_expert_policy)
        nn.init.normal_(router.wg.weight, std=d**-0.5)
    experts = ExpertBank(E, d, f, activation_fn="relu")
    experts.impl = args.impl
    experts.bias_impl = args.bias_impl
    moe = MoELayer(router, experts).to(device=device, dtype=dtype).train()
    dense = DenseFFN(d, k * f).to(device=device, dtype=dtype).train()
    return moe, dense, cf


class Timer:
    """Wall time on CPU, CUDA events (bracketed by synchronize) on GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        """Run ``fn()`` once, return milliseconds."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def moe_step(moe, x, g):
    out = moe(x)
    losses = moe.stats.losses
    loss = (out * g).sum() + BALANCE_WT * losses["balance"] + Z_WT * losses["z"]
    loss.backward()


def dense_step(dense, x, g):
    out = dense(x)
    (out * g).sum().backward()


def set_kernels(moe, mode: str) -> None:
    """Select the layer's expert path, as --moe-kernels does."""
    moe.kernels = mode


class BareReference(nn.Module):
    """The simplest sort-based MoE on the same shapes and weights: top-k of the router's
    softmax, a sort by expert, a gather, two ``torch._grouped_mm`` around a relu, and an
    index_add of the gated rows. No capacity, no biases, no losses, no statistics: the
    floor a full layer is measured against."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        router, bank = self.moe.router, self.moe.experts
        E, k, T = bank.num_experts, router.top_k, x.size(0)
        probs = (x @ router.wg.weight.t().to(x.dtype)).float().softmax(-1)
        gates, index = probs.topk(k, dim=-1)
        flat = index.reshape(-1)
        order = flat.argsort()
        token = order // k
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        h = torch.relu(torch._grouped_mm(x[token], bank.w1, offs=offs))
        y = torch._grouped_mm(h, bank.w2, offs=offs)
        y = y * gates.reshape(-1)[order].to(y.dtype).unsqueeze(1)
        return torch.zeros_like(x).index_add(0, token, y)


def bare_step(bare, x, g):
    (bare(x) * g).sum().backward()


def host_syncs(step) -> str:
    """'none', or the first host sync CUDA's sync debug mode reports in ``step()``."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def kernels_per_step(step) -> int:
    """CUDA kernels one ``step()`` launches (profiler events on the device)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def phase_pass(moe, x, g, timer):
    """One instrumented MoE forward (library pieces called directly) + backward -> ms per phase."""
    t = {}
    router, disp, experts = moe.router, moe.dispatcher, moe.experts
    res = {}

    def run(name, fn):
        t[name] = timer(lambda: res.__setitem__(name, fn()))
        return res[name]

    routing = run("router", lambda: router(x, 0))
    plan = run("plan", lambda: disp.plan(routing))
    rows, local_sizes = run("gather", lambda: disp.dispatch(x, plan))
    rows = run("experts", lambda: experts(rows, local_sizes))
    y = run("combine", lambda: disp.combine(rows, plan))
    # The layer forward also does stats bookkeeping; its difference to the sum of
    # these pieces is reported as "other".
    loss_fn = lambda: (  # noqa: E731
        (y * g).sum() + BALANCE_WT * routing.losses["balance"] + Z_WT * routing.losses["z"]
    ).backward()
    t["backward"] = timer(loss_fn)
    x.grad = None
    zero_grads(moe)
    return t


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)

    moe, dense, cf = build(args, device, dtype)
    T, d, E, k = args.tokens, args.embed_dim, args.experts, args.top_k
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, d, device=device, dtype=dtype)
    timer = Timer(device)
    path = "grouped_mm" if moe.experts.use_grouped_mm(x) else "loop"  # probes once, untimed

    paths = {"torch": ["torch"], "triton": ["triton"], "both": ["torch", "triton"]}[args.kernels]

    def moe_runner(mode):
        def run():
            set_kernels(moe, mode)
            moe_step(moe, x, g)
        return run

    def run_dense():
        dense_step(dense, x, g)

    bare = BareReference(moe) if args.reference else None
    contenders = {f"MoE ({mode})" if len(paths) > 1 else "MoE": moe_runner(mode) for mode in paths}
    contenders["dense"] = run_dense
    if bare is not None:
        contenders["bare sort+grouped_mm"] = lambda: bare_step(bare, x, g)

    def reset():
        x.grad = None
        zero_grads(moe, dense)

    for _ in range(args.warmup):
        for fn in contenders.values():
            fn()
            reset()
    timer.sync()

    samples = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(args.repeats):
        # the order rotates every repetition: load from other processes hits all alike
        for name in names[i % len(names):] + names[:i % len(names)]:
            samples[name].append(timer(contenders[name]))
            reset()
    moe_name = names[len(paths) - 1]  # the last MoE path given: the one the ratio is of
    moe_ms, dense_ms = samples[moe_name], samples["dense"]
    diagnostics = {}
    if device.type == "cuda" and (args.sync_check or args.count_kernels):
        for name, fn in contenders.items():
            d = {}
            if args.sync_check and name.startswith("MoE"):
                d["host_syncs"] = host_syncs(fn)
                reset()
            if args.count_kernels:
                d["kernels"] = kernels_per_step(fn)
                reset()
            diagnostics[name] = d
    set_kernels(moe, paths[-1])

    # Routing statistics of the (deterministic unless policy != all) routing.
    with torch.no_grad():
        moe(x)
    st = moe.stats
    requested, dropped = int(st.assignments), int(st.dropped)
    load = st.expert_load.tolist()
    routing = moe.router(x.detach(), 0)
    requested_capacity = int(st.expert_passes) / max(int(st.tokens), 1)

    phases = {}
    # The instrumented pass calls the pieces of one routing pass: single-pass routers only.
    if not args.no_phases and moe.router.num_passes == 1:
        for _ in range(args.warmup):
            phase_pass(moe, x, g, timer)
        phase_samples = [phase_pass(moe, x, g, timer) for _ in range(args.repeats)]
        fwd_grad, fwd_nograd = [], []
        for _ in range(args.repeats):
            fwd_grad.append(timer(lambda: moe(x)))
            with torch.no_grad():
                fwd_nograd.append(timer(lambda: moe(x)))
        phases = {name: statistics.median(s[name] for s in phase_samples)
                  for name in phase_samples[0]}
        phases["layer fwd (grad on)"] = statistics.median(fwd_grad)
        phases["layer fwd (no_grad)"] = statistics.median(fwd_nograd)

    moe_med, dense_med = statistics.median(moe_ms), statistics.median(dense_ms)
    ratio = moe_med / dense_med

    def spread(v):
        return f"min {min(v):8.2f}  max {max(v):8.2f}"

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = os.cpu_count() or 1
    print(f"device={device.type} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    if device.type == "cpu":
        print(f"loadavg_1m={load1:.2f} cores={cores}")
        if load1 > cores:
            print("WARNING: CPU busy with other processes; the MoE/dense ratio is inflated "
                  "with threads > 1 (see the docstring: --threads 1 or OMP_WAIT_POLICY=PASSIVE)")
    print(f"tokens={T} embed_dim={d} ffn_dim={args.ffn_dim} experts={E} top_k={k} "
          f"dense_hidden={k * args.ffn_dim}")
    print(f"policy={args.second_expert_policy} capacity_factor={cf:g} capacity={routing.capacity} "
          f"expert_bank_path={path} (impl={args.impl}, bias_impl={args.bias_impl})")
    print(f"assignments={requested} dropped={dropped} overflow_fraction={dropped / max(requested, 1):.4f} "
          f"kept_rows={requested - dropped} (dense-equivalent rows={T * k})")
    print(f"expert_load={load}")
    if args.smoe_strata:
        print(f"smoe_strata={args.smoe_strata} requested_capacity={requested_capacity:.3f} "
              f"(expert passes per token; the dense reference does 1) "
              f"ratio_per_pass={ratio / requested_capacity:.3f}")
    print(f"repeats={args.repeats} warmup={args.warmup} (MoE/dense interleaved, order alternating)")
    print()
    print(f"{'fwd+bwd':<22}{'median ms':>10}    spread")
    for name, v in samples.items():
        extra = "".join(f"  {k}={val}" for k, val in diagnostics.get(name, {}).items())
        print(f"{name:<22}{statistics.median(v):>10.2f}    {spread(v)}{extra}")
    if len(paths) > 1:
        torch_med = statistics.median(samples["MoE (torch)"])
        print(f"ratio_torch_vs_dense={torch_med / dense_med:.3f}")
        print(f"speedup_triton_vs_torch={torch_med / moe_med:.3f}")
    if bare is not None:
        print(f"ratio_bare_vs_dense={statistics.median(samples['bare sort+grouped_mm']) / dense_med:.3f}")
    if phases:
        print()
        print("MoE phases (instrumented pass, synced between pieces, medians)")
        fwd_sum = sum(phases[n] for n in ("router", "plan", "gather", "experts", "combine"))
        for name in ("router", "plan", "gather", "experts", "combine"):
            print(f"  {name:<20}{phases[name]:>10.2f}  ({100 * phases[name] / fwd_sum:4.1f}% of fwd pieces)")
        print(f"  {'sum of fwd pieces':<20}{fwd_sum:>10.2f}")
        print(f"  {'layer fwd (grad on)':<20}{phases['layer fwd (grad on)']:>10.2f}"
              f"  (other = {phases['layer fwd (grad on)'] - fwd_sum:+.2f}: stats bookkeeping)")
        print(f"  {'layer fwd (no_grad)':<20}{phases['layer fwd (no_grad)']:>10.2f}")
        print(f"  {'backward':<20}{phases['backward']:>10.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                contenders[moe_name]()
                reset()
            timer.sync()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print()
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    print()
    print(f"ratio_vs_dense={ratio:.3f}")


if __name__ == "__main__":
    main()
