#!/usr/bin/env python3
"""Sparse upcycling: turn a trained dense fairseq transformer checkpoint into an MoE
checkpoint whose experts start as copies of the dense FFNs (arXiv 2212.05055).

    python scripts/upcycle.py checkpoints/dense/checkpoint_best.pt \
        --arch moe_transformer --moe-expert-count 8 --moe-freq 2 --out checkpoints/moe_up/upcycled.pt
    fairseq-train DATA ... --arch moe_transformer --moe-expert-count 8 --moe-freq 2 \
        --finetune-from-model checkpoints/moe_up/upcycled.pt --save-dir checkpoints/moe_up

Any MoE flag (--moe-*, --moec-*, --smoe-*) and dropout rate may follow --arch; dimensions
come from the dense model (an MoE preset such as smoe_transformer_tiny only adds its
routing rules), also when fine-tuning: fairseq-train --finetune-from-model takes every
model setting the command line does not name from the upcycled checkpoint.
In eval mode the written model translates exactly as the dense one for the linear
router (normalised top-2 gates: any router; otherwise a zero router and rescaled
copies), the cosine router without --moec-output-mixing and the stratified router with
--smoe-stratum-norm gate-input or none; the script prints the rule it applied and says
when the outputs cannot be equal. Train on from it with --finetune-from-model (any
number of ranks) or decode it with fairseq-generate --path.
"""

import argparse
import copy
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_flag_parser():
    """The MoE transformer's model flags (fairseq's transformer flags plus ours)."""
    from moe_fairseq.models.moe_transformer import MoETransformerModel

    p = argparse.ArgumentParser(prog="upcycle.py model flags", add_help=False)
    MoETransformerModel.add_args(p)
    return p


def model_flags(parser, argv, dense_args):
    """The MoE model's flags over the dense model's: those given in ``argv``, and for
    the MoE flags (``--moe-*``, ``--moec-*``, ``--smoe-*``) the dense model lacks, the
    parser's defaults (None: the architecture fills them), as on a fresh command line."""
    ns = parser.parse_args(argv)
    flags = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        given = any(tok == opt or tok.startswith(opt + "=") for opt in action.option_strings
                    for tok in argv)
        moe_flag = action.dest.startswith(("moe_", "moec_", "smoe_"))
        if given or (moe_flag and not hasattr(dense_args, action.dest)):
            flags[action.dest] = getattr(ns, action.dest)
    return flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("dense", metavar="DENSE_CKPT", help="dense transformer checkpoint")
    p.add_argument("--arch", required=True,
                   help="an MoE architecture: moe_transformer[_tiny|_base|_big], "
                        "moec_transformer_*, smoe_transformer_*")
    p.add_argument("--out", required=True, help="the MoE checkpoint to write")
    p.add_argument("--data", help="data-bin folder (default: the one saved in the checkpoint)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="multiply expert weights by 1 + NOISE * N(0,1) to break the copies' "
                        "symmetry (default 0: outputs equal the dense model's)")
    p.add_argument("--seed", type=int, default=1, help="seed of the router init and the noise")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is a training checkpoint (checkpoint_last.pt, "
                        "... or a file with optimizer state); DENSE_CKPT is never replaced")
    args, rest = p.parse_known_args(argv)
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    if ARCH_MODEL_NAME_REGISTRY.get(args.arch) != "moe_transformer":
        moe = sorted(a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m == "moe_transformer")
        p.error(f"--arch {args.arch}: not an MoE architecture (choose from {', '.join(moe)})")
    if not (args.noise >= 0 and args.noise < 1):
        p.error(f"--noise must be in [0, 1), got {args.noise}")
    if not os.path.isfile(args.dense):
        p.error(f"DENSE_CKPT {args.dense}: no such file")
    check_dense_checkpoint(args.dense, rest)  # before any work
    from moe_fairseq.conversion.checkpoint_output import check_checkpoint_output

    check_checkpoint_output(args.out, [args.dense], "--out", args.force, "upcycled.pt")
    args.model_argv = rest
    return args


def _is_training_only(dest: str) -> bool:
    """Model flags that change training, not the weights or the eval-mode outputs."""
    return "dropout" in dest or "layerdrop" in dest or dest.startswith("checkpoint_activations")


def check_dense_checkpoint(path, model_argv):
    """DENSE_CKPT is a readable dense transformer, and the model flags keep its shape."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    from moe_fairseq.args_version import is_moe_namespace
    from moe_fairseq.conversion.upcycling import UpcyclingError
    from moe_fairseq.fairseq_fixes.checkpoint_fit import checkpoint_settings

    dense = checkpoint_settings(path, "DENSE_CKPT")
    arch = getattr(dense, "arch", None) or getattr(dense, "_name", None)
    if is_moe_namespace(dense):
        raise UpcyclingError(f"DENSE_CKPT {path} is already an MoE model (--arch {arch})")
    family = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if family != "transformer":
        raise UpcyclingError(
            f"DENSE_CKPT {path} is not a transformer (--arch {arch}, model {family}): upcycling "
            "copies a transformer's FFN layers into experts; give a checkpoint of a fairseq "
            "transformer (--arch transformer, transformer_iwslt_de_en, ...)")
    parser = model_flag_parser()
    given = parser.parse_args(model_argv)
    for action in parser._actions:
        if action.dest == "help" or action.dest.startswith(("moe_", "moec_", "smoe_")) \
                or _is_training_only(action.dest):
            continue
        named = [opt for opt in action.option_strings for tok in model_argv
                 if tok == opt or tok.startswith(opt + "=")]
        if named and getattr(given, action.dest) != getattr(dense, action.dest, None):
            raise UpcyclingError(
                f"{named[0]} {getattr(given, action.dest)}: the MoE model takes its dimensions "
                f"and layers from DENSE_CKPT ({action.dest} {getattr(dense, action.dest, None)}); "
                "upcycle.py takes MoE flags (--moe-*, --moec-*, --smoe-*) and dropout rates")


def main(argv=None) -> int:
    logging.disable(logging.INFO)
    import moe_fairseq  # noqa: F401  (architectures, checkpoint loading, one-line errors)

    args = parse_args(argv)
    import torch
    from fairseq import checkpoint_utils, tasks
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import DictConfig, OmegaConf

    from moe_fairseq.atomic_files import exit_on_sigterm
    from moe_fairseq.conversion.checkpoint_output import save_checkpoint
    from moe_fairseq.conversion.upcycling import describe_rules, exactness_problems, upcycle

    overrides = {"data": args.data} if args.data else {}
    state = checkpoint_utils.load_checkpoint_to_cpu(args.dense, overrides)
    cfg = state["cfg"]
    dense_model_cfg = cfg["model"]
    if isinstance(dense_model_cfg, DictConfig):
        dense_model_cfg = argparse.Namespace(**OmegaConf.to_container(dense_model_cfg))
    moe_args = copy.deepcopy(dense_model_cfg)
    for k, v in model_flags(model_flag_parser(), args.model_argv, dense_model_cfg).items():
        setattr(moe_args, k, v)
    moe_args.arch = moe_args._name = args.arch
    ARCH_CONFIG_REGISTRY[args.arch](moe_args)
    # A preset may change weightless settings of the dense model (the SMoE presets go
    # pre-norm): the weights then fit, but the computation is another one.
    changed = [f"{k} {getattr(dense_model_cfg, k)!r} -> {getattr(moe_args, k, None)!r}"
               for k in sorted(vars(dense_model_cfg))
               if not k.startswith(("moe_", "moec_", "smoe_")) and k not in ("arch", "_name")
               and getattr(moe_args, k, None) != getattr(dense_model_cfg, k)]
    torch.manual_seed(args.seed)
    task = tasks.setup_task(cfg["task"])
    model = task.build_model(moe_args)
    rules = upcycle(model, state["model"], args.noise, args.seed)

    out_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out_cfg["model"] = moe_args
    exit_on_sigterm()  # a killed run removes its temp file
    save_checkpoint({
        "cfg": out_cfg,
        "args": None,
        "model": model.state_dict(),
        "optimizer_history": [{"criterion_name": "MoELabelSmoothedCrossEntropyCriterion",
                               "optimizer_name": "none", "lr_scheduler_state": {"best": None},
                               "num_updates": 0}],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0,
                                           "shuffle": True, "version": 2},
                        "previous_training_time": 0,
                        "upcycled_from": os.path.abspath(args.dense)},
    }, args.out)

    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    print(f"upcycled {args.dense} -> {args.out}: {args.arch}, {len(rules)} MoE layers, "
          f"{experts:,} expert parameters")
    for line in describe_rules(rules):
        print("  " + line)
    problems = exactness_problems(model, rules)
    if changed:
        problems.append(f"--arch {args.arch} changes settings of the dense model "
                        f"({'; '.join(changed)}); use --arch moe_transformer with the method's "
                        "flags to keep them")
    if args.noise > 0:
        problems.append(f"--noise {args.noise} perturbs the expert copies")
    if problems:
        print("outputs will differ from the dense model's: " + "; ".join(problems))
    else:
        print("in eval mode the MoE model's outputs equal the dense model's")
    task_cfg = cfg["task"]
    data = getattr(task_cfg, "data", None) or "DATA"
    print(f"train on with: fairseq-train {data} --task {getattr(task_cfg, '_name', '...')} ... "
          f"--arch {args.arch} {' '.join(args.model_argv)} --finetune-from-model {args.out} "
          f"--save-dir DIR (model settings the command line does not name, such as the "
          f"dimensions, are taken from {args.out})".replace("  ", " "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
