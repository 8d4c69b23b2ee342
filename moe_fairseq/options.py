"""Command-line flags of the MoE layers, their validation and their parsed form.

Flags are spelled as in fairseq's MoE branch (``--moe-expert-count``, ``--moe-freq``,
...) so its users feel at home. Every bad value is refused at start-up with a
:class:`MoEConfigError` whose message names the flag and what is allowed;
``moe_fairseq`` installs an exception hook that prints such an error as one line.
"""

import argparse
from dataclasses import dataclass
from typing import List

from .routers import ROUTERS
from .routers.top_k import SECOND_EXPERT_POLICIES


class MoEConfigError(ValueError):
    """A bad MoE configuration; the message names the flag."""


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Mixture of Experts (moe_fairseq)")
    group.add_argument("--moe-expert-count", type=int, metavar="E",
                       help="experts per MoE layer (arch presets: tiny 4, base 8, big 16)")
    group.add_argument("--moe-freq", type=int, metavar="N",
                       help="every N-th FFN (1-based) of encoder and decoder is an MoE layer "
                            "(default 2: layers 2, 4, 6, ...)")
    group.add_argument("--moe-top-k", type=int, metavar="K",
                       help="experts per token: 1 (Switch) or 2 (GShard); default 2")
    group.add_argument("--moe-router", type=str, metavar="NAME",
                       help=f"routing method, one of {sorted(ROUTERS)}; default linear")
    group.add_argument("--moe-capacity-factor", type=float, metavar="C",
                       help="training capacity per expert = ceil(C * k * tokens / E); "
                            "assignments past it are dropped and the token's residual "
                            "passes through (default 1.0)")
    group.add_argument("--moe-eval-capacity-token-fraction", type=float, metavar="F",
                       help="inference capacity per expert = ceil(F * tokens); 1.0 or -1 "
                            "never drops (default 1.0)")
    group.add_argument("--moe-second-expert-policy", type=str, metavar="P",
                       help=f"top-2 second expert in training: one of {list(SECOND_EXPERT_POLICIES)} "
                            "(default sampling); inference always uses the second-best expert")
    group.add_argument("--moe-normalize-gates", action="store_true", default=None,
                       help="renormalize the top-2 gate weights of a token to sum to 1")
    group.add_argument("--moe-jitter-eps", type=float, metavar="EPS",
                       help="training only: multiply the router input by U(1-EPS, 1+EPS) "
                            "(Switch jitter; default 0)")
    group.add_argument("--moe-expert-ffn-dim", type=int, metavar="D",
                       help="hidden size of each expert FFN (default: the layer's FFN dim)")


def moe_defaults(args: argparse.Namespace, expert_count: int) -> None:
    """Fill MoE flags the user left unset (architectures call this)."""
    def default(name, value):
        if getattr(args, name, None) is None:
            setattr(args, name, value)

    default("moe_expert_count", expert_count)
    default("moe_freq", 2)
    default("moe_top_k", 2)
    default("moe_router", "linear")
    default("moe_capacity_factor", 1.0)
    default("moe_eval_capacity_token_fraction", 1.0)
    default("moe_second_expert_policy", "sampling")
    default("moe_normalize_gates", False)
    default("moe_jitter_eps", 0.0)
    default("moe_expert_ffn_dim", None)


@dataclass
class MoEOptions:
    """Parsed MoE flags shared by every MoE layer of a model."""

    expert_count: int
    freq: int
    top_k: int
    router: str
    capacity_factor: float
    eval_capacity_token_fraction: float
    second_expert_policy: str
    normalize_gates: bool
    jitter_eps: float
    expert_ffn_dim: int  # 0 = use the layer's own FFN dim
    args: argparse.Namespace  # the full namespace, for routers with flags of their own

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MoEOptions":
        validate_moe_args(args)
        return cls(
            expert_count=args.moe_expert_count,
            freq=args.moe_freq,
            top_k=args.moe_top_k,
            router=args.moe_router,
            capacity_factor=args.moe_capacity_factor,
            eval_capacity_token_fraction=args.moe_eval_capacity_token_fraction,
            second_expert_policy=args.moe_second_expert_policy,
            normalize_gates=bool(args.moe_normalize_gates),
            jitter_eps=args.moe_jitter_eps,
            expert_ffn_dim=args.moe_expert_ffn_dim or 0,
            args=args,
        )

    def moe_layer_indices(self, num_layers: int) -> List[int]:
        """0-based indices of the MoE layers in a stack of ``num_layers``."""
        return [i for i in range(num_layers) if (i + 1) % self.freq == 0]


def validate_moe_args(args: argparse.Namespace) -> None:
    """Refuse bad MoE configurations with one clear message naming the flag."""
    E = args.moe_expert_count
    if E is None or E < 1:
        raise MoEConfigError(f"--moe-expert-count must be a positive integer, got {E}")
    if args.moe_top_k not in (1, 2):
        raise MoEConfigError(f"--moe-top-k must be 1 or 2, got {args.moe_top_k}")
    if args.moe_top_k > E:
        raise MoEConfigError(
            f"--moe-top-k {args.moe_top_k} is larger than --moe-expert-count {E}"
        )
    if args.moe_router not in ROUTERS:
        raise MoEConfigError(
            f"--moe-router must be one of {sorted(ROUTERS)}, got {args.moe_router!r}"
        )
    if not args.moe_capacity_factor > 0:
        raise MoEConfigError(
            f"--moe-capacity-factor must be > 0, got {args.moe_capacity_factor}"
        )
    frac = args.moe_eval_capacity_token_fraction
    if not (frac == -1 or 0 < frac <= 1):
        raise MoEConfigError(
            "--moe-eval-capacity-token-fraction must be in (0, 1] or -1 (never drop), "
            f"got {frac}"
        )
    if args.moe_second_expert_policy not in SECOND_EXPERT_POLICIES:
        raise MoEConfigError(
            f"--moe-second-expert-policy must be one of {list(SECOND_EXPERT_POLICIES)}, "
            f"got {args.moe_second_expert_policy!r}"
        )
    if args.moe_normalize_gates and args.moe_top_k == 1:
        raise MoEConfigError(
            "--moe-normalize-gates needs --moe-top-k 2 (with one expert the gate would "
            "always be 1 and the router would get no gradient from the task loss)"
        )
    if not 0 <= args.moe_jitter_eps < 1:
        raise MoEConfigError(f"--moe-jitter-eps must be in [0, 1), got {args.moe_jitter_eps}")
    if args.moe_expert_ffn_dim is not None and args.moe_expert_ffn_dim < 1:
        raise MoEConfigError(
            f"--moe-expert-ffn-dim must be a positive integer, got {args.moe_expert_ffn_dim}"
        )
    freq = args.moe_freq
    enc = getattr(args, "encoder_layers", 0) or 0
    dec = getattr(args, "decoder_layers", 0) or 0
    if freq is None or freq < 1 or freq > max(enc, dec):
        raise MoEConfigError(
            f"--moe-freq {freq} places no MoE layer: it must be between 1 and the "
            f"number of layers (encoder {enc}, decoder {dec})"
        )
    # fairseq features whose code paths the MoE layers do not implement.
    unsupported = {
        "checkpoint_activations": "--checkpoint-activations (recomputation would "
        "drop the routing losses' gradient)",
        "cross_self_attention": "--cross-self-attention",
        "scale_attn": "--scale-attn",
        "scale_heads": "--scale-heads",
        "scale_fc": "--scale-fc",
        "scale_resids": "--scale-resids",
    }
    for name, flag in unsupported.items():
        if getattr(args, name, False):
            raise MoEConfigError(f"{flag} is not supported with MoE layers")
    if (getattr(args, "encoder_layers_to_keep", None)
            or getattr(args, "decoder_layers_to_keep", None)):
        raise MoEConfigError(
            "--encoder-layers-to-keep/--decoder-layers-to-keep are not supported with MoE layers"
        )
