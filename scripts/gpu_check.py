#!/usr/bin/env python
"""One prepared check of everything GPU-specific (``make gpu-check``), for the few
minutes a lent GPU is available. On a CUDA machine, in at most about 5 minutes:

1. the tests marked ``gpu`` (``tests/test_gpu.py``): the layer on CUDA against the
   fp64 CPU reference for every router in fp32/fp16/bf16, grouped vs loop expert
   path, empty experts and zero-token passes, no host sync in single-pass forwards;
2. tiny MoE, MoEC and SMoE models trained for 50 updates with ``--fp16`` and with
   ``--bf16`` on a toy task, then decoded;
3. ``scripts/bench_moe_layer.py`` at the reference shapes (bf16, d=1024, ffn=4096;
   E16 top-2 capacity 1.25 and dropless at 16,384 tokens, E64 top-2 at 32,768), timing
   interleaved in one run today's path, the fused Triton path (``--moe-kernels``), the
   dense FFN and the bare sort + ``_grouped_mm`` reference; host syncs under
   ``torch.cuda.set_sync_debug_mode("error")`` and CUDA kernels per step (profiler);
   then ``scripts/bench_decode.py``: base MoE vs dense base decoding tokens/s (beam 4,
   batch 64); each against the issue's targets;
4. the all-to-all dispatcher through NCCL (world size 1) and a 2-process gloo run
   with CUDA tensors (tests of step 1, reported here);
5. one summary table, also written to ``OUT/summary.md`` and ``summary.json``.

Without a GPU it says so, runs the gpu tests (which skip with their reason) and
exits 0. Usage::

    python scripts/gpu_check.py [--out DIR] [--skip-train] [--skip-bench]
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# (label, experts, tokens, top-k, capacity factor (0 = dropless), target
# ratio_vs_dense of the fused path (issue 25)). Every case times, interleaved in one
# run: today's path (--kernels torch), the fused Triton path, the dense FFN and the bare
# sort + _grouped_mm reference; checks host syncs and counts kernels per step.
BENCHES = [
    ("E16 top2 cf1.25", 16, 16384, 2, 1.25, 1.15),
    ("E16 top2 dropless", 16, 16384, 2, 0.0, 1.15),
    ("E64 top2 cf1.25", 64, 32768, 2, 1.25, 1.25),
]
BENCH_FLAGS = ["--kernels", "both", "--reference", "--sync-check", "--count-kernels",
               "--no-phases"]
# MoE-base decoding at least 0.8x the dense base model's tokens/s (issue 25).
DECODE_TARGET = 0.8
TRAIN_ARCHS = ("moe_transformer_tiny", "moec_transformer_tiny", "smoe_transformer_tiny")


def log(msg: str) -> None:
    print(msg, flush=True)


def env() -> dict:
    e = dict(os.environ)
    # the plugin and (on the GPU machine) the carried wheels come through PYTHONPATH
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run(cmd, log_file: Path, timeout: float):
    """Run ``cmd``, output to ``log_file``; returns (returncode or 'timeout', seconds)."""
    t0 = time.time()
    with open(log_file, "w") as f:
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t0


# ------------------------------------------------------------------ 1 + 4: tests


def run_tests(out: Path, timeout: float):
    xml = out / "gpu_tests.xml"
    rc, secs = run([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "tests/test_fused_layer.py", "-rs",
                    "-p", "no:cacheprovider", f"--junitxml={xml}"], out / "gpu_tests.log", timeout)
    cases = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    status = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                    message = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                    break
            cases.append({"name": case.get("name"), "status": status, "message": message,
                          "seconds": float(case.get("time", 0))})
    return {"rc": rc, "seconds": secs, "cases": cases}


# ------------------------------------------------------------------ 2: training


def toy_data(root: Path, seed: int = 7) -> Path:
    """Binarized "reverse the sentence" data (train 3000, valid/test 200)."""
    dest = root / "bin"
    if (dest / "dict.src.txt").exists():
        return dest
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 3000), ("valid", 200), ("test", 200)):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]
        (raw / f"{split}.src").write_text("\n".join(sents) + "\n")
        (raw / f"{split}.tgt").write_text("\n".join(" ".join(s.split()[::-1]) for s in sents) + "\n")
    subprocess.run([PY, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang",
                    "tgt", "--trainpref", raw / "train", "--validpref", raw / "valid",
                    "--testpref", raw / "test", "--destdir", dest, "--joined-dictionary",
                    "--workers", "4"], check=True, cwd=REPO, env=env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest


def train_and_decode(out: Path, timeout: float):
    data = toy_data(out / "toy")
    jobs = []
    for arch in TRAIN_ARCHS:
        for precision in ("fp16", "bf16"):
            name = f"{arch.split('_')[0]}-{precision}"
            save = out / "train" / name
            save.mkdir(parents=True, exist_ok=True)
            cmd = [PY, "-m", "fairseq_cli.train", data, "--user-dir", REPO / "moe_fairseq",
                   "--task", "translation", "--arch", arch,
                   "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                   "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
                   "--warmup-updates", "10", "--max-tokens", "2048", "--max-update", "50",
                   "--save-dir", save, "--no-epoch-checkpoints", "--disable-validation",
                   "--log-format", "json", "--log-interval", "10", "--no-progress-bar",
                   "--num-workers", "0", "--seed", "1", f"--{precision}"]
            jobs.append((name, precision, save, cmd))
    t0 = time.time()
    # Tiny models leave the GPU mostly idle: the six runs go side by side.
    procs = [(name, precision, save, subprocess.Popen(
        [str(c) for c in cmd], stdout=open(save / "train.log", "w"), stderr=subprocess.STDOUT,
        cwd=REPO, env=env())) for name, precision, save, cmd in jobs]
    results = {}
    for name, precision, save, p in procs:
        try:
            rc = p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        text = (save / "train.log").read_text(errors="replace")
        losses = [float(m) for m in re.findall(r'"loss": "([0-9.naif]+)"', text)]
        results[name] = {"train_rc": rc, "losses": losses,
                         "tail": "" if rc == 0 else text[-1500:]}
    train_secs = time.time() - t0
    t0 = time.time()
    gens = []
    for name, precision, save, _ in jobs:
        ckpt = save / "checkpoint_last.pt"
        if not ckpt.exists():
            continue
        # fairseq-generate casts to fp16 only (it has no bf16 cast): bf16 models decode in fp32.
        cmd = [PY, "-m", "fairseq_cli.generate", data, "--user-dir", REPO / "moe_fairseq",
               "--path", ckpt, "--gen-subset", "test", "--beam", "4", "--batch-size", "100",
               "--remove-bpe"] + (["--fp16"] if precision == "fp16" else [])
        gens.append((name, save, subprocess.Popen([str(c) for c in cmd],
                                                  stdout=open(save / "generate.log", "w"),
                                                  stderr=subprocess.STDOUT, cwd=REPO, env=env())))
    for name, save, p in gens:
        try:
            rc = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        text = (save / "generate.log").read_text(errors="replace")
        bleu = re.search(r"BLEU4? = ([0-9.]+)", text)
        results[name].update(decode_rc=rc, hypotheses=len(re.findall(r"^H-\d+", text, re.M)),
                             bleu=float(bleu.group(1)) if bleu else None)
        if rc != 0:
            results[name]["tail"] += text[-1500:]
    return {"seconds_train": train_secs, "seconds_decode": time.time() - t0, "runs": results}


# ------------------------------------------------------------------ 3: benchmark


def _contenders(text: str) -> dict:
    """name -> {ms, kernels, host_syncs} from bench_moe_layer.py's timing table, whose
    rows read ``NAME  MEDIAN  min A  max B[  key=value ...]``."""
    found = {}
    for m in re.finditer(r"^(MoE(?: \((?:torch|triton)\))?|dense|bare sort\+grouped_mm)\s+"
                         r"([0-9.]+)\s+min\s+\S+\s+max\s+\S+(.*)$", text, re.M):
        row = {"ms": float(m.group(2)), "kernels": None, "host_syncs": None}
        for item in filter(None, (i.strip() for i in m.group(3).split("  "))):
            key, _, value = item.partition("=")
            row[key] = int(value) if key == "kernels" else value
        found[m.group(1)] = row
    return found


def _number(pattern: str, text: str):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def run_benches(out: Path, timeout_first: float, timeout_each: float):
    rows = []
    for i, (label, E, T, k, cf, target) in enumerate(BENCHES):
        logf = out / f"bench_{re.sub(r'[^A-Za-z0-9.]+', '_', label)}.log"
        cmd = [PY, "scripts/bench_moe_layer.py", "--device", "cuda", "--dtype", "bfloat16",
               "--tokens", T, "--embed-dim", 1024, "--ffn-dim", 4096, "--experts", E,
               "--top-k", k, "--capacity-factor", cf, "--repeats", 20, "--warmup", 5,
               *BENCH_FLAGS]
        # the first case also compiles the Triton kernels
        rc, secs = run(cmd, logf, timeout_first if i == 0 else timeout_each)
        text = logf.read_text(errors="replace")
        rows.append({
            "label": label, "rc": rc, "seconds": secs, "target": target,
            "contenders": _contenders(text),
            "ratio_vs_dense": _number(r"(?m)^ratio_vs_dense=([0-9.]+)", text),
            "ratio_torch_vs_dense": _number(r"ratio_torch_vs_dense=([0-9.]+)", text),
            "ratio_bare_vs_dense": _number(r"ratio_bare_vs_dense=([0-9.]+)", text),
            "speedup": _number(r"speedup_triton_vs_torch=([0-9.]+)", text),
            "overflow": _number(r"overflow_fraction=([0-9.]+)", text),
            "tail": "" if rc == 0 else text[-1500:],
        })
        r = rows[-1]
        log(f"  {label}: fused {r['ratio_vs_dense']} x dense (today's path "
            f"{r['ratio_torch_vs_dense']}, bare {r['ratio_bare_vs_dense']}), fused/today "
            f"speed-up {r['speedup']}")
    return rows


def run_decode(out: Path, timeout: float):
    """MoE-base vs dense-base decoding tokens/s (beam 4, batch 64, bf16)."""
    logf = out / "bench_decode.log"
    cmd = [PY, "scripts/bench_decode.py", "--device", "cuda", "--dtype", "bfloat16",
           "--batch", 64, "--beam", 4, "--src-len", 32, "--length", 32, "--repeats", 3]
    rc, secs = run(cmd, logf, timeout)
    text = logf.read_text(errors="replace")
    rate = dict(re.findall(r"^(moe|dense)\s+median [0-9.]+ s per batch, ([0-9,]+) target", text,
                           re.M))
    return {"rc": rc, "seconds": secs,
            "ratio": _number(r"decode_ratio_vs_dense=([0-9.]+)", text),
            "moe_tokens_s": rate.get("moe"), "dense_tokens_s": rate.get("dense"),
            "tail": "" if rc == 0 else text[-1500:]}


# ------------------------------------------------------------------ summary


def summarize(report: dict) -> str:
    lines = ["# GPU check", "", f"device: {report['device']}", f"torch: {report['torch']}", ""]
    tests = report.get("tests")
    if tests:
        cases = tests["cases"]
        count = {s: sum(c["status"] == s for c in cases) for s in ("passed", "FAILED", "ERROR", "skipped")}
        lines += ["## 1. gpu tests", "",
                  f"{count['passed']} passed, {count['FAILED']} failed, {count['ERROR']} errors, "
                  f"{count['skipped']} skipped in {tests['seconds']:.0f} s (pytest rc {tests['rc']})", ""]
        for c in cases:
            if c["status"] != "passed" and "all_to_all" not in c["name"]:
                lines.append(f"- {c['status']} {c['name']}: {c['message']}")
        lines.append("")
    train = report.get("train")
    if train:
        lines += ["## 2. tiny models, 50 updates", "",
                  "| run | train | first -> last logged loss | decode | hypotheses | BLEU |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in train["runs"].items():
            losses = r["losses"]
            loss = f"{losses[0]:.2f} -> {losses[-1]:.2f}" if losses else "-"
            lines.append(f"| {name} | {'ok' if r['train_rc'] == 0 else r['train_rc']} | {loss} | "
                         f"{'ok' if r.get('decode_rc') == 0 else r.get('decode_rc', '-')} | "
                         f"{r.get('hypotheses', '-')} | {r.get('bleu', '-')} |")
        lines += ["", f"training {train['seconds_train']:.0f} s (6 runs side by side), decoding "
                      f"{train['seconds_decode']:.0f} s", ""]
    benches = report.get("bench")
    if benches:
        lines += ["## 3. MoE layer vs dense FFN, bf16 fwd+bwd, d=1024 ffn=4096", "",
                  "| case | today ms | fused ms | dense ms | bare ms | fused / dense | target | "
                  "today / dense | fused speed-up | kernels today / fused / dense | host syncs "
                  "today / fused | overflow |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for b in benches:
            c = b["contenders"]
            get = lambda name, key: (c.get(name) or {}).get(key, "-")  # noqa: E731
            ratio = b["ratio_vs_dense"]
            verdict = "" if ratio is None else (" (met)" if ratio <= b["target"] else " (MISSED)")
            lines.append(
                f"| {b['label']} | {get('MoE (torch)', 'ms')} | {get('MoE (triton)', 'ms')} | "
                f"{get('dense', 'ms')} | {get('bare sort+grouped_mm', 'ms')} | {ratio}{verdict} | "
                f"{b['target']} | {b['ratio_torch_vs_dense']} | {b['speedup']} (target 1.9) | "
                f"{get('MoE (torch)', 'kernels')} / {get('MoE (triton)', 'kernels')} / "
                f"{get('dense', 'kernels')} | {get('MoE (torch)', 'host_syncs')} / "
                f"{get('MoE (triton)', 'host_syncs')} | {b['overflow']} |")
            if b["rc"] != 0:
                lines.append(f"|  rc {b['rc']}: {b['tail'][-300:]!r} |")
        lines.append("")
    decode = report.get("decode")
    if decode:
        ratio = decode["ratio"]
        verdict = "" if ratio is None else (" (met)" if ratio >= DECODE_TARGET else " (MISSED)")
        lines += ["## 3b. decoding, base MoE (8 experts, every 2nd layer) vs dense base, bf16, "
                  "beam 4, batch 64", "",
                  f"MoE {decode['moe_tokens_s']} tokens/s, dense {decode['dense_tokens_s']} "
                  f"tokens/s: ratio {ratio}{verdict} (target >= {DECODE_TARGET}), "
                  f"rc {decode['rc']}", ""]
    if tests:
        lines += ["## 4. all-to-all dispatcher on the device", ""]
        for c in tests["cases"]:
            if "all_to_all" in c["name"]:
                lines.append(f"- {c['name']}: {c['status']} {c['message']}")
        lines.append("")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                   help="folder for logs and the summary (default $OUT or runs/gpu_check)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    t0 = time.time()
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name(0) if cuda else "no CUDA device",
              "torch": torch.__version__}
    if not cuda:
        log("gpu-check: no GPU present (torch.cuda.is_available() is False): nothing to "
            "measure here. The gpu tests skip with their reason:")
        rc, _ = run([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "tests/test_fused_layer.py", "-rs",
                     "-p", "no:cacheprovider"], out / "gpu_tests.log", 600)
        log((out / "gpu_tests.log").read_text(errors="replace").strip().splitlines()[-1])
        for line in (out / "gpu_tests.log").read_text(errors="replace").splitlines():
            if line.startswith("SKIPPED"):
                log("  " + line)
        return 0 if rc == 0 else 1
    log(f"gpu-check on {report['device']}, torch {torch.__version__}; logs in {out}")
    log("[1/4] gpu tests ...")
    report["tests"] = run_tests(out, timeout=90)
    log(f"      {sum(c['status'] == 'passed' for c in report['tests']['cases'])} passed "
        f"in {report['tests']['seconds']:.0f} s")
    if not args.skip_train:
        log("[2/4] tiny MoE / MoEC / SMoE, --fp16 and --bf16, 50 updates, then decoding ...")
        report["train"] = train_and_decode(out, timeout=75)
    if not args.skip_bench:
        log("[3/4] bench_moe_layer.py at the reference shapes (bf16): today's path, the fused "
            "path, dense, bare reference; then decoding ...")
        report["bench"] = run_benches(out, timeout_first=90, timeout_each=45)
        report["decode"] = run_decode(out, timeout=60)
    log("[4/4] all-to-all: see the tests of step 1")
    report["seconds"] = time.time() - t0
    text = summarize(report)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(report, indent=1, default=str))
    print()
    print(text)
    failed = [c for c in report["tests"]["cases"] if c["status"] in ("FAILED", "ERROR")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
