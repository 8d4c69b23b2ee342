"""The time budget of make gpu-compare and make quality (moe_fairseq/bible/compare.py),
checked on CPU in seconds: ``--plan`` as a user types it, and the GPU budget by the same
arithmetic the script does on the GPU machine."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env
from moe_fairseq.bible import compare as C


def run_script(name, *argv, timeout=120):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *map(str, argv)],
                          cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def plan_rows(stdout):
    lines = stdout.split("time budget:\n", 1)[1].splitlines()
    rows = {}
    for line in lines:
        if not line.startswith("  "):
            break
        name, seconds = line[2:16].strip(), float(line[16:24])
        rows[name] = seconds
    return rows


def test_quality_plan_fits_100_minutes_and_starts_nothing(tmp_path):
    """``python scripts/quality.py --plan`` (make quality's settings), on a data folder
    not built yet: the m4 build is planned, dense and MoE train for the same budget,
    and the total is within the 100 minutes; nothing is written."""
    out, data = tmp_path / "out", tmp_path / "data"
    proc = run_script("quality.py", "--plan", "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = plan_rows(proc.stdout)
    assert set(rows) == {"data", "train dense", "train moe", "decode", "score", "total"}
    assert rows["train dense"] == rows["train moe"] >= 2400
    assert rows["total"] == pytest.approx(sum(v for k, v in rows.items() if k != "total"), abs=4)
    assert rows["total"] <= 6000 and "(limit 6000 s)" in proc.stdout
    assert "2400 lines over 8 directions" in proc.stdout  # 300 test lines x 8
    assert not out.exists() and not data.exists()


def test_gpu_compare_plan_on_a_built_benchmark(tmp_path):
    """``gpu_compare.py --plan --data DIR`` reads the build's size (here a tiny
    prebuilt one: 2 directions of 50 lines) for the decoding estimate."""
    from test_bible_prep import make_db, prep_args
    from moe_fairseq.bible import prepare as P

    argv = prep_args(make_db(tmp_path / "bible.db"), tmp_path / "data", "--max-test-verses", "50")
    argv[argv.index("--langs") + 1] = "de"
    P.run(argv, progress=False)
    proc = run_script("gpu_compare.py", "--plan", "--data", tmp_path / "data", "--out",
                      tmp_path / "out", "--methods", "dense moe", "--budget-seconds", "30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = plan_rows(proc.stdout)
    costs = C.COSTS["cpu"]
    assert rows["train dense"] == 30 + costs["startup"]
    jobs = min(os.cpu_count() or 1, 2)  # eval jobs default to the cores, at most 2 methods
    assert rows["decode"] == pytest.approx(
        2 * (costs["load"] + 100 / costs["lines_per_second"]) / jobs, abs=1)
    assert "100 lines over 2 directions" in proc.stdout and not (tmp_path / "out").exists()


class Args:
    methods = list(C.DEFAULT_METHODS)
    size = "base"
    limit_seconds = None
    eval_jobs = None

    def __init__(self, budget, cap):
        self.budget_seconds, self.max_test_verses = budget, cap


def m4_manifest(test_lines):
    langs = ("de", "ru", "sw", "tl")
    return {"directions": [d for x in langs for d in (f"en-{x}", f"{x}-en")],
            "counts": {f"en-{x}": {"train": 29400, "valid": 494, "test": test_lines}
                       for x in langs},
            "levels": {x: "high" for x in langs}, "settings": {"max_test_verses": test_lines}}


def test_gpu_default_fits_one_device_call():
    """make gpu-compare's defaults on the GPU machine (base, 4 methods, the README's
    export of 200 test lines per direction, reused): within 540 s; the full test set
    is not, and is refused with the budget that would fit."""
    budget = C.default_budget("base")
    plan = C.plan_budget(Args(budget, None), m4_manifest(200), cuda=True)
    assert plan["limit"] == C.GPU_LIMIT_SECONDS == 540
    assert plan["total"] <= 540, C.format_plan(plan)
    C.check_plan(plan, Args(budget, None))
    assert "1600 lines over 8 directions" in C.format_plan(plan)
    t300 = C.plan_budget(Args(budget, None), m4_manifest(300), cuda=True)
    with pytest.raises(C.CompareError, match=r"over the limit of 540 s \(--limit-seconds\): "
                                             r"--budget-seconds 69 would fit"):
        C.check_plan(t300, Args(budget, None))
    full = C.plan_budget(Args(budget, None), m4_manifest(1179), cuda=True)
    with pytest.raises(C.CompareError, match="fewer --methods or a smaller test set would"):
        C.check_plan(full, Args(budget, None))


def test_limit_is_refused_in_one_line(tmp_path):
    proc = run_script("quality.py", "--plan", "--data", tmp_path / "d", "--out", tmp_path / "o",
                      "--limit-seconds", "100")
    assert proc.returncode == 0  # --plan only prints
    proc = run_script("quality.py", "--data", tmp_path / "d", "--out", tmp_path / "o",
                      "--limit-seconds", "100")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "quality.py: error: the plan takes ")
    assert "fewer --methods or a smaller test set would" in proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_make_quality_runs_the_script_the_readme_names():
    """``make quality QUALITY_ARGS="--plan"`` as the README gives it: make's dry run
    shows the command, which is scripts/quality.py with the arguments passed on."""
    # Not as a sub-make of `make test` (which would print its directory changes).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "quality", "QUALITY_ARGS=--plan"],
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if "scripts/quality.py" in l][-1]
    assert line.endswith("scripts/quality.py --plan") and "OMP_WAIT_POLICY=PASSIVE" in line
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert 'make quality QUALITY_ARGS="--plan"    # the time budget only' in readme


def test_make_quality_nllb_plans_moe_eom_cmr_with_low_resource_directions(tmp_path):
    """``make quality-nllb QUALITY_ARGS="--plan"`` as the README gives it: the command
    make would run, run with its plan only: MoE, MoE+EOM and MoE+CMR for the same budget,
    a build with low- and very-low-resource languages, within its 105 minutes."""
    import shlex

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "quality-nllb",
                           "QUALITY_ARGS=--plan"], cwd=str(REPO_ROOT), capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if "scripts/quality.py" in l][-1]
    argv = shlex.split(line.split("scripts/quality.py", 1)[1])
    assert argv[-1] == "--plan"
    out, data = tmp_path / "out", tmp_path / "data"
    proc = run_script("quality.py", *argv, "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = plan_rows(proc.stdout)
    assert rows["train moe"] == rows["train moe+eom"] == rows["train moe+cmr"] >= 1800
    assert "train dense" not in rows and rows["total"] <= 6300 and "(limit 6300 s)" in proc.stdout
    assert "sw:very_low" in proc.stdout and "ru:low" in proc.stdout
    assert not out.exists() and not data.exists()
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "make quality-nllb" in readme


def test_longer_quality_nllb_command_in_the_readme_plans_what_it_says(tmp_path):
    """The README's longer NLLB comparison, as written there, planned with --plan: every
    method trains for its budget and the total is the hours the README states."""
    import re
    import shlex

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r'^make quality-nllb QUALITY_ARGS="([^"]+)" +# a ([0-9.]+)-hour plan$',
                      readme, re.M)
    assert match, "the README's longer make quality-nllb command"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "quality-nllb",
                           f"QUALITY_ARGS={match.group(1)} --plan"], cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if "scripts/quality.py" in l][-1]
    argv = shlex.split(line.split("scripts/quality.py", 1)[1])
    proc = run_script("quality.py", *argv, "--data", tmp_path / "data", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = plan_rows(proc.stdout)
    budget = float(re.search(r"--budget-seconds (\d+)", match.group(1)).group(1))
    assert rows["train moe"] == rows["train moe+eom"] == rows["train moe+cmr"] > budget
    assert round(rows["total"] / 3600, 1) == float(match.group(2))
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
