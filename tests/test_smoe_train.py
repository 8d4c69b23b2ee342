"""SMoE end to end: ``--arch smoe_transformer_tiny`` trained with fairseq-train on the
multilingual task (two target languages), then decoded with fairseq-generate;
requested capacity logged overall, per stratum and per target language;
incremental decoding equals the full forward; the eval capacity flag reaches
every stratum's gate."""

import math

import pytest
import torch

from conftest import N_TEST, USER_DIR, log_records, run_cli

MULTI_TASK_ARGS = [
    "--task", "translation_multi_simple_epoch",
    "--lang-pairs", "a-b,a-c",
    "--encoder-langtok", "tgt", "--decoder-langtok",
]


@pytest.fixture(scope="module")
def smoe_run(multilingual_data_bin, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("smoe") / "checkpoints"
    proc = run_cli(
        "train",
        [
            multilingual_data_bin, "--user-dir", USER_DIR, *MULTI_TASK_ARGS,
            "--arch", "smoe_transformer_tiny",
            "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--lr", "3e-3",
            "--max-tokens", "1000", "--max-update", "12",
            "--save-dir", save_dir, "--no-epoch-checkpoints",
            "--cpu", "--num-workers", "0", "--seed", "1",
            "--log-format", "json", "--log-interval", "3", "--no-progress-bar",
        ],
    )
    return multilingual_data_bin, save_dir, proc.stdout


def _check_capacity_record(r, strata=2):
    rc = r["smoe_requested_capacity"]
    assert 1.0 <= rc <= strata
    shares = [r[f"smoe_stratum{i}_share"] for i in range(strata)]
    assert shares[0] == 1.0  # every token starts at stratum 0
    assert 0.0 <= shares[1] <= 1.0
    assert sum(shares) == pytest.approx(rc, abs=2e-3)  # logged rounded to 3 places
    for lang in ("b", "c"):
        assert 1.0 <= r[f"smoe_rc_{lang}"] <= strata


def test_train_logs_requested_capacity_per_stratum_and_language(smoe_run):
    _data, save_dir, stdout = smoe_run
    assert "MoE layers: encoder [2], decoder [2] (1-based), 4 experts" in stdout
    assert "router stratified" in stdout
    inner = log_records(stdout, "train_inner")
    valid = [{k[len("valid_"):]: v for k, v in r.items() if k.startswith("valid_")}
             for r in log_records(stdout, "valid")]
    assert inner and valid
    for r in inner + valid:
        assert math.isfinite(r["loss"]) and "moe_gate_loss" in r
        _check_capacity_record(r)
    # Dynamic capacity at work: some tokens took one pass, some two.
    assert any(1.0 < r["smoe_requested_capacity"] < 2.0 for r in inner + valid)
    assert (save_dir / "checkpoint_last.pt").is_file()


def test_generate_decodes_every_sentence(smoe_run):
    data, save_dir, _ = smoe_run
    gen = run_cli(
        "generate",
        [
            data, "--user-dir", USER_DIR, *MULTI_TASK_ARGS,
            "--source-lang", "a", "--target-lang", "c",
            "--path", save_dir / "checkpoint_last.pt",
            "--beam", "4", "--gen-subset", "test", "--max-tokens", "2000",
            "--cpu", "--num-workers", "0",
        ],
    )
    hyps = [l for l in gen.stdout.splitlines() if l.startswith("H-")]
    assert sorted(int(l.split("\t")[0][2:]) for l in hyps) == list(range(N_TEST))


def test_incremental_decoding_and_eval_capacity_flag(smoe_run):
    from fairseq import checkpoint_utils

    from moe_fairseq.layer.moe_layer import MoELayer
    from moe_fairseq.routers.stratified import StratifiedRouter

    data, save_dir, _ = smoe_run
    # The eval capacity flag reaches every stratum's gate.
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save_dir / "checkpoint_last.pt")],
        arg_overrides={"data": str(data), "moe_eval_capacity_token_fraction": 0.25},
    )
    routers = [m.router for m in models[0].modules() if isinstance(m, MoELayer)]
    assert len(routers) == 2 and all(isinstance(r, StratifiedRouter) for r in routers)
    assert all(g.eval_capacity_token_fraction == 0.25 for r in routers for g in r.gates)
    assert all(r.strata == [2, 2] and r.norms is not None for r in routers)

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save_dir / "checkpoint_last.pt")],
        arg_overrides={"data": str(data), "moe_eval_capacity_token_fraction": 1.0},
    )
    model = models[0].eval()
    decoder_moe = [m for m in model.decoder.modules() if isinstance(m, MoELayer)][0]
    g = torch.Generator().manual_seed(0)
    vocab = len(task.source_dictionary)
    bsz, src_len, tgt_len = 3, 9, 8
    # Ordinary word ids (past the 4 special symbols), no padding.
    src_tokens = torch.randint(4, vocab - 3, (bsz, src_len), generator=g)
    prev = torch.randint(4, vocab - 3, (bsz, tgt_len), generator=g)
    with torch.no_grad():
        encoder_out = model.encoder(src_tokens, src_lengths=torch.full((bsz,), src_len))
        full, _ = model.decoder(prev, encoder_out=encoder_out)
        full_passes = decoder_moe.stats.token_passes.clone()  # [tgt_len, bsz]
        state, steps, step_passes = {}, [], []
        for t in range(tgt_len):
            out, _ = model.decoder(prev[:, : t + 1], encoder_out=encoder_out,
                                   incremental_state=state)
            steps.append(out)
            step_passes.append(decoder_moe.stats.token_passes.clone())
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # Each position took the same strata one step at a time as in the full pass.
    assert torch.equal(torch.cat(step_passes, 0), full_passes)


def test_expert_load_script_reports_requested_capacity_per_language(smoe_run, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT, subprocess_env

    data, save_dir, _ = smoe_run
    out = tmp_path / "reports" / "new" / "load.json"  # folders that do not exist yet
    proc = subprocess.run(
        [sys.executable, "scripts/expert_load.py", "--path", str(save_dir / "checkpoint_last.pt"),
         "--data", str(data), "--split", "valid", "--cpu", "--json", str(out)],
        cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "requested capacity per target language: b " in proc.stdout
    report = json.loads(out.read_text())["smoe_requested_capacity"]
    assert set(report["by_target_language"]) == {"b", "c"}
    assert all(1.0 <= v <= 2.0 for v in report["by_target_language"].values())
    shares = report["stratum_share"]
    assert shares[0] == 1.0 and sum(shares) == pytest.approx(report["requested_capacity"])
    # I(first-choice expert; target language) per MoE layer; b and c are the targets
    assert "I(expert; target language)" in proc.stdout and "dispatch H" in proc.stdout
    language_mi = json.loads(out.read_text())["target_language_mi"]
    assert language_mi and all(".moe" in name for name in language_mi)
    for d in language_mi.values():
        counts = torch.tensor(d["counts"])
        assert counts.shape[1] == 3 and int(counts.sum()) > 0  # languages a, b, c
        assert 0.0 <= d["mi_bits"] <= d["h_language_bits"] + 1e-9 <= 1.0 + 1e-9
        assert 0.0 <= d["dispatch_entropy_nats"] <= math.log(2) + 1e-9
        assert set(d["expert_entropy_bits_by_language"]) == {"b", "c"}


def test_expert_load_refuses_an_unwritable_json_path_before_routing(tmp_path):
    import subprocess
    import sys

    from conftest import REPO_ROOT, subprocess_env

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "scripts/expert_load.py", "--path", str(tmp_path / "none.pt"),
         "--json", str(blocker / "load.json")],
        cwd=str(REPO_ROOT), env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: --json" in last and "a_file" in last, proc.stderr[-2000:]


def test_flags_reach_the_router(data_bin, tmp_path):
    """--smoe-strata, --smoe-stratum-norm none and --moe-top-k 1 on the command
    line end up in every layer's router, and survive the checkpoint."""
    from fairseq import checkpoint_utils

    from conftest import train_args
    from moe_fairseq.layer.moe_layer import MoELayer

    save_dir = tmp_path / "ckpt"
    run_cli("train", train_args(data_bin, save_dir, "--arch", "smoe_transformer_tiny",
                                "--smoe-strata", "1,3", "--smoe-stratum-norm", "none",
                                "--moe-top-k", "1", max_update=2))
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save_dir / "checkpoint_last.pt")], arg_overrides={"data": str(data_bin)})
    routers = [m.router for m in models[0].modules() if isinstance(m, MoELayer)]
    assert len(routers) == 2
    for r in routers:
        assert r.strata == [1, 3] and r.norms is None
        assert [g.top_k for g in r.gates] == [1, 1]
        assert [g.num_experts for g in r.gates] == [4, 3]
