"""scripts/average_checkpoints.py on checkpoints of real fairseq-train runs (MoE, MoEC
with its boolean kept_experts buffer), decoded with fairseq-generate afterwards."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, USER_DIR, run_cli, subprocess_env, train_args


def average(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "average_checkpoints.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


@pytest.fixture(scope="module", params=["moe_transformer_tiny", "moec_transformer_tiny"])
def run(request, data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp(request.param)
    run_cli("train", train_args(data_bin, save, "--arch", request.param,
                                "--save-interval-updates", "2", max_update=6))
    return save


def test_average_is_the_mean_of_the_weights_and_decodes(run, data_bin):
    out = run / "avg.pt"
    proc = average("--inputs", run, "--num-update-checkpoints", "3", "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = ["checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint_2_6.pt"]
    assert [line.strip().split("/")[-1] for line in proc.stdout.splitlines()[1:]] == names
    inputs = [torch.load(run / n, weights_only=True)["model"] for n in names]
    avg = torch.load(out, weights_only=True)
    assert "last_optimizer_state" not in avg
    for key, value in avg["model"].items():
        if value.is_floating_point():
            mean = sum(m[key].double() for m in inputs) / 3
            assert value.dtype == inputs[0][key].dtype
            assert torch.equal(value, mean.to(value.dtype)), key
        else:  # counters and masks (MoEC kept_experts) come from the newest
            assert torch.equal(value, inputs[-1][key]), key
    if "moec" in run.name:
        assert any(k.endswith("kept_experts") and v.dtype == torch.bool
                   for k, v in avg["model"].items())
    gen = run_cli("generate", [data_bin, "--user-dir", USER_DIR, "--path", out, "--cpu",
                               "--max-tokens", "2000", "--beam", "2"])
    assert "Generate test with beam=2" in gen.stdout + gen.stderr


def test_averaging_one_checkpoint_with_itself_changes_nothing(run, tmp_path):
    one = run / "checkpoint_1_4.pt"
    proc = average("--inputs", one, one, one, "--output", tmp_path / "same.pt")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(one, weights_only=True)["model"]
    b = torch.load(tmp_path / "same.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_end_in_one_line(run, data_bin, tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run / "checkpoint_1_2.pt").read_bytes()[:5000])
    dense = tmp_path / "dense"
    run_cli("train", train_args(data_bin, dense, "--arch", "transformer", "--encoder-layers",
                                "1", "--decoder-layers", "1", max_update=1))
    cases = [
        (["--inputs", run / "checkpoint_1_2.pt", truncated], "is truncated or corrupt"),
        (["--inputs", run / "checkpoint_1_2.pt", dense / "checkpoint_last.pt"],
         "hold different parameters"),
        (["--inputs", run, "--num-update-checkpoints", "9"], "has 3 such checkpoints"),
        (["--inputs", run / "checkpoint_1_2.pt", tmp_path / "none.pt"], "does not exist"),
    ]
    for args, says in cases:
        proc = average(*args, "--output", tmp_path / "out.pt")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and says in lines[-1], proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("out.pt*"))  # nothing half-written
