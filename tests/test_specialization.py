"""Expert-specialization pieces (arXiv 2302.14703): importance and sample-similarity
losses against hand-computed values, and the bits metrics on constructed routings."""

import math

import torch

from moe_fairseq.analysis.specialization import (
    joint_counts, mutual_information_bits, sample_entropy_bits, usage_entropy_bits)
from moe_fairseq.routers.losses import importance_loss, sample_similarity_loss


def test_importance_loss_by_hand():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    # importances [3, 1]: mean 2, unbiased std sqrt(2), CV^2 = 0.5
    assert abs(float(importance_loss(probs, weight=2.0)) - 1.0) < 1e-6
    assert float(importance_loss(torch.full((4, 3), 1 / 3))) == 0.0
    assert float(importance_loss(torch.ones(4, 1))) == 0.0


def test_sample_similarity_loss_by_hand():
    # Points 0, 1, 2, 4 on a line: D_ij = |x_i - x_j| / 4. Samples 0, 1 -> expert 0,
    # samples 2, 3 -> expert 1 (E = 2).
    x = torch.tensor([[0.0], [1.0], [2.0], [4.0]])
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # same = (1/2) * 2 * (1/4 + 2/4) = 0.75
    # diff = (1/2) * 2 * (2/4 + 4/4 + 1/4 + 3/4) = 2.5, divided by N^2 = 16
    loss = sample_similarity_loss(probs, x, beta_s=1.0, beta_d=1.0)
    assert abs(float(loss) - (0.75 - 2.5 / 16)) < 1e-6
    assert abs(float(sample_similarity_loss(probs, x, 2.0, 0.0)) - 1.5) < 1e-6


def test_sample_similarity_loss_matches_a_loop_with_soft_gates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g)
    probs = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), -1)
    probs.requires_grad_(True)
    N, E = probs.shape
    flat = x.reshape(N, -1).double()
    D = [[float((flat[i] - flat[j]).norm()) for j in range(N)] for i in range(N)]
    top = max(max(row) for row in D)
    same = diff = 0.0
    for i in range(N):
        for j in range(N):
            d = D[i][j] / top
            for e in range(E):
                for f in range(E):
                    term = float(probs[i, e] * probs[j, f]) * d
                    if e == f:
                        same += term / E
                    else:
                        diff += term / (E * E - E)
    expected = 1e-2 * same - 0.3 * diff / N**2
    loss = sample_similarity_loss(probs, x, beta_s=1e-2, beta_d=0.3)
    assert abs(float(loss) - expected) < 1e-12
    loss.backward()
    assert torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0


def test_mutual_information_zero_and_log2k():
    K = 4
    label = torch.arange(K).repeat(24)
    own_expert = label.clone()  # each label its own expert
    assert abs(mutual_information_bits(joint_counts(own_expert, label, K, K)) - math.log2(K)) < 1e-9
    ignores = torch.arange(96) // 24  # expert by position only: 6 of each label each
    assert torch.equal(joint_counts(ignores, label, K, K), torch.full((K, K), 6))
    assert mutual_information_bits(joint_counts(ignores, label, K, K)) < 1e-12
    assert mutual_information_bits(torch.zeros(3, 2, dtype=torch.long)) == 0.0


def test_gate_and_usage_entropies():
    E = 8
    one_hot = torch.eye(E).repeat(3, 1)
    assert sample_entropy_bits(one_hot) == 0.0
    assert abs(usage_entropy_bits(one_hot) - 3.0) < 1e-12
    uniform = torch.full((10, E), 1 / E)
    assert abs(sample_entropy_bits(uniform) - 3.0) < 1e-12
    all_to_one = torch.zeros(10, E)
    all_to_one[:, 2] = 1
    assert usage_entropy_bits(all_to_one) == 0.0


def test_marginal_entropies_and_the_language_report():
    import sys

    from conftest import REPO_ROOT
    from moe_fairseq.analysis.specialization import marginal_entropies_bits

    # Experts 0, 1 serve language 0 only, expert 2 language 1 only: I = H(lang) = 1 bit.
    counts = torch.tensor([[30, 0], [30, 0], [0, 60]])
    h_e, h_y = marginal_entropies_bits(counts)
    assert abs(h_e - 1.5) < 1e-12 and abs(h_y - 1.0) < 1e-12
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from expert_load import describe_language_mi
    finally:
        sys.path.pop(0)
    report = describe_language_mi({"languages": ["x", "y"], "enc.moe": counts,
                                   "dec.moe": torch.tensor([[10, 10], [20, 20]])})
    assert abs(report["enc.moe"]["mi_bits"] - 1.0) < 1e-12 and report["enc.moe"]["mi_share"] == 1.0
    assert report["dec.moe"]["mi_bits"] < 1e-12  # routing independent of the language
    # Chen et al.'s dispatch entropy with languages as clusters, and H(expert | language)
    assert report["enc.moe"]["dispatch_entropy_nats"] == 0.0
    assert abs(report["dec.moe"]["dispatch_entropy_nats"] - math.log(2)) < 1e-12
    assert report["enc.moe"]["expert_entropy_bits_by_language"] == {"x": 1.0, "y": 0.0}
