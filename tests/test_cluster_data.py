"""The synthetic data of the cluster-structure study (examples/cluster_study/data.py,
Chen et al., arXiv 2208.02813): each sample's four patches recovered by projection on
the true features and centres, the statistics of the draws against the specification,
determinism per seed, and the argument errors."""

import math

import pytest
import torch

from examples.cluster_study.data import (NUM_CLUSTERS, NUM_PATCHES, PATCH_LEN, SCALE,
                                         SETTINGS, ClusterData, generate, train_test)

N = 2000
K, P, D = NUM_CLUSTERS, NUM_PATCHES, PATCH_LEN


def decompose(data: ClusterData):
    """Per sample, which patch is which and its coefficient, found by projecting each
    patch on the 2K true vectors: the noise patch is the one with a residual off their
    span; each other patch has exactly one non-zero coefficient."""
    basis = torch.cat([data.features, data.centers]).double()        # [2K, d]
    patches = data.patches.double()                                   # [N, P, d]
    coef = patches @ basis.t()                                        # [N, P, 2K]
    residual = (patches - coef @ basis).norm(dim=-1)                  # [N, P]
    is_noise = residual > 1e-3 * SCALE
    assert (is_noise.sum(1) == 1).all(), "exactly one patch per sample is off the span"
    big = coef.abs() > 1e-3 * SCALE                                   # [N, P, 2K]
    structured = ~is_noise
    assert (big[structured].sum(-1) == 1).all(), "each structured patch lies on one vector"
    which = big.float().argmax(-1)                                    # [N, P], index in 0..2K-1
    value = coef.gather(-1, which[..., None]).squeeze(-1)             # [N, P]
    rows = torch.arange(len(data))
    k = data.cluster
    # the feature-signal patch: on v_k; the centre patch: on c_k (index K + k)
    signal = structured & (which == k[:, None])
    centre = structured & (which == K + k[:, None])
    feature_noise = structured & (which < K) & (which != k[:, None])
    for mask in (signal, centre, feature_noise):
        assert (mask.sum(1) == 1).all()
    noise = patches[rows, is_noise.float().argmax(1)]                 # [N, d]
    return dict(
        alpha_y=value[signal] / SCALE,            # alpha * y, [N] in sample order
        beta=value[centre] / SCALE,
        gamma_eps=value[feature_noise] / SCALE,
        k_noise=which[feature_noise],
        noise=noise,
        positions=torch.stack([m.float().argmax(1)
                               for m in (signal, centre, is_noise, feature_noise)], 1),
    )


def test_shapes_and_dtypes():
    train, test = train_test(1, seed=0, n_train=N, n_test=300)
    assert train.x.shape == (N, P * D) and train.x.dtype == torch.float32
    assert test.x.shape == (300, P * D)
    assert train.y.dtype == torch.int64 and set(train.y.unique().tolist()) == {0, 1}
    assert train.cluster.dtype == torch.int64
    assert set(train.cluster.unique().tolist()) == set(range(K))
    assert train.features.shape == train.centers.shape == (K, D)
    assert train.patches.shape == (N, P, D) and len(train) == N
    torch.testing.assert_close(train.signed_y.abs(), torch.ones(N, dtype=torch.int64))
    # both splits share one set of features and centres
    assert torch.equal(train.features, test.features) and torch.equal(train.centers, test.centers)


def test_features_and_centres_are_orthonormal():
    data = generate(2, N, seed=3)
    basis = torch.cat([data.features, data.centers])
    torch.testing.assert_close(basis @ basis.t(), torch.eye(2 * K), rtol=0, atol=1e-5)


def test_cluster_and_label_balance():
    data = generate(1, N, seed=1)
    # binomial: 5 standard deviations around N/4 and N/2
    for c in range(K):
        count = int((data.cluster == c).sum())
        assert abs(count - N / K) < 5 * math.sqrt(N * 0.25 * 0.75)
    assert abs(int(data.y.sum()) - N / 2) < 5 * math.sqrt(N * 0.25)
    # labels are independent of clusters: balanced within each cluster too
    for c in range(K):
        in_c = data.y[data.cluster == c]
        assert abs(float(in_c.double().mean()) - 0.5) < 5 * math.sqrt(0.25 / in_c.numel())


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_patches_match_the_specification(setting):
    spec = SETTINGS[setting]
    data = generate(setting, N, seed=10 + setting)
    parts = decompose(data)
    tol = 1e-5

    # signal patch: 10 * alpha * y * v_k, alpha in [0.5, 2], sign = label
    alpha = parts["alpha_y"].abs()
    assert alpha.min() >= spec.alpha[0] - tol and alpha.max() <= spec.alpha[1] + tol
    assert torch.equal((parts["alpha_y"] > 0).long(), data.y)
    # centre patch: 10 * beta * c_k, beta in [1, 2] (positive)
    beta = parts["beta"]
    assert beta.min() >= spec.beta[0] - tol and beta.max() <= spec.beta[1] + tol
    # feature noise: 10 * eps * gamma * v_k', k' != k (checked in decompose), gamma range
    gamma = parts["gamma_eps"].abs()
    assert gamma.min() >= spec.gamma[0] - tol and gamma.max() <= spec.gamma[1] + tol
    # uniform draws: means near the middle of their ranges (5 standard errors)
    for values, (lo, hi) in ((alpha, spec.alpha), (beta, spec.beta), (gamma, spec.gamma)):
        se = (hi - lo) / math.sqrt(12 * N)
        assert abs(float(values.mean()) - (lo + hi) / 2) < 5 * se
    # eps is +-1 about evenly
    assert abs(float((parts["gamma_eps"] > 0).double().mean()) - 0.5) < 5 * math.sqrt(0.25 / N)
    # k' covers all the other clusters, about evenly (expected N/3 per (k, k') pair / 4)
    pairs = torch.zeros(K, K)
    pairs.index_put_((data.cluster, parts["k_noise"]), torch.ones(N), accumulate=True)
    assert (pairs.diagonal() == 0).all()
    off = pairs[~torch.eye(K, dtype=torch.bool)]
    expected = N / (K * (K - 1))
    assert (off - expected).abs().max() < 5 * math.sqrt(expected)

    # noise patch: entries N(0, (10 sigma)^2 / d); mean square within 5% and mean ~ 0
    noise = parts["noise"]
    var = (SCALE * spec.sigma) ** 2 / D
    assert abs(float(noise.pow(2).mean()) / var - 1) < 0.05
    assert abs(float(noise.mean())) < 5 * math.sqrt(var / noise.numel())

    # the positions of the 4 patch kinds: every kind in every position about equally
    counts = torch.stack([torch.bincount(parts["positions"][:, j], minlength=P) for j in range(P)])
    assert (counts - N / P).abs().max() < 5 * math.sqrt(N * (1 / P) * (1 - 1 / P))


def test_same_seed_same_data_other_seed_other_data():
    a_train, a_test = train_test(3, seed=7, n_train=500, n_test=200)
    b_train, b_test = train_test(3, seed=7, n_train=500, n_test=200)
    for a, b in ((a_train, b_train), (a_test, b_test)):
        for name in ("x", "y", "cluster", "features", "centers"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    c_train, _ = train_test(3, seed=8, n_train=500, n_test=200)
    assert not torch.equal(a_train.x, c_train.x)
    assert not torch.equal(a_train.features, c_train.features)
    # the test split continues the stream: not a copy of the training split
    assert not torch.equal(a_train.x[:200], a_test.x)
    # generate() with the same seed is the training split
    assert torch.equal(generate(3, 500, seed=7).x, a_train.x)


def test_given_features_and_centres_are_used():
    train, _ = train_test(4, seed=0, n_train=10, n_test=10)
    data = generate(4, 300, seed=5, features=train.features, centers=train.centers)
    torch.testing.assert_close(data.features, train.features)
    decompose(data)  # every structured patch lies on the given vectors


def test_settings_differ_only_in_gamma_and_sigma():
    assert SETTINGS[1].gamma == SETTINGS[2].gamma == (0.5, 3.0)
    assert SETTINGS[3].gamma == SETTINGS[4].gamma == (0.5, 2.0)
    assert SETTINGS[1].sigma == SETTINGS[3].sigma == 1.0
    assert SETTINGS[2].sigma == SETTINGS[4].sigma == 2.0


@pytest.mark.parametrize("call, match", [
    (lambda: generate(5, 10, seed=0), r"setting must be one of \[1, 2, 3, 4\], got 5"),
    (lambda: generate(0, 10, seed=0), r"setting must be one of"),
    (lambda: generate("1", 10, seed=0), r"setting must be one of"),
    (lambda: generate(True, 10, seed=0), r"setting must be one of"),
    (lambda: generate(1, 0, seed=0), r"n must be a positive integer.*got 0"),
    (lambda: generate(1, 2.5, seed=0), r"n must be a positive integer"),
    (lambda: generate(1, 10, seed=-1), r"seed must be a non-negative integer"),
    (lambda: train_test(1, seed=0, n_train=-3), r"n_train must be a positive integer.*-3"),
    (lambda: train_test(1, seed=0, n_test=0), r"n_test must be a positive integer"),
    (lambda: train_test(9, seed=0), r"setting must be one of"),
    (lambda: generate(1, 10, seed=0, features=torch.eye(K, D)), r"together"),
    (lambda: generate(1, 10, seed=0, features=torch.eye(3, D), centers=torch.eye(3, D)),
     r"features must have shape \[4, 50\], got \[3, 50\]"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
