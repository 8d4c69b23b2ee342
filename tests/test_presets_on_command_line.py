"""Presets hold on every command line: generated over every registered MoE architecture
and every ``--moe-*``, ``--moec-*``, ``--smoe-*``, ``--cmr-*`` flag, through fairseq's own parser
(``parse_args_and_arch``, which leaves unnamed model flags out of the namespace).

- Naming the value the preset already resolves changes nothing in the resolved namespace.
- Naming another value changes that flag, and only what the flag documents as derived
  from it (:data:`DERIVED`).

The flags are read off the parser, so a new flag without an entry in
:data:`OTHER_VALUES` fails the test instead of going unchecked.
"""

import argparse

import pytest

import moe_fairseq  # noqa: F401  (registers the architectures)
from fairseq import options
from fairseq.models import ARCH_MODEL_REGISTRY

from moe_fairseq.args_version import ARGS_VERSION
from moe_fairseq.models.moe_transformer import MoETransformerModel

ARCHS = sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is MoETransformerModel)
PREFIXES = ("--moe-", "--moec-", "--smoe-", "--cmr-")

# Candidate values of each flag, tried in order: the first that differs from what the
# preset resolves is named. Booleans are named as --flag / --no-flag.
OTHER_VALUES = {
    "moe_expert_count": [8, 6],
    "moe_freq": [1, 2],
    "moe_top_k": [1, 2],
    "moe_router": ["attentive", "linear"],
    "moe_capacity_factor": [1.5, 2.0],
    "moe_capacity_rule": ["per-slot", "tokens"],
    "moe_eval_capacity_token_fraction": [0.5, 1.0],
    "moe_second_expert_policy": ["all", "random"],
    "moe_eval_second_expert_policy": ["sampling", "all"],
    "moe_normalize_gates": [True, False],
    "moe_normalize_gate_prob_before_dropping": [True],
    "moe_output_dropout": [False, True],
    "moe_token_order": ["seq-major", "batch-major"],
    "moe_kernels": ["torch", "auto"],
    "moe_encoder_layers": ["1", "2"],
    "moe_decoder_layers": ["1", "2"],
    "moe_layer_expert_counts": ["2,2"],
    "moe_jitter_eps": [0.01, 0.0],
    "moe_expert_ffn_dim": [32],
    "moe_attentive_dim": [8, 16],
    "moec_routing_dim": [16, 32],
    "moec_clusters": [1, 2],
    "moec_var_coef": [0.5, 1.0],
    "moec_var_type": ["gap", "cluster"],
    "moec_expert_dropout": [0.25, 0.0],
    "moec_dropout_interval": [10, 250],
    "moec_output_mixing": [True, False],
    "moec_expert_sublayers": [2, 1],
    "smoe_strata": ["1,3", "2,2"],
    "smoe_stratum_norm": ["gate-input", "post-ln"],
    "moe_eom": [0.2, 0.0],
    "moe_cmr": [True],
    "cmr_gate_drop": [0.2, 0.0],
    "moe_batch_prioritized_routing": [True],
    # the MoE criterion's flags
    "moe_gate_loss_wt": [0.1, 0.01],
    "moe_gate_loss_combine_method": ["average", "sum"],
    "moe_router_z_loss_wt": [0.001],
    "moe_similarity_loss_wt": [0.1],
    "moe_similarity_beta_s": [1e-6],
    "moe_similarity_beta_d": [0.1],
    "moe_similarity_sample_tokens": [64],
    "moe_log_per_layer": [True],
    "cmr_gate_loss_wt": [0.1, 0.0],
    "cmr_gate_loss_p": [0.8, 1.0],
}

# What a flag's help documents as following from it when the other is not named.
DERIVED = {
    "moe_top_k": {"moe_normalize_gates"},  # default on for top-2 only
    "smoe_strata": {"moe_expert_count"},  # smoe presets: the strata's sum
}


def resolve(arch, *flags, save_dir="/nonexistent/moe_fairseq_test") -> argparse.Namespace:
    """The namespace ``fairseq-train`` resolves for a command line (model flags only
    where named, then the architecture function), as a user runs it."""
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [
        "data-bin", "--task", "translation", "--arch", arch,
        "--criterion", "moe_label_smoothed_cross_entropy", "--save-dir", save_dir,
        *map(str, flags)])


def moe_flag_actions():
    """dest -> argparse action of every MoE flag the training parser knows."""
    parser = options.get_training_parser()
    options.parse_args_and_arch(parser, ["data-bin", "--arch", "moe_transformer_tiny",
                                         "--criterion", "moe_label_smoothed_cross_entropy"])
    found = {}
    for action in parser._actions:
        if any(o.startswith(PREFIXES) for o in action.option_strings):
            found[action.dest] = action
    return found


ACTIONS = moe_flag_actions()


def name_value(action, value):
    """The command-line words that name ``value`` for ``action``; None if it cannot be
    named (None, or False for a store_true flag)."""
    flag = next(o for o in action.option_strings if not o.startswith("--no-"))
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else None
    return [flag, str(value)]


def test_every_moe_flag_has_candidate_values():
    assert set(ACTIONS) == set(OTHER_VALUES), (
        "flags without candidates (add them to OTHER_VALUES): "
        f"{sorted(set(ACTIONS) - set(OTHER_VALUES))}; stale entries: "
        f"{sorted(set(OTHER_VALUES) - set(ACTIONS))}")


def _diff(a: argparse.Namespace, b: argparse.Namespace) -> dict:
    keys = set(vars(a)) | set(vars(b))
    missing = object()
    return {k: (getattr(a, k, missing), getattr(b, k, missing)) for k in keys
            if getattr(a, k, missing) != getattr(b, k, missing)}


@pytest.mark.parametrize("arch", ARCHS)
def test_naming_a_flag_changes_that_flag_only(arch):
    bare = resolve(arch)
    assert bare.moe_args_version == ARGS_VERSION
    unnameable, checked = [], 0
    for dest, action in sorted(ACTIONS.items()):
        preset = getattr(bare, dest)
        same = name_value(action, preset)
        if same is None:
            unnameable.append(dest)
        else:
            diff = _diff(bare, resolve(arch, *same))
            assert not diff, f"{arch}: naming the preset's own {' '.join(same)} changed {diff}"
        other = next((v for v in OTHER_VALUES[dest] if v != preset), None)
        assert other is not None, f"{arch}: no candidate other than {dest}={preset!r}"
        words = name_value(action, other)
        named = resolve(arch, *words)
        assert getattr(named, dest) == other, f"{arch}: {' '.join(words)} resolved to " \
                                              f"{getattr(named, dest)!r}"
        diff = _diff(bare, named)
        allowed = {dest} | DERIVED.get(dest, set())
        assert set(diff) <= allowed, (
            f"{arch}: {' '.join(words)} also changed {sorted(set(diff) - allowed)}: "
            f"{ {k: diff[k] for k in set(diff) - allowed} }")
        checked += 1
    assert checked == len(ACTIONS)
    # Flags whose preset value is None (unset) or a store_true False cannot be named.
    assert set(unnameable) <= {"moe_encoder_layers", "moe_decoder_layers",
                               "moe_layer_expert_counts", "moe_expert_ffn_dim", "smoe_strata",
                               "moe_gate_loss_combine_method",
                               "moe_normalize_gate_prob_before_dropping", "moe_log_per_layer",
                               "moe_cmr", "moe_batch_prioritized_routing"}


# What the README promises for each family, bare or with the expert count named.
PRESET_RULES = {
    "moe_transformer": dict(moe_normalize_gates=True, moe_capacity_rule="joint",
                            moe_token_order="batch-major", moe_freq=2),
    "smoe_transformer_tiny": dict(encoder_normalize_before=True, decoder_normalize_before=True,
                                  moe_capacity_rule="per-slot", moe_normalize_gates=True,
                                  smoe_stratum_norm="post-ln", moe_token_order="batch-major"),
    "moec_transformer_base": dict(moe_capacity_rule="tokens", moec_output_mixing=True,
                                  moec_expert_sublayers=3, moe_output_dropout=False,
                                  moe_freq=4, moe_encoder_layers=None, moe_top_k=1,
                                  moe_gate_loss_combine_method="sum"),
}


@pytest.mark.parametrize("arch, count", [("moe_transformer", 8), ("smoe_transformer_tiny", 4),
                                         ("moec_transformer_base", 8)])
def test_issue_command_lines_get_the_preset(arch, count):
    """The command lines of the bug report: naming the expert count kept nothing of the
    preset (post-norm SMoE, joint capacity, raw top-2 gates, MoEC without mixing)."""
    for flags in ([], ["--moe-expert-count", count]):
        args = resolve(arch, *flags)
        got = {k: getattr(args, k) for k in PRESET_RULES[arch]}
        assert got == PRESET_RULES[arch], f"{arch} {flags}"


# ------------------------------------------------------------------ end to end


def _saved_model_args(path) -> dict:
    """The model config a checkpoint records, read as stock torch reads it."""
    import torch

    from moe_fairseq.fairseq_fixes.checkpoint_compat import NAMESPACE_TAG

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state["cfg"]["model"].items() if k != NAMESPACE_TAG}


def test_fairseq_train_saves_the_preset_it_was_asked_for(data_bin, tmp_path):
    """`fairseq-train --arch smoe_transformer_tiny --moe-expert-count 4`, as the README's
    users type it: the checkpoint records the SMoE preset (pre-norm, per-slot capacity,
    renormalised top-2 gates, post-LN strata, batch-major priority, version 3), and its
    weights are those of that model (pre-norm keeps the MoE layers' final_layer_norm)."""
    import torch

    from conftest import run_cli, train_args

    save_dir = tmp_path / "ckpt"
    args = train_args(data_bin, save_dir, "--moe-expert-count", "4", max_update=2)
    args[args.index("moe_transformer_tiny")] = "smoe_transformer_tiny"
    proc = run_cli("train", args)
    saved = _saved_model_args(save_dir / "checkpoint_last.pt")
    want = dict(moe_args_version=ARGS_VERSION, moe_expert_count=4,
                encoder_normalize_before=True, decoder_normalize_before=True,
                moe_capacity_rule="per-slot", moe_normalize_gates=True,
                smoe_stratum_norm="post-ln", moe_token_order="batch-major")
    assert {k: saved.get(k) for k in want} == want
    weights = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu",
                         weights_only=True)["model"]
    assert "encoder.layers.1.final_layer_norm.weight" in weights
    # a fresh save dir resumes nothing: the log says nothing about taking settings
    assert "MoE settings the command line does not name" not in proc.stdout + proc.stderr


def test_resume_keeps_the_checkpoints_moe_settings(data_bin, tmp_path):
    """A run resumed with a command line that names fewer flags than the checkpoint was
    trained with continues the checkpoint's model: unnamed MoE flags come from the
    checkpoint (and the log says which); a flag named now still wins."""
    from conftest import run_cli, train_args

    save_dir = tmp_path / "ckpt"
    run_cli("train", train_args(data_bin, save_dir, "--moe-expert-count", "4",
                                "--no-moe-normalize-gates", "--moe-capacity-factor", "1.5",
                                "--moe-token-order", "seq-major", max_update=2))
    proc = run_cli("train", train_args(data_bin, save_dir, "--moe-capacity-factor", "2",
                                       max_update=4))
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log
    assert "MoE settings the command line does not name are the checkpoint's" in log
    assert "moe_normalize_gates=False" in log and "moe_token_order=seq-major" in log
    saved = _saved_model_args(save_dir / "checkpoint_last.pt")
    assert (saved["moe_normalize_gates"], saved["moe_token_order"],
            saved["moe_capacity_factor"], saved["moe_args_version"]) == (
        False, "seq-major", 2.0, ARGS_VERSION)
