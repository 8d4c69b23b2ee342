#!/usr/bin/env python
"""The cluster-structure study of Chen et al. (NeurIPS 2022, arXiv 2208.02813): why a
nonlinear MoE beats a single expert on data with cluster structure.

For each setting and seed: generate the data (examples/cluster_study/data.py), train
single linear / single nonlinear / MoE linear / MoE nonlinear with the authors'
optimisers (normalised GD for the experts, SGD for the noisy top-1 router; Adam for
the single models; full batch), and measure test accuracy and dispatch entropy. The
MoE is the package's own MoELayer with the noisy top-1 router. Writes to --out:
``runs.jsonl`` (every seed's numbers, as runs end; a rerun skips them), ``table.md``
(mean ± std, median, collapsed seeds, the authors' figures, acceptance checks),
``accuracy.png`` and ``router_centers.png`` (router weights against the true centres).

    python scripts/cluster_study.py --settings 1 2 3 4 --seeds 10
    python scripts/cluster_study.py --quick      # 2,000 points, 101 epochs (tests)
"""

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.cluster_study.data import N_TEST, N_TRAIN, SETTINGS, generate, train_test  # noqa: E402
from examples.cluster_study.report import accuracy_png, markdown, router_centers_png  # noqa: E402
from examples.cluster_study.train import MODELS, Schedule, run  # noqa: E402
from moe_fairseq.analysis.run_records import append_record, read_records, write_atomic  # noqa: E402

QUICK = dict(n=2000, moe_epochs=101, single_epochs=101)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=int, nargs="+", default=[1, 2, 3, 4],
                   help=f"data settings, from {sorted(SETTINGS)} (default all)")
    p.add_argument("--seeds", type=int, default=10, help="seeds 1..N per setting and model (default 10)")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"from {', '.join(MODELS)}")
    p.add_argument("--n", type=int, default=N_TRAIN, help=f"training and test points each (default {N_TRAIN})")
    p.add_argument("--moe-epochs", type=int, default=501)
    p.add_argument("--single-epochs", type=int, default=801)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['n']} points, {QUICK['moe_epochs']} epochs (for tests)")
    p.add_argument("--no-noise-at-eval", action="store_true",
                   help="route test points without the router noise (the authors keep it)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    p.add_argument("--out", help="output folder (default runs/cluster_study[-quick])")
    p.add_argument("--restart", action="store_true", help="forget the runs already in --out")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.moe_epochs, args.single_epochs = QUICK["n"], QUICK["moe_epochs"], QUICK["single_epochs"]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        p.error(f"--settings: {bad} not in {sorted(SETTINGS)}")
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: {bad} not in {list(MODELS)}")
    for flag in ("seeds", "n", "moe_epochs", "single_epochs", "jobs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    args.out = args.out or os.path.join("runs", "cluster_study" + ("-quick" if args.quick else ""))
    return args


@functools.lru_cache(maxsize=2)
def _data(setting, seed, n):
    """The (train, test) splits, generated once per (setting, seed) in a process: the
    four models of a seed train on the same data."""
    return train_test(setting, seed, n_train=n, n_test=n)


def _one(args, setting, seed, model):
    import torch
    if args.jobs > 1:
        torch.set_num_threads(1)
    train, test = _data(setting, seed, args.n)
    schedule = Schedule(moe_epochs=args.moe_epochs, single_epochs=args.single_epochs)
    r = run(model, train, test, seed, schedule, noise_at_eval=not args.no_noise_at_eval)
    r.update(setting=setting, n=args.n, moe_epochs_max=args.moe_epochs,
             single_epochs_max=args.single_epochs, noise_at_eval=not args.no_noise_at_eval)
    return r


def _key(r):
    return (r["setting"], r["seed"], r["model"], r["n"], r["moe_epochs_max"],
            r["single_epochs_max"], r["noise_at_eval"])


def main(argv=None):
    args = parse_args(argv)
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "runs.jsonl")
    if args.restart and os.path.exists(log_path):
        os.remove(log_path)
    done = read_records(log_path)
    shape = (args.n, args.moe_epochs, args.single_epochs, not args.no_noise_at_eval)
    have = {_key(r) for r in done}
    todo = [(s, seed, m) for seed in range(1, args.seeds + 1) for s in args.settings
            for m in args.models if (s, seed, m) + shape not in have]
    print(f"{len(todo)} runs to do, {len(have)} already in {log_path}", flush=True)
    start = time.perf_counter()

    def record(r):
        append_record(log_path, r)
        done.append(r)
        ent = "" if r.get("dispatch_entropy") is None else f", dispatch entropy {r['dispatch_entropy']:.3f}"
        print(f"  S{r['setting']} seed {r['seed']} {r['model']}: test accuracy {r['test_accuracy']:.2f}%"
              f"{ent} ({r['epochs']} epochs, {r['seconds']:.1f} s)", flush=True)

    if args.jobs == 1:
        for item in todo:
            record(_one(args, *item))
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as ex:
            for fut in as_completed([ex.submit(_one, args, *item) for item in todo]):
                record(fut.result())
    runs = [r for r in done if r["setting"] in args.settings and r["seed"] <= args.seeds
            and r["model"] in args.models and _key(r)[3:] == shape]
    full = args.n == N_TRAIN and args.moe_epochs == 501 and args.single_epochs == 801 \
        and not args.no_noise_at_eval
    header = (f"{args.n} training / {args.n} test points, MoE up to {args.moe_epochs} epochs, single "
              f"models up to {args.single_epochs}, seeds 1..{args.seeds}; test accuracy mean ± std "
              f"(population std, as the authors) over seeds; dispatch entropy in nats (max ln 4 = 1.386) "
              f"on the last training forward\n")
    table = markdown(runs, header, with_checks=full)
    write_atomic(os.path.join(args.out, "table.md"), table)
    write_atomic(os.path.join(args.out, "results.json"), json.dumps(
        [{k: v for k, v in r.items() if k != "router_weight"} for r in runs], indent=1))
    print("\n" + table)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no figures")
        return 0
    if runs:
        print("figure:", accuracy_png(os.path.join(args.out, "accuracy.png"), runs))
    moe = [r for r in runs if r["model"] == "moe_nonlinear"]
    if moe:
        # the median-accuracy nonlinear MoE run of the first setting
        first = sorted((r for r in moe if r["setting"] == moe[0]["setting"]), key=lambda r: r["test_accuracy"])
        pick = first[len(first) // 2]
        basis = generate(pick["setting"], 1, pick["seed"])
        print("figure:", router_centers_png(os.path.join(args.out, "router_centers.png"), pick,
                                            basis.centers, basis.features))
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
