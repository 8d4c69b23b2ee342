"""Checkpoint mistakes a user makes, tried the way the user runs the tools (subprocesses):
nothing is overwritten, and every mistake ends in one line naming the file or flag.

- the checkpoint tools (average_checkpoints.py, prune_experts.py, upcycle.py) refuse an
  output that is one of their inputs (same path, symbolic or hard link), and replace a
  training checkpoint only with --force;
- a checkpoint without optimizer state that fairseq-train would resume stops with one
  line (fairseq would restart at update 0 without a word); --reset-optimizer lets it in;
- temp files of killed writers are removed by the next run; SIGTERM removes its own;
- resuming or loading a checkpoint of another shape, method or vocabulary is one line
  naming both sides; inputs that cannot be converted are refused before any work;
- an upcycled checkpoint fine-tunes with the README's command, which names no sizes.

Every refused run leaves its inputs byte for byte as they were (checksums).
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (REPO_ROOT, USER_DIR, first_test_batch, log_records, run_cli,
                      subprocess_env, train_args)
from test_upcycling import TINY_DIMS

def script(name, *args, timeout=300):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *map(str, args)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def checksums(*paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def folder_checksums(folder):
    return checksums(*sorted(p for p in Path(folder).iterdir() if p.is_file()))


def one_line_error(proc, *says):
    """The run failed on exactly one error line, the last, saying all of ``says``, with
    no traceback (fairseq's start-up warnings from hydra may come before it)."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if ": error: " in l]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    print(errors[0])  # shown with -s: what the user reads
    for s in says:
        assert s in errors[0], errors[0]
    return errors[0]


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def moe_run(data_bin, tmp_path_factory):
    """Tiny MoE, 12 updates, 5 per epoch, saved every 2 updates with epoch checkpoints:
    update 10 ends epoch 2, so fairseq writes checkpoint2.pt and no checkpoint_2_10.pt."""
    save = tmp_path_factory.mktemp("moe_run")
    args = [a for a in train_args(data_bin, save, "--moe-expert-count", "4", "--moe-freq", "2",
                                  "--save-interval-updates", "2", max_update=12)
            if a != "--no-epoch-checkpoints"]
    run_cli("train", args)
    assert (save / "checkpoint2.pt").is_file() and not (save / "checkpoint_2_10.pt").exists()
    return save


@pytest.fixture(scope="module")
def dense_ckpt(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("dense_run")
    run_cli("train", train_args(data_bin, save, "--arch", "transformer", *TINY_DIMS,
                                max_update=10))
    return save / "checkpoint_last.pt"


@pytest.fixture
def resumable(moe_run, tmp_path):
    """A save dir of its own holding a copy of the MoE run's checkpoint_last.pt."""
    save = tmp_path / "save"
    save.mkdir()
    shutil.copy(moe_run / "checkpoint_last.pt", save / "checkpoint_last.pt")
    return save


@pytest.fixture(scope="module")
def other_vocabulary(data_bin, tmp_path_factory):
    """The same data with 40 more dictionary entries (the binaries stay valid)."""
    root = tmp_path_factory.mktemp("other_vocab") / "bin"
    shutil.copytree(data_bin, root)
    for lang in ("src", "tgt"):
        with open(root / f"dict.{lang}.txt", "a") as f:
            f.writelines(f"extra{i} 1\n" for i in range(40))
    return root


# ------------------------------------------------------------- outputs and inputs


def test_update_checkpoints_at_epoch_ends_are_averaged(moe_run, tmp_path):
    out = tmp_path / "avg.pt"
    proc = script("average_checkpoints.py", "--inputs", moe_run, "--num-update-checkpoints", "4",
                  "--output", out)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out, weights_only=True)
    inputs = [os.path.basename(p) for p in state["extra_state"]["averaged_checkpoints"]["inputs"]]
    # update 10 is the end of epoch 2: its state is checkpoint2.pt
    assert inputs == ["checkpoint_2_6.pt", "checkpoint_2_8.pt", "checkpoint2.pt",
                      "checkpoint_3_12.pt"]


def test_an_output_that_is_an_input_is_refused(moe_run, dense_ckpt, tmp_path):
    a, b = moe_run / "checkpoint_1_2.pt", moe_run / "checkpoint_1_4.pt"
    link = tmp_path / "link.pt"
    link.symlink_to(a)
    hard = tmp_path / "hard.pt"
    os.link(b, hard)
    before = checksums(a, b, dense_ckpt)
    cases = [
        ("average_checkpoints.py", ["--inputs", a, b, "--output", a], "--output"),
        ("average_checkpoints.py", ["--inputs", a, b, "--output", link], "the same file as"),
        ("average_checkpoints.py", ["--inputs", a, b, "--output", hard], "the same file as"),
        ("average_checkpoints.py", ["--inputs", a, b, "--output", a, "--force"], "--output"),
        ("prune_experts.py", [a, "--keep", "2", "--out", link], "--out"),
        ("upcycle.py", [dense_ckpt, "--arch", "moe_transformer", "--moe-expert-count", "4",
                        "--moe-freq", "2", "--out", dense_ckpt, "--force"], "--out"),
    ]
    for tool, args, flag in cases:
        line = one_line_error(script(tool, *args), "is an input of this run", flag)
        assert line.startswith(f"{tool}: error:" if tool.startswith("average") else
                               "moe_fairseq: error:"), line
    assert checksums(a, b, dense_ckpt) == before


def test_a_training_checkpoint_is_replaced_only_with_force(moe_run, resumable, tmp_path):
    a, b = moe_run / "checkpoint_1_2.pt", moe_run / "checkpoint_1_4.pt"
    last = resumable / "checkpoint_last.pt"
    best = tmp_path / "renamed_but_training.pt"  # any name: it holds optimizer state
    shutil.copy(a, best)
    before = checksums(last, best)
    for target in (last, best):
        one_line_error(script("average_checkpoints.py", "--inputs", a, b, "--output", target),
                       "would replace a training checkpoint", "--force")
        one_line_error(script("prune_experts.py", a, "--keep", "2", "--out", target),
                       "would replace a training checkpoint", "--force")
    assert checksums(last, best) == before
    proc = script("average_checkpoints.py", "--inputs", a, b, "--output", last, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "last_optimizer_state" not in torch.load(last, weights_only=True)


def test_resuming_an_averaged_checkpoint_is_refused_unless_reset(moe_run, data_bin, tmp_path):
    save = tmp_path / "save"
    proc = script("average_checkpoints.py", "--inputs", moe_run / "checkpoint_2_8.pt",
                  moe_run / "checkpoint_3_12.pt", "--output", save / "checkpoint_last.pt")
    assert proc.returncode == 0, proc.stderr
    before = folder_checksums(save)
    args = train_args(data_bin, save, "--moe-expert-count", "4", "--moe-freq", "2",
                      max_update=14)
    line = one_line_error(run_cli("train", args, check=False), "written by average_checkpoints.py",
                          "holds no optimizer state", "update 12", "--finetune-from-model",
                          "--reset-optimizer")
    assert str(save / "checkpoint_last.pt") in line
    assert folder_checksums(save) == before
    # named: the user wants the weights at update 0 with a new schedule
    proc = run_cli("train", [*args, "--reset-optimizer"])
    assert "Loaded checkpoint" in proc.stdout + proc.stderr
    assert torch.load(save / "checkpoint_last.pt", weights_only=True)[
        "optimizer_history"][-1]["num_updates"] == 14


def test_temp_files_of_killed_writers_are_removed(moe_run, tmp_path):
    out = tmp_path / "avg.pt"
    dead = dead_pid()
    stale = [tmp_path / f"avg.pt.tmp-{dead}", tmp_path / f"older.pt.tmp-{dead}"]
    live = tmp_path / f"avg.pt.tmp-{os.getpid()}"  # a writer still at work
    other = tmp_path / f"notes.txt.tmp-{dead}"  # not ours to remove
    for p in (*stale, live, other):
        p.write_bytes(b"x" * 1000)
    proc = script("average_checkpoints.py", "--inputs", moe_run / "checkpoint_1_2.pt",
                  moe_run / "checkpoint_1_4.pt", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists() and out.is_file()


def test_sigterm_during_a_write_removes_the_temp_file(tmp_path):
    """The handler the tools install turns SIGTERM into SystemExit inside the write: the
    temp file goes, the earlier output stays."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from moe_fairseq.atomic_files import exit_on_sigterm, write_atomically
exit_on_sigterm()
def write(f):
    f.write(b"partial")
    f.flush()
    os.kill(os.getpid(), signal.SIGTERM)
    f.write(b"never")
write_atomically({str(tmp_path / 'out.pt')!r}, write)
"""
    (tmp_path / "out.pt").write_bytes(b"earlier")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert (tmp_path / "out.pt").read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_an_unwritable_output_is_refused_before_any_work(moe_run, dense_ckpt):
    probe = Path("/sys/moe_fairseq_probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    a = moe_run / "checkpoint_1_2.pt"
    for tool, args, flag in [
        ("average_checkpoints.py", ["--inputs", a, a, "--output", "/sys/avg.pt"], "--output"),
        ("prune_experts.py", [a, "--keep", "2", "--out", "/sys/pruned.pt"], "--out"),
        ("upcycle.py", [dense_ckpt, "--arch", "moe_transformer", "--moe-expert-count", "4",
                        "--moe-freq", "2", "--out", "/sys/up.pt"], "--out"),
    ]:
        one_line_error(script(tool, *args), f"{flag} /sys/", "not writable")


# ------------------------------------------------------------- resume and load


@pytest.mark.parametrize("flags,says", [
    (["--moe-expert-count", "8", "--moe-freq", "2"],
     ["experts per MoE layer: checkpoint 4, this run 8 (--moe-expert-count 4)"]),
    (["--arch", "smoe_transformer_tiny"],
     ["architecture: checkpoint moe_transformer_tiny [MoE], this run smoe_transformer_tiny "
      "[MoE] (--arch moe_transformer_tiny)"]),
    (["--arch", "transformer", *TINY_DIMS],
     ["this run transformer [dense] (--arch moe_transformer_tiny)"]),
], ids=["expert_count", "method", "dense"])
def test_resuming_another_model_is_one_line(resumable, data_bin, flags, says):
    before = folder_checksums(resumable)
    proc = run_cli("train", train_args(data_bin, resumable, *flags, max_update=14), check=False)
    one_line_error(proc, f"checkpoint {resumable / 'checkpoint_last.pt'} does not fit the model "
                   "this run builds", *says, "another --save-dir", "the checkpoint is unchanged")
    assert folder_checksums(resumable) == before


def test_loading_with_another_vocabulary_is_one_line(moe_run, other_vocabulary, tmp_path):
    ckpt = moe_run / "checkpoint_last.pt"
    before = checksums(ckpt)
    says = ["vocabulary: checkpoint 40 entries", "use the data-bin the model was trained on"]
    proc = run_cli("generate", [other_vocabulary, "--user-dir", USER_DIR, "--path", ckpt,
                                "--cpu", "--beam", "1", "--max-tokens", "1000"], check=False)
    one_line_error(proc, f"checkpoint {ckpt} does not fit", *says, str(other_vocabulary))
    proc = script("routing_report.py", "--path", ckpt, "--data", other_vocabulary, "--cpu",
                  "--out", tmp_path / "report")
    one_line_error(proc, *says)
    proc = script("prune_experts.py", ckpt, "--data", other_vocabulary, "--keep", "2",
                  "--out", tmp_path / "pruned.pt")
    one_line_error(proc, *says)
    for tool, args in (("routing_report.py", ["--path", ckpt, "--out", tmp_path / "r2"]),
                       ("prune_experts.py", [ckpt, "--keep", "2", "--out", tmp_path / "p2.pt"])):
        one_line_error(script(tool, *args, "--data", tmp_path / "missing"),
                       f"--data {tmp_path / 'missing'}: no such folder")
    assert not (tmp_path / "pruned.pt").exists()
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())
    assert checksums(ckpt) == before


# ------------------------------------------------------------- conversions


def test_conversions_of_the_wrong_model_are_refused_before_any_work(dense_ckpt, moe_run,
                                                                    data_bin, tmp_path):
    lstm = tmp_path / "lstm"
    run_cli("train", [data_bin, "--user-dir", USER_DIR, "--task", "translation", "--arch", "lstm",
                      *[x for d in ("encoder", "decoder") for x in (
                          f"--{d}-embed-dim", "16", f"--{d}-hidden-size", "16")],
                      "--decoder-out-embed-dim", "16", "--criterion", "cross_entropy",
                      "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1000",
                      "--max-update", "1", "--save-dir", lstm, "--cpu", "--no-epoch-checkpoints",
                      "--disable-validation", "--no-progress-bar"])
    before = checksums(dense_ckpt, lstm / "checkpoint_last.pt", moe_run / "checkpoint_last.pt")
    out = tmp_path / "out.pt"
    one_line_error(script("prune_experts.py", dense_ckpt, "--keep", "2", "--out", out),
                   f"MOE_CKPT {dense_ckpt} is a dense model (--arch transformer)", "upcycle.py")
    one_line_error(script("upcycle.py", lstm / "checkpoint_last.pt", "--arch", "moe_transformer",
                          "--moe-expert-count", "4", "--out", out),
                   "is not a transformer (--arch lstm, model lstm)")
    one_line_error(script("upcycle.py", moe_run / "checkpoint_last.pt", "--arch",
                          "moe_transformer", "--out", out), "is already an MoE model")
    one_line_error(script("upcycle.py", dense_ckpt, "--arch", "moe_transformer",
                          "--moe-expert-count", "4", "--encoder-embed-dim", "128", "--out", out),
                   "--encoder-embed-dim 128", "encoder_embed_dim 64", "DENSE_CKPT")
    assert not out.exists()
    assert checksums(dense_ckpt, lstm / "checkpoint_last.pt",
                     moe_run / "checkpoint_last.pt") == before


def test_the_readme_finetune_command_works_without_size_flags(dense_ckpt, data_bin, tmp_path):
    """README: upcycle.py, then fairseq-train ... --arch moe_transformer --moe-expert-count
    8 --moe-freq 2 --finetune-from-model UP: the base-size arch with a 64-wide dense
    checkpoint. The model it builds is the upcycled one: with lr 0 the fine-tuned
    checkpoint's first forward equals the dense model's."""
    up = tmp_path / "moe_up" / "upcycled.pt"
    proc = script("upcycle.py", dense_ckpt, "--arch", "moe_transformer", "--moe-expert-count",
                  "8", "--moe-freq", "2", "--out", up)
    assert proc.returncode == 0, proc.stderr
    assert "--finetune-from-model" in proc.stdout and "are taken from" in proc.stdout
    save = tmp_path / "moe_up"
    proc = run_cli("train", [
        data_bin, "--user-dir", USER_DIR, "--task", "translation",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--arch", "moe_transformer", "--moe-expert-count", "8", "--moe-freq", "2",
        "--finetune-from-model", up, "--save-dir", save,
        "--optimizer", "adam", "--lr", "0", "--max-tokens", "1000", "--max-update", "1",
        "--cpu", "--num-workers", "0", "--no-epoch-checkpoints", "--disable-validation",
        "--log-format", "json", "--no-progress-bar"])
    assert "model settings the command line does not name are the checkpoint's" in proc.stdout + proc.stderr
    _, dense_out, real = first_test_batch(dense_ckpt, data_bin)
    model, tuned_out, tuned_real = first_test_batch(save / "checkpoint_last.pt", data_bin)
    assert torch.equal(real, tuned_real)
    w1 = [p for n, p in model.named_parameters() if n.endswith("moe.experts.w1")]
    assert w1 and all(tuple(p.shape) == (8, 64, 128) for p in w1)
    assert torch.allclose(tuned_out[real], dense_out[real], atol=1e-5)
