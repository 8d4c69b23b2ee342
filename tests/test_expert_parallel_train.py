"""Expert-parallel fairseq-train with real processes (gloo, CPU).

A W-process run (each rank holds E / W experts) must reach the same parameters as
a 1-process run that holds every expert and sees the union of the W batches
(``--update-freq W``: fairseq hands rank r the r-th of every W consecutive
batches, exactly the micro-batches the single process accumulates). Checkpoints
hold every expert, so training resumes on another world size and the
1-process ``fairseq-generate`` decodes them.

Resumes happen at epoch boundaries: mid-epoch, fairseq's iterator position is
counted in per-rank batches and cannot carry over to another world size.
"""

import re
import subprocess
import sys

import pytest
import torch

import moe_fairseq  # noqa: F401  (allowlists fairseq's checkpoint types)
from conftest import REPO_ROOT, _tail, run_cli, subprocess_env, train_args

EXACT = [
    "--dropout", "0", "--attention-dropout", "0",
    "--moe-second-expert-policy", "all",
    "--moe-capacity-factor", "1.0",  # some drops: capacity is per rank/micro-batch
    "--lr-scheduler", "fixed",
]


def train(data, save_dir, world: int, tmp_path, *extra, tag: str, ddp="legacy_ddp", check=True):
    """Run fairseq-train on ``world`` processes (1 = plain run); returns rank 0's log
    (or, with ``check=False``, every rank's (exit code, log))."""
    base = [str(a) for a in train_args(data, save_dir, *EXACT, "--ddp-backend", ddp, *extra,
                                       max_update=1000)]
    if world == 1:
        proc = run_cli("train", base)
        return proc.stdout + proc.stderr
    init_file = tmp_path / f"init-{tag}"
    procs = []
    for rank in range(world):
        cmd = [sys.executable, "-m", "fairseq_cli.train", *base,
               "--distributed-backend", "gloo",
               "--distributed-world-size", str(world), "--distributed-rank", str(rank),
               "--distributed-init-method", f"file://{init_file}",
               "--distributed-no-spawn"]
        procs.append(subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=subprocess_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{world}-process training hung ({tag})")
        outs.append(out)
    if not check:
        return [(p.returncode, out) for p, out in zip(procs, outs)]
    failed = [(rank, out) for rank, (p, out) in enumerate(zip(procs, outs)) if p.returncode]
    if failed:
        # A rank that crashed first explains it; its peers only saw the connection drop.
        failed.sort(key=lambda r: "Connection closed by peer" in r[1])
        report = "\n".join(f"--- rank {r} ---\n{_tail(out, 25)}" for r, out in failed)
        pytest.fail(f"{len(failed)} of {world} ranks failed ({tag}):\n{report}", pytrace=False)
    return outs[0]


def params(path):
    # weights-only load; importing moe_fairseq allowlisted the checkpoint's types
    # (torch.serialization.safe_globals() as a context would drop them on exit)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"], state


# The attention key bias has an exactly zero gradient (it shifts every logit of a
# query by the same amount); what it gets is rounding noise, which Adam scales up
# to lr-sized steps, so summing the same gradients in another order moves it by
# ~1e-5. It is held to a looser bound; every other parameter to 1e-5.
NOISE_ONLY = "k_proj.bias"


def assert_same_params(a, b, atol=1e-5, skip=(), rounding_room=False):
    """Same parameters to ``atol``. ``rounding_room``: experts that see their rows in
    other groupings on W ranks (one matmul over all ranks' rows) round differently
    by ~1e-7; a LayerNorm, a renormalised top-2 gate or a ReLU unit near its
    threshold can grow that to a few 1e-5 in a handful of weights (seen: 5 to 14 of
    32768 in one expert FFN), so allow 1e-4 but at most 0.1% of weights past 1e-5.
    A routing or scheduling error moves weights by lr-sized steps (3e-3) instead."""
    ma, _ = params(a)
    mb, _ = params(b)
    assert ma.keys() == mb.keys()
    atol = 1e-4 if rounding_room else atol
    off = total = 0
    for k in ma:
        if k.endswith(skip):
            continue
        assert ma[k].shape == mb[k].shape, k
        tol = 1e-4 if k.endswith(NOISE_ONLY) else atol
        diff = (ma[k].float() - mb[k].float()).abs()
        assert float(diff.max()) <= tol, f"{k}: max |diff| {float(diff.max()):.3g} > {tol}"
        off += int((diff > 1e-5).sum()) if not k.endswith(NOISE_ONLY) else 0
        total += diff.numel()
    if rounding_room:
        assert off <= 1e-3 * total, f"{off} of {total} weights differ by more than 1e-5"


@pytest.mark.parametrize("ddp", ["legacy_ddp", "c10d"])
def test_two_ranks_equal_one_rank_with_union_batches(data_bin, tmp_path, ddp):
    one, two = tmp_path / "one", tmp_path / "two"
    train(data_bin, one, 1, tmp_path, "--max-epoch", "1", "--update-freq", "2", tag="one")
    log = train(data_bin, two, 2, tmp_path, "--max-epoch", "1", tag="two", ddp=ddp)
    assert "experts sharded over 2 ranks" in log
    # fairseq counts params with .expert: each rank holds half of them.
    assert_same_params(one / "checkpoint_last.pt", two / "checkpoint_last.pt")
    model, state = params(two / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] >= 3
    w1 = [v for k, v in model.items() if k.endswith("moe.experts.w1")]
    assert w1 and all(t.size(0) == 4 for t in w1), "checkpoint must hold all 4 experts"
    # the optimizer state of the experts is consolidated too
    opt_state = state["last_optimizer_state"]["state"]
    shapes = {tuple(s["exp_avg"].shape) for s in opt_state.values()}
    assert any(s[0] == 4 and len(s) == 3 for s in shapes)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2), (4, 2)])
def test_resume_on_another_world_size(data_bin, tmp_path, first, second):
    """Epoch 1 on `first` ranks, then resume for epoch 2 on `second` ranks, equals
    the same two phases on one process. Every update sums M = max(first, second)
    micro-batches (W ranks x --update-freq M / W), so the run differs from the
    reference only in where experts live: the model and optimizer state saved by
    one world size must be exactly what the next one resumes from.

    The reference resumes too: fairseq's own resume at an epoch boundary is not
    bit-identical to uninterrupted training (seen with the dense transformer,
    loss 5.083 vs 5.082 on the first resumed update), so that is not the test.
    """
    m = max(first, second)
    run, ref = tmp_path / "run", tmp_path / "ref"
    train(data_bin, run, first, tmp_path, "--max-epoch", "1", "--update-freq", str(m // first),
          tag=f"a{first}")
    log = train(data_bin, run, second, tmp_path, "--max-epoch", "2",
                "--update-freq", str(m // second), tag=f"b{second}")
    assert "Loaded checkpoint" in log
    for epochs in ("1", "2"):
        train(data_bin, ref, 1, tmp_path, "--max-epoch", epochs, "--update-freq", str(m),
              tag=f"ref{epochs}")
    _, state = params(run / "checkpoint_last.pt")
    _, ref_state = params(ref / "checkpoint_last.pt")
    updates = state["optimizer_history"][-1]["num_updates"]
    assert updates == ref_state["optimizer_history"][-1]["num_updates"] and updates >= 2
    assert_same_params(ref / "checkpoint_last.pt", run / "checkpoint_last.pt",
                       rounding_room=True)


def test_two_rank_checkpoint_decodes_on_one_process(data_bin, tmp_path):
    save = tmp_path / "ep"
    train(data_bin, save, 2, tmp_path, "--max-epoch", "2", tag="gen")
    proc = run_cli("generate", [data_bin, "--user-dir", REPO_ROOT / "moe_fairseq",
                                "--path", save / "checkpoint_last.pt", "--beam", "2",
                                "--gen-subset", "test", "--cpu", "--max-tokens", "2000"])
    assert proc.stdout.count("\nH-") + proc.stdout.startswith("H-") == 60


@pytest.mark.parametrize("extra,flag", [
    (["--moe-expert-count", "3"], "--moe-expert-count 3 must be divisible"),
    (["--fp16"], "--fp16-no-flatten-grads"),
])
def test_bad_expert_parallel_configuration_is_one_line(data_bin, tmp_path, extra, flag):
    results = train(data_bin, tmp_path / "bad", 2, tmp_path, "--max-epoch", "1", *extra,
                    tag="bad", check=False)
    for code, log in results:
        assert code != 0
        # torch.distributed prefixes what a rank's exception hook prints with [rankN]:
        errors = [line for line in log.splitlines()
                  if re.match(r"(\[rank\d+\]: )?moe_fairseq: error:", line)]
        assert len(errors) == 1 and flag in errors[0], log[-3000:]
        assert "Traceback" not in log


def test_moec_expert_dropout_is_identical_on_every_rank(data_bin, tmp_path):
    """MoEC with cluster-level expert dropout (0.5: one of two experts kept per
    cluster) under expert parallelism equals one process: every rank must drop the
    same global experts, or routing (and the parameters) would differ. Within the
    first --moec-dropout-interval (250) passes both runs use the same kept set."""
    moec = ["--arch", "moec_transformer_tiny", "--moec-expert-dropout", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(data_bin, one, 1, tmp_path, "--max-epoch", "1", "--update-freq", "2", *moec, tag="m1")
    log = train(data_bin, two, 2, tmp_path, "--max-epoch", "1", *moec, tag="m2")
    assert "router cosine" in log and "experts sharded over 2 ranks" in log
    # dropout_calls counts this process's forward passes: 2 per update on one
    # process with --update-freq 2, 1 per update on each of two ranks.
    assert_same_params(one / "checkpoint_last.pt", two / "checkpoint_last.pt",
                       skip=("router.dropout_calls",))
    model, _ = params(two / "checkpoint_last.pt")
    kept = [v for k, v in model.items() if k.endswith("router.kept_experts")]
    assert kept and all(int(k.sum()) == 2 for k in kept)  # 2 clusters x 1 kept expert


@pytest.mark.parametrize("ddp", ["legacy_ddp", "c10d"])
def test_smoe_two_ranks_equal_one_rank(data_bin, tmp_path, ddp):
    """SMoE (strata 2,2) under expert parallelism equals one process: each rank runs
    both stratum passes even when none of its tokens reaches stratum 1, and the
    per-stratum gates and LayerNorms get identical updates (with c10d, DDP also
    needs every one of them to receive a gradient on every rank)."""
    smoe = ["--arch", "smoe_transformer_tiny"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(data_bin, one, 1, tmp_path, "--max-epoch", "1", "--update-freq", "2", *smoe, tag="s1")
    log = train(data_bin, two, 2, tmp_path, "--max-epoch", "1", *smoe, tag="s2", ddp=ddp)
    assert "router stratified" in log and "experts sharded over 2 ranks" in log
    assert re.search(r"smoe_requested_capacity\W+1\.\d", log)
    assert_same_params(one / "checkpoint_last.pt", two / "checkpoint_last.pt",
                       rounding_room=True)
    model, _ = params(two / "checkpoint_last.pt")
    norms = [k for k in model if re.search(r"moe\.router\.norms\.\d\.weight$", k)]
    assert len(norms) == 4  # post-LN strata: two LayerNorms in each of the two MoE layers


def test_similarity_loss_two_ranks_equal_one_rank(data_bin, tmp_path):
    """--moe-similarity-loss-wt under expert parallelism: each rank computes L_s on
    its own tokens before the all-to-all, as the single process does per
    micro-batch, so the parameters match; and the loss does move them."""
    sim = ["--moe-similarity-loss-wt", "10", "--moe-similarity-beta-s", "1e-3",
           "--moe-similarity-beta-d", "1", "--moe-similarity-sample-tokens", "16"]
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    train(data_bin, one, 1, tmp_path, "--max-epoch", "1", "--update-freq", "2", *sim, tag="l1")
    log = train(data_bin, two, 2, tmp_path, "--max-epoch", "1", *sim, tag="l2")
    assert "experts sharded over 2 ranks" in log and "moe_similarity_loss" in log
    assert_same_params(one / "checkpoint_last.pt", two / "checkpoint_last.pt")
    train(data_bin, plain, 1, tmp_path, "--max-epoch", "1", "--update-freq", "2", tag="l0")
    with pytest.raises(AssertionError):
        assert_same_params(one / "checkpoint_last.pt", plain / "checkpoint_last.pt")


def test_store_ema_two_ranks_equal_one_rank(data_bin, tmp_path):
    """--store-ema under expert parallelism: the EMA copy's experts are sharded like
    the model's, gathered into the checkpoint (all 4 experts) and sliced again on
    resume; 2 ranks keep the same EMA as one process, before and after a resume."""
    ema = ["--store-ema", "--ema-decay", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    for epochs in ("1", "2"):  # the second run resumes from checkpoint_last.pt
        train(data_bin, one, 1, tmp_path, "--max-epoch", epochs, "--update-freq", "2", *ema,
              tag=f"e1-{epochs}")
        train(data_bin, two, 2, tmp_path, "--max-epoch", epochs, *ema, tag=f"e2-{epochs}")
        _, s1 = params(one / "checkpoint_last.pt")
        model, s2 = params(two / "checkpoint_last.pt")
        e1, e2 = s1["extra_state"]["ema"], s2["extra_state"]["ema"]
        assert e1.keys() == e2.keys() == model.keys()
        for k in e1:
            assert e1[k].shape == e2[k].shape == model[k].shape, k
            tol = 1e-4 if k.endswith(NOISE_ONLY) else 1e-5
            assert float((e1[k].float() - e2[k].float()).abs().max()) <= tol, k
        # the EMA trails the model: it is not a copy of it
        w1 = [k for k in model if k.endswith("moe.experts.w1")]
        assert w1 and all(e2[k].size(0) == 4 for k in w1)
        assert any(float((e2[k] - model[k]).abs().max()) > 1e-4 for k in w1)


def test_ema_fp32_is_refused_with_expert_parallelism(data_bin, tmp_path):
    results = train(data_bin, tmp_path / "bad", 2, tmp_path, "--max-epoch", "1", "--store-ema",
                    "--ema-fp32", tag="emafp32", check=False)
    for code, log in results:
        assert code != 0
        errors = [line for line in log.splitlines()
                  if re.match(r"(\[rank\d+\]: )?moe_fairseq: error:", line)]
        assert len(errors) == 1 and "--ema-fp32" in errors[0], log[-3000:]


def test_expert_parallel_checkpoints_average_like_any_other(data_bin, tmp_path):
    """Each checkpoint of a 2-rank run holds all experts: scripts/average_checkpoints.py
    averages them as it does single-process ones."""
    two = tmp_path / "two"
    train(data_bin, two, 2, tmp_path, "--max-epoch", "1", "--save-interval-updates", "1",
          tag="avg")
    names = sorted(p.name for p in two.glob("checkpoint_1_*.pt"))[-2:]
    assert len(names) == 2
    out = tmp_path / "avg.pt"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "average_checkpoints.py"),
                           "--inputs", *[str(two / n) for n in names], "--output", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    avg, _ = params(out)
    a, _ = params(two / names[0])
    b, _ = params(two / names[1])
    w1 = [k for k in avg if k.endswith("moe.experts.w1")]
    assert w1 and all(avg[k].size(0) == 4 for k in w1)
    for k in avg:
        if avg[k].is_floating_point():
            assert torch.equal(avg[k], ((a[k].double() + b[k].double()) / 2).to(avg[k].dtype)), k
