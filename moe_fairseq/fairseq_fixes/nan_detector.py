"""Keep fairseq's NaN detector from hiding the divergence it was called to explain.

When gradients turn NaN/Inf, fairseq's trainer saves ``crash.pt``, reruns the step
inside ``NanDetector`` to name the first module with a NaN, then re-raises
``FloatingPointError: gradients are Nan/Inf``. The detector registers old-style
module backward hooks; on torch 2.x these look for a tensor in each module's output
and crash on the encoder's (a dict of lists) with ``StopIteration``, so the run ends
on that error instead of the real cause. Our detector keeps fairseq's forward hooks
and finds the backward NaN with gradient hooks on the parameters instead (it names
the first parameter whose gradient is NaN/Inf), which works for any module output.
"""

import logging

import torch

logger = logging.getLogger(__name__)


def _safe_detector_class():
    from fairseq.nan_detector import NanDetector

    class ParameterGradNanDetector(NanDetector):
        def __init__(self, model, forward=True, backward=True):
            super().__init__(model, forward=forward, backward=False)
            self.backward = backward
            if backward:
                for name, param in model.named_parameters():
                    if param.requires_grad:
                        self.bhooks.append(param.register_hook(self._grad_hook(name)))

        def _grad_hook(self, name):
            def hook(grad):
                if self.has_printed_b or not torch.is_floating_point(grad):
                    return None
                with torch.no_grad():
                    err = "NaN" if torch.isnan(grad).any() else (
                        "Inf" if torch.isinf(grad).any() else None)
                if err is not None:
                    logger.warning(f"{err} detected in the gradient of {name}, shape: "
                                   f"{tuple(grad.shape)}, backward")
                    self.has_printed_b = True
                return None

            return hook

    ParameterGradNanDetector._moe_fairseq = True
    return ParameterGradNanDetector


def install() -> None:
    """Idempotent; the trainer looks ``NanDetector`` up in its own module."""
    import fairseq.trainer as trainer_module

    if getattr(trainer_module.NanDetector, "_moe_fairseq", False):
        return
    trainer_module.NanDetector = _safe_detector_class()
