"""Training rules of the cluster-structure study, as the authors run them (uclaml/MoE,
synthetic_demo notebooks). Full batch: one step per epoch on all training points.

- MoE (``moe_linear``, ``moe_nonlinear``): experts by *normalised* gradient descent
  (lr 1e-3; each expert's gradient divided by the sum of the norms of its parameter
  gradients), router by SGD (lr 0.1), cross-entropy on the MoE's softmax output, up to
  501 epochs; stop when the loss rises above its minimum by more than 0.02, or rises
  while at most 0.314 (about the floor of that double softmax, ln(1 + 1/e)).
- Single models (``single_linear``, ``single_nonlinear``): 40 filters per class, Adam
  (lr 3e-3 linear, 1e-2 cubic, weight decay 5e-4), cross-entropy on the logits, up to
  801 epochs; after epoch 500, stop when the loss exceeds its minimum by 0.02.
- Dispatch entropy: ``sum_e (n_e / N) H(cluster | expert e)`` in nats (max ln 4) of
  the last training forward's routing; 0 = each expert sees one cluster.
"""

import math
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_fairseq.analysis.specialization import dispatch_entropy_nats, joint_counts

from .models import ClusterMoE, PatchClassifier

MODELS = ("single_linear", "single_nonlinear", "moe_linear", "moe_nonlinear")


@dataclass(frozen=True)
class Schedule:
    moe_epochs: int = 501
    single_epochs: int = 801
    expert_lr: float = 1e-3
    router_lr: float = 0.1


def normalized_gd_step(params, lr: float) -> None:
    """One normalised-GD step on stacked expert parameters (``[E, ...]`` each):
    expert e moves by ``lr * g_e / sum_p |g_{e,p}|`` (its own gradient norms)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    E = grads[0].size(0)
    norm = sum(g.reshape(E, -1).norm(dim=1) for g in grads)  # [E]
    scale = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-30), torch.zeros_like(norm))
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad * scale.view(E, *([1] * (p.dim() - 1)))


def dispatch_entropy(expert: Tensor, cluster: Tensor, num_experts: int, num_clusters: int) -> float:
    """``sum_e (n_e / N) H(cluster | expert = e)`` in nats; expert, cluster ``[N]``."""
    counts = joint_counts(expert.cpu(), cluster.cpu(), num_experts, num_clusters)
    return dispatch_entropy_nats(counts)


def accuracy(probs_or_logits: Tensor, y: Tensor) -> float:
    return float((probs_or_logits.argmax(-1) == y).double().mean()) * 100


def train_moe(model: ClusterMoE, x, y, cluster, schedule: Schedule, log=None) -> Dict:
    router_opt = torch.optim.SGD(model.router.parameters(), lr=schedule.router_lr)
    expert_params = list(model.experts.parameters())
    best = math.inf
    epochs = 0
    entropy = None
    for epoch in range(schedule.moe_epochs):
        out = model(x)
        loss = F.cross_entropy(out, y)
        entropy = dispatch_entropy(model.moe.stats.first_expert, cluster, model.router.num_experts,
                                   int(cluster.max()) + 1)
        value = float(loss.detach())
        epochs = epoch + 1
        if value <= best:
            best = value
        elif value > best + 0.02 or value <= 0.314:
            break
        router_opt.zero_grad(set_to_none=True)
        for p in expert_params:
            p.grad = None
        loss.backward()
        normalized_gd_step(expert_params, schedule.expert_lr)
        router_opt.step()
        if log and epoch % 100 == 0:
            log(f"epoch {epoch}: loss {value:.4f}, dispatch entropy {entropy:.3f}")
    return dict(epochs=epochs, train_loss=value, dispatch_entropy=entropy)


def train_single(model: PatchClassifier, x, y, lr: float, schedule: Schedule, log=None) -> Dict:
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    best = math.inf
    epochs = 0
    for epoch in range(schedule.single_epochs):
        loss = F.cross_entropy(model(x), y)
        value = float(loss.detach())
        epochs = epoch + 1
        if value <= best:
            best = value
        elif epoch > 500 and value > best + 0.02:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and epoch % 100 == 0:
            log(f"epoch {epoch}: loss {value:.4f}")
    return dict(epochs=epochs, train_loss=value)


def run(model_name: str, train, test, seed: int, schedule: Schedule = Schedule(),
        noise_at_eval: bool = True, log=None) -> Dict:
    """Train one model on ``train`` and measure test accuracy (%) on ``test``;
    ``train``/``test`` have ``x [N, P*d]``, ``y [N]`` in {0, 1}, ``cluster [N]``."""
    if model_name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model_name!r}")
    torch.manual_seed(seed)
    nonlinear = model_name.endswith("_nonlinear")
    patch_len = 50
    start = time.perf_counter()
    result: Dict = dict(model=model_name, seed=seed)
    if model_name.startswith("moe"):
        model = ClusterMoE(nonlinear=nonlinear, patch_len=patch_len,
                           patches=train.x.size(1) // patch_len, noise_at_eval=noise_at_eval)
        result.update(train_moe(model, train.x, train.y, train.cluster, schedule, log))
        with torch.no_grad():
            out = model(test.x)
            result["test_dispatch_entropy"] = dispatch_entropy(
                model.moe.stats.first_expert, test.cluster, model.router.num_experts,
                int(test.cluster.max()) + 1)
        result["router_weight"] = model.router.weight.detach().tolist()
    else:
        model = PatchClassifier(40, patch_len, nonlinear)
        result.update(train_single(model, train.x, train.y, 1e-2 if nonlinear else 3e-3, schedule, log))
        with torch.no_grad():
            out = model(test.x)
    result["test_accuracy"] = accuracy(out, test.y)
    result["seconds"] = time.perf_counter() - start
    return result
