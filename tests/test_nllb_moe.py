"""NLLB-MoE's regularizers and batch-prioritized routing, each against a reference
written from its definition in fairseq's MoE code (``fairseq/modules/moe/moe_layer.py``:
``tok_dropout``; ``moe_cmr_layer.py``: ``CMRGate``/``CMRLayer``; ``top2gate.py``:
``batch_prioritized_routing``; the NLLB criterion's CMR budget term), in float64 on
identical weights (1e-10): outputs, every gradient, the losses, with padding.
Expert parallelism: ``test_expert_parallel_layer.py`` (cases ``eom_*`` and
``batch_prioritized_*``); training, logging, TensorBoard and resuming at the end.
"""

import math
import shlex

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, USER_DIR, log_records, run_cli
from moe_fairseq.criterions.moe_label_smoothed_cross_entropy import (
    MoELabelSmoothedCrossEntropyCriterion,
)
from moe_fairseq.layer.cmr_share import cmr_counts, cmr_summary
from moe_fairseq.layer.dispatcher import SortDispatcher
from moe_fairseq.layer.moe_layer import MoELayer, MoEStats
from moe_fairseq.options import MoEConfigError, MoEOptions
from moe_fairseq.routers.base import capacity_for
from moe_fairseq.routers.top_k import TopKRouter
from test_fidelity import EXACT, D, assert_same_grads, bank64, build_block, ffn, preset_args

E, CAP_FACTOR = 4, 0.5


def top2_layer(eom=0.0, prioritized=False, layout="auto", seed=0):
    """fp64 top-2 layer as fairseq's top2gating (second-best expert, gates renormalised
    after dropping), with a binding capacity ceil(0.5 * 2 * T / E)."""
    torch.manual_seed(seed)
    router = TopKRouter(D, E, top_k=2, capacity_factor=CAP_FACTOR, second_expert_policy="all",
                        normalize_gates=True, batch_prioritized=prioritized)
    return MoELayer(router, bank64(E, seed), SortDispatcher(E, layout), eom=eom).double()


def claim_order(probs, prioritized):
    """Tokens in the order they claim capacity: token order, or (batch-prioritized,
    fairseq's importance_scores = -max prob) decreasing top probability, ties by token."""
    T = probs.size(0)
    if not prioritized:
        return list(range(T))
    top = probs.max(-1).values.tolist()
    return sorted(range(T), key=lambda t: (-top[t], t))


def reference(layer, x, masks=None, scale=1.0, prioritized=False, training=True):
    """fairseq's top-2 MoE layer on tokens ``x [T, d]``: ``masks [T, 2]`` (EOM: False
    drops that token-expert output), ``scale`` (EOM at inference: 1 - p)."""
    T = x.size(0)
    probs = torch.softmax(x @ layer.router.wg.weight.t(), -1)
    first = probs.argmax(-1)
    second = probs.scatter(1, first[:, None], float("-inf")).argmax(-1)
    index = torch.stack([first, second], 1)
    cap = capacity_for(T, E, 2, training, CAP_FACTOR, 1.0) if training else None
    used, kept = [0] * E, torch.zeros(T, 2, dtype=torch.bool)
    for j in range(2):
        for t in claim_order(probs, prioritized):
            e = int(index[t, j])
            if cap is None or used[e] < cap:
                used[e] += 1
                kept[t, j] = True
    rows = []
    for t in range(T):
        gates = [probs[t, int(index[t, j])] for j in range(2)]
        total = sum(gates[j] for j in range(2) if kept[t, j]) if kept[t].any() else 1.0
        y = x.new_zeros(D)
        for j in range(2):
            if kept[t, j] and (masks is None or masks[t, j]):
                y = y + scale * gates[j] / total * ffn(layer.experts, int(index[t, j]), x[t])
        rows.append(y)
    return torch.stack(rows), kept


def eom_masks(seed, rows, p, tokens=None):
    """The draw ``torch.rand(2 * rows)`` after ``manual_seed(seed)``: slot j of row r is
    kept when ``U[j * rows + r] > p``; ``tokens`` picks the token rows (padding removed)."""
    torch.manual_seed(seed)
    u = torch.rand(2 * rows).view(2, rows).t()
    keep = u > p
    return keep if tokens is None else keep[tokens]


# ---------------------------------------------------------------- expert output masking


def test_eom_drops_token_expert_outputs_in_training():
    """fairseq's tok_dropout: each kept (token, expert) output is zeroed when its
    uniform draw is not above p, no rescaling; gradients through it vanish."""
    T, p = 14, 0.3
    layer = top2_layer(eom=p).train()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    masks = eom_masks(7, T, p)
    ref, kept = reference(layer, x, masks)
    torch.testing.assert_close(out, ref, **EXACT)
    assert_same_grads(out, ref, [x, *layer.parameters()])
    # the case masks some kept outputs, keeps others, and drops some for capacity
    assert 0 < int((kept & ~masks).sum()) < int(kept.sum()) < 2 * T
    # the routing losses are the unmasked layer's (EOM acts on outputs only)
    plain = top2_layer(eom=0.0).train()
    plain(x)
    for name, value in plain.stats.losses.items():
        torch.testing.assert_close(layer.stats.losses[name], value, **EXACT)


def test_eom_scales_expert_outputs_at_inference():
    """fairseq at inference: every expert output times (1 - p); no randomness."""
    x = torch.randn(9, D, dtype=torch.float64)
    layer = top2_layer(eom=0.2).eval()
    plain = top2_layer(eom=0.0).eval()
    ref, _ = reference(layer, x, scale=0.8, training=False)
    torch.testing.assert_close(layer(x), ref, **EXACT)
    torch.testing.assert_close(layer(x), 0.8 * plain(x), **EXACT)


@pytest.mark.parametrize("padding", ["remove", "mask"])
def test_eom_with_padding(padding):
    """Padding gets no expert and outputs 0; the tokens' masks are drawn over the rows
    the router sees (the tokens when padding is removed, every row when it is masked)."""
    B, S, p = 3, 5, 0.3
    layer = top2_layer(eom=p).train()
    layer.padding = padding
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 3:] = pad[2, 1:] = True
    torch.manual_seed(3)
    out = layer(x, pad)
    flat_pad = pad.reshape(-1)
    tokens = (~flat_pad).nonzero().squeeze(1)
    if padding == "remove":
        masks = eom_masks(3, tokens.numel(), p)
    else:
        masks = eom_masks(3, B * S, p, tokens)
    ref_tokens, _ = reference(layer, x.reshape(-1, D)[tokens], masks)
    ref = x.new_zeros(B * S, D).index_copy(0, tokens, ref_tokens).view(B, S, D)
    torch.testing.assert_close(out, ref, **EXACT)
    assert_same_grads(out, ref, [x, *layer.parameters()])
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))


# ---------------------------------------------------------------- batch-prioritized routing


@pytest.mark.parametrize("layout", ["compact", "static"])
def test_batch_prioritized_routing_gives_capacity_to_the_surest_tokens(layout):
    """fairseq's top2gating with batch_prioritized_routing: first choices claim capacity
    before second choices, each in decreasing top probability."""
    T = 16
    layer = top2_layer(prioritized=True, layout=layout).train()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref, kept = reference(layer, x, prioritized=True)
    torch.testing.assert_close(out, ref, **EXACT)
    assert_same_grads(out, ref, [x, *layer.parameters()])
    _, kept_in_token_order = reference(layer, x, prioritized=False)
    assert not torch.equal(kept, kept_in_token_order)  # the order really matters here
    # the surest tokens' first choices are never dropped while a less sure one is kept
    probs = torch.softmax(x.detach() @ layer.router.wg.weight.detach().t(), -1)
    top, first = probs.max(-1)
    for e in range(E):
        mine = (first == e).nonzero().squeeze(1)
        kept_top = top[mine][kept[mine, 0]]
        dropped_top = top[mine][~kept[mine, 0]]
        if kept_top.numel() and dropped_top.numel():
            assert kept_top.min() >= dropped_top.max()


def test_batch_prioritized_routing_of_every_router():
    """The priority is each token's highest probability for every top-k router (linear,
    attentive, cosine, each SMoE stratum); off, the routing is the token order's."""
    for arch, extra in (("moe_transformer_tiny", ()), ("moe_transformer_tiny",
                        ("--moe-router", "attentive")), ("moec_transformer_tiny", ()),
                        ("smoe_transformer_tiny", ())):
        block = build_block(arch, "--moe-batch-prioritized-routing", *extra)
        router = block.moe.router
        gates = getattr(router, "gates", [router])
        assert all(g.batch_prioritized for g in gates), arch
        x = torch.randn(7, 64, dtype=torch.float64)
        routing = gates[0].route(x)
        torch.testing.assert_close(routing.priority, routing.probs.max(-1).values, **EXACT)
        off = build_block(arch, *extra).moe.router
        assert getattr(off, "gates", [off])[0].route(x).priority is None
        assert gates[0].fused_route(x) is None  # the plan kernel keeps token order


# ---------------------------------------------------------------- conditional MoE routing


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_cmr_block_mixes_dense_ffn_and_moe(decoder, training):
    """fairseq's CMRLayer: g = dropout(sigmoid(w x + b)) * nonpadding;
    out = (1 - g) FFN(x) + g MoE(x), then the residual and post-norm."""
    p = 0.25
    block = build_block("moe_transformer_tiny", "--moe-cmr", "--cmr-gate-drop", str(p),
                        "--dropout", "0", "--moe-second-expert-policy", "all",
                        decoder=decoder).train(training)
    S, B = 6, 3
    x = torch.randn(S, B, 64, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 4:] = True
    torch.manual_seed(11)
    out = block._moe_block(x, pad)
    stats = block.moe.stats

    moe = block.moe(x.transpose(0, 1), pad).transpose(0, 1)
    nonpad = (~pad).t().to(x.dtype)
    g = torch.sigmoid(x @ block.cmr_gate.wg.weight.t() + block.cmr_gate.wg.bias).squeeze(-1)
    if training:
        torch.manual_seed(11)  # the MoE layer (second-best expert, no EOM) draws nothing
        g = F.dropout(g, p, True)
    g = g * nonpad
    dense = block.fc2(torch.relu(block.fc1(x)))
    ref = block.final_layer_norm(x + (1 - g)[..., None] * dense + g[..., None] * moe)
    torch.testing.assert_close(out, ref, **EXACT)
    assert_same_grads(out, ref, [x, *block.parameters()])
    torch.testing.assert_close(stats.cmr_gate_sum, g.sum(), **EXACT)
    assert int(stats.cmr_tokens) == int((~pad).sum())
    torch.testing.assert_close(stats.sentence_cmr_gate, g.detach().sum(0), **EXACT)
    if training:
        assert bool(((g == 0) & (nonpad > 0)).any())  # some tokens' gates really dropped
    # padding rows get the dense FFN only (g = 0 there), as in fairseq
    torch.testing.assert_close(out[4:, 1], block.final_layer_norm(
        x[4:, 1] + dense[4:, 1]), **EXACT)


def criterion(wt, p):
    crit = MoELabelSmoothedCrossEntropyCriterion.__new__(MoELabelSmoothedCrossEntropyCriterion)
    crit.cmr_wt, crit.cmr_p = wt, p
    return crit


def cmr_stats(gate_sum, tokens):
    return MoEStats(cmr_gate_sum=gate_sum, cmr_tokens=torch.tensor(tokens),
                    sentence_cmr_gate=gate_sum.detach().view(1), sentence_cmr_tokens=torch.tensor([tokens]))


def test_cmr_budget_term_is_fairseqs():
    """|sum over CMR layers of sum g / sum of non-padding tokens - p| (fairseq's
    moe_label_smoothed_cross_entropy), differentiable through the gates."""
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    stats = [cmr_stats(a, 4), MoEStats(), cmr_stats(b, 6)]  # the middle layer has no CMR
    loss = criterion(0.1, 0.8).cmr_budget_loss(stats)
    assert float(loss) == pytest.approx(abs(4.5 / 10 - 0.8), rel=1e-12)
    ga, gb = torch.autograd.grad(loss, [a, b])
    assert float(ga) == float(gb) == pytest.approx(-1 / 10)  # below p: raise the gates
    assert criterion(0.0, 0.8).cmr_budget_loss([MoEStats()]) is None
    with pytest.raises(MoEConfigError, match="--cmr-gate-loss-wt 0.1 needs a model with --moe-cmr"):
        criterion(0.1, 0.8).cmr_budget_loss([MoEStats()])
    counts = cmr_counts(stats)
    assert counts == {"cmr_gate": 4.5, "cmr_tokens": 10}
    assert cmr_summary(counts)["gate_share"] == pytest.approx(0.45)


# ---------------------------------------------------------------- flags as users type them


def test_flags_reach_every_moe_layer():
    args = preset_args("moe_transformer_tiny", "--moe-eom", "0.2", "--moe-cmr",
                       "--cmr-gate-drop", "0.1", "--moe-batch-prioritized-routing")
    options = MoEOptions.from_args(args)
    assert (options.eom, options.cmr, options.cmr_gate_drop, options.batch_prioritized) == (
        0.2, True, 0.1, True)
    for decoder in (False, True):
        block = build_block("moe_transformer_tiny", "--moe-eom", "0.2", "--moe-cmr",
                            "--cmr-gate-drop", "0.1", decoder=decoder)
        assert block.moe.eom == 0.2 and block.cmr_gate.gate_drop == 0.1
        assert block.fc1.out_features == 128 and block.fc2.in_features == 128
    plain = build_block("moe_transformer_tiny")
    assert plain.cmr_gate is None and not hasattr(plain, "fc1") and plain.moe.eom == 0.0
    assert not plain.moe.router.batch_prioritized
    # SMoE with a stratum norm that leaves the block's residual to the layer takes CMR
    smoe = build_block("smoe_transformer_tiny", "--moe-cmr", "--smoe-stratum-norm", "gate-input")
    assert smoe.cmr_gate is not None and not smoe.moe.returns_block_output


BAD = [
    (("--moe-eom", "1.0"), "--moe-eom must be in [0, 1), got 1.0"),
    (("--moe-eom", "-0.1"), "--moe-eom must be in [0, 1)"),
    (("--cmr-gate-drop", "0.2"), "--cmr-gate-drop 0.2 needs --moe-cmr"),
    (("--moe-cmr", "--cmr-gate-drop", "1"), "--cmr-gate-drop must be in [0, 1)"),
    (("--moe-batch-prioritized-routing", "--moe-capacity-factor", "0"),
     "--moe-batch-prioritized-routing orders tokens for capacity, but --moe-capacity-factor 0"),
]


@pytest.mark.parametrize("flags, says", BAD)
def test_bad_combinations_name_the_flag(flags, says):
    with pytest.raises(MoEConfigError) as err:
        MoEOptions.from_args(preset_args("moe_transformer_tiny", *flags))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cmr_refuses_post_ln_strata():
    with pytest.raises(MoEConfigError, match="--moe-cmr mixes an FFN's output .* post-ln"):
        MoEOptions.from_args(preset_args("smoe_transformer_tiny", "--moe-cmr"))


# ---------------------------------------------------------------- training, logs, resume

MULTI = ["--task", "translation_multi_simple_epoch", "--lang-pairs", "a-b,a-c",
         "--encoder-langtok", "tgt", "--decoder-langtok"]
README_COMMAND = "fairseq-train DATA --user-dir moe_fairseq --arch moe_transformer_base"


def readme_flags():
    """The flags of the README's NLLB-MoE command (after its --arch, without '...')."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(README_COMMAND, 1)[1].split("```", 1)[0]
    return [w for w in shlex.split(block.replace("\\\n", " ")) if w != "..."]


# The README's flags, on the tiny model; capacity 1.0 so that it binds.
NLLB_FLAGS = readme_flags() + ["--moe-capacity-factor", "1.0"]
CMR_LOSS_FLAGS = ["--cmr-gate-loss-wt", "0.1", "--cmr-gate-loss-p", "0.8"]


def test_readme_command_names_every_option():
    flags = readme_flags()
    for flag in ("--moe-eom", "--moe-cmr", "--cmr-gate-drop", "--moe-batch-prioritized-routing",
                 "--cmr-gate-loss-wt", "--cmr-gate-loss-p"):
        assert flag in flags


def nllb_train(data, save_dir, max_update, *extra):
    return run_cli("train", [
        data, "--user-dir", USER_DIR, *MULTI, "--arch", "moe_transformer_tiny",
        "--moe-expert-count", "4",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "1000",
        "--max-update", str(max_update), "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--cpu", "--num-workers", "0", "--seed", "1", "--disable-validation",
        "--log-format", "json", "--log-interval", "1", "--no-progress-bar", *extra])


@pytest.fixture(scope="module")
def nllb_run(multilingual_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("nllb")
    proc = nllb_train(multilingual_data_bin, root / "straight", 4, *NLLB_FLAGS,
                      "--tensorboard-logdir", root / "tb")
    return multilingual_data_bin, root, proc.stdout


def test_training_logs_the_cmr_budget_and_gate_share_per_language(nllb_run):
    _, root, stdout = nllb_run
    inner = log_records(stdout, "train_inner")
    assert len(inner) == 4
    for r in inner:
        share = r["cmr_gate_share"]
        assert 0 < share < 1 / 0.8  # gates after dropout: up to 1 / (1 - 0.2)
        assert r["cmr_gate_loss"] >= 0 and math.isfinite(r["loss"])
        assert {"cmr_gate_share_b", "cmr_gate_share_c"} <= set(r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "tb" / "train_inner"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"cmr_gate_share_b", "cmr_gate_share_c", "cmr_gate_loss"} <= tags
    logged = [r["cmr_gate_share_b"] for r in inner]
    assert [round(e.value, 3) for e in acc.Scalars("cmr_gate_share_b")] == pytest.approx(logged)


def test_resume_continues_the_same_run(nllb_run):
    """2 updates, then a resume that names none of the NLLB flags: the checkpoint's
    EOM, CMR and priority settings come back, and updates 3-4 equal the straight run's."""
    data, root, straight = nllb_run
    save = root / "resumed"
    nllb_train(data, save, 2, *NLLB_FLAGS)
    proc = nllb_train(data, save, 4, "--criterion", "moe_label_smoothed_cross_entropy",
                      *CMR_LOSS_FLAGS)
    log = proc.stdout + proc.stderr
    for taken in ("moe_eom=0.2", "moe_cmr=True", "cmr_gate_drop=0.2",
                  "moe_batch_prioritized_routing=True"):
        assert taken in log
    want = {int(r["num_updates"]): r["loss"] for r in log_records(straight, "train_inner")}
    got = {int(r["num_updates"]): r["loss"] for r in log_records(proc.stdout, "train_inner")}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-3)


def test_routing_report_shows_the_cmr_gate_share_per_language(nllb_run, tmp_path):
    """scripts/routing_report.py on the CMR model: per MoE layer the mean gate g (eval:
    no gate dropout, so 0 < g < 1) overall and per target language, whose token-weighted
    mean is the overall share; report.md has the table."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    data, root, _ = nllb_run
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "routing_report.py"),
                           "--path", str(root / "straight" / "checkpoint_last.pt"),
                           "--data", str(data), "--split", "test", "--out", str(tmp_path / "r"),
                           "--cpu", "--max-sentences", "20"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    layers = doc["models"][0]["layers"]
    assert len(layers) == 2  # encoder and decoder layer 2
    for layer in layers:
        cmr = layer["cmr"]
        assert 0 < cmr["gate_share"] < 1
        by = cmr["gate_share_by_target_language"]
        assert set(by) == {"b", "c"}
        tokens = dict(zip(layer["target_language"]["languages"],
                          layer["target_language"]["tokens"]))
        mean = sum(by[l] * tokens[l] for l in by) / sum(tokens[l] for l in by)
        assert mean == pytest.approx(cmr["gate_share"], rel=1e-9)
    assert "## CMR gate share" in (tmp_path / "r" / "report.md").read_text()
