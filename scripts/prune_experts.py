#!/usr/bin/env python3
"""Prune an MoE checkpoint for serving some directions: keep, per MoE layer, the experts
that carry the routing of those directions (after Koishekenov et al., arXiv 2212.09811).

    python scripts/prune_experts.py checkpoints/m4_moe/checkpoint_best.pt \
        --data data/bible_m4/bin --lang-pairs en-de --split valid --keep 4 \
        --out checkpoints/m4_moe/en-de_4experts.pt
    fairseq-generate data/bible_m4/bin --path checkpoints/m4_moe/en-de_4experts.pt ...

Routes --split of --lang-pairs (teacher-forced, eval mode), counts each expert's
token-expert assignments per MoE layer and keeps the --keep most used experts of every
layer, or the fewest whose share reaches --keep-mass. The written checkpoint holds only
the kept experts (the routers choose among them; layers may keep different numbers,
recorded as --moe-layer-expert-counts) and no optimizer state; it decodes with plain
fairseq-generate. Linear and one-cluster cosine routers.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", metavar="MOE_CKPT", help="MoE checkpoint written by fairseq-train")
    p.add_argument("--data", help="data-bin folder (default: the one saved in the checkpoint)")
    p.add_argument("--lang-pairs", help="directions to serve, e.g. en-de,de-en (default: all "
                                        "of the checkpoint's)")
    p.add_argument("--split", default="valid", help="split whose routing decides (default: valid)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", type=int, metavar="K", help="experts to keep per MoE layer")
    group.add_argument("--keep-mass", type=float, metavar="F",
                       help="per MoE layer, keep the fewest experts with at least this share "
                            "of the assignments, in (0, 1]")
    p.add_argument("--out", required=True, help="the pruned checkpoint to write")
    p.add_argument("--max-tokens", type=int, default=4000)
    p.add_argument("--max-sentences", type=int, default=0,
                   help="route about this many sentences per direction (0 = the whole split)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a training checkpoint (checkpoint_last.pt, "
                        "... or a file with optimizer state); MOE_CKPT is never replaced")
    args = p.parse_args(argv)
    if args.keep is not None and args.keep < 1:
        p.error(f"--keep must be >= 1, got {args.keep}")
    if args.keep_mass is not None and not 0 < args.keep_mass <= 1:
        p.error(f"--keep-mass must be in (0, 1], got {args.keep_mass}")
    if not os.path.isfile(args.checkpoint):
        p.error(f"MOE_CKPT {args.checkpoint}: no such file")
    from moe_fairseq.conversion.checkpoint_output import check_checkpoint_output
    from moe_fairseq.conversion.pruning import check_prunable_checkpoint

    check_prunable_checkpoint(args.checkpoint)  # before any work: a dense model, MoEC clusters
    check_checkpoint_output(args.out, [args.checkpoint], "--out", args.force, "pruned.pt")
    args.directions = args.lang_pairs.split(",") if args.lang_pairs else None
    return args


def main(argv=None) -> int:
    logging.disable(logging.INFO)
    import moe_fairseq  # noqa: F401  (architectures, checkpoint loading, one-line errors)

    args = parse_args(argv)
    import copy

    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    from moe_fairseq.analysis.route_split import RouteSplitError, load_model, route_split
    from moe_fairseq.atomic_files import exit_on_sigterm
    from moe_fairseq.conversion.checkpoint_output import save_checkpoint
    from moe_fairseq.conversion.pruning import (
        PruningError,
        check_prunable,
        choose_experts,
        prune_model,
    )

    exit_on_sigterm()  # a killed run removes its temp file
    loaded = load_model(args.checkpoint, args.data, "cpu")
    model = loaded.model
    check_prunable(model)
    top_k = int(getattr(loaded.cfg.model, "moe_top_k", 1) or 1)
    E_max = max(m.num_experts for n, m in model.named_modules() if n.endswith(".moe"))
    if args.keep is not None and not top_k <= args.keep <= E_max:
        raise PruningError(f"--keep must be between --moe-top-k {top_k} and the experts per "
                           f"layer ({E_max}), got {args.keep}")
    try:
        counts = route_split(loaded, args.split, args.directions, args.max_tokens,
                             args.max_sentences)
    except RouteSplitError as e:
        print(f"prune_experts.py: error: {e}", file=sys.stderr)
        return 2
    before = sum(p.numel() for p in model.parameters())
    kept, shares = {}, {}
    for c in counts.layers:
        load = c.load.sum(1)
        keep = min(args.keep, c.info.num_experts) if args.keep is not None else None
        kept[c.info.name] = choose_experts(load, top_k, keep, args.keep_mass)
        total = float(load.sum())
        shares[c.info.name] = sum(float(load[e]) for e in kept[c.info.name]) / total if total else 0.0
    layer_counts = prune_model(model, kept)
    after = sum(p.numel() for p in model.parameters())

    state = checkpoint_utils.load_checkpoint_to_cpu(args.checkpoint)
    cfg = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)
    cfg["model"] = copy.deepcopy(cfg["model"])
    cfg["model"].moe_layer_expert_counts = ",".join(map(str, layer_counts))
    extra = {k: v for k, v in (state.get("extra_state") or {}).items()
             if k not in ("ema", "ema_fp32_params")}  # EMA weights keep every expert
    extra["pruned_from"] = {"checkpoint": os.path.abspath(args.checkpoint), "split": args.split,
                            "directions": counts.directions,
                            "kept_experts": {k.removesuffix(".moe"): v for k, v in kept.items()}}
    save_checkpoint({"cfg": cfg, "args": None, "model": model.state_dict(),
                     "optimizer_history": state["optimizer_history"], "extra_state": extra},
                    args.out)

    print(f"pruned {args.checkpoint} for {','.join(counts.directions)} ('{args.split}' routing):")
    for name, experts in kept.items():
        print(f"  {name.removesuffix('.moe')}: kept experts {experts} "
              f"({100 * shares[name]:.1f}% of the assignments)")
    print(f"parameters {before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer); "
          f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
