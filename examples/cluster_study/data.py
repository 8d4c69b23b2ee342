"""Synthetic data of the cluster-structure study (Chen et al., NeurIPS 2022, arXiv
2208.02813, Section 6 "Experiments on synthetic data").

A sample ``x`` has ``P = 4`` patches of ``d = 50`` entries. With ``K = 4`` clusters,
unit feature vectors ``v_1..v_K`` and cluster centres ``c_1..c_K`` (all ``2K`` mutually
orthonormal), label ``y`` uniform in {+1, -1} and cluster ``k`` uniform in {0..K-1},
its patches are, in a random order per sample, and then all multiplied by 10::

    alpha * y * v_k               feature signal,   alpha ~ U(0.5, 2)
    beta * c_k                    cluster centre,   beta  ~ U(1, 2)
    xi ~ N(0, sigma^2 / d * I_d)  Gaussian noise (independent entries)
    eps * gamma * v_k'            feature noise,    k' uniform in {0..K-1} \\ {k},
                                                    eps uniform in {+1, -1}, gamma ~ U(...)

Settings (gamma range, sigma): 1 = ((0.5, 3), 1), 2 = ((0.5, 3), 2), 3 = ((0.5, 2), 1),
4 = ((0.5, 2), 2).

Facts taken from the authors' notebooks (github.com/uclaml/MoE,
``Codes/synthetic_data_s1.ipynb``, ``Codes/synthetic_data_s3.ipynb``,
``synthetic_data_s2.ipynb``, ``synthetic_data_s4.ipynb``), written here in our own code:

- K = 4, P = 4, d = 50; 16,000 training and 16,000 test points, drawn from one random
  stream (training first), sharing one set of features and centres.
- The 8 vectors are made by Gram-Schmidt on standard Gaussian vectors, features first,
  then centres, so all 8 are mutually orthonormal; each is a unit vector.
- Noise patch: one fresh draw per sample with independent entries of standard deviation
  ``sigma / sqrt(d)`` (sigma = 1 in settings 1 and 3, 2 in settings 2 and 4).
- ``eps`` is uniform in {+1, -1}, ``k'`` uniform over the other K - 1 clusters;
  alpha ~ U(0.5, 2), beta ~ U(1, 2), gamma ~ U(0.5, 3) (settings 1, 2) or U(0.5, 2)
  (settings 3, 4), each drawn fresh per sample.
- The 4 patches are shuffled by a uniform random permutation per sample.
- Labels are stored as int64 {0, 1} with y = -1 -> 0 and y = +1 -> 1 (the classifiers
  use cross-entropy over 2 classes); the data, as float32 ``[N, 1, P*d]`` there, are
  multiplied by 10 after generation, and the stored features / centres are the unit
  vectors (the notebooks scale their copies by 10 only for plotting).

Our choices (not bit-compatible with the notebooks, which use numpy's and torch's
global generators sample by sample): one ``torch.Generator`` seeded with ``seed`` draws,
in this order, the 2K Gaussian vectors of the basis, then per split, vectorised over
the samples: y, k, the noise, eps, k', alpha, beta, gamma, and the permutations (argsort
of uniforms). Arithmetic is in float64 on the CPU, scaled by 10, then cast to float32,
so the same seed gives the same tensors bit for bit. ``x`` is ``[N, P*d]`` (no
singleton channel axis); ``ClusterData.patches`` gives the ``[N, P, d]`` view.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

NUM_CLUSTERS = 4   # K
NUM_PATCHES = 4    # P
PATCH_LEN = 50     # d
SCALE = 10.0       # every entry of x is multiplied by this
N_TRAIN = N_TEST = 16000


@dataclass(frozen=True)
class Setting:
    """Ranges of the uniform coefficients and the noise level of one data setting."""
    gamma: Tuple[float, float]
    sigma: float
    alpha: Tuple[float, float] = (0.5, 2.0)
    beta: Tuple[float, float] = (1.0, 2.0)


SETTINGS = {
    1: Setting(gamma=(0.5, 3.0), sigma=1.0),
    2: Setting(gamma=(0.5, 3.0), sigma=2.0),
    3: Setting(gamma=(0.5, 2.0), sigma=1.0),
    4: Setting(gamma=(0.5, 2.0), sigma=2.0),
}


@dataclass(frozen=True)
class ClusterData:
    """One split of the synthetic data, on the CPU.

    - ``x``: float32 ``[N, P*d]``, the P patches of length d concatenated (scaled by 10);
    - ``y``: int64 ``[N]`` in {0, 1}; 1 is the label +1, 0 the label -1;
    - ``cluster``: int64 ``[N]`` in {0..K-1}, the cluster k of each sample;
    - ``features``: float32 ``[K, d]``, unit feature vectors v_k (rows), unscaled;
    - ``centers``: float32 ``[K, d]``, unit cluster centres c_k (rows), unscaled.
    """
    x: Tensor
    y: Tensor
    cluster: Tensor
    features: Tensor
    centers: Tensor

    def __len__(self) -> int:
        return self.y.numel()

    @property
    def patches(self) -> Tensor:
        """``x`` viewed as ``[N, P, d]``."""
        return self.x.view(self.x.size(0), -1, self.features.size(1))

    @property
    def signed_y(self) -> Tensor:
        """The labels in {-1, +1}, int64 ``[N]``."""
        return 2 * self.y - 1


def _check_setting(setting) -> Setting:
    if isinstance(setting, bool) or not isinstance(setting, numbers.Integral) \
            or int(setting) not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    return SETTINGS[int(setting)]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer (number of samples), got {value!r}")
    return int(value)


def _generator(seed) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _uniform(lo_hi: Tuple[float, float], n: int, gen: torch.Generator) -> Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, dtype=torch.float64, generator=gen)


def draw_basis(gen: torch.Generator, num_clusters: int = NUM_CLUSTERS,
               patch_len: int = PATCH_LEN) -> Tuple[Tensor, Tensor]:
    """``2K`` orthonormal vectors by Gram-Schmidt on Gaussian draws (features first).
    Returns float64 ``(features [K, d], centers [K, d])``."""
    if 2 * num_clusters > patch_len:
        raise ValueError(f"patch_len ({patch_len}) must be at least 2 * num_clusters "
                         f"({2 * num_clusters}) for orthonormal features and centres")
    raw = torch.randn(2 * num_clusters, patch_len, dtype=torch.float64, generator=gen)
    basis = []
    for v in raw:
        for _ in range(2):  # a second pass removes the rounding left by the first
            for u in basis:
                v = v - (v @ u) * u
        basis.append(v / v.norm())
    basis = torch.stack(basis)
    return basis[:num_clusters], basis[num_clusters:]


def _sample(setting: Setting, n: int, features: Tensor, centers: Tensor,
            gen: torch.Generator) -> ClusterData:
    K, d = features.shape
    sign = torch.randint(0, 2, (n,), generator=gen)                     # y in {0, 1}
    k = torch.randint(0, K, (n,), generator=gen)
    noise = torch.randn(n, d, dtype=torch.float64, generator=gen) * (setting.sigma / math.sqrt(d))
    eps = (2 * torch.randint(0, 2, (n,), generator=gen) - 1).double()
    # k + U{1..K-1} mod K is uniform over the K - 1 clusters other than k.
    k_noise = (k + torch.randint(1, K, (n,), generator=gen)) % K
    alpha = _uniform(setting.alpha, n, gen)
    beta = _uniform(setting.beta, n, gen)
    gamma = _uniform(setting.gamma, n, gen)
    # argsort of float64 uniforms: a uniform permutation (ties have probability ~0)
    order = torch.rand(n, NUM_PATCHES, dtype=torch.float64, generator=gen).argsort(dim=1)

    y_pm = (2 * sign - 1).double()
    canonical = torch.stack([
        (alpha * y_pm)[:, None] * features[k],
        beta[:, None] * centers[k],
        noise,
        (eps * gamma)[:, None] * features[k_noise],
    ], dim=1)                                                          # [n, P, d]
    shuffled = canonical.gather(1, order[:, :, None].expand(n, NUM_PATCHES, d))
    x = (SCALE * shuffled).reshape(n, NUM_PATCHES * d).float()
    return ClusterData(x=x, y=sign.long(), cluster=k.long(),
                       features=features.float(), centers=centers.float())


def generate(setting: int, n: int, seed: int, features: Optional[Tensor] = None,
             centers: Optional[Tensor] = None) -> ClusterData:
    """``n`` samples of data setting ``setting`` (1..4) from a generator seeded with ``seed``.

    Without ``features``/``centers`` (``[K, d]`` each, unit rows), they are drawn first
    from the same generator, so ``generate(s, n, seed)`` equals the training split of
    ``train_test(s, seed, n_train=n)``. Returns a :class:`ClusterData` (x ``[n, P*d]``).
    """
    spec = _check_setting(setting)
    n = _check_count("n", n)
    gen = _generator(seed)
    if (features is None) != (centers is None):
        raise ValueError("features and centers must be given together (or both left out)")
    if features is None:
        features, centers = draw_basis(gen)
    else:
        for name, t in (("features", features), ("centers", centers)):
            if tuple(t.shape) != (NUM_CLUSTERS, PATCH_LEN):
                raise ValueError(f"{name} must have shape [{NUM_CLUSTERS}, {PATCH_LEN}], "
                                 f"got {list(t.shape)}")
        features, centers = features.double().cpu(), centers.double().cpu()
    return _sample(spec, n, features, centers, gen)


def train_test(setting: int, seed: int, n_train: int = N_TRAIN,
               n_test: int = N_TEST) -> Tuple[ClusterData, ClusterData]:
    """The training and test splits of one setting: one generator seeded with ``seed``
    draws the shared features and centres, then the training samples, then the test
    samples. Returns ``(train, test)``; x ``[n_train, P*d]`` and ``[n_test, P*d]``."""
    spec = _check_setting(setting)
    n_train = _check_count("n_train", n_train)
    n_test = _check_count("n_test", n_test)
    gen = _generator(seed)
    features, centers = draw_basis(gen)
    train = _sample(spec, n_train, features, centers, gen)
    test = _sample(spec, n_test, features, centers, gen)
    return train, test
