"""Shared fixtures for the end-to-end tests: tiny synthetic parallel data,
binarized once per session with ``fairseq-preprocess``, and helpers that run the
fairseq command-line tools as real subprocesses."""

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_DIR = REPO_ROOT / "moe_fairseq"

# In-process tests import the plugin; make that work wherever pytest is started.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VOCAB = [f"w{i:02d}" for i in range(30)]
N_TRAIN, N_VALID, N_TEST = 600, 60, 60

# A fixed word -> word dictionary (a permutation of VOCAB), for the second
# direction of the multilingual data.
_perm = VOCAB[:]
random.Random(1234).shuffle(_perm)
WORD_MAP = dict(zip(VOCAB, _perm))


def _sentences(n: int, seed: int) -> List[List[str]]:
    rng = random.Random(seed)
    return [[rng.choice(VOCAB) for _ in range(rng.randint(3, 8))] for _ in range(n)]


def reverse(words: Sequence[str]) -> List[str]:
    return list(reversed(words))


def word_map(words: Sequence[str]) -> List[str]:
    return [WORD_MAP[w] for w in words]


def _write(path: Path, sents: List[List[str]]) -> None:
    path.write_text("".join(" ".join(s) + "\n" for s in sents), encoding="utf-8")


def _splits():
    return {
        "train": _sentences(N_TRAIN, 1),
        "valid": _sentences(N_VALID, 2),
        "test": _sentences(N_TEST, 3),
    }


# --------------------------------------------------------------------- subprocess


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        PYTHONHASHSEED="0",
    )
    # fairseq's --user-dir must be the only way the plugin gets in; do not
    # let an inherited PYTHONPATH put the repo first, nor the installed autoload
    # (tests of the autoload turn it back on).
    env.pop("PYTHONPATH", None)
    env["MOE_FAIRSEQ_AUTOLOAD"] = "0"
    return env


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_cli(
    tool: str,
    args: Sequence,
    cwd: Optional[Path] = None,
    check: bool = True,
    timeout: float = 300,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m fairseq_cli.<tool> ARGS`` and return the completed process
    (``stdout``/``stderr`` as text). With ``check``, a non-zero exit fails the test
    with the tail of both streams; ``env`` adds to :func:`subprocess_env`."""
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)]
    proc = subprocess.run(
        cmd,
        cwd=str(cwd or REPO_ROOT),
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited with {proc.returncode}\n"
            f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n"
            f"--- stderr (tail) ---\n{_tail(proc.stderr)}",
            pytrace=False,
        )
    return proc


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def log_records(output: str, tag: str) -> List[dict]:
    """The stats records a ``--log-format json`` fairseq run logged under ``tag``
    (``train_inner``, ``train``, ``valid``), values converted to float."""
    marker = f"| {tag} | "
    records = []
    for line in output.splitlines():
        pos = line.find(marker)
        if pos < 0:
            continue
        message = line[pos + len(marker):].strip()
        if message.startswith("{"):
            records.append({k: _number(v) for k, v in json.loads(message).items()})
    return records


def train_args(
    data: Path,
    save_dir: Path,
    *extra,
    user_dir=USER_DIR,
    max_update: int = 6,
    log_interval: int = 2,
    validate: bool = False,
) -> list:
    """``fairseq-train`` arguments for the tiny MoE model on CPU, json logs."""
    return [
        data,
        "--user-dir", user_dir,
        "--task", "translation",
        "--arch", "moe_transformer_tiny",
        "--criterion", "moe_label_smoothed_cross_entropy",
        "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "3e-3",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--max-tokens", "1000",
        "--max-update", max_update,
        "--save-dir", save_dir,
        "--cpu", "--num-workers", "0", "--seed", "1",
        "--log-format", "json", "--log-interval", log_interval,
        "--no-progress-bar",
        "--no-epoch-checkpoints",
        *([] if validate else ["--disable-validation"]),
        *extra,
    ]


def first_test_batch(path, data, **overrides):
    """Load checkpoint ``path`` (eval mode; ``overrides`` such as source_lang/target_lang
    go to the task) and run the first batch of the test split: ``(model, decoder output
    [B, T, V], mask [B, T] of the real target positions)``."""
    import torch
    from fairseq import checkpoint_utils, utils

    import moe_fairseq  # noqa: F401

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data), **overrides})
    model = models[0].eval()
    task.load_dataset("test")
    itr = task.get_batch_iterator(
        dataset=task.dataset("test"), max_tokens=2000,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
    ).next_epoch_itr(shuffle=False)
    sample = next(iter(itr))
    with torch.no_grad():
        out = model(**sample["net_input"])[0]
    return model, out, sample["target"].ne(task.target_dictionary.pad())


def moe_namespace(layers: int, router: str, **overrides):
    """Parsed-args stand-in: ``layers`` encoder and decoder layers, ``--moe-router
    router``, ``overrides`` set, then the MoE defaults (8 experts) fill the rest."""
    from moe_fairseq.options import moe_defaults

    args = argparse.Namespace(encoder_layers=layers, decoder_layers=layers, moe_router=router)
    for k, v in overrides.items():
        setattr(args, k, v)
    moe_defaults(args, 8)
    return args


# --------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory) -> Path:
    """Binarized "reverse the sentence" data, src -> tgt, joined dictionary."""
    root = tmp_path_factory.mktemp("reverse_data")
    raw = root / "raw"
    raw.mkdir()
    for split, sents in _splits().items():
        _write(raw / f"{split}.src", sents)
        _write(raw / f"{split}.tgt", [reverse(s) for s in sents])
    dest = root / "bin"
    run_cli(
        "preprocess",
        [
            "--source-lang", "src", "--target-lang", "tgt",
            "--trainpref", raw / "train", "--validpref", raw / "valid",
            "--testpref", raw / "test",
            "--destdir", dest, "--joined-dictionary", "--workers", "1",
        ],
    )
    assert (dest / "dict.src.txt").read_text() == (dest / "dict.tgt.txt").read_text()
    return dest


@pytest.fixture(scope="session")
def multilingual_data_bin(tmp_path_factory) -> Path:
    """Two directions sharing one dictionary: a -> b reverses, a -> c maps each
    word through WORD_MAP. Both pairs are binarized into the same directory."""
    root = tmp_path_factory.mktemp("multi_data")
    raw = root / "raw"
    raw.mkdir()
    # Different sentences for the two pairs, so the pairs are separate corpora.
    splits_ab = _splits()
    splits_ac = {
        "train": _sentences(N_TRAIN // 2, 11),
        "valid": _sentences(N_VALID, 12),
        "test": _sentences(N_TEST, 13),
    }
    for split in splits_ab:
        _write(raw / f"{split}.a-b.a", splits_ab[split])
        _write(raw / f"{split}.a-b.b", [reverse(s) for s in splits_ab[split]])
        _write(raw / f"{split}.a-c.a", splits_ac[split])
        _write(raw / f"{split}.a-c.c", [word_map(s) for s in splits_ac[split]])
    dest = root / "bin"

    def prefs(pair):
        return [
            "--trainpref", raw / f"train.{pair}", "--validpref", raw / f"valid.{pair}",
            "--testpref", raw / f"test.{pair}",
        ]

    run_cli(
        "preprocess",
        ["--source-lang", "a", "--target-lang", "b", *prefs("a-b"),
         "--destdir", dest, "--joined-dictionary", "--workers", "1"],
    )
    shared = dest / "dict.a.txt"
    run_cli(
        "preprocess",
        ["--source-lang", "a", "--target-lang", "c", *prefs("a-c"),
         "--destdir", dest, "--srcdict", shared, "--tgtdict", shared, "--workers", "1"],
    )
    # Every language's dictionary is the shared one (WORD_MAP permutes VOCAB).
    assert (dest / "dict.c.txt").read_text() == shared.read_text()
    assert (dest / "dict.b.txt").read_text() == shared.read_text()
    return dest


# --------------------------------------------------------------------- training


class TrainedRun:
    """A finished ``fairseq-train`` run: its data, save dir, logs and TB dir."""

    def __init__(self, data: Path, save_dir: Path, tb_dir: Path, proc, max_update: int):
        self.data = data
        self.save_dir = save_dir
        self.tb_dir = tb_dir
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.max_update = max_update

    @property
    def checkpoint_last(self) -> Path:
        return self.save_dir / "checkpoint_last.pt"


TRAINED_MAX_UPDATE = 42  # 5 updates per epoch: the last checkpoint is mid-epoch 9


@pytest.fixture(scope="session")
def trained(data_bin, tmp_path_factory) -> TrainedRun:
    """The tiny MoE model trained for a few dozen updates (json log, validation
    every epoch, TensorBoard logging); shared by the generate/resume/decoding tests."""
    root = tmp_path_factory.mktemp("trained")
    save_dir, tb_dir = root / "checkpoints", root / "tb"
    args = train_args(
        data_bin, save_dir,
        "--moe-expert-count", "4", "--moe-freq", "2",
        "--tensorboard-logdir", tb_dir,
        max_update=TRAINED_MAX_UPDATE,
        log_interval=5,
        validate=True,
    )
    proc = run_cli("train", args)
    return TrainedRun(data_bin, save_dir, tb_dir, proc, TRAINED_MAX_UPDATE)


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        # make test runs one pytest process per core: each computes on its share.
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device (skips with a reason without one; make gpu-check)")


def opcheck_every(calls) -> dict:
    """``torch.library.opcheck`` on each custom op of ``calls`` (op -> list of argument
    tuples): schema, fake implementation against the real one, autograd registration,
    AOT dispatch. Returns the op names with the number of argument sets checked."""
    import torch

    done = {}
    for op, arg_sets in calls.items():
        for args in arg_sets:
            torch.library.opcheck(op, args)
        done[op._name] = len(arg_sets)
    return done
