"""Decode every direction of a prepared Bible benchmark and score it.

Used by ``scripts/evaluate.py``; run it with ``--help`` for the flags.

For each model (a checkpoint, every matching checkpoint under a folder, or a
folder of ready hypotheses) and each direction of the data's manifest:

1. ``fairseq-generate`` (``translation_multi_simple_epoch``, the manifest's
   language pairs and ``bin/langs.txt``, ``--gen-subset test``) without
   post-processing, so the ``H-`` lines hold SentencePiece pieces;
2. the hypotheses are put back in test order (by sample id) and decoded with
   the data's ``spm.model``;
3. sacrebleu scores them against the raw references: BLEU and chrF, and for
   xx->en also against WEB + the other English versions (multi-reference).
   A hypothesis file must have one line per reference line (else one error line
   names both files); empty hypotheses are scored as empty translations, with a
   warning naming the file and lines, and counted in ``results.json``
   (``empty_hypotheses``).

Writes ``results.md`` (one row per direction, side-by-side columns per model,
averages for en->xx, xx->en, each resource level and all) and
``results.json`` (every score with its sacrebleu signature), and keeps each
model's detokenized hypotheses as ``<output>/<model>/<src>-<tgt>.hyp``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import BibleDataError, run_as_command
from .scoring import score_direction

METRICS = ("bleu", "chrf", "bleu_multi", "chrf_multi")
METRIC_LABELS = {"bleu": "BLEU", "chrf": "chrF", "bleu_multi": "BLEU-multi",
                 "chrf_multi": "chrF-multi"}
_H_LINE = re.compile(r"^H-(\d+)\t[^\t]*\t?(.*)$")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Decode every direction of a prepare_bible.py data folder with "
        "fairseq-generate and score with sacrebleu (BLEU, chrF; multi-reference for xx->en).",
    )
    p.add_argument("--data", required=True, help="output folder of prepare_bible.py")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="PATH",
                   help="checkpoint files, or folders searched (recursively) for "
                        "--checkpoint-glob; one model per checkpoint")
    p.add_argument("--checkpoint-glob", default="checkpoint_best.pt",
                   help="file name pattern looked for in checkpoint folders (default %(default)s)")
    p.add_argument("--hypotheses", action="append", default=[], metavar="NAME=DIR",
                   help="score ready detokenized hypotheses DIR/<src>-<tgt>.hyp as model NAME "
                        "(repeatable; no decoding)")
    p.add_argument("--names", nargs="+", help="model names, one per checkpoint found, in order")
    p.add_argument("--directions", help="comma list such as de-en,en-de (default: all)")
    p.add_argument("--output-dir", required=True, help="where results.md/json and hypotheses go")
    g = p.add_argument_group("decoding (fairseq-generate)")
    g.add_argument("--beam", type=int, default=5)
    g.add_argument("--lenpen", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, help="sentences per batch (default 64 unless "
                   "--max-tokens is given)")
    g.add_argument("--max-tokens", type=int, help="tokens per batch")
    g.add_argument("--moe-eval-capacity-token-fraction", type=float, metavar="F",
                   help="override the MoE inference capacity (passed as --model-overrides); "
                        "default: the checkpoint's own")
    g.add_argument("--user-dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="fairseq --user-dir (default: this moe_fairseq package)")
    g.add_argument("--cpu", action="store_true", help="decode on the CPU")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--encoder-langtok", choices=("src", "tgt", "none"), default="tgt",
                   help="as in training (default %(default)s)")
    g.add_argument("--no-decoder-langtok", action="store_true",
                   help="the model was trained without --decoder-langtok")
    g.add_argument("--generate-args", default="",
                   help="extra fairseq-generate arguments, one shell-quoted string")
    g.add_argument("--reuse", action="store_true",
                   help="keep hypotheses already in --output-dir instead of decoding again")
    s = p.add_argument_group("scoring")
    s.add_argument("--tokenize", help="sacrebleu tokenizer for every direction (default: 13a; "
                   "zh for Chinese, char for Japanese)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------


def load_manifest(data: str) -> dict:
    path = os.path.join(data, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise BibleDataError(
            f"{data} has no manifest.json: pass the --out folder of prepare_bible.py"
        ) from None
    except ValueError as exc:
        raise BibleDataError(f"{path} is not valid JSON ({exc})") from None
    if not manifest.get("complete") or "directions" not in manifest:
        raise BibleDataError(f"{path} is incomplete: rerun prepare_bible.py")
    return manifest


def pick_directions(manifest: dict, wanted: Optional[str]) -> List[str]:
    all_dirs = list(manifest["directions"])
    if not wanted:
        return all_dirs
    chosen = [d.strip() for d in wanted.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in all_dirs]
    if unknown:
        raise BibleDataError(
            f"unknown direction(s) {', '.join(unknown)}; the data has: {', '.join(all_dirs)}"
        )
    return chosen


def find_checkpoints(paths: Sequence[str], pattern: str) -> List[str]:
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            hits = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                hits += [os.path.join(root, f) for f in sorted(files) if fnmatch.fnmatch(f, pattern)]
            if not hits:
                raise BibleDataError(f"no checkpoint matching {pattern!r} under {path}")
            found += hits
        else:
            raise BibleDataError(f"checkpoint not found: {path}")
    return found


def default_name(checkpoint: str) -> str:
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))
    if stem in ("checkpoint_best", "checkpoint_last") and parent:
        return parent if stem == "checkpoint_best" else f"{parent}/last"
    return f"{parent}/{stem}" if parent else stem


def _unique(names: List[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 1
        out.append(name)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "model"


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def reference_path(data: str, manifest: dict, direction: str) -> str:
    src, tgt = direction.split("-")
    pivot = manifest["pivot"]["lang"]
    xx = tgt if src == pivot else src
    return os.path.join(data, "raw", f"test.{pivot}-{xx}.{tgt}")


def references(data: str, manifest: dict, direction: str) -> Tuple[List[str], Dict[str, List[str]]]:
    """Primary reference and, for xx->en, the extra English ones (as long as the primary:
    multi-reference scoring pairs them line by line)."""
    src, tgt = direction.split("-")
    pivot = manifest["pivot"]["lang"]
    ref_path = reference_path(data, manifest, direction)
    if not os.path.isfile(ref_path):
        raise BibleDataError(f"reference for {direction} not found: {ref_path} "
                             "(rerun prepare_bible.py)")
    ref = read_lines(ref_path)
    extra: Dict[str, List[str]] = {}
    if tgt == pivot:
        for version in manifest.get("extra_refs", {}).get("versions", {}):
            path = os.path.join(data, "raw", f"test.{src}-{pivot}.ref-{version}")
            if os.path.isfile(path):
                lines = read_lines(path)
                if len(lines) != len(ref):
                    raise BibleDataError(
                        f"{path} has {len(lines)} lines but the reference {ref_path} has "
                        f"{len(ref)}: the references must hold the same verses (rerun "
                        "prepare_bible.py)")
                extra[version] = lines
    return ref, extra


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def generate_command(args, data: str, manifest: dict, checkpoint: str, direction: str) -> List[str]:
    src, tgt = direction.split("-")
    cmd = [
        sys.executable, "-m", "fairseq_cli.generate", os.path.join(data, "bin"),
        "--path", checkpoint,
        "--task", "translation_multi_simple_epoch",
        "--lang-pairs", manifest["lang_pairs"],
        "--lang-dict", os.path.join(data, manifest.get("lang_dict", "bin/langs.txt")),
        "--source-lang", src, "--target-lang", tgt,
        "--gen-subset", "test",
        # fairseq main's batch_by_size drops the indices left over after the last
        # full multiple of --required-batch-size-multiple (default 8): up to 7
        # test sentences. moe_fairseq.fairseq_fixes.batching patches that when the plugin
        # is loaded; multiple 1 keeps every sentence with any --user-dir too.
        "--required-batch-size-multiple", "1",
        "--beam", str(args.beam), "--lenpen", str(args.lenpen),
        "--user-dir", args.user_dir,
    ]
    if args.encoder_langtok != "none":
        cmd += ["--encoder-langtok", args.encoder_langtok]
    if not args.no_decoder_langtok:
        cmd.append("--decoder-langtok")
    if args.max_tokens:
        cmd += ["--max-tokens", str(args.max_tokens)]
    if args.batch_size or not args.max_tokens:
        cmd += ["--batch-size", str(args.batch_size or 64)]
    if args.moe_eval_capacity_token_fraction is not None:
        overrides = {"moe_eval_capacity_token_fraction": args.moe_eval_capacity_token_fraction}
        cmd += ["--model-overrides", repr(overrides)]
    if args.cpu:
        cmd.append("--cpu")
    if args.fp16:
        cmd.append("--fp16")
    cmd += shlex.split(args.generate_args)
    return cmd


def parse_generate_output(text: str, expected: int) -> List[str]:
    """Piece strings of the ``H-`` lines, in sample-id order; all ``expected`` ids must be there."""
    hyps: Dict[int, str] = {}
    for line in text.splitlines():
        m = _H_LINE.match(line)
        if m:
            hyps.setdefault(int(m.group(1)), m.group(2))
    missing = [i for i in range(expected) if i not in hyps]
    if missing or len(hyps) != expected:
        raise BibleDataError(
            f"fairseq-generate gave {len(hyps)} hypotheses for {expected} test lines "
            f"(missing ids {missing[:5]}...)"
        )
    return [hyps[i] for i in range(expected)]


def detokenize(pieces: Sequence[str], sp) -> List[str]:
    """SentencePiece-decode piece strings; unknown pieces become sp's unknown symbol."""
    return [sp.decode([sp.piece_to_id(p) for p in line.split()]) for line in pieces]


def decode(args, data: str, manifest: dict, checkpoint: str, direction: str, n: int,
           log_path: str, sp) -> List[str]:
    cmd = generate_command(args, data, manifest, checkpoint, direction)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log_path, "w", encoding="utf-8") as f:
        f.write("# " + " ".join(shlex.quote(c) for c in cmd) + "\n" + proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-12:])
        raise BibleDataError(
            f"fairseq-generate failed for {direction} with {checkpoint} (log: {log_path}):\n{tail}"
        )
    return detokenize(parse_generate_output(proc.stdout, n), sp)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _flat(scores: dict) -> Dict[str, Optional[float]]:
    multi = scores.get("multi") or {}
    return {"bleu": scores["bleu"], "chrf": scores["chrf"],
            "bleu_multi": multi.get("bleu"), "chrf_multi": multi.get("chrf")}


def averages(rows: List[dict], models: List[str], levels: Dict[str, str], pivot: str) -> List[dict]:
    groups: List[Tuple[str, List[dict]]] = [
        (f"{pivot}→xx", [r for r in rows if r["src"] == pivot]),
        (f"xx→{pivot}", [r for r in rows if r["tgt"] == pivot]),
    ]
    for level in ("high", "low", "very_low"):
        groups.append((level, [r for r in rows if r["level"] == level]))
    groups.append(("all", rows))
    out = []
    for label, members in groups:
        if not members:
            continue
        scores = {}
        for model in models:
            avg = {}
            for metric in METRICS:
                values = [r["scores"][model][metric] for r in members
                          if r["scores"][model].get(metric) is not None]
                avg[metric] = sum(values) / len(values) if values else None
            scores[model] = avg
        out.append({"group": label, "directions": [r["direction"] for r in members],
                    "scores": scores})
    return out


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(results: dict) -> str:
    models = [m["name"] for m in results["models"]]
    has_multi = any(r["scores"][m].get("bleu_multi") is not None
                    for r in results["directions"] for m in models)
    metrics = [m for m in METRICS if has_multi or not m.endswith("_multi")]
    def col(metric, model):
        return METRIC_LABELS[metric] if len(models) == 1 else f"{METRIC_LABELS[metric]} {model}"
    header = ["Direction", "Level", "Lines"] + [col(me, mo) for me in metrics for mo in models]
    lines = [f"# Bible benchmark: {results['data']}", ""]
    for m in results["models"]:
        source = m.get("checkpoint") or m.get("hypotheses")
        lines.append(f"- **{m['name']}**: `{source}`")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(
        ["---", "---", "---:"] + ["---:"] * (len(header) - 3)) + "|"]
    for r in results["directions"]:
        cells = [r["direction"], r["level"], str(r["n"])]
        cells += [_fmt(r["scores"][mo].get(me)) for me in metrics for mo in models]
        lines.append("| " + " | ".join(cells) + " |")
    for a in results["averages"]:
        cells = [f"**avg {a['group']}**", "", str(len(a["directions"]))]
        cells += [_fmt(a["scores"][mo].get(me)) for me in metrics for mo in models]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Averages are unweighted means over directions (the Lines column of an "
              "average row counts directions). Multi-reference scores (xx→en only) use WEB plus "
              + ", ".join(f"{v} ({n})" for v, n in results.get("extra_refs", {}).items())
              + " as references.", "", "sacrebleu signatures:", ""]
    for sig in results["signatures"]:
        lines.append(f"- `{sig}`")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    data = args.data
    manifest = load_manifest(data)
    directions = pick_directions(manifest, args.directions)
    pivot = manifest["pivot"]["lang"]
    levels = manifest.get("levels", {})

    models: List[dict] = []
    checkpoints = find_checkpoints(args.checkpoints, args.checkpoint_glob) if args.checkpoints else []
    if args.names and len(args.names) != len(checkpoints):
        raise BibleDataError(
            f"--names gives {len(args.names)} name(s) for {len(checkpoints)} checkpoint(s): "
            + ", ".join(checkpoints)
        )
    names = list(args.names) if args.names else [default_name(c) for c in checkpoints]
    for name, ckpt in zip(names, checkpoints):
        models.append({"name": name, "checkpoint": os.path.abspath(ckpt)})
    for item in args.hypotheses:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise BibleDataError(f"--hypotheses wants NAME=DIR, got {item!r}")
        if not os.path.isdir(folder):
            raise BibleDataError(f"hypotheses folder not found: {folder}")
        models.append({"name": name, "hypotheses": os.path.abspath(folder)})
    if not models:
        raise BibleDataError("nothing to evaluate: give --checkpoints and/or --hypotheses")
    for m, name in zip(models, _unique([m["name"] for m in models])):
        m["name"] = name

    sp = None
    if checkpoints:
        import sentencepiece as spm

        spm_path = os.path.join(data, manifest.get("spm", {}).get("model", "spm.model"))
        if not os.path.isfile(spm_path):
            raise BibleDataError(f"SentencePiece model not found: {spm_path}")
        sp = spm.SentencePieceProcessor(model_file=spm_path)

    os.makedirs(args.output_dir, exist_ok=True)
    refs = {d: references(data, manifest, d) for d in directions}
    rows = []
    for d in directions:
        src, tgt = d.split("-")
        xx = tgt if src == pivot else src
        rows.append({"direction": d, "src": src, "tgt": tgt, "level": levels.get(xx, ""),
                     "n": len(refs[d][0]), "scores": {}, "signatures": {}})

    t0 = time.time()
    jobs = [(m, r) for m in models for r in rows]
    bar = tqdm(jobs, desc="evaluate", unit="dir", disable=args.quiet, file=sys.stderr)
    for model, row in bar:
        d = row["direction"]
        bar.set_description(f"{model['name']} {d}")
        ref, extra = refs[d]
        if "hypotheses" in model:
            path = os.path.join(model["hypotheses"], f"{d}.hyp")
            if not os.path.isfile(path):
                raise BibleDataError(f"hypotheses for {d} not found: {path}")
            hyps = read_lines(path)
        else:
            out_dir = os.path.join(args.output_dir, _safe(model["name"]))
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"{d}.hyp")
            if args.reuse and os.path.isfile(path):
                hyps = read_lines(path)
            else:
                hyps = decode(args, data, manifest, model["checkpoint"], d, len(ref),
                              os.path.join(out_dir, f"{d}.generate.txt"), sp)
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(h + "\n" for h in hyps)
        if len(hyps) != len(ref):
            raise BibleDataError(
                f"{path} has {len(hyps)} lines but the reference "
                f"{reference_path(data, manifest, d)} has {len(ref)}: one hypothesis per "
                "reference line, in order")
        empty = [i + 1 for i, h in enumerate(hyps) if not h.strip()]
        row.setdefault("empty_hypotheses", {})[model["name"]] = len(empty)
        if empty:
            # Scored as they are (an empty line is a zero-length translation), but a
            # decoding that stopped early or lost its output should not pass unseen.
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            tqdm.write(f"evaluate.py: warning: {path}: {len(empty)} of {len(hyps)} hypotheses "
                       f"are empty (line{'s' if len(empty) > 1 else ''} {shown}); they are "
                       "scored as empty translations",
                       file=sys.stderr)
        scores = score_direction(hyps, ref, extra or None, tgt_lang=row["tgt"],
                                 tokenize=args.tokenize)
        row["scores"][model["name"]] = _flat(scores)
        row["signatures"] = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        if "multi" in scores:
            row["signatures"].update(bleu_multi=scores["multi"]["bleu_signature"],
                                     chrf_multi=scores["multi"]["chrf_signature"])
    bar.close()

    names = [m["name"] for m in models]
    signatures = sorted({s for r in rows for s in r["signatures"].values()})
    results = {
        "data": os.path.abspath(data),
        "manifest_settings": manifest.get("settings"),
        "models": models,
        "decoding": {"beam": args.beam, "lenpen": args.lenpen, "batch_size": args.batch_size,
                     "max_tokens": args.max_tokens,
                     "moe_eval_capacity_token_fraction": args.moe_eval_capacity_token_fraction,
                     "encoder_langtok": args.encoder_langtok,
                     "decoder_langtok": not args.no_decoder_langtok,
                     "generate_args": args.generate_args},
        "extra_refs": manifest.get("extra_refs", {}).get("versions", {}),
        "directions": rows,
        "averages": averages(rows, names, levels, pivot),
        "signatures": signatures,
        "seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")
    table = markdown(results)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    if not args.quiet:
        print(table)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_as_command(run, "evaluate.py", argv)
