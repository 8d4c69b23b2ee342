#!/usr/bin/env python3
"""What the experts learned: a routing report with figures, for one MoE checkpoint or
several side by side.

    python scripts/routing_report.py --path checkpoints/moe/checkpoint_best.pt \
        --data data-bin/corpus --split test --out reports/moe
    python scripts/routing_report.py --path runs/moe/checkpoint_last.pt \
        --path runs/smoe/checkpoint_last.pt --label MoE --label SMoE \
        --data data-bin/corpus --out reports/moe_vs_smoe

Routes the split, one translation direction at a time (teacher-forced, eval mode), and
writes into --out: report.md (tables, which experts took which languages, the figures),
report.json (every number) and PNG figures: per MoE layer, heat maps of the routing
share expert x target language and expert x source language; expert load with the
fair share and starved experts; I(expert; language) in bits; per-token gate entropy
and expert-usage entropy; SMoE's strata and requested capacity per language; MoEC's
load per cluster. See moe_fairseq/analysis/routing_counts.py for the definitions.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_MODELS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--path", action="append", required=True, metavar="CKPT",
                   help=f"checkpoint written by fairseq-train; repeat (up to {MAX_MODELS}) to "
                        "draw models side by side")
    p.add_argument("--label", action="append", default=[],
                   help="name of each --path in the figures, in the same order (default: "
                        "the checkpoint's folder name)")
    p.add_argument("--data", help="data-bin folder (default: the one saved in the checkpoint)")
    p.add_argument("--split", default="test", help="data split to route (default: test)")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the "
                                                "figures (created; files of an earlier "
                                                "report there are replaced)")
    p.add_argument("--lang-pairs", help="route only these directions, e.g. en-de,de-en "
                                        "(default: every direction of the checkpoint)")
    p.add_argument("--max-tokens", type=int, default=4000, help="tokens per batch")
    p.add_argument("--max-sentences", type=int, default=0,
                   help="route about this many sentences per direction (0 = the whole split)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    p.add_argument("--verbose", action="store_true", help="show fairseq's INFO logging")
    args = p.parse_args(argv)
    if len(args.path) > MAX_MODELS:
        p.error(f"--path: at most {MAX_MODELS} checkpoints side by side, got {len(args.path)}")
    if args.label and len(args.label) != len(args.path):
        p.error(f"--label: give one per --path ({len(args.path)}), got {len(args.label)}")
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-sentences", args.max_sentences)):
        if value < (1 if flag == "--max-tokens" else 0):
            p.error(f"{flag} must be {'>= 1' if flag == '--max-tokens' else '>= 0'}, got {value}")
    for path in args.path:
        if not os.path.isfile(path):
            p.error(f"--path {path}: no such checkpoint file")
    from moe_fairseq.atomic_files import output_path_problem

    problem = output_path_problem(os.path.join(args.out, "report.json"), "report.json")
    if problem:  # before the long routing pass
        p.error(f"--out {args.out}: {problem}")
    args.labels = args.label or default_labels(args.path)
    if len(set(args.labels)) != len(args.labels):
        p.error(f"--label: the names must differ, got {', '.join(args.labels)}")
    args.directions = args.lang_pairs.split(",") if args.lang_pairs else None
    return args


def default_labels(paths):
    """The checkpoints' folder names (``runs/moe/checkpoint_last.pt`` -> ``moe``), made
    unique with the file name when two share a folder."""
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{l}/{os.path.splitext(os.path.basename(p))[0]}" for l, p in zip(labels, paths)]
    return labels


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        logging.disable(logging.INFO)
    import torch

    import moe_fairseq  # noqa: F401  (architectures, checkpoint loading, one-line errors)
    from moe_fairseq.analysis.route_split import RouteSplitError, load_model, route_split
    from moe_fairseq.analysis.routing_report import language_sentence, write_report

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    models = []
    for label, path in zip(args.labels, args.path):
        loaded = load_model(path, args.data, device)
        try:
            counts = route_split(loaded, args.split, args.directions, args.max_tokens,
                                 args.max_sentences)
        except RouteSplitError as e:
            print(f"routing_report.py: error: {e}", file=sys.stderr)
            return 2
        meta = dict(path=path, arch=loaded.arch, num_updates=loaded.num_updates)
        models.append((label, meta, counts.summary()))
        del loaded
    doc = write_report(models, args.split, args.out)
    for label, _, s in models:
        print(f"{label}: I(expert; target language) bits per MoE layer: " + ", ".join(
            f"{l['name']} {l['target_language']['mi_bits']:.3f}" for l in s["layers"]))
        for l in s["layers"]:
            print(f"  {l['name']}: {language_sentence(l)}")
    print(f"routing report ({len(doc['figures'])} figures): "
          f"{os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
