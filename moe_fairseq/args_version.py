"""Which rules fill the MoE flags a model namespace leaves unset: its *args version*.

fairseq leaves every model flag the user did not name out of a fresh command line's
namespace (``argparse.SUPPRESS``), and the architecture functions fill them. A
checkpoint records the filled namespace. So the rules that fill a namespace must come
from what the namespace *records*, never from which flags happen to be missing:

- a fresh command line records nothing: it gets :data:`ARGS_VERSION`, the current rules,
  whatever MoE flags it names (the preset's rules hold, a named flag overrides that one
  setting);
- the architecture functions write ``moe_args_version`` into the namespace, so every
  checkpoint written from now on records its version;
- checkpoints written before the version existed are stamped when they are loaded
  (:func:`stamp_checkpoint_args`), from what their complete namespace holds;
- ``fairseq-train`` resuming a checkpoint (``checkpoint_last.pt`` or ``--restore-file``)
  takes the checkpoint's version and the MoE settings it records for every MoE flag the
  command line does not name (:func:`adopt_resumed_rules`): an upgrade of the plugin
  never changes the model a run is training;
- ``fairseq-train --finetune-from-model`` of a checkpoint written by a conversion tool
  (``upcycle.py``, ``prune_experts.py``, ``average_checkpoints.py``) takes, for every
  model flag the command line does not name, the value the checkpoint records
  (:func:`adopt_converted_model`): no training command line describes such a model
  (an upcycled one has the dense model's widths, a pruned one per-layer expert
  counts), so the checkpoint is the description; named flags still win.

Versions:

| version | written by | rules |
| --- | --- | --- |
| 1 | the code before the fidelity flags (up to c8693dc) | raw top-2 gates (``--moe-normalize-gates`` meant before dropping), ``joint`` capacity, SMoE ``gate-input`` LayerNorm, no MoEC output mixing, plain experts, seq-major capacity priority |
| 2 | the fidelity flags (up to f8eaf4f) | its namespaces record every flag; seq-major capacity priority |
| 3 | presets that hold on every command line | batch-major capacity priority (``--moe-token-order``) |
"""

import argparse
import logging
import os
from typing import Optional

from .errors import OneLineError

logger = logging.getLogger(__name__)

ARGS_VERSION = 3
ARGS_VERSION_KEY = "moe_args_version"
# Prefixes of the flags a resumed checkpoint's settings are taken for.
MOE_FLAG_PREFIXES = ("moe_", "moec_", "smoe_", "cmr_")
# fairseq flags that a preset sets (SMoE: pre-norm) and a checkpoint records.
PRESET_FAIRSEQ_FLAGS = ("encoder_normalize_before", "decoder_normalize_before")


def is_moe_namespace(args) -> bool:
    """A namespace of an MoE model: the architecture functions always fill this flag."""
    return isinstance(args, argparse.Namespace) and getattr(args, "moe_expert_count", None) is not None


def recorded_version(args) -> Optional[int]:
    """The version a namespace records, or None (a fresh command line)."""
    return getattr(args, ARGS_VERSION_KEY, None)


def apply_args_version(args: argparse.Namespace) -> bool:
    """Fill the flags that the rules of the namespace's version set differently from
    today's and record the version in the namespace. Returns True for a fresh command
    line (a namespace that recorded no version and resumes no checkpoint).

    Only unset flags (missing or None) are filled: a value the namespace holds, named
    by the user or recorded by a checkpoint, is kept. Architecture functions call this
    before filling the preset's values.
    """
    fresh = recorded_version(args) is None
    if fresh:
        fresh = not (adopt_resumed_rules(args) or adopt_converted_model(args))
    version = recorded_version(args) or ARGS_VERSION
    if version > ARGS_VERSION:
        raise OneLineError(
            f"this model was written by a newer moe_fairseq (MoE args version {version}; this "
            f"one knows up to {ARGS_VERSION}): update the plugin to load it"
        )
    if version < 2:
        _fill_version_1(args)
    if version < 3:
        set_defaults(args, moe_token_order="seq-major")
    setattr(args, ARGS_VERSION_KEY, version)
    return fresh


def set_defaults(args: argparse.Namespace, **values) -> None:
    """Set each flag the user (or an older checkpoint) left unset (None or missing)."""
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def _fill_version_1(args: argparse.Namespace) -> None:
    """The rules of the code before the fidelity flags, for the flags it did not have."""
    normalize = bool(getattr(args, "moe_normalize_gates", False))
    # Version 1's --moe-normalize-gates renormalized before capacity dropping.
    set_defaults(
        args,
        moe_normalize_gates=normalize,
        moe_normalize_gate_prob_before_dropping=normalize,
        moe_capacity_rule="joint",
        moe_eval_second_expert_policy="all",
        moe_output_dropout=True,
        moec_output_mixing=False,
        moec_expert_sublayers=1,
    )
    if getattr(args, "smoe_strata", None) is not None:
        old = getattr(args, "smoe_stratum_layernorm", True)
        set_defaults(args, smoe_stratum_norm="gate-input" if old in (None, True) else "none")
    # Version 1 placed MoE layers by --moe-freq only, which its namespaces record, so
    # the MoEC base/big preset's --moe-freq 4 does not apply to them.


def stamp_checkpoint_args(args, version: Optional[int] = None) -> None:
    """Record the version of a loaded checkpoint's model namespace that has none.

    A checkpoint records the namespace its architecture function filled, so every flag
    its code had is there: one without ``moe_capacity_rule`` was written before the
    fidelity flags existed (version 1), one with it by version 2. ``version``: known
    otherwise (read from the file before fairseq applied ``--model-overrides``).
    """
    if not is_moe_namespace(args) or recorded_version(args) is not None:
        return
    if version is None:
        version = 2 if hasattr(args, "moe_capacity_rule") else 1
    setattr(args, ARGS_VERSION_KEY, version)


# ----------------------------------------------------------------- resuming training


def resume_checkpoint_path(args) -> Optional[str]:
    """The checkpoint ``fairseq-train`` will resume from, as its ``load_checkpoint``
    picks it (``--restore-file``, default ``SAVE_DIR/checkpoint_last.pt``), if that
    file exists; None otherwise."""
    restore = getattr(args, "restore_file", None)
    save_dir = getattr(args, "save_dir", None)
    if restore is None or save_dir is None:
        return None
    suffix = getattr(args, "checkpoint_suffix", "") or ""
    if restore == "checkpoint_last.pt":
        path = os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    else:
        path = restore.replace(".pt", suffix + ".pt") if suffix else restore
    if "://" in path or not os.path.isfile(path):
        return None
    return path


def model_namespace(state) -> Optional[argparse.Namespace]:
    """The model namespace a checkpoint's contents record (``cfg.model``, else the
    legacy ``args``), stamped with its version; None if they record none."""
    from .fairseq_fixes.checkpoint_compat import restore_namespaces

    if not isinstance(state, dict):
        return None
    model = (state.get("cfg") or {}).get("model")
    if model is None:
        model = state.get("args")
    model = restore_namespaces(model) if isinstance(model, dict) else model
    if not isinstance(model, argparse.Namespace):
        return None
    stamp_checkpoint_args(model)
    return model


def read_model_args(path: str) -> Optional[argparse.Namespace]:
    """The model namespace a checkpoint records (weights-only, memory-mapped: the
    tensors are not read), stamped with its version; None if it records none."""
    from .fairseq_fixes.checkpoint_compat import load_plain_state

    return model_namespace(load_plain_state(path))


def adopt_resumed_rules(args: argparse.Namespace) -> bool:
    """A fresh training command line that resumes an MoE checkpoint takes the
    checkpoint's args version and, for each MoE flag it does not name, the value the
    checkpoint records (plus SMoE's pre-norm, which the preset sets). Logs what it took
    that the command line alone would have set otherwise (called before the presets
    fill anything, so that is everything it took). Returns whether it did."""
    if recorded_version(args) is not None:
        return False
    path = resume_checkpoint_path(args)
    if path is None:
        return False
    try:
        recorded = read_model_args(path)
    except Exception as exc:  # fairseq's own load reports an unreadable file by name
        logger.warning("could not read the MoE settings of %s before resuming it: %s", path, exc)
        return False
    if recorded is None or not is_moe_namespace(recorded):
        return False
    if getattr(recorded, "arch", None) not in (None, getattr(args, "arch", None)):
        # Another model: its settings are not this one's. The load then says what
        # differs (fairseq_fixes/checkpoint_fit.py), unless the shapes happen to fit.
        logger.warning("resuming %s, a %s checkpoint, with --arch %s: the checkpoint's MoE "
                       "settings are not taken", path, recorded.arch, args.arch)
        return False
    taken = []
    for name, value in vars(recorded).items():
        if not (name.startswith(MOE_FLAG_PREFIXES) or name in PRESET_FAIRSEQ_FLAGS):
            continue
        if getattr(args, name, None) is None:
            setattr(args, name, value)
            if name != ARGS_VERSION_KEY and value is not None:
                taken.append(f"{name}={value}")
    setattr(args, ARGS_VERSION_KEY, recorded_version(recorded))
    logger.info("resuming %s (MoE args version %d): MoE settings the command line does not "
                "name are the checkpoint's: %s", path, recorded_version(recorded),
                ", ".join(taken) or "none")
    return True


# extra_state keys the conversion tools write (scripts/upcycle.py, prune_experts.py,
# average_checkpoints.py), and what to call the tool in messages.
CONVERTED_BY = {"upcycled_from": "upcycle.py", "pruned_from": "prune_experts.py",
                "averaged_checkpoints": "average_checkpoints.py"}


def converted_by(state) -> Optional[str]:
    """The conversion tool that wrote a checkpoint's ``state`` (None: fairseq-train)."""
    extra = state.get("extra_state") if isinstance(state, dict) else None
    for key, tool in CONVERTED_BY.items():
        if isinstance(extra, dict) and key in extra:
            return tool
    return None


def _model_flag_names(arch: str) -> set:
    """The model's own flags (its ``add_args``), not the training flags the namespace
    also holds."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    model_class = ARCH_MODEL_REGISTRY.get(arch)
    if model_class is None or not hasattr(model_class, "add_args"):
        return set()
    parser = argparse.ArgumentParser(add_help=False)
    model_class.add_args(parser)
    return {a.dest for a in parser._actions if a.dest != "help"}


def adopt_converted_model(args: argparse.Namespace) -> bool:
    """``fairseq-train --finetune-from-model CKPT`` (fairseq fine-tunes only when the
    save dir has no checkpoint to resume) where CKPT was written by a conversion tool:
    every model flag the command line does not name takes CKPT's value, so the model
    built fits CKPT. Logs what it took. Returns whether it did."""
    path = getattr(args, "finetune_from_model", None)
    if not path or resume_checkpoint_path(args) is not None or "://" in path \
            or not os.path.isfile(path):
        return False
    from .fairseq_fixes.checkpoint_compat import load_plain_state

    try:
        state = load_plain_state(path)
    except Exception:  # noqa: BLE001 - fairseq's own load reports an unreadable file by name
        return False
    tool = converted_by(state)
    model = model_namespace(state) if tool else None
    if model is None:
        return False
    taken = []
    for name in sorted(_model_flag_names(args.arch) | {ARGS_VERSION_KEY}):
        if name in vars(model) and getattr(args, name, None) is None:
            value = getattr(model, name)
            setattr(args, name, value)
            if name != ARGS_VERSION_KEY and value is not None:
                taken.append(f"{name}={value}")
    logger.info("fine-tuning from %s, written by %s: model settings the command line does not "
                "name are the checkpoint's: %s", path, tool, ", ".join(taken) or "none")
    return True
