"""Routing in TensorBoard while training: with ``--tensorboard-logdir``, each log
interval (``train_inner``) gets, per MoE layer,

- ``moe_expert_load/<layer>``: a histogram of the token-expert assignments over the
  expert index (one bucket per expert) since the last interval;
- ``moe_mi_target_lang_bits/<layer>``: I(first-choice expert; target language) in bits
  over the same tokens, when the batches carry target-language tokens
  (``translation_multi_simple_epoch`` with ``--decoder-langtok`` or
  ``--encoder-langtok tgt``).

The MoE criterion puts the counts into its logging outputs as summable tensors
(:func:`routing_logging_output`), so fairseq sums them over gradient-accumulation
steps and ranks like any other count; its ``reduce_metrics`` hands them to
:func:`accumulate`; fairseq's TensorBoard progress bar, patched by :func:`install`,
writes and clears them when it logs ``train_inner``. Only the first process writes
TensorBoard files, as for fairseq's scalars.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..target_language import expert_language_counts, target_language_index
from .specialization import mutual_information_bits

LOAD_PREFIX = "moe_tb_load:"  # + layer name -> [E] assignments
LANG_PREFIX = "moe_tb_lang:"  # + layer name -> [E * L] (first expert, target language)

_pending: Dict[str, Tensor] = {}  # summed since the last TensorBoard write


def routing_logging_output(layers: Sequence[Tuple[str, object]], task, sample) -> Dict[str, Tensor]:
    """Summable per-batch tensors for the TensorBoard routing views, from the stats of
    the MoE ``layers`` (``(name, MoELayer)``; recorded with ``record_first_expert``).
    Stays on the device (no host sync); the keys depend only on the model and the task's
    flags, so every rank has the same ones (fairseq sums them in one all-reduce)."""
    found = target_language_index(task, sample)
    out: Dict[str, Tensor] = {}
    for name, m in layers:
        while name.startswith("module."):  # DDP / fairseq wrappers: the same tag on any setup
            name = name[len("module."):]
        s = m.stats
        if s is None:
            continue
        out[LOAD_PREFIX + name] = s.expert_load.detach()
        if found is None:
            continue
        index, names = found
        E, L = m.num_experts, len(names)
        joint = expert_language_counts(s.first_expert, index, E, L)
        if joint is None:  # the key is still needed: every rank sums the same keys
            joint = torch.zeros(E, L, dtype=torch.long, device=s.expert_load.device)
        out[LANG_PREFIX + name] = joint.view(-1)
    return out


def accumulate(logging_outputs) -> None:
    """Add the routing tensors of one update's (summed) logging outputs to the pending
    counts."""
    for log in logging_outputs:
        for key, value in log.items():
            if key.startswith((LOAD_PREFIX, LANG_PREFIX)) and torch.is_tensor(value):
                value = value.detach().to("cpu", torch.float64)
                _pending[key] = _pending[key] + value if key in _pending else value


def take_pending() -> Dict[str, Tensor]:
    """The pending counts, cleared."""
    out = dict(_pending)
    _pending.clear()
    return out


def write(writer, step: int, pending: Optional[Dict[str, Tensor]] = None) -> int:
    """Write the pending counts (default: take them) to a SummaryWriter; how many
    histograms were written."""
    pending = take_pending() if pending is None else pending
    written = 0
    for key, load in pending.items():
        if not key.startswith(LOAD_PREFIX) or float(load.sum()) <= 0:
            continue
        layer = key[len(LOAD_PREFIX):].removesuffix(".moe")
        E = load.numel()
        idx = torch.arange(E, dtype=torch.float64)
        writer.add_histogram_raw(
            f"moe_expert_load/{layer}", min=0.0, max=float(E - 1), num=float(load.sum()),
            sum=float((idx * load).sum()), sum_squares=float((idx * idx * load).sum()),
            bucket_limits=[e + 0.5 for e in range(E)], bucket_counts=load.tolist(),
            global_step=step)
        written += 1
        joint = pending.get(LANG_PREFIX + key[len(LOAD_PREFIX):])
        if joint is not None and float(joint.sum()) > 0:
            counts = joint.view(E, -1)
            writer.add_scalar(f"moe_mi_target_lang_bits/{layer}",
                              mutual_information_bits(counts), step)
    writer.flush()
    return written


def install() -> None:
    """Make fairseq's TensorBoard progress bar write the routing views at each
    ``train_inner`` log."""
    from fairseq.logging import progress_bar

    wrapper = progress_bar.TensorboardProgressBarWrapper
    if getattr(wrapper, "_moe_routing_views", False):
        return
    original = wrapper._log_to_tensorboard

    def _log_to_tensorboard(self, stats, tag=None, step=None):
        original(self, stats, tag, step)
        if tag != "train_inner" or not _pending:
            return
        writer = self._writer(tag)
        if writer is not None:
            write(writer, stats["num_updates"] if step is None else step)

    wrapper._log_to_tensorboard = _log_to_tensorboard
    wrapper._moe_routing_views = True
