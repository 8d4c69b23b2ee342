"""One training run of the study and its evaluation.

Protocol (the authors'): Adam lr 1e-3 on everything, batch 512 shuffled, 20 epochs,
loss = NLL of ``log(y + 1e-7)`` plus the configuration's regularisers. The gate's
BatchNorm stays in training mode at test time, as in the authors' notebooks (they
never call ``eval()``); ``bn_eval=True`` uses the running statistics instead.
"""

import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from moe_fairseq.analysis.specialization import (
    joint_counts,
    mutual_information_bits,
    sample_entropy_bits,
    usage_entropy_bits,
)
from moe_fairseq.routers.losses import importance_loss, sample_similarity_loss

from .data import Split
from .models import Model


@dataclass(frozen=True)
class Config:
    name: str
    gate: Optional[str]        # None (single model), "softmax" or "attentive"
    beta_s: float = 0.0        # sample-similarity loss weights (0, 0 = off)
    beta_d: float = 0.0
    w_importance: float = 0.0  # importance loss weight (0 = off)

    @property
    def num_experts_default(self):
        return 1 if self.gate is None else 5


# The paper's table (results/fmnist_final_results.csv): L_s weights as selected there.
CONFIGS: Dict[str, Config] = {c.name: c for c in [
    Config("single", None),
    Config("moe", "softmax"),
    Config("moe+ls", "softmax", beta_s=1e-7, beta_d=1e-2),
    Config("attentive", "attentive"),
    Config("attentive+ls", "attentive", beta_s=1e-6, beta_d=1e-6),
    # the importance-loss rows of the same file, not in the paper's main table
    Config("moe+imp", "softmax", w_importance=0.2),
    Config("attentive+imp", "attentive", w_importance=0.8),
]}
DEFAULT_CONFIGS = ["single", "moe", "moe+ls", "attentive", "attentive+ls"]


@dataclass
class RunResult:
    config: str
    seed: int
    epochs: int
    train_error: float
    test_error: float
    seconds: float
    # MoE only (None for the single model); bits
    mi_pred: Optional[float] = None    # I(E; Y_hat), Y_hat = the chosen expert's class (authors')
    mi_label: Optional[float] = None   # I(E; Y), Y = the true class
    h_sample: Optional[float] = None   # H_s
    h_usage: Optional[float] = None    # H_u
    expert_by_class: Optional[List[List[int]]] = None  # [E, C] test counts, E = argmax gate
    loss_history: List[float] = field(default_factory=list)  # mean training loss per epoch

    def to_dict(self):
        return asdict(self)


def regularisers(cfg: Config, gate_probs, x):
    loss = gate_probs.new_zeros(())
    if cfg.beta_s or cfg.beta_d:
        loss = loss + sample_similarity_loss(gate_probs, x, cfg.beta_s, cfg.beta_d)
    if cfg.w_importance:
        loss = loss + importance_loss(gate_probs, cfg.w_importance)
    return loss


@torch.no_grad()
def evaluate(model: Model, split: Split, batch_size: int, bn_eval: bool):
    """(error, gate probs ``[N, E]`` or None, chosen expert's prediction ``[N]``)."""
    model.train(not bn_eval)
    errors, probs, chosen_pred = 0, [], []
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size]
        y, p, expert_probs = model(x)
        errors += int((y.argmax(-1) != split.labels[start:start + batch_size]).sum())
        if p is not None:
            expert = p.argmax(-1)
            probs.append(p)
            chosen_pred.append(expert_probs[torch.arange(x.size(0)), expert].argmax(-1))
    model.train()
    if not probs:
        return errors / len(split), None, None
    return errors / len(split), torch.cat(probs), torch.cat(chosen_pred)


def run(cfg: Config, train: Split, test: Split, seed: int, epochs: int = 20,
        batch_size: int = 512, lr: float = 1e-3, num_experts: int = 5,
        bn_eval: bool = False, device: str = "cpu", log=None) -> RunResult:
    torch.manual_seed(seed)
    model = Model(1 if cfg.gate is None else num_experts, cfg.gate).to(device)
    train = Split(train.images.to(device), train.labels.to(device))
    test = Split(test.images.to(device), test.labels.to(device))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start, history = time.perf_counter(), []
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        total, batches = 0.0, 0
        for i in range(0, len(train), batch_size):
            idx = order[i:i + batch_size].to(device)
            x, target = train.images[idx], train.labels[idx]
            y, p, _ = model(x)
            loss = -torch.log(y.gather(1, target[:, None]).squeeze(1) + 1e-7).mean()
            if p is not None:
                loss = loss + regularisers(cfg, p, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.detach(), batches + 1
        history.append(float(total) / max(batches, 1))
        if log:
            log(f"{cfg.name} seed {seed} epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")
    train_error, _, _ = evaluate(model, train, batch_size, bn_eval)
    test_error, probs, chosen_pred = evaluate(model, test, batch_size, bn_eval)
    result = RunResult(cfg.name, seed, epochs, train_error, test_error,
                       time.perf_counter() - start, loss_history=history)
    if probs is not None:
        probs, chosen_pred, test = probs.cpu(), chosen_pred.cpu(), Split(test.images, test.labels.cpu())
        expert = probs.argmax(-1)
        E = probs.size(1)
        by_class = joint_counts(expert, test.labels, E, 10)
        result.mi_pred = mutual_information_bits(joint_counts(expert, chosen_pred, E, 10))
        result.mi_label = mutual_information_bits(by_class)
        result.h_sample = sample_entropy_bits(probs)
        result.h_usage = usage_entropy_bits(probs)
        result.expert_by_class = by_class.tolist()
    return result
