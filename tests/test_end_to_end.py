"""End-to-end tests: the fairseq command-line tools, run as real subprocesses with
``--user-dir``, train, resume, decode and load checkpoints of the MoE transformer."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    N_TEST,
    REPO_ROOT,
    TRAINED_MAX_UPDATE,
    USER_DIR,
    log_records,
    run_cli,
    subprocess_env,
    train_args,
)

MOE_METRICS = ("moe_gate_loss", "moe_overflow", "moe_load_cv", "moe_route_entropy",
               "moe_starved_experts")
NUM_EXPERTS = 4
# moe_transformer_tiny has 2 encoder + 2 decoder layers; --moe-freq 2 makes
# encoder layer 2 and decoder layer 2 MoE layers.
NUM_MOE_LAYERS = 2
MOE_LAYERS_LOG = "MoE layers: encoder [2], decoder [2] (1-based), 4 experts"


def _stopped_at(stdout: str) -> int:
    m = re.findall(r"Stopping training due to num_updates: (\d+) >= max_update", stdout)
    assert m, "the run did not stop at --max-update"
    return int(m[-1])


def _hypotheses(stdout: str) -> dict:
    """id -> hypothesis string of fairseq-generate's ``H-`` lines."""
    hyps = {}
    for line in stdout.splitlines():
        if line.startswith("H-"):
            head, _score, text = line.split("\t", 2)
            hyps[int(head[2:])] = text
    return hyps


def _checkpoint_num_updates(path: Path) -> int:
    import moe_fairseq  # noqa: F401  (allowlists the checkpoint's non-tensor types)

    state = torch.load(path, map_location="cpu")  # weights_only=True, torch's default
    return int(state["optimizer_history"][-1]["num_updates"])


# --------------------------------------------------------------------- 1. train


def test_train_loss_decreases_and_logs_moe_metrics(trained):
    inner = log_records(trained.stdout, "train_inner")
    assert len(inner) >= 6, trained.stdout[-3000:]
    assert [int(r["num_updates"]) for r in inner] == list(range(5, TRAINED_MAX_UPDATE + 1, 5))
    assert _stopped_at(trained.stdout) == TRAINED_MAX_UPDATE
    assert MOE_LAYERS_LOG in trained.stdout

    first, last = inner[0]["loss"], inner[-1]["loss"]
    assert last < first - 0.5, f"training loss did not go down: {first} -> {last}"

    epoch_summaries = log_records(trained.stdout, "train")
    valid = log_records(trained.stdout, "valid")
    assert epoch_summaries and valid
    for rec in inner:
        for key in MOE_METRICS:
            assert key in rec, f"{key} missing from train_inner log {rec}"
            assert math.isfinite(rec[key])
        assert 0.0 <= rec["moe_overflow"] <= 1.0
        assert 0.0 <= rec["moe_route_entropy"] <= math.log(NUM_EXPERTS) + 1e-3
        assert rec["moe_load_cv"] >= 0.0
        assert 0.0 <= rec["moe_starved_experts"] <= 1.0
        # Balance loss E * sum_e f_e p_e lies in (0, E] per layer, summed over layers.
        assert 0.0 < rec["moe_gate_loss"] <= NUM_MOE_LAYERS * NUM_EXPERTS
        # Training capacity (factor 1.0, top-2) drops a little, never most tokens.
        assert rec["moe_overflow"] < 0.5
    for rec in epoch_summaries:
        for key in MOE_METRICS:
            assert f"train_{key}" in rec
    for rec in valid:
        for key in MOE_METRICS:
            assert f"valid_{key}" in rec
        # Inference capacity fraction 1.0 never drops an assignment.
        assert rec["valid_moe_overflow"] == 0.0
        assert 0.0 <= rec["valid_moe_route_entropy"] <= math.log(NUM_EXPERTS) + 1e-3
    assert valid[-1]["valid_loss"] < valid[0]["valid_loss"]


def test_train_writes_moe_scalars_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    inner_dir = trained.tb_dir / "train_inner"
    assert list(inner_dir.glob("events.out.tfevents.*")), list(trained.tb_dir.rglob("*"))
    acc = EventAccumulator(str(inner_dir))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for key in MOE_METRICS:
        assert key in scalars, f"{key} not in TensorBoard scalars {scalars}"

    events = acc.Scalars("moe_gate_loss")
    logged = {int(r["num_updates"]): r["moe_gate_loss"]
              for r in log_records(trained.stdout, "train_inner")}
    assert [e.step for e in events] == sorted(logged)
    for e in events:
        assert e.value == pytest.approx(logged[e.step], abs=1e-3)

    for sub in ("train", "valid"):
        acc = EventAccumulator(str(trained.tb_dir / sub))
        acc.Reload()
        assert "moe_gate_loss" in acc.Tags()["scalars"], sub


# --------------------------------------------------------------------- 2. generate


def test_generate_loads_checkpoint_and_decodes_every_test_sentence(trained):
    proc = run_cli(
        "generate",
        [
            trained.data, "--user-dir", USER_DIR,
            "--path", trained.checkpoint_last,
            "--beam", "4", "--gen-subset", "test",
            # Default --required-batch-size-multiple (8): plain fairseq main would
            # drop the last batch here; moe_fairseq.fairseq_fixes.batching gives it back.
            "--max-tokens", "2000",
            "--cpu", "--num-workers", "0",
        ],
    )
    assert "Weights only load failed" not in proc.stdout + proc.stderr
    hyps = _hypotheses(proc.stdout)
    assert sorted(hyps) == list(range(N_TEST)), f"decoded ids: {sorted(hyps)}"
    assert all(h.strip() for h in hyps.values()), "empty hypothesis"
    assert f"Translated {N_TEST} sentences" in proc.stdout + proc.stderr


def test_checkpoints_hold_no_global_outside_torchs_defaults(trained):
    """Plain types only: stock torch >= 2.6 reads them weights-only, no allowlist."""
    checkpoints = [trained.checkpoint_last, trained.save_dir / "checkpoint_best.pt"]
    # A fresh interpreter: no allowlist installed, so torch reports every global.
    script = (
        "import json, sys, torch\n"
        "print(json.dumps([torch.serialization.get_unsafe_globals_in_checkpoint(p)"
        " for p in sys.argv[1:]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, checkpoints)],
        capture_output=True, text=True, env=subprocess_env(), check=True,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for path, names in zip(checkpoints, found):
        assert names == [], (path, names)

    # And weights-only loading succeeds.
    assert _checkpoint_num_updates(trained.checkpoint_last) == TRAINED_MAX_UPDATE


# --------------------------------------------------------------------- 3. resume


def test_resume_from_checkpoint_last(trained, tmp_path):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    shutil.copy(trained.checkpoint_last, save_dir / "checkpoint_last.pt")
    new_max = TRAINED_MAX_UPDATE + 6
    proc = run_cli("train", train_args(trained.data, save_dir, max_update=new_max))

    # 5 updates per epoch: update 42 is two updates into epoch 9.
    loaded = re.search(
        r"Loaded checkpoint (\S+) \(epoch (\d+) @ (\d+) updates\)", proc.stdout
    )
    assert loaded, proc.stdout[-3000:]
    assert Path(loaded.group(1)).resolve() == (save_dir / "checkpoint_last.pt").resolve()
    assert int(loaded.group(2)) == 9
    assert int(loaded.group(3)) == TRAINED_MAX_UPDATE

    inner = log_records(proc.stdout, "train_inner")
    assert inner and int(inner[0]["num_updates"]) > TRAINED_MAX_UPDATE
    assert int(inner[-1]["num_updates"]) == new_max
    assert _stopped_at(proc.stdout) == new_max
    # Weights (not just counters) came back: the loss continues where it was,
    # far below the loss of a freshly initialized model.
    fresh_loss = log_records(trained.stdout, "train_inner")[0]["loss"]
    assert inner[0]["loss"] < fresh_loss - 0.5
    assert _checkpoint_num_updates(save_dir / "checkpoint_last.pt") == new_max


# --------------------------------------------------------------------- 4. --user-dir


def _short_train(data_bin, tmp_path, user_dir, cwd):
    proc = run_cli(
        "train",
        train_args(data_bin, tmp_path / "ckpt", "--no-save", user_dir=user_dir, max_update=3),
        cwd=cwd,
    )
    assert MOE_LAYERS_LOG in proc.stdout
    assert _stopped_at(proc.stdout) == 3
    inner = log_records(proc.stdout, "train_inner")
    assert inner and all("moe_gate_loss" in r for r in inner)
    return proc


def test_user_dir_relative_to_repo_root(data_bin, tmp_path):
    assert (REPO_ROOT / "moe_fairseq" / "__init__.py").is_file()
    proc = _short_train(data_bin, tmp_path, "moe_fairseq", cwd=REPO_ROOT)
    assert "'user_dir': 'moe_fairseq'" in proc.stdout


def test_user_dir_package_directory_from_another_cwd(data_bin, tmp_path):
    import moe_fairseq

    package_dir = os.path.dirname(os.path.abspath(moe_fairseq.__file__))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    _short_train(data_bin, tmp_path, package_dir, cwd=cwd)


# --------------------------------------------------------------------- 5. multilingual


MULTI_TASK_ARGS = [
    "--task", "translation_multi_simple_epoch",
    "--lang-pairs", "a-b,a-c",
    "--encoder-langtok", "tgt", "--decoder-langtok",
]


def test_translation_multi_simple_epoch(multilingual_data_bin, tmp_path):
    save_dir = tmp_path / "checkpoints"
    proc = run_cli(
        "train",
        [
            multilingual_data_bin, "--user-dir", USER_DIR, *MULTI_TASK_ARGS,
            "--sampling-method", "temperature", "--sampling-temperature", "1.5",
            "--arch", "moe_transformer_tiny",
            "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--lr", "3e-3",
            "--max-tokens", "1000", "--max-update", "8",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation",
            "--cpu", "--num-workers", "0", "--seed", "1",
            "--log-format", "json", "--log-interval", "2", "--no-progress-bar",
        ],
    )
    assert MOE_LAYERS_LOG in proc.stdout
    assert "selected sampler: temperature" in proc.stdout
    assert "train a-b 600 examples" in proc.stdout
    assert "train a-c 300 examples" in proc.stdout
    assert _stopped_at(proc.stdout) == 8
    inner = log_records(proc.stdout, "train_inner")
    assert inner and all(math.isfinite(r["loss"]) and "moe_gate_loss" in r for r in inner)
    assert (save_dir / "checkpoint_last.pt").is_file()

    gen = run_cli(
        "generate",
        [
            multilingual_data_bin, "--user-dir", USER_DIR, *MULTI_TASK_ARGS,
            "--source-lang", "a", "--target-lang", "b",
            "--path", save_dir / "checkpoint_last.pt",
            "--beam", "4", "--gen-subset", "test",
            "--max-tokens", "2000",
            "--cpu", "--num-workers", "0",
        ],
    )
    hyps = _hypotheses(gen.stdout)
    assert sorted(hyps) == list(range(N_TEST))
    # Source lines carry the target-language token; hypotheses do not.
    sources = [l for l in gen.stdout.splitlines() if l.startswith("S-")]
    assert sources and all("__b__" in l for l in sources)
    assert not any("__" in h for h in hyps.values())


# --------------------------------------------------------------------- 6. incremental decoding


def test_incremental_decoding_matches_full_forward(trained):
    from fairseq import checkpoint_utils
    from fairseq.data import data_utils

    from moe_fairseq.layer.moe_layer import MoELayer

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(trained.checkpoint_last)],
        arg_overrides={"data": str(trained.data), "moe_eval_capacity_token_fraction": 1.0},
    )
    model = models[0].eval()
    decoder_moe = [m for m in model.decoder.modules() if isinstance(m, MoELayer)]
    encoder_moe = [m for m in model.encoder.modules() if isinstance(m, MoELayer)]
    assert len(decoder_moe) == 1 and len(encoder_moe) == 1
    assert decoder_moe[0].router.eval_capacity_token_fraction == 1.0

    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    sources = ["w01 w02 w03 w04", "w05 w06 w07 w08 w09 w10 w11 w12", "w13 w14 w15 w16 w17 w18"]
    targets = ["w20 w21 w22 w23 w24 w25 w26", "w27 w28 w29 w00 w01 w02 w03",
               "w04 w05 w06 w07 w08 w09 w10"]
    encode = lambda d, s: d.encode_line(s, add_if_not_exist=False, append_eos=True).long()
    src = [encode(src_dict, s) for s in sources]
    src_tokens = data_utils.collate_tokens(src, src_dict.pad(), left_pad=True)
    src_lengths = torch.tensor([t.numel() for t in src])
    tgt = [encode(tgt_dict, s) for s in targets]
    assert len({t.numel() for t in tgt}) == 1  # no target padding
    prev_output_tokens = data_utils.collate_tokens(
        tgt, tgt_dict.pad(), tgt_dict.eos(), move_eos_to_beginning=True
    )
    bsz, tgt_len = prev_output_tokens.shape
    assert (src_tokens == src_dict.pad()).any()  # the encoder sees padding

    routes = []
    hook = decoder_moe[0].router.register_forward_hook(
        lambda _m, _inp, routing: routes.append(routing.expert_index.clone())
    )
    try:
        with torch.no_grad():
            encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
            full, _ = model.decoder(prev_output_tokens, encoder_out=encoder_out)
            full_routes = routes.pop()
            assert not routes

            incremental_state = {}
            steps, step_routes = [], []
            for t in range(tgt_len):
                out, _ = model.decoder(
                    prev_output_tokens[:, : t + 1],
                    encoder_out=encoder_out,
                    incremental_state=incremental_state,
                )
                assert out.shape == (bsz, 1, full.size(-1))
                # Each step routes only the new position of every sentence.
                assert int(decoder_moe[0].stats.tokens) == bsz
                assert int(decoder_moe[0].stats.dropped) == 0
                steps.append(out)
                step_routes.append(routes.pop())
    finally:
        hook.remove()

    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)
    # Same experts per token: the full pass routes [bsz * tgt_len] tokens in
    # batch-major order (--moe-token-order), each step's [bsz] routings are one column.
    assert model.decoder.layers[1].moe_token_order == "batch-major"
    assert torch.equal(torch.stack(step_routes, dim=1).reshape(-1, 2), full_routes)
    assert full_routes.shape == (tgt_len * bsz, 2)
    # The trained router is not trivially sending everything to one expert.
    assert full_routes[:, 0].unique().numel() > 1
