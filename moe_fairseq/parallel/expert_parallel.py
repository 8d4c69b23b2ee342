"""Expert parallelism inside fairseq's own data-parallel training.

With W data-parallel ranks, each rank holds ``E / W`` experts of every MoE layer
(``ExpertBank.keep_shard``) and tokens travel to their experts and back with
all-to-all (``AllToAllDispatcher``). What fairseq's trainer needs on top:

- Gradients. Dense gradients are averaged over ranks by the DDP wrapper and the
  trainer then multiplies every gradient by ``W / sample_size``. An expert's
  gradient already sums the contributions of every rank's tokens (they came
  through the all-to-all), so it must not be averaged: expert parameters carry
  ``param.expert``, which fairseq's ``legacy_ddp`` skips and which we list in
  ``_ddp_params_and_buffers_to_ignore`` for torch DDP (``c10d``); a gradient hook
  divides them by W to cancel the trainer's factor. fairseq's gradient clipping
  already measures the norm on non-expert gradients only, so it agrees on all
  ranks.
- Checkpoints hold every expert. At each save, fairseq calls
  ``Trainer.consolidate_optimizer`` on every rank: there we all-gather the expert
  parameters and their optimizer state, and the saving rank writes full tensors.
  On load, each rank keeps its block of the experts (``ExpertBank``) and of their
  optimizer state (a load hook on the optimizer), so a checkpoint resumes on any
  world size that divides E, and loads in a single process for decoding. With
  ``--store-ema`` the EMA copy's experts are gathered and sliced the same way
  (``--ema-fp32``, whose fp32 copies fairseq restores without a load hook, is refused).
"""

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SUPPORTED_DDP_BACKENDS = ("legacy_ddp", "no_c10d", "c10d", "pytorch_ddp")


def expert_parallel_group() -> Tuple[Optional[object], int, int]:
    """(process group, rank, world size) of expert parallelism: fairseq's data-parallel
    group when training runs distributed, else ``(None, 0, 1)``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    from fairseq.distributed import utils as dist_utils

    group = dist_utils.get_data_parallel_group()
    return group, dist_utils.get_data_parallel_rank(), dist_utils.get_data_parallel_world_size()


def validate_expert_parallel(args, num_experts: int, world: int) -> None:
    """Refuse configurations expert parallelism cannot serve, naming the flag."""
    from ..options import MoEConfigError

    if num_experts % world:
        raise MoEConfigError(
            f"--moe-expert-count {num_experts} must be divisible by the number of "
            f"data-parallel ranks ({world}): each rank holds E / W experts"
        )
    backend = getattr(args, "ddp_backend", "pytorch_ddp")
    if backend not in SUPPORTED_DDP_BACKENDS:
        raise MoEConfigError(
            f"--ddp-backend {backend} is not supported with expert parallelism; "
            f"use one of {list(SUPPORTED_DDP_BACKENDS)}"
        )
    if getattr(args, "store_ema", False) and getattr(args, "ema_fp32", False):
        raise MoEConfigError(
            "--ema-fp32 is not supported with expert parallelism (fairseq restores its "
            "fp32 copies without a hook that could keep this rank's experts); drop "
            "--ema-fp32 or train on one process"
        )
    if getattr(args, "fp16", False) and not (
        getattr(args, "fp16_no_flatten_grads", False) or getattr(args, "memory_efficient_fp16", False)
    ):
        raise MoEConfigError(
            "--fp16 with expert parallelism needs --fp16-no-flatten-grads (or "
            "--memory-efficient-fp16): flattened fp32 copies lose which weights are experts"
        )


def scale_expert_grads(params, world: int) -> None:
    """Divide expert gradients by W as they arrive (see the module docstring)."""
    for p in params:
        p.register_hook(lambda g, w=world: g / w)


def sharded_expert_params(model) -> List[Tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "expert_shard", None)]


def ignore_experts_in_torch_ddp(model) -> None:
    """torch DDP (``--ddp-backend c10d``) leaves these parameters alone."""
    names = [n for n, _ in sharded_expert_params(model)]
    if names:
        model._ddp_params_and_buffers_to_ignore = names


def _all_gather_rows(t: torch.Tensor, group, world: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _flat_params(optimizer) -> List[torch.Tensor]:
    """A torch optimizer's parameters in state-dict index order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _optimizer_params(trainer) -> List[torch.Tensor]:
    return _flat_params(trainer.optimizer.optimizer)


def _expert_slots(trainer) -> Dict[int, Tuple[int, int]]:
    """Optimizer parameter index -> (rank, world) for sharded expert parameters.

    The optimizer's parameters follow the trainer's (model, then criterion,
    trainable only), as fairseq builds them; the fp16 optimizer's fp32 copies
    keep that order unless flattened, which expert parallelism refuses.
    """
    trainable = [p for p in trainer.get_model().parameters() if p.requires_grad]
    trainable += [p for p in trainer.criterion.parameters() if p.requires_grad]
    opt_params = _optimizer_params(trainer)
    if len(opt_params) != len(trainable):
        raise RuntimeError(
            "expert parallelism needs one optimizer parameter per model parameter; "
            "use --fp16-no-flatten-grads or --memory-efficient-fp16 with --fp16"
        )
    return {
        i: p.expert_shard for i, p in enumerate(trainable) if getattr(p, "expert_shard", None)
    }


def _consolidate(trainer) -> None:
    """Runs on every rank at every save: gather experts and their optimizer state."""
    experts = sharded_expert_params(trainer.get_model())
    trainer._moe_full_experts = None
    if not experts:
        return
    group, _, world = expert_parallel_group()
    full = {name: _all_gather_rows(p.data, group, world) for name, p in experts}
    trainer._moe_full_experts = full if trainer.should_save_checkpoint_on_current_rank else None
    trainer._moe_full_ema_experts = None
    if trainer.cfg.ema.store_ema:
        # The EMA model is a copy of the sharded model: its experts are sharded alike.
        ema_state = trainer.ema.get_model().state_dict()
        gathered = {"ema": {name: _all_gather_rows(ema_state[name], group, world)
                            for name, _ in experts}}
        if trainer.should_save_checkpoint_on_current_rank:
            trainer._moe_full_ema_experts = gathered
    if trainer.cfg.checkpoint.no_save_optimizer_state:
        return
    slots = _expert_slots(trainer)
    opt = trainer.optimizer.optimizer
    opt_params = _optimizer_params(trainer)
    gathered = {}
    for i in sorted(slots):
        state = opt.state.get(opt_params[i], {})
        local_shape = opt_params[i].shape
        for key in sorted(state):
            value = state[key]
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == local_shape:
                gathered[(i, key)] = _all_gather_rows(value, group, world)
    if trainer.should_save_checkpoint_on_current_rank:
        sd = trainer.optimizer.state_dict()
        for i in {i for i, _ in gathered}:
            # state_dict() shares each parameter's state dict with the live optimizer
            sd["state"][i] = dict(sd["state"][i])
        for (i, key), value in gathered.items():
            sd["state"][i][key] = value
        trainer._gathered_optim_state = sd


def _slice_optimizer_state(slots: Dict[int, Tuple[int, int]]):
    """Optimizer load pre-hook: keep this rank's block of full expert states."""

    def hook(optimizer, state_dict):
        params = _flat_params(optimizer)
        for i, (rank, world) in slots.items():
            state = state_dict["state"].get(i)
            if not state or i >= len(params):
                continue
            param = params[i]
            for key, value in list(state.items()):
                if torch.is_tensor(value) and value.dim() > 0 and value.size(0) % world == 0:
                    local = value.size(0) // world
                    if value.size(0) != param.size(0) and local == param.size(0):
                        state[key] = value[rank * local:(rank + 1) * local].clone()
        return state_dict

    return hook


def install() -> None:
    """Patch fairseq's Trainer; a no-op for models without sharded experts. Idempotent."""
    from fairseq.trainer import Trainer
    from omegaconf import open_dict

    if getattr(Trainer, "_moe_fairseq_expert_parallel", False):
        return
    original_consolidate = Trainer.consolidate_optimizer
    original_state_dict = Trainer.state_dict
    original_build_optimizer = Trainer._build_optimizer
    original_load_checkpoint = Trainer.load_checkpoint

    def consolidate_optimizer(self):
        original_consolidate(self)
        _consolidate(self)

    def state_dict(self):
        sd = original_state_dict(self)
        full = getattr(self, "_moe_full_experts", None)
        if full:
            for name, value in full.items():
                sd["model"][name] = value
            self._moe_full_experts = None
        full_ema = getattr(self, "_moe_full_ema_experts", None)
        if full_ema:
            for key, tensors in full_ema.items():
                sd["extra_state"][key] = {**sd["extra_state"][key], **tensors}
            self._moe_full_ema_experts = None
        return sd

    def load_checkpoint(self, *args, **kwargs):
        # fairseq's rank 0 reads the file and sends the state to its peers pickled
        # with torch.save; the peers' torch.load is weights-only on torch >= 2.6
        # and refuses the OmegaConf config inside. Every rank reads the file
        # itself instead, through the checkpoint allowlist.
        if self.data_parallel_world_size > 1:
            with open_dict(self.cfg):
                self.cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
        return original_load_checkpoint(self, *args, **kwargs)

    def _build_optimizer(self):
        original_build_optimizer(self)
        if sharded_expert_params(self.get_model()):
            self.optimizer.optimizer.register_load_state_dict_pre_hook(
                _slice_optimizer_state(_expert_slots(self))
            )

    Trainer.consolidate_optimizer = consolidate_optimizer
    Trainer.state_dict = state_dict
    Trainer._build_optimizer = _build_optimizer
    Trainer.load_checkpoint = load_checkpoint
    Trainer._moe_fairseq_expert_parallel = True
