"""The cluster-structure study (arXiv 2208.02813) on the package's MoE layer: the
noisy top-1 router, the MoE against a per-sample reference, normalised GD, the
dispatch entropy, a router at the true centres, and the script with --quick."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, subprocess_env
from examples.cluster_study.data import generate
from examples.cluster_study.models import ClusterMoE
from examples.cluster_study.train import dispatch_entropy, normalized_gd_step
from moe_fairseq.routers.noisy_top1 import NoisyTop1Router


def test_router_scores_the_patch_sum_and_gates_with_the_noisy_score():
    torch.manual_seed(0)
    router = NoisyTop1Router(12, 3, patches=3)
    assert float(router.weight.detach().abs().sum()) == 0.0  # zero init
    router.weight.data = torch.randn(3, 4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(router.scores(x), x.view(5, 3, 4).sum(1) @ router.weight.t())
    torch.manual_seed(1)
    routing = router(x)
    torch.manual_seed(1)
    noisy = router.scores(x) + torch.rand(5, 3)
    assert torch.equal(routing.expert_index[:, 0], noisy.argmax(-1))
    torch.testing.assert_close(routing.gates[:, 0], noisy.max(-1).values)
    assert routing.capacity is None and routing.losses == {}
    quiet = NoisyTop1Router(12, 3, patches=3, noise_at_eval=False).eval()
    quiet.weight.data = router.weight.data
    assert torch.equal(quiet(x).gates[:, 0], router.scores(x).max(-1).values)
    with pytest.raises(ValueError, match="patches"):
        NoisyTop1Router(10, 3, patches=3)


def test_moe_equals_a_per_sample_reference():
    torch.manual_seed(0)
    model = ClusterMoE(num_experts=3, filters_per_class=2, patches=2, patch_len=5,
                       init_scale=1.0).double()
    model.router.weight.data = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(9, 10, dtype=torch.float64)
    torch.manual_seed(5)
    probs = model(x)
    expert = model.moe.stats.first_expert
    torch.manual_seed(5)
    noisy = model.router.scores(x) + torch.rand(9, 3)
    assert torch.equal(expert, noisy.argmax(-1))
    for i in range(9):
        e = int(expert[i])
        patches = x[i].view(2, 5)
        z = (patches @ model.experts.weight[e].t() + model.experts.bias[e]).pow(3).sum(0)  # [4]
        logits = torch.stack([z[:2].sum(), z[2:].sum()]) * noisy[i].max()
        torch.testing.assert_close(probs[i], torch.softmax(logits, -1), rtol=1e-6, atol=1e-9)


def test_normalized_gd_moves_each_expert_by_its_own_gradient_norm():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    b.grad = torch.tensor([5.0, 0.0])
    normalized_gd_step([w, b], lr=0.1)
    # expert 0: norms 5 + 5 = 10; expert 1 has no gradient and stays
    torch.testing.assert_close(w.data, torch.tensor([[-0.03, -0.04, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(b.data, torch.tensor([-0.05, 0.0]))


def test_dispatch_entropy_extremes():
    cluster = torch.arange(400) % 4
    assert dispatch_entropy(cluster, cluster, 8, 4) == 0.0
    assert abs(dispatch_entropy(torch.zeros(400, dtype=torch.long), cluster, 8, 4) - math.log(4)) < 1e-12


def test_router_at_the_true_centres_sends_each_cluster_to_one_expert():
    data = generate(1, 2000, seed=3)
    model = ClusterMoE()
    model.router.weight.data.zero_()
    model.router.weight.data[:4] = data.centers  # expert k <- centre c_k
    with torch.no_grad():
        model(data.x)
    expert = model.moe.stats.first_expert
    assert dispatch_entropy(expert, data.cluster, 8, 4) < 0.01
    assert torch.equal(expert, data.cluster)


def test_cluster_study_quick_end_to_end(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "scripts/cluster_study.py", "--quick", "--settings", "1", "3",
           "--seeds", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["setting"], r["model"]) for r in runs) == sorted(
        (s, m) for s in (1, 3) for m in ("single_linear", "single_nonlinear", "moe_linear", "moe_nonlinear"))
    moe = [r for r in runs if r["model"].startswith("moe")]
    assert all(0.0 <= r["dispatch_entropy"] <= math.log(4) + 1e-9 for r in moe)
    # the MoE's 101 quick epochs already beat the single linear model on setting 1
    acc = {(r["setting"], r["model"]): r["test_accuracy"] for r in runs}
    assert acc[(1, "moe_linear")] > acc[(1, "single_linear")]
    table = (out / "table.md").read_text()
    assert "| 3 | moe_nonlinear | 1 |" in table and "No acceptance checks" in table
    for png in ("accuracy.png", "router_centers.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run(cmd, cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "0 runs to do, 8 already" in again.stdout
    bad = subprocess.run(cmd[:2] + ["--settings", "5"], cwd=str(REPO_ROOT), env=subprocess_env(),
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--settings" in bad.stderr
