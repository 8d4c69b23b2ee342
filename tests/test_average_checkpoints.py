"""scripts/average_checkpoints.py on checkpoints of real fairseq-train runs (MoE, MoEC
with expert dropout, whose integer/boolean buffers change during training), decoded with
fairseq-generate afterwards; bad inputs end in one line naming the file."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, USER_DIR, run_cli, subprocess_env, train_args

NAMES = ["checkpoint_1_2.pt", "checkpoint_1_4.pt", "checkpoint_2_6.pt"]  # oldest first
# MoEC's preset has no expert dropout at tiny size: turn it on, redrawn at every call,
# so dropout_calls and kept_experts differ between the checkpoints.
EXTRA = {"moe_transformer_tiny": [],
         "moec_transformer_tiny": ["--moec-expert-dropout", "0.5", "--moec-dropout-interval", "1"]}


def average(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "average_checkpoints.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


def average_in_process(capsys, *args):
    """The script's main() in this process (no 3 s start-up): (exit status, stderr)."""
    spec = importlib.util.spec_from_file_location(
        "average_checkpoints_script", REPO_ROOT / "scripts" / "average_checkpoints.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    status = script.main([str(a) for a in args])
    return status, capsys.readouterr().err


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    """``trained(arch)``: the save dir of a 6-update run saving every 2 updates (trained
    once per module)."""
    done = {}

    def get(arch):
        if arch not in done:
            save = tmp_path_factory.mktemp(arch)
            run_cli("train", train_args(data_bin, save, "--arch", arch, *EXTRA[arch],
                                        "--save-interval-updates", "2", max_update=6))
            done[arch] = save
        return done[arch]

    return get


@pytest.fixture(params=list(EXTRA))
def run(request, trained):
    return trained(request.param)


def mean_in_order(models, key):
    total = models[0][key].double()
    for m in models[1:]:
        total = total + m[key].double()
    return (total / len(models)).to(models[0][key].dtype)


def test_average_is_the_mean_of_the_weights_and_decodes(run, data_bin):
    out = run / "avg.pt"
    proc = average("--inputs", run, "--num-update-checkpoints", "3", "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert [p.split("/")[-1] for p in listed] == NAMES
    assert proc.stdout.splitlines()[-1].endswith(NAMES[-1])  # fields from the newest
    states = [load(run / n) for n in NAMES]
    inputs = [s["model"] for s in states]
    avg = load(out)
    assert "last_optimizer_state" not in avg
    assert avg["optimizer_history"] == states[-1]["optimizer_history"]
    assert avg["extra_state"]["train_iterator"] == states[-1]["extra_state"]["train_iterator"]
    assert avg["cfg"] == states[-1]["cfg"]
    assert avg["model"].keys() == inputs[-1].keys()
    buffers = 0
    for key, value in avg["model"].items():
        assert value.dtype == inputs[-1][key].dtype, key
        if value.is_floating_point():
            assert torch.equal(value, mean_in_order(inputs, key)), key
        else:  # counters and masks (MoEC's dropout_calls, kept_experts) come from the newest
            assert torch.equal(value, inputs[-1][key]), key
            buffers += 1
    if "moec" in run.name:
        # The case fairseq's script fails on, and why equality is not required: these
        # buffers legitimately differ between checkpoints of one run.
        assert buffers and any(k.endswith("kept_experts") and v.dtype == torch.bool
                               for k, v in avg["model"].items())
        calls = [k for k in avg["model"] if k.endswith("dropout_calls")]
        assert calls and [int(m[calls[0]]) for m in inputs] == [2, 4, 6]
    gen = run_cli("generate", [data_bin, "--user-dir", USER_DIR, "--path", out, "--cpu",
                               "--max-tokens", "2000", "--beam", "2"])
    assert "Generate test with beam=2" in gen.stdout + gen.stderr


def test_the_newest_gives_the_fields_whatever_the_order(run, tmp_path):
    """fairseq keeps the first input's fields; here the newest (most updates) wins, so
    listing the files newest first (fairseq's own order) or oldest first is the same."""
    order = [NAMES[2], NAMES[0], NAMES[1]]
    out = tmp_path / "new" / "folder" / "avg.pt"  # missing folders are created
    proc = average("--inputs", *[run / n for n in order], "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    avg, newest = load(out), load(run / NAMES[2])
    inputs = [load(run / n)["model"] for n in order]
    assert avg["extra_state"]["averaged_checkpoints"]["fields_from"] == str(run / NAMES[2])
    assert avg["optimizer_history"] == newest["optimizer_history"]
    for key, value in avg["model"].items():
        expected = mean_in_order(inputs, key) if value.is_floating_point() else newest["model"][key]
        assert torch.equal(value, expected), key


def test_averaging_one_checkpoint_with_itself_changes_nothing(run, tmp_path):
    one = run / "checkpoint_1_4.pt"
    proc = average("--inputs", one, one, one, "--output", tmp_path / "same.pt")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = load(one)["model"]
    b = load(tmp_path / "same.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(a[k].dtype == b[k].dtype for k in a)


def test_bad_inputs_end_in_one_line(trained, tmp_path, capsys):
    moe, moec = trained("moe_transformer_tiny"), trained("moec_transformer_tiny")
    good = moe / "checkpoint_1_2.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    state = load(good)
    key = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][key] = torch.zeros(3, 3)
    reshaped = tmp_path / "reshaped.pt"
    torch.save(state, reshaped)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    out = tmp_path / "out.pt"
    cases = [
        ([good, truncated], "", f"checkpoint {truncated} is truncated or corrupt"),
        ([good, empty], "", f"checkpoint {empty} is empty (0 bytes)"),
        ([good, tmp_path / "none.pt"], "", f"checkpoint {tmp_path / 'none.pt'} does not exist"),
        ([good, moec / "checkpoint_1_2.pt"], "", f"{moec / 'checkpoint_1_2.pt'} and {good} hold "
         "different parameters"),
        ([good, reshaped], "", f"{key!r} is (3, 3) torch.float32 in {reshaped} but"),
        ([good, foreign], "", f"{foreign} is not a fairseq checkpoint"),
        ([moe], "", f"--inputs {moe} is a folder: add --num-epoch-checkpoints N"),
        ([moe, "--num-update-checkpoints", "9"], "",
         f"--num-update-checkpoints 9: {moe} has 3 checkpoint_<epoch>_<update>.pt files"),
        ([moe, "--num-epoch-checkpoints", "1"], "",
         f"--num-epoch-checkpoints 1: {moe} has 0 checkpoint<epoch>.pt files"),
        # the output is checked before any input is read (this one does not exist)
        ([tmp_path / "none.pt"], a_file / "avg.pt", f"{a_file} is a file, not a folder"),
    ]
    # Two cases as a user runs them (a subprocess: the last stderr line, no traceback);
    # all of them in this process, where main() is the same code without the start-up.
    for inputs, output, says in cases[0], cases[-1]:
        proc = average("--inputs", *inputs, "--output", output or out)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1, proc.stderr[-1500:]
        assert lines[-1].startswith("average_checkpoints.py: error: ") and says in lines[-1], \
            (says, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr
    for inputs, output, says in cases:
        status, err = average_in_process(capsys, "--inputs", *inputs, "--output", output or out)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 1 and len(lines) == 1, err[-1500:]
        assert lines[0].startswith("average_checkpoints.py: error: ") and says in lines[0], \
            (says, err[-1500:])
    assert not list(tmp_path.glob("out.pt*"))  # nothing half-written
