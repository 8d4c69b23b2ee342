"""Let ``--bf16`` train on GPUs (and CPUs) instead of going down fairseq's TPU path.

fairseq's option parser turns ``--bf16`` into ``--tpu`` ("use bfloat16; implies
--tpu"), so a bf16 run on a GPU imports ``torch_xla`` and crashes. bf16 itself
works on current GPUs: the trainer casts the model and the float inputs to bf16,
and fairseq's FP16Optimizer keeps fp32 master weights without loss scaling. We
undo the implied ``--tpu`` just before fairseq sets up devices, but only when
torch_xla is not installed: on a real TPU host nothing changes.
"""

import importlib.util
import logging

logger = logging.getLogger(__name__)


def _has_torch_xla() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def untangle_bf16_from_tpu(cfg) -> bool:
    """Set ``cfg.common.tpu`` back to False for a bf16 run on a host without
    torch_xla. Returns whether it changed anything."""
    common = getattr(cfg, "common", None)
    if common is None or not getattr(common, "bf16", False) or not getattr(common, "tpu", False):
        return False
    if _has_torch_xla():
        return False
    common.tpu = False  # distributed_training.tpu interpolates common.tpu
    logger.info("--bf16 without torch_xla: training in bf16 on %s, not on a TPU",
                "CPU" if getattr(common, "cpu", False) else "GPU")
    return True


def install() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported (inside fairseq's argument
    parsing, before ``call_main`` runs)."""
    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils.call_main, "_moe_fairseq_bf16", False):
        return
    fairseq_call_main = distributed_utils.call_main

    def call_main(cfg, main, **kwargs):
        untangle_bf16_from_tpu(cfg)
        return fairseq_call_main(cfg, main, **kwargs)

    call_main._moe_fairseq_bf16 = True
    distributed_utils.call_main = call_main
