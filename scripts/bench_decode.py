#!/usr/bin/env python
"""Decoding throughput: an MoE transformer vs the dense one of the same size, as
``fairseq-generate`` decodes (fairseq's ``SequenceGenerator``, beam search).

At decoding sizes the MoE layer sees a few hundred tokens per step (batch x beam), so
what it costs beyond the dense FFN is launches and host syncs, not FLOPs. Both models
are built from fairseq's own parser (``--arch transformer_base`` vs ``moe_transformer_base
--moe-expert-count 8 --moe-freq 2`` by default, shared embeddings, a V-entry
dictionary), randomly initialised, in eval mode; every hypothesis is forced to exactly
``--length`` target tokens (min = max length), so both decode the same number of steps
whatever their weights say. Timing: ``--warmup`` untimed batches, then ``--repeats``
timed batches of each model, interleaved (MoE, dense, dense, MoE, ...), medians
reported. CUDA steps are bracketed by synchronisation.

The last line is exactly ``decode_ratio_vs_dense=R``: MoE tokens/s over dense tokens/s
(the issue's target on a GPU: >= 0.8).

    python scripts/bench_decode.py --device cpu --batch 64 --beam 4 --length 24
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--dense-arch", default="transformer")
    p.add_argument("--moe-arch", default="moe_transformer")
    p.add_argument("--moe-flags", default="--moe-expert-count 8 --moe-freq 2",
                   help="MoE flags as typed on the fairseq command line")
    p.add_argument("--model-flags", default="",
                   help="flags for both models, e.g. '--encoder-layers 2 --decoder-layers 2'")
    p.add_argument("--vocab", type=int, default=8000, help="dictionary entries")
    p.add_argument("--batch", type=int, default=64, help="sentences per batch")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--src-len", type=int, default=24, help="source tokens per sentence")
    p.add_argument("--length", type=int, default=24, help="target tokens every hypothesis gets")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: default)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    for flag in ("batch", "beam", "src_len", "length", "repeats", "vocab"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build(arch: str, flags: str, args):
    """A model of ``arch`` built as ``fairseq-train`` builds it, and its dictionary."""
    import shlex

    import torch
    from fairseq import options, tasks
    from fairseq.data import Dictionary

    import moe_fairseq  # noqa: F401  (architectures)

    parser = options.get_training_parser()
    argv = ["/nonexistent-data", "--task", "translation", "--arch", arch,
            "--share-all-embeddings", "--source-lang", "src", "--target-lang", "tgt",
            *shlex.split(args.model_flags), *shlex.split(flags)]
    ns = options.parse_args_and_arch(parser, argv)
    dictionary = Dictionary()
    for i in range(args.vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")
    task = tasks.get_task("translation")(ns, dictionary, dictionary)
    torch.manual_seed(args.seed)
    model = task.build_model(ns).eval()
    dtype = {"float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[args.dtype]
    return model.to(device=args.device, dtype=dtype), dictionary


def decode_once(generator, sample, device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generator.forward(sample)  # what fairseq-generate runs per batch (no_grad inside)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.manual_seed(args.seed)
    models = {}
    for name, arch, flags in (("moe", args.moe_arch, args.moe_flags),
                              ("dense", args.dense_arch, "")):
        model, dictionary = build(arch, flags, args)
        # min = max length: every hypothesis decodes exactly --length steps
        generator = SequenceGenerator([model], dictionary, beam_size=args.beam,
                                      max_len_a=0, max_len_b=args.length,
                                      min_len=args.length)
        models[name] = (model, generator)
    nspecial = dictionary.nspecial
    tokens = torch.randint(nspecial, len(dictionary), (args.batch, args.src_len))
    tokens[:, -1] = dictionary.eos()
    sample = {"net_input": {"src_tokens": tokens.to(args.device),
                            "src_lengths": torch.full((args.batch,), args.src_len,
                                                      device=args.device)}}
    params = {n: sum(p.numel() for p in m.parameters()) for n, (m, _) in models.items()}
    print(f"device {args.device}, {args.dtype}, batch {args.batch}, beam {args.beam}, "
          f"source {args.src_len} tokens, {args.length} target tokens per hypothesis, "
          f"threads {torch.get_num_threads()}")
    print(f"MoE   {args.moe_arch} {args.moe_flags} {args.model_flags}: {params['moe']:,} "
          "parameters")
    print(f"dense {args.dense_arch} {args.model_flags}: {params['dense']:,} parameters")
    for _ in range(args.warmup):
        for _, generator in models.values():
            decode_once(generator, sample, args.device)
    times = {"moe": [], "dense": []}
    order = ["moe", "dense"]
    for i in range(args.repeats):
        for name in (order if i % 2 == 0 else order[::-1]):
            times[name].append(decode_once(models[name][1], sample, args.device))
    tokens_out = args.batch * args.length  # the best hypothesis of each sentence
    rate = {n: tokens_out / statistics.median(t) for n, t in times.items()}
    for name in ("dense", "moe"):
        print(f"{name:5s} median {statistics.median(times[name]):.3f} s per batch, "
              f"{rate[name]:,.0f} target tokens/s")
    print(f"decode_ratio_vs_dense={rate['moe'] / rate['dense']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
