#!/usr/bin/env python
"""Expert load of every MoE layer of a checkpoint on a data split.

Runs the model teacher-forced (eval mode, as in inference) over a split of the data
it was trained on and prints, per MoE layer, the share of token-expert assignments
each expert received, its coefficient of variation and how many experts get less
than 10% of their fair share. For SMoE models (multi-pass routers) it also prints
the requested capacity (mean expert passes per token), the share of tokens
reaching each stratum and, for multilingual data with target-language tokens, the
requested capacity per target language. For multilingual data with target-language
tokens (``translation_multi_simple_epoch`` with ``--decoder-langtok`` or
``--encoder-langtok tgt``) it also prints, per MoE layer, the mutual information
I(expert; target language) in bits between a token's first-choice expert and the
language its sentence is translated into (Krishnamurthy et al.'s I(E;Y) with Y the
target language; 0 = routing ignores the language, H(language) = the expert
determines it). ``--json`` also writes the counts.

    python scripts/expert_load.py --path checkpoints/moe/checkpoint_best.pt \
        --data data-bin/corpus --split valid [--json load.json]
"""

import argparse
import json
import os
import sys
from collections import Counter

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="checkpoint (.pt) written by fairseq-train")
    p.add_argument("--data", help="data-bin folder (default: the one saved in the checkpoint)")
    p.add_argument("--split", default="valid", help="data split to run (default: valid)")
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = all)")
    p.add_argument("--user-dir", default=None, help="plugin folder (default: this repository's moe_fairseq)")
    p.add_argument("--json", default=None,
                   help="also write the per-layer counts here (missing folders are created)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    p.add_argument("--verbose", action="store_true", help="show fairseq's INFO logging")
    args = p.parse_args(argv)
    if args.json:
        # Checked (missing folders created) before the long routing pass, which used to
        # end in a crash when the folder did not exist.
        from moe_fairseq.atomic_files import output_path_problem

        problem = output_path_problem(args.json, "load.json")
        if problem:
            p.error(f"--json {args.json}: {problem}")
    return args


def collect_expert_load(models, task, split, max_tokens, max_batches, device, by_language=None):
    """Returns (``[(layer name, counts [E] list)]`` summed over the split, SMoE
    requested-capacity summary or None). ``by_language``: a dict to fill with
    ``layer name -> [E, L]`` joint counts of (first-choice expert, target language)
    and ``"languages" -> names``, when the batches carry target-language tokens."""
    from fairseq import utils

    from moe_fairseq.layer.moe_layer import MoELayer
    from moe_fairseq.layer.requested_capacity import capacity_counts, capacity_summary
    from moe_fairseq.target_language import expert_language_counts, target_language_index

    model = models[0]
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if not layers:
        raise SystemExit(f"error: --path {model.__class__.__name__} has no MoE layer")
    for _, m in layers:
        m.reset_expert_load()
        m.record_first_expert = by_language is not None
    task.load_dataset(split)
    itr = task.get_batch_iterator(
        dataset=task.dataset(split),
        max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
    ).next_epoch_itr(shuffle=False)
    counts = Counter()  # SMoE requested-capacity counts, summed over batches
    with torch.no_grad():
        for i, sample in enumerate(itr):
            if max_batches and i >= max_batches:
                break
            sample = utils.move_to_cuda(sample) if device == "cuda" else sample
            model(**sample["net_input"])
            counts.update(capacity_counts([m.stats for _, m in layers], task, sample))
            found = target_language_index(task, sample) if by_language is not None else None
            if found is None:
                continue
            index, names = found
            by_language["languages"] = names
            for name, m in layers:
                c = expert_language_counts(m.stats.first_expert, index, m.num_experts, len(names))
                if c is not None:
                    c = c.cpu()
                    by_language[name] = by_language[name] + c if name in by_language else c
    return [(name, m.expert_load_total.tolist()) for name, m in layers], capacity_summary(counts)


def describe(counts):
    """``(share per expert, CV, number of starved experts)`` of a layer's load (the
    routing report's definitions, analysis/routing_counts.py)."""
    from moe_fairseq.analysis.routing_counts import describe_load

    d = describe_load(torch.tensor(counts))
    return d["load_share"], d["load_cv"], len(d["starved"])


def describe_language_mi(by_language):
    """``layer -> {mi_bits, h_language_bits, mi_share, h_expert_bits,
    dispatch_entropy_nats, expert_entropy_bits_by_language, counts, ...}`` from the joint
    counts of :func:`collect_expert_load`; empty without languages. The language
    summary is the routing report's (analysis/routing_counts.py); the dispatch entropy
    is the cluster study's (Chen et al.) with languages as the clusters."""
    from moe_fairseq.analysis.routing_counts import language_summary
    from moe_fairseq.analysis.specialization import dispatch_entropy_nats

    names = by_language.get("languages", [])
    out = {}
    for name, counts in by_language.items():
        if name == "languages" or int(counts.sum()) == 0:
            continue
        labels = [names[i] if i < len(names) else str(i) for i in range(counts.size(1))]
        out[name] = dict(language_summary(counts, labels),
                         dispatch_entropy_nats=dispatch_entropy_nats(counts))
    return out


def main(argv=None):
    args = parse_args(argv)
    if not args.verbose:
        import logging

        logging.disable(logging.INFO)
    from fairseq import utils

    user_dir = args.user_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moe_fairseq")
    utils.import_user_module(argparse.Namespace(user_dir=user_dir))
    from moe_fairseq.analysis.route_split import load_model

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    loaded = load_model(args.path, args.data, device)
    models, task = [loaded.model], loaded.task
    by_language = {}
    result, capacity = collect_expert_load(models, task, args.split, args.max_tokens,
                                           args.max_batches, device, by_language)
    print(f"expert load on '{args.split}' ({args.path})")
    print(f"{'layer':<28} {'CV':>6} {'<10% fair':>9}  share of assignments per expert (%)")
    for name, counts in result:
        share, cv, starved = describe(counts)
        cells = " ".join(f"{100 * s:5.1f}" for s in share)
        print(f"{name.replace('.moe', ''):<28} {cv:6.3f} {starved:>9}  {cells}")
    if capacity is not None:
        shares = " ".join(f"{100 * x:5.1f}" for x in capacity["stratum_share"])
        print(f"\nSMoE requested capacity (mean expert passes per token, SMoE layers): "
              f"{capacity['requested_capacity']:.3f}")
        print(f"tokens reaching each stratum (%): {shares}")
        if capacity["by_target_language"]:
            print("requested capacity per target language: " + ", ".join(
                f"{lang} {rc:.3f}" for lang, rc in capacity["by_target_language"].items()))
    language_mi = describe_language_mi(by_language)
    if language_mi:
        names = by_language["languages"]
        print(f"\nI(expert; target language), first-choice expert, {len(names)} target languages "
              f"({', '.join(names)}):")
        print(f"{'layer':<28} {'I bits':>7} {'H(lang)':>8} {'I/H(lang)':>9} {'H(expert)':>9} "
              f"{'dispatch H':>10}  H(expert | language) bits")
        for name, d in language_mi.items():
            per_lang = " ".join(f"{l} {v:.2f}" for l, v in d["expert_entropy_bits_by_language"].items())
            print(f"{name.replace('.moe', ''):<28} {d['mi_bits']:7.3f} {d['h_language_bits']:8.3f} "
                  f"{d['mi_share']:9.3f} {d['h_expert_bits']:9.3f} {d['dispatch_entropy_nats']:10.3f}  {per_lang}")
        print("dispatch H: sum_e (n_e/N) H(language | expert e), nats (0 = each expert serves one "
              "language); H(expert | language): 0 = the language goes to one expert")
    if args.json:
        out = {name: counts for name, counts in result}
        if capacity is not None:
            out["smoe_requested_capacity"] = capacity
        if language_mi:
            out["target_language_mi"] = language_mi
        from moe_fairseq.atomic_files import write_atomically

        text = json.dumps(out, indent=1).encode()  # a kill leaves the old file or the new one
        write_atomically(args.json, lambda f: f.write(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
