"""Half-precision flags that work where the hardware does: ``--bf16`` on GPUs and CPUs,
``--fp16`` on CPUs.

- fairseq's option parser turns ``--bf16`` into ``--tpu`` ("use bfloat16; implies
  --tpu"), so a bf16 run on a GPU imports ``torch_xla`` and crashes. bf16 itself
  works on current GPUs: the trainer casts the model and the float inputs to bf16,
  and fairseq's FP16Optimizer keeps fp32 master weights without loss scaling. We
  undo the implied ``--tpu`` just before fairseq sets up devices, but only when
  torch_xla is not installed: on a real TPU host nothing changes.
- ``--fp16 --cpu`` crashes building the optimizer: fairseq's flattened fp32 master
  copy asks for the current CUDA device. The unflattened copy (one fp32 tensor per
  parameter, ``--fp16-no-flatten-grads``) works on CPU, so a CPU run uses it.
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


def unflatten_fp16_on_cpu(cfg) -> bool:
    """Set ``--fp16-no-flatten-grads`` for an fp16 run on CPU; whether it changed anything."""
    common = getattr(cfg, "common", None)
    if common is None or not getattr(common, "fp16", False) or not getattr(common, "cpu", False):
        return False
    if getattr(common, "fp16_no_flatten_grads", False) or getattr(common, "memory_efficient_fp16", False):
        return False
    common.fp16_no_flatten_grads = True
    logger.info("--fp16 on CPU: keeping one fp32 master copy per parameter "
                "(--fp16-no-flatten-grads); fairseq's flattened copy needs CUDA")
    return True


def install() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported (inside fairseq's argument
    parsing, before ``call_main`` runs)."""
    from fairseq.distributed import utils as distributed_utils

    if getattr(distributed_utils.call_main, "_moe_fairseq_precision", False):
        return
    fairseq_call_main = distributed_utils.call_main

    def call_main(cfg, main, **kwargs):
        untangle_bf16_from_tpu(cfg)
        unflatten_fp16_on_cpu(cfg)
        return fairseq_call_main(cfg, main, **kwargs)

    call_main._moe_fairseq_precision = True
    distributed_utils.call_main = call_main
