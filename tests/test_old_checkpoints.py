"""Checkpoints written by older versions of the plugin, with the current code.

The fixtures in ``tests/fixtures/old_checkpoints/`` were produced by the OLD code
(``make_fixtures.py`` there; see its README): for each commit and method (``moe``,
``smoe``, ``moec`` presets, ``--moe-expert-count 4``) a checkpoint after 8 updates,
the ``fairseq-generate`` output, the teacher-forced logits of a padded batch and the
exact command lines. For each (commit, method) the current code must

- decode the test split to the same ``H-``/``P-`` lines (beam 2, batches of 4),
- give bit-identical logits on the recorded batch (in-process load),
- resume training from the checkpoint with the command line the old run used (to
  update 10) and run with the MoE settings the checkpoint records.
"""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from conftest import USER_DIR, run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "old_checkpoints"
DATA = FIXTURES / "data"
COMMITS = ("c8693dc", "f8eaf4f")
METHODS = ("moe", "smoe", "moec")
CASES = [pytest.param(c, m, id=f"{c}-{m}") for c in COMMITS for m in METHODS]

RESUME_MAX_UPDATE = 10
# Model flags compared between a checkpoint and the run that resumed it: the MoE
# flags and the fairseq flags a preset sets (SMoE's pre-norm).
COMPARED_PREFIXES = ("moe_", "moec_", "smoe_")
COMPARED_FAIRSEQ = ("encoder_normalize_before", "decoder_normalize_before")
# Flags that were renamed: old name -> (new name, old value -> new value, whether the
# flag matters for the recorded model). Before the fidelity change,
# --smoe-stratum-layernorm (on by default) put a LayerNorm on what strata >= 1 route,
# which is --smoe-stratum-norm gate-input (the upgrade rule of the code at f8eaf4f);
# models without strata recorded it too, to no effect.
RENAMED = {
    "smoe_stratum_layernorm": (
        "smoe_stratum_norm",
        lambda v: "gate-input" if v in (None, True) else "none",
        lambda old: old.get("smoe_strata") is not None,
    ),
}


def fixture(commit: str, method: str, suffix: str) -> Path:
    return FIXTURES / commit / f"{method}{suffix}"


def command(commit: str, method: str) -> dict:
    return json.loads(fixture(commit, method, ".cmd.json").read_text())


def fill(args, **values):
    return [a.format(**values) if a.startswith("{") else a for a in args]


def hypothesis_lines(stdout: str) -> str:
    """The ``H-``/``P-`` lines of fairseq-generate, by sentence id (H before P), as
    ``make_fixtures.py`` records them."""
    rows = []
    for line in stdout.splitlines():
        if line[:2] in ("H-", "P-"):
            tag, rest = line.split("-", 1)
            rows.append((int(rest.split("\t", 1)[0]), tag == "P", line))
    return "".join(r[2] + "\n" for r in sorted(rows))


@pytest.fixture(scope="module")
def old_data_bin(tmp_path_factory) -> Path:
    """The shipped raw corpus binarized with the shipped dictionaries."""
    dest = tmp_path_factory.mktemp("old_checkpoints") / "bin"
    run_cli("preprocess", [
        "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", DATA / "train", "--validpref", DATA / "valid",
        "--testpref", DATA / "test", "--destdir", dest,
        "--srcdict", DATA / "dict.src.txt", "--tgtdict", DATA / "dict.tgt.txt",
        "--workers", "1",
    ])
    for lang in ("src", "tgt"):
        assert (dest / f"dict.{lang}.txt").read_text() == (DATA / f"dict.{lang}.txt").read_text()
    return dest


@pytest.mark.parametrize("commit,method", CASES)
def test_generate_is_unchanged(commit, method, old_data_bin):
    cmd = command(commit, method)
    proc = run_cli("generate", fill(cmd["generate"], data=old_data_bin, user_dir=USER_DIR,
                                    checkpoint=fixture(commit, method, ".pt")))
    got = hypothesis_lines(proc.stdout)
    want = fixture(commit, method, ".generate.txt").read_text()
    assert got == want, (
        f"{commit}/{method}: fairseq-generate differs from the old code's\n"
        f"--- old\n{want}--- current\n{got}")


@pytest.mark.parametrize("commit,method", CASES)
def test_logits_are_bit_identical(commit, method, old_data_bin):
    import torch
    from fairseq import checkpoint_utils

    import moe_fairseq  # noqa: F401

    ref = torch.load(str(fixture(commit, method, ".logits.pt")), weights_only=True)
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [str(fixture(commit, method, ".pt"))], arg_overrides={"data": str(old_data_bin)})
    model = models[0].eval().float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the old code's logits were computed
    try:
        with torch.no_grad():
            logits = model(ref["src_tokens"], ref["src_lengths"], ref["prev_output_tokens"])[0]
    finally:
        torch.set_num_threads(threads)
    assert ref["src_lengths"].unique().numel() > 1, "the recorded batch has no padding"
    assert logits.dtype == ref["logits"].dtype and logits.shape == ref["logits"].shape
    assert torch.equal(logits, ref["logits"]), (
        f"{commit}/{method}: logits differ, max abs diff "
        f"{(logits - ref['logits']).abs().max().item():.3e}")


def _model_args(path: Path) -> dict:
    """The model flags a checkpoint written by the current code records."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model = (state.get("cfg") or {}).get("model") or state.get("args")
    if isinstance(model, argparse.Namespace):
        model = vars(model)
    return dict(model)


def _jsonable(value):
    return json.loads(json.dumps(value, default=repr))


def _settings_mismatches(old: dict, new: dict) -> list:
    """``key: old != new`` for each compared flag the old checkpoint records."""
    problems = []
    for key in sorted(old):
        if not (key.startswith(COMPARED_PREFIXES) or key in COMPARED_FAIRSEQ):
            continue
        want, new_key = old[key], key
        if key in RENAMED and key not in new:
            new_key, convert, matters = RENAMED[key]
            if not matters(old):
                continue
            want = convert(want)
        if new_key not in new:
            problems.append(f"{key}: {want!r} recorded, absent from the resumed run")
            continue
        got = _jsonable(new[new_key])
        if got != want:
            name = key if new_key == key else f"{key} (as {new_key})"
            problems.append(f"{name}: {want!r} recorded, {got!r} in the resumed run")
    return problems


@pytest.mark.parametrize("commit,method", CASES)
def test_resume_keeps_the_recorded_settings(commit, method, old_data_bin, tmp_path):
    cmd = command(commit, method)
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    shutil.copyfile(fixture(commit, method, ".pt"), save_dir / "checkpoint_last.pt")
    args = fill(cmd["train"], data=old_data_bin, user_dir=USER_DIR, save_dir=save_dir)
    i = args.index("--max-update")
    args[i + 1] = str(RESUME_MAX_UPDATE)
    proc = run_cli("train", args)
    out = proc.stdout + proc.stderr
    loaded = [l for l in out.splitlines() if "Loaded checkpoint" in l]
    assert loaded and "@ 8 updates" in loaded[0], (
        f"the checkpoint was not resumed:\n{out[-3000:]}")

    import torch

    last = save_dir / "checkpoint_last.pt"
    state = torch.load(str(last), map_location="cpu", weights_only=True)
    # Rewritten by this run at its end (update 10 is no --save-interval-updates multiple,
    # so checkpoint_last.pt is the only checkpoint it writes besides checkpoint_best.pt).
    assert state["optimizer_history"][-1]["num_updates"] == RESUME_MAX_UPDATE

    old = json.loads(fixture(commit, method, ".args.json").read_text())
    problems = _settings_mismatches(old, _model_args(last))
    assert not problems, (
        f"{commit}/{method}: the resumed run's MoE settings differ from the checkpoint's:\n  "
        + "\n  ".join(problems))


@pytest.mark.parametrize("commit, version", [("c8693dc", 1), ("f8eaf4f", 2)])
def test_version_comes_from_the_file_not_from_overrides(commit, version):
    """Checkpoints without moe_args_version are stamped from what they record; an
    --model-overrides of moe_capacity_rule (applied by fairseq before we see the
    namespace) does not make a version-1 checkpoint look like version 2."""
    from fairseq import checkpoint_utils

    import moe_fairseq  # noqa: F401

    path = str(fixture(commit, "smoe", ".pt"))
    for overrides in (None, {"moe_capacity_rule": "per-slot"}):
        model_args = checkpoint_utils.load_checkpoint_to_cpu(path, overrides)["cfg"]["model"]
        assert model_args.moe_args_version == version, overrides
