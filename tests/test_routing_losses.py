"""Routing losses (``moe_fairseq/routers/losses.py``) against hand-computed values."""

import math

import pytest
import torch

from moe_fairseq.routers.losses import load_balance_loss, router_z_loss

# 4 tokens, 3 experts. Rows are tokens, columns experts.
PROBS = [
    [0.5, 0.3, 0.2],
    [0.1, 0.6, 0.3],
    [0.2, 0.2, 0.6],
    [0.7, 0.2, 0.1],
]
FIRST = [0, 1, 2, 0]  # argmax of each row


def _probs(requires_grad=False):
    return torch.tensor(PROBS, dtype=torch.float64, requires_grad=requires_grad)


def test_balance_loss_hand_example():
    # f_e = share of first choices:  e0: 2/4 = 0.5, e1: 1/4 = 0.25, e2: 1/4 = 0.25
    # p_e = mean probability:        e0: (0.5+0.1+0.2+0.7)/4 = 1.5/4 = 0.375
    #                                e1: (0.3+0.6+0.2+0.2)/4 = 1.3/4 = 0.325
    #                                e2: (0.2+0.3+0.6+0.1)/4 = 1.2/4 = 0.300
    # E * sum_e f_e p_e = 3 * (0.5*0.375 + 0.25*0.325 + 0.25*0.3)
    #                   = 3 * (0.1875 + 0.08125 + 0.075) = 3 * 0.34375 = 1.03125
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.325 + 0.25 * 0.3)
    assert expected == pytest.approx(1.03125, abs=1e-15)
    loss = load_balance_loss(_probs(), torch.tensor(FIRST), 3)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_balance_loss_uses_given_first_choice_not_argmax():
    # Same probabilities, but every first choice is said to be expert 2:
    # f = (0, 0, 1) -> loss = 3 * p_2 = 3 * 0.3 = 0.9
    loss = load_balance_loss(_probs(), torch.tensor([2, 2, 2, 2]), 3)
    assert loss.item() == pytest.approx(0.9, rel=1e-12)


def test_balance_loss_gradient_only_through_probs():
    # d loss / d p[t, e] = E * f_e / T with f treated as a constant:
    #   e0: 3 * 0.5  / 4 = 0.375;  e1, e2: 3 * 0.25 / 4 = 0.1875  (same for every token)
    probs = _probs(requires_grad=True)
    first = torch.tensor(FIRST)
    load_balance_loss(probs, first, 3).backward()
    expected_row = [0.375, 0.1875, 0.1875]
    torch.testing.assert_close(
        probs.grad, torch.tensor([expected_row] * 4, dtype=torch.float64), rtol=1e-12, atol=0
    )
    # Through a softmax, the gradient reaching the logits is exactly the chain
    # rule through probs (the first-choice counts contribute nothing).
    logits = torch.tensor(
        [[0.3, -1.2, 0.8], [1.5, 0.1, -0.4], [-0.7, 0.2, 0.9], [0.0, 2.0, -1.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    p = torch.softmax(logits, -1)
    first = p.argmax(-1)
    load_balance_loss(p, first, 3).backward()
    # first = [2, 0, 2, 1] -> f = (1/4, 1/4, 2/4); upstream grad g_e = 3 f_e / 4
    g = [3 * 0.25 / 4, 3 * 0.25 / 4, 3 * 0.5 / 4]
    expected = []
    for row in logits.detach().tolist():
        z = sum(math.exp(v) for v in row)
        s = [math.exp(v) / z for v in row]
        dot = sum(si * gi for si, gi in zip(s, g))
        expected.append([si * (gi - dot) for si, gi in zip(s, g)])
    torch.testing.assert_close(
        logits.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-14
    )


def test_balance_loss_uniform_routing_is_exactly_one():
    # Uniform probabilities and a perfectly even first-choice split:
    # E * sum_e (1/E)(1/E) = 1. With E = 4 every quantity is exact in binary.
    E, T = 4, 8
    probs = torch.full((T, E), 0.25, dtype=torch.float32)
    first = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    assert load_balance_loss(probs, first, E).item() == 1.0
    # Uniform probabilities make f irrelevant: E * sum_e f_e / E = sum_e f_e = 1.
    assert load_balance_loss(probs, torch.zeros(T, dtype=torch.long), E).item() == 1.0
    # An even first-choice split makes p irrelevant: E * sum_e p_e / E = 1.
    # (6 tokens, 3 experts, two first choices each, non-uniform probabilities.)
    six = torch.tensor(PROBS + [[0.25, 0.25, 0.5], [0.6, 0.1, 0.3]], dtype=torch.float64)
    loss = load_balance_loss(six, torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)


def test_balance_loss_full_collapse_is_num_experts():
    # Every token sends all probability and its first choice to expert 1:
    # f = (0, 1, 0, 0), p = (0, 1, 0, 0) -> E * 1 = 4.
    probs = torch.zeros(5, 4, dtype=torch.float64)
    probs[:, 1] = 1.0
    assert load_balance_loss(probs, torch.ones(5, dtype=torch.long), 4).item() == 4.0


def test_balance_loss_no_tokens_is_zero_and_backprops():
    # Router weight [E, d] applied to zero tokens: the loss is 0 and the weight
    # still receives a (zero) gradient, so every rank runs the same backward.
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(0, 5, dtype=torch.float64)
    probs = torch.softmax(x @ weight.t(), -1)
    loss = load_balance_loss(probs, probs.argmax(-1), 3)
    assert loss.dim() == 0 and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert weight.grad is not None
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    leaf = torch.zeros(0, 3, requires_grad=True)
    load_balance_loss(leaf, torch.zeros(0, dtype=torch.long), 3).backward()
    assert leaf.grad is not None and leaf.grad.shape == (0, 3)


def test_z_loss_hand_example():
    # token 0: logits (0, 0, 0)           -> logsumexp = log(1 + 1 + 1) = log 3
    # token 1: logits (0, log 3, log 4)   -> logsumexp = log(1 + 3 + 4) = log 8
    # z = (log(3)^2 + log(8)^2) / 2  ~= (1.206949 + 4.324077) / 2 ~= 2.765513
    logits = torch.tensor(
        [[0.0, 0.0, 0.0], [0.0, math.log(3.0), math.log(4.0)]],
        dtype=torch.float64,
        requires_grad=True,
    )
    expected = (math.log(3.0) ** 2 + math.log(8.0) ** 2) / 2
    assert expected == pytest.approx(2.765513, abs=1e-6)
    loss = router_z_loss(logits)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # d z / d l[t, e] = (2 / T) * lse_t * softmax(l_t)_e
    #   token 0: lse = log 3, softmax = (1/3, 1/3, 1/3)  -> log(3)/3 each
    #   token 1: lse = log 8, softmax = (1/8, 3/8, 4/8)  -> log(8) * (1, 3, 4) / 8
    loss.backward()
    l3, l8 = math.log(3.0), math.log(8.0)
    expected_grad = [[l3 / 3, l3 / 3, l3 / 3], [l8 / 8, 3 * l8 / 8, 4 * l8 / 8]]
    torch.testing.assert_close(
        logits.grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_z_loss_is_stable_for_large_logits():
    # logsumexp(1000, 1000) = 1000 + log 2; a naive exp would overflow.
    logits = torch.tensor([[1000.0, 1000.0]], dtype=torch.float64)
    assert router_z_loss(logits).item() == pytest.approx((1000.0 + math.log(2.0)) ** 2, rel=1e-12)
    loss32 = router_z_loss(torch.tensor([[100.0, 100.0, 100.0]], dtype=torch.float32))
    assert math.isfinite(loss32.item())
    assert loss32.item() == pytest.approx((100.0 + math.log(3.0)) ** 2, rel=1e-6)


def test_z_loss_no_tokens_is_zero_and_backprops():
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(0, 5, dtype=torch.float64) @ weight.t()
    loss = router_z_loss(logits)
    assert loss.dim() == 0 and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert weight.grad is not None
    assert torch.equal(weight.grad, torch.zeros_like(weight))
