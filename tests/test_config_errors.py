"""Bad MoE configurations are refused at start-up by ``fairseq-train`` with one
``moe_fairseq: error: ...`` line naming the flag, and no Python traceback.

All cases run as real subprocesses; they are started together (a few at a time)
because each one is dominated by interpreter and fairseq import time."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_cli, train_args

ERROR_PREFIX = "moe_fairseq: error:"

# id -> (extra fairseq-train arguments, flags the error line must name)
BAD_CONFIGS = {
    "top2-with-one-expert": (["--moe-top-k", "2", "--moe-expert-count", "1"],
                             ["--moe-top-k", "--moe-expert-count"]),
    "top-k-3": (["--moe-top-k", "3"], ["--moe-top-k"]),
    "capacity-factor-inf": (["--moe-capacity-factor", "inf"], ["--moe-capacity-factor"]),
    "capacity-factor-negative": (["--moe-capacity-factor", "-1"], ["--moe-capacity-factor"]),
    "eval-capacity-fraction-1.5": (["--moe-eval-capacity-token-fraction", "1.5"],
                                   ["--moe-eval-capacity-token-fraction"]),
    "second-expert-policy-bogus": (["--moe-second-expert-policy", "bogus"],
                                   ["--moe-second-expert-policy"]),
    "freq-past-layers": (["--moe-freq", "5", "--encoder-layers", "2", "--decoder-layers", "2"],
                         ["--moe-freq"]),
    "freq-0": (["--moe-freq", "0"], ["--moe-freq"]),
    "router-nope": (["--moe-router", "nope"], ["--moe-router"]),
    "normalize-gates-top1": (["--moe-normalize-gates", "--moe-top-k", "1"],
                             ["--moe-normalize-gates"]),
    "jitter-eps-1.5": (["--moe-jitter-eps", "1.5"], ["--moe-jitter-eps"]),
    "gate-loss-wt-negative": (["--moe-gate-loss-wt", "-1"], ["--moe-gate-loss-wt"]),
    "gate-loss-wt-inf": (["--moe-gate-loss-wt", "inf"], ["--moe-gate-loss-wt"]),
    "z-loss-wt-nan": (["--moe-router-z-loss-wt", "nan"], ["--moe-router-z-loss-wt"]),
    "capacity-factor-nan": (["--moe-capacity-factor", "nan"], ["--moe-capacity-factor"]),
    "eval-capacity-fraction-inf": (["--moe-eval-capacity-token-fraction", "inf"],
                                   ["--moe-eval-capacity-token-fraction"]),
    "moec-var-coef-nan": (["--arch", "moec_transformer_tiny", "--moec-var-coef", "nan"],
                          ["--moec-var-coef"]),
    "smoe-strata-sum": (["--arch", "smoe_transformer_tiny", "--moe-expert-count", "4",
                         "--smoe-strata", "2,3"], ["--smoe-strata", "--moe-expert-count"]),
    "smoe-strata-malformed": (["--arch", "smoe_transformer_tiny", "--smoe-strata", "2;2"],
                              ["--smoe-strata"]),
    "smoe-top2-past-last-stratum": (["--arch", "smoe_transformer_tiny", "--smoe-strata", "3,1"],
                                    ["--moe-top-k", "--smoe-strata"]),
    "smoe-strata-without-router": (["--smoe-strata", "2,2"], ["--smoe-strata", "--moe-router"]),
    "stratified-without-strata": (["--moe-router", "stratified"], ["--smoe-strata"]),
    "moec-mixing-with-top2": (["--arch", "moec_transformer_tiny", "--moe-top-k", "2"],
                              ["--moec-output-mixing", "--moe-top-k"]),
    "moec-mixing-linear-router": (["--moec-output-mixing", "--moe-top-k", "1"],
                                  ["--moec-output-mixing", "--moe-router"]),
    "expert-sublayers-0": (["--moec-expert-sublayers", "0"], ["--moec-expert-sublayers"]),
    "encoder-layers-past-stack": (["--moe-encoder-layers", "3"], ["--moe-encoder-layers"]),
    "capacity-rule-bogus": (["--moe-capacity-rule", "bogus"], ["--moe-capacity-rule"]),
    "smoe-stratum-norm-bogus": (["--arch", "smoe_transformer_tiny", "--smoe-stratum-norm", "pre"],
                                ["--smoe-stratum-norm"]),
    "gate-loss-combine-bogus": (["--moe-gate-loss-combine-method", "max"],
                                ["--moe-gate-loss-combine-method"]),
}


@pytest.fixture(scope="module")
def bad_runs(data_bin, tmp_path_factory):
    """case id -> (completed fairseq-train process, its --save-dir)."""
    root = tmp_path_factory.mktemp("config_errors")

    def run(case):
        extra, _flags = BAD_CONFIGS[case]
        save_dir = root / case
        proc = run_cli("train", train_args(data_bin, save_dir, *extra, max_update=2),
                       check=False, timeout=120)
        return case, (proc, save_dir)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, BAD_CONFIGS))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fails_with_one_line(bad_runs, case):
    proc, save_dir = bad_runs[case]
    _extra, flags = BAD_CONFIGS[case]
    context = f"\n--- stdout tail ---\n{proc.stdout[-2000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"

    assert proc.returncode != 0, "fairseq-train accepted a bad configuration" + context
    assert "Traceback" not in proc.stderr, context
    errors = [l for l in proc.stderr.splitlines() if l.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, context
    for flag in flags:
        assert flag in errors[0], f"{flag!r} not named in {errors[0]!r}"
    # Refused at start-up: no training began and nothing was saved.
    assert "begin training epoch" not in proc.stdout, context
    assert not save_dir.exists() or not any(save_dir.iterdir())


def test_good_config_is_accepted(data_bin, tmp_path):
    """Control: the same command line with allowed values next to the refused
    ones trains, so the failures above come from the bad values alone."""
    proc = run_cli(
        "train",
        train_args(
            data_bin, tmp_path / "ckpt",
            "--moe-top-k", "2", "--moe-expert-count", "2", "--moe-freq", "1",
            "--moe-eval-capacity-token-fraction", "-1", "--moe-capacity-factor", "0.5",
            "--moe-second-expert-policy", "random", "--moe-normalize-gates",
            "--moe-jitter-eps", "0.1", "--moe-gate-loss-wt", "0",
            "--moe-capacity-rule", "per-slot", "--moe-eval-second-expert-policy", "sampling",
            "--moe-normalize-gate-prob-before-dropping", "--moec-expert-sublayers", "2",
            "--moe-gate-loss-combine-method", "sum",
            "--no-save", max_update=1,
        ),
    )
    assert proc.returncode == 0
    assert ERROR_PREFIX not in proc.stderr
    assert "MoE layers: encoder [1, 2], decoder [1, 2] (1-based), 2 experts, top-2" in proc.stdout
    assert "Stopping training due to num_updates: 1 >= max_update: 1" in proc.stdout
