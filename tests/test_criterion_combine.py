"""``--moe-gate-loss-combine-method`` of ``moe_label_smoothed_cross_entropy`` and
its logged loss keys, on a fake model whose MoE layers report known losses."""

import pytest
import torch
import torch.nn as nn
from fairseq import metrics, options
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from conftest import USER_DIR
from moe_fairseq.criterions.moe_label_smoothed_cross_entropy import (
    MoELabelSmoothedCrossEntropyCriterion,
)
from moe_fairseq.layer.moe_layer import MoELayer, MoEStats
from moe_fairseq.options import MoEConfigError

VOCAB = 12
GATE_WT, Z_WT = 0.03, 0.002
LS = 0.1

# Per layer: name -> loss value. Layer 2 has no moec_var (a layer of another kind).
LAYER_LOSSES = [
    {"balance": 1.25, "z": 3.0, "moec_var": 0.5},
    {"balance": 1.5, "z": 2.0, "moec_var": 0.25},
    {"balance": 2.0, "z": 4.5},
]


class FakeMoELayer(MoELayer):
    """An MoE layer (for ``isinstance``) whose forward only reports ``losses``:
    each loss is ``value * scale`` with ``scale`` a parameter equal to 1, so the
    gradient reaching ``scale`` is the total weight of the layer's losses."""

    def __init__(self, losses):
        nn.Module.__init__(self)
        self.values = dict(losses)
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.stats = None

    def forward(self):
        load = torch.tensor([3, 1, 0, 4])
        self.stats = MoEStats(
            losses={k: v * self.scale for k, v in self.values.items()},
            tokens=torch.tensor(4),
            assignments=load.sum(),
            dropped=torch.tensor(1),
            expert_load=load,
            entropy_sum=torch.tensor(2.0),
            entropy_count=torch.tensor(4),
        )


class FakeModel(nn.Module):
    def __init__(self, layer_losses):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, VOCAB)
        self.layers = nn.ModuleList(FakeMoELayer(l) for l in layer_losses)

    def forward(self, src_tokens, **kwargs):
        for layer in self.layers:
            layer()
        return self.embed(src_tokens), {}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        fn = torch.log_softmax if log_probs else torch.softmax
        return fn(net_output[0].float(), dim=-1)

    def get_targets(self, sample, net_output):
        return sample["target"]


class FakeTask:
    def __init__(self):
        d = Dictionary()
        for i in range(VOCAB - len(d)):
            d.add_symbol(f"w{i}")
        assert len(d) == VOCAB
        self.target_dictionary = d
        self.source_dictionary = d


def make_sample():
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, VOCAB, (2, 5), generator=g)
    target = torch.randint(4, VOCAB, (2, 5), generator=g)
    target[1, -1] = 1  # one padding position
    return {
        "net_input": {"src_tokens": src},
        "target": target,
        "ntokens": int((target != 1).sum()),
    }


def criterion(method, gate_wt=GATE_WT, z_wt=Z_WT, task=None):
    return MoELabelSmoothedCrossEntropyCriterion(
        task or FakeTask(), False, LS, moe_gate_loss_wt=gate_wt, moe_router_z_loss_wt=z_wt,
        moe_gate_loss_combine_method=method,
    )


def combined(method, select, layer_losses=LAYER_LOSSES):
    total = sum(v for l in layer_losses for k, v in l.items() if select(k))
    return total / len(layer_losses) if method == "average" else total


def plain_ce(model, sample):
    ref = LabelSmoothedCrossEntropyCriterion(FakeTask(), False, LS)
    loss, _, _ = ref(model, sample)
    return loss.item()


@pytest.mark.parametrize("method", ["average", "sum", None])
def test_loss_combines_layers(method):
    resolved = method or "average"
    model, sample = FakeModel(LAYER_LOSSES), make_sample()
    crit = criterion(method)
    assert crit.combine_method == resolved
    loss, sample_size, log = crit(model, sample)
    assert sample_size == sample["ntokens"] == 9

    gate = combined(resolved, lambda k: k != "z")
    z = combined(resolved, lambda k: k == "z")
    if resolved == "average":
        assert gate == pytest.approx((1.25 + 0.5 + 1.5 + 0.25 + 2.0) / 3)
        assert z == pytest.approx((3.0 + 2.0 + 4.5) / 3)
    else:
        assert gate == pytest.approx(5.5) and z == pytest.approx(9.5)
    expected = plain_ce(model, sample) + sample_size * (GATE_WT * gate + Z_WT * z)
    assert loss.item() == pytest.approx(expected, rel=1e-9)

    # Gradient: each layer's losses are weighted 1/3 (average) or 1 (sum).
    loss.backward()
    per_layer = 1 / 3 if resolved == "average" else 1.0
    for layer, values in zip(model.layers, LAYER_LOSSES):
        want = sample_size * per_layer * sum(
            (Z_WT if k == "z" else GATE_WT) * v for k, v in values.items())
        assert layer.scale.grad.item() == pytest.approx(want, rel=1e-9)

    # Logged keys: one meaning each.
    assert log["moe_gate_loss"] == pytest.approx(gate, rel=1e-9)
    assert log["moe_z_loss"] == pytest.approx(z, rel=1e-9)
    assert log["moec_var_loss"] == pytest.approx(
        combined(resolved, lambda k: k == "moec_var"), rel=1e-9)
    balance = combined(resolved, lambda k: k == "balance")
    assert log["moe_gate_loss"] - log["moec_var_loss"] == pytest.approx(balance, rel=1e-9)
    assert "moe_balance_loss" not in log
    assert "moe_moec_var_loss" not in log
    assert log["moe_batches"] == 1 and log["moe_layers"] == 3


def test_zero_weights_leave_plain_ce_but_still_log():
    model, sample = FakeModel(LAYER_LOSSES), make_sample()
    loss, _, log = criterion("sum", gate_wt=0.0, z_wt=0.0)(model, sample)
    assert loss.item() == pytest.approx(plain_ce(model, sample), rel=1e-12)
    assert log["moe_gate_loss"] == pytest.approx(5.5)


def test_average_is_over_the_layers_that_ran():
    # Only layers whose stats were set in this forward count: a layer left over
    # from an earlier forward (stats reset by the criterion) is not averaged in.
    model, sample = FakeModel(LAYER_LOSSES), make_sample()
    idle = FakeMoELayer({"balance": 100.0, "z": 100.0})
    idle()  # stale stats from some earlier forward; the model never calls it
    model.idle = idle
    loss, sample_size, log = criterion("average")(model, sample)
    assert idle.stats is None
    assert log["moe_layers"] == 3
    assert log["moe_gate_loss"] == pytest.approx(combined("average", lambda k: k != "z"))
    expected = plain_ce(model, sample) + sample_size * (
        GATE_WT * combined("average", lambda k: k != "z")
        + Z_WT * combined("average", lambda k: k == "z"))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_no_method_loss_no_method_key():
    layers = [{"balance": 1.0, "z": 2.0}, {"balance": 3.0, "z": 4.0}]
    _, _, log = criterion("average")(FakeModel(layers), make_sample())
    assert log["moe_gate_loss"] == pytest.approx(2.0)
    assert log["moe_z_loss"] == pytest.approx(3.0)
    assert not any(k.startswith(("moec_", "smoe_")) for k in log)
    assert "moe_balance_loss" not in log


def test_reduce_metrics_means_over_batches():
    # Two batches, built through the criterion so the logging outputs are real.
    crit = criterion("sum")
    logs = []
    for layers in (LAYER_LOSSES, [{"balance": 1.0, "z": 1.0, "moec_var": 2.5}]):
        _, _, log = crit(FakeModel(layers), make_sample())
        logs.append(log)
    assert MoELabelSmoothedCrossEntropyCriterion.logging_outputs_can_be_summed()
    with metrics.aggregate() as agg:
        MoELabelSmoothedCrossEntropyCriterion.reduce_metrics(logs)
    values = agg.get_smoothed_values()
    assert values["moe_gate_loss"] == pytest.approx((5.5 + 3.5) / 2, abs=1e-4)
    assert values["moe_z_loss"] == pytest.approx((9.5 + 1.0) / 2, abs=1e-4)
    assert values["moec_var_loss"] == pytest.approx((0.75 + 2.5) / 2, abs=1e-4)
    assert "moe_balance_loss" not in values


@pytest.mark.parametrize("bad", ["mean", "Average", "", "none"])
def test_bad_combine_method_is_refused(bad):
    with pytest.raises(MoEConfigError) as info:
        criterion(bad)
    message = str(info.value)
    assert "--moe-gate-loss-combine-method" in message
    assert "average" in message and "sum" in message


def _parse(*extra):
    argv = [
        "unused-data-dir", "--user-dir", str(USER_DIR),
        "--task", "translation", "--arch", "moe_transformer_tiny",
        "--criterion", "moe_label_smoothed_cross_entropy", *extra,
    ]
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, input_args=argv)


def _build_from_args(args):
    from fairseq.criterions import build_criterion

    cfg = convert_namespace_to_omegaconf(args)
    return build_criterion(cfg.criterion, FakeTask())


@pytest.mark.parametrize("value", ["sum", "average"])
def test_flag_parses_through_fairseq(value):
    args = _parse("--moe-gate-loss-combine-method", value)
    assert args.moe_gate_loss_combine_method == value
    crit = _build_from_args(args)
    assert isinstance(crit, MoELabelSmoothedCrossEntropyCriterion)
    assert crit.combine_method == value


def test_flag_default_is_none_and_resolves_to_average():
    args = _parse()
    assert args.moe_gate_loss_combine_method in (None, "average")
    assert _build_from_args(args).combine_method == "average"


def test_preset_can_set_the_method_on_the_namespace():
    # What an architecture preset does: set the field before the criterion is built.
    args = _parse()
    args.moe_gate_loss_combine_method = "sum"
    assert _build_from_args(args).combine_method == "sum"


def test_bad_flag_value_is_refused_when_the_criterion_is_built():
    args = _parse("--moe-gate-loss-combine-method", "mean")
    with pytest.raises(MoEConfigError, match="--moe-gate-loss-combine-method"):
        _build_from_args(args)
