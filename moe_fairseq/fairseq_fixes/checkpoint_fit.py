"""One line when a checkpoint does not fit the run that loads it, and no silent restart.

fairseq ends a resume whose checkpoint has another shape (expert count, method,
dense vs MoE, vocabulary) in two tracebacks and "please ensure that the
architectures match", and ``fairseq-generate`` in a size-mismatch dump. Here the
failed load is described in one line that names both sides and the flag that makes
them agree (:func:`describe_misfit`): the settings of the checkpoint and of the run
are compared flag by flag, the vocabulary by the embedding rows, and what torch
reports as missing or mismatched is the fallback. Nothing is written: the checkpoint
is left as it is.

A checkpoint without optimizer state (written by ``average_checkpoints.py``,
``prune_experts.py`` or ``upcycle.py``) that ``fairseq-train`` would *resume*
(``checkpoint_last.pt`` in ``--save-dir`` or ``--restore-file``) is refused
(:func:`check_resumable`): fairseq would resume it at update 0 with a restarted
learning-rate schedule but the saved epoch, without a word. An error, not a warning,
because the run's log would look like a resume. ``--reset-optimizer`` says the user
wants exactly that and lets it through; ``--finetune-from-model`` is the way to train
on from such a file.
"""

import os
import re
from typing import List, Optional, Tuple

from ..errors import CheckpointError

_LOAD_ERROR = "Error(s) in loading state_dict"
_MISMATCH = re.compile(r"size mismatch for ([^:]+): copying a param with shape "
                       r"torch\.Size\(\[([^\]]*)\]\) from checkpoint, the shape in current "
                       r"model is torch\.Size\(\[([^\]]*)\]\)")
_KEYS = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)')

# Settings that decide the shape of the weights: (namespace key, what it is, flag).
SHAPE_SETTINGS = [
    ("moe_expert_count", "experts per MoE layer", "--moe-expert-count"),
    ("moe_layer_expert_counts", "experts per MoE layer (pruned)", "--moe-layer-expert-counts"),
    ("moe_freq", "MoE in every n-th layer", "--moe-freq"),
    ("moe_encoder_layers", "MoE encoder layers", "--moe-encoder-layers"),
    ("moe_decoder_layers", "MoE decoder layers", "--moe-decoder-layers"),
    ("moe_expert_ffn_dim", "expert FFN width", "--moe-expert-ffn-dim"),
    ("moe_router", "router", "--moe-router"),
    ("moe_attentive_dim", "attentive router width", "--moe-attentive-dim"),
    ("moe_cmr", "CMR dense FFN and gate", "--moe-cmr"),
    ("moec_clusters", "MoEC clusters", "--moec-clusters"),
    ("moec_routing_dim", "MoEC routing width", "--moec-routing-dim"),
    ("moec_expert_sublayers", "MoEC expert sublayers", "--moec-expert-sublayers"),
    ("smoe_strata", "SMoE strata", "--smoe-strata"),
    ("smoe_stratum_norm", "SMoE stratum norm", "--smoe-stratum-norm"),
    ("encoder_embed_dim", "encoder width", "--encoder-embed-dim"),
    ("decoder_embed_dim", "decoder width", "--decoder-embed-dim"),
    ("encoder_ffn_embed_dim", "encoder FFN width", "--encoder-ffn-embed-dim"),
    ("decoder_ffn_embed_dim", "decoder FFN width", "--decoder-ffn-embed-dim"),
    ("encoder_layers", "encoder layers", "--encoder-layers"),
    ("decoder_layers", "decoder layers", "--decoder-layers"),
    ("share_all_embeddings", "shared embeddings", "--share-all-embeddings"),
    ("share_decoder_input_output_embed", "shared decoder embeddings",
     "--share-decoder-input-output-embed"),
    ("encoder_normalize_before", "encoder pre-norm", "--encoder-normalize-before"),
    ("decoder_normalize_before", "decoder pre-norm", "--decoder-normalize-before"),
    ("layernorm_embedding", "embedding LayerNorm", "--layernorm-embedding"),
]
_VOCAB_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
               "decoder.output_projection.weight")


def load_error_text(exc: BaseException) -> Optional[str]:
    """The text of torch's ``load_state_dict`` error behind ``exc`` (fairseq's trainer
    re-raises it as a generic Exception), or None if the failure was something else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RuntimeError) and _LOAD_ERROR in str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def parse_load_error(text: str) -> Tuple[List[str], List[str], List[Tuple[str, str, str]]]:
    """(missing keys, unexpected keys, [(key, checkpoint shape, model shape)])."""
    missing, unexpected = [], []
    for kind, keys in _KEYS.findall(text):
        (missing if kind == "Missing" else unexpected).extend(re.findall(r'"([^"]+)"', keys))
    mismatched = [(k.strip(), f"({a})", f"({b})") for k, a, b in _MISMATCH.findall(text)]
    return missing, unexpected, mismatched


def _model_kind(args) -> str:
    arch = getattr(args, "arch", None) or getattr(args, "_name", None) or "?"
    moe = getattr(args, "moe_expert_count", None) is not None
    return f"{arch} [{'MoE' if moe else 'dense'}]"


def _value(args, key):
    value = getattr(args, key, None)
    return None if value in ("", "None") else value


def setting_differences(ckpt_args, run_args) -> List[str]:
    """Shape-deciding settings that differ: 'WHAT: checkpoint A, this run B (FLAG A)'."""
    if ckpt_args is None or run_args is None:
        return []
    out = []
    ckpt_arch, run_arch = getattr(ckpt_args, "arch", None), getattr(run_args, "arch", None)
    if ckpt_arch and run_arch and ckpt_arch != run_arch:
        out.append(f"architecture: checkpoint {_model_kind(ckpt_args)}, this run "
                   f"{_model_kind(run_args)} (--arch {ckpt_arch})")
    for key, what, flag in SHAPE_SETTINGS:
        a, b = _value(ckpt_args, key), _value(run_args, key)
        if isinstance(a, bool) or isinstance(b, bool):
            a, b = bool(a), bool(b)  # an unset switch (older checkpoints) is off
        if a is None and b is None or a == b:
            continue
        if (a is None or b is None) and ckpt_arch != run_arch:
            continue  # one model has no such setting: the architecture line says it
        if isinstance(a, bool) or isinstance(b, bool):
            hint = flag if a else f"without {flag}"
        else:
            hint = f"{flag} {a}"
        out.append(f"{what}: checkpoint {a}, this run {b} ({hint})")
    return out


def describe_misfit(path: str, text: str, ckpt_args=None, run_args=None,
                    data: Optional[str] = None, resume: bool = False) -> str:
    """One line: why the weights in ``path`` do not load into the model the run built."""
    missing, unexpected, mismatched = parse_load_error(text)
    parts = setting_differences(ckpt_args, run_args)
    vocab = [(k, a, b) for k, a, b in mismatched if k in _VOCAB_KEYS]
    if vocab and not parts:
        key, a, b = vocab[0]
        rows = lambda shape: shape.strip("()").split(",")[0].strip()  # noqa: E731
        where = f" of --data {data}" if data else ""
        parts.append(f"vocabulary: checkpoint {rows(a)} entries ({key} {a}), the "
                     f"dictionaries{where} {rows(b)}: use the data-bin the model was trained on")
    elif not parts:
        if mismatched:
            key, a, b = mismatched[0]
            parts.append(f"{key} is {a} in the checkpoint, {b} in this run's model")
        if missing:
            parts.append(f"the checkpoint has no {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"this run's model has no {unexpected[0]}"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if resume:
        parts.append("pass the checkpoint's values to resume it, or train a new model in "
                     "another --save-dir")
    elif not vocab:
        parts.append("load it with the settings and data it was trained with")
    return (f"checkpoint {path} does not fit the model this run builds: {'; '.join(parts)} "
            "(the checkpoint is unchanged)")


def read_header(path: str):
    """(model namespace, whole state) of a checkpoint, memory-mapped; (None, None) if
    it cannot be read."""
    from ..args_version import model_namespace
    from .checkpoint_compat import load_plain_state

    try:
        state = load_plain_state(path)
    except Exception:  # noqa: BLE001 - the load that follows reports it by name
        return None, None
    if not isinstance(state, dict):
        return None, None
    return model_namespace(state), state


def checkpoint_settings(path: str, name: str):
    """The model namespace ``path`` records, for a tool that needs it before any work;
    one line naming ``name`` (the tool's argument) if it cannot be read or records none."""
    from ..args_version import read_model_args
    from .checkpoint_compat import describe_load_error

    try:
        args = read_model_args(path)
    except Exception as exc:  # noqa: BLE001 - every cause becomes one line naming the file
        raise CheckpointError(describe_load_error(path, exc)) from None
    if args is None:
        raise CheckpointError(f"{name} {path} records no model settings: give a checkpoint "
                              "written by fairseq-train")
    return args


def check_resumable(path: str, reset_optimizer: bool) -> None:
    """Refuse to resume a checkpoint that holds no optimizer state (see the module
    docstring)."""
    if reset_optimizer or not os.path.isfile(path):
        return
    from ..args_version import converted_by
    from .checkpoint_compat import recorded_updates

    _, state = read_header(path)
    if state is None or state.get("last_optimizer_state") is not None:
        return
    tool = converted_by(state) or "a tool other than fairseq-train"
    updates = recorded_updates(state)
    epoch = ((state.get("extra_state") or {}).get("train_iterator") or {}).get("epoch")
    recorded = f" (it records update {updates}, epoch {epoch})" if updates is not None else ""
    raise CheckpointError(
        f"fairseq-train would resume {path}, written by {tool}, which holds no optimizer "
        f"state{recorded}: fairseq would restart at update 0 with a fresh learning-rate "
        "schedule. To train on from its weights, move it out of --save-dir and pass "
        "--finetune-from-model; to resume the run, restore its own checkpoint_last.pt; to "
        "start from it at update 0 anyway, pass --reset-optimizer")
