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
from .routers.cosine import VAR_TYPES as MOEC_VAR_TYPES
from .routers.cosine import kept_per_cluster
from .routers.stratified import parse_strata
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
    add_moec_args(parser)
    add_smoe_args(parser)


def add_moec_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the MoEC cosine router (``--moe-router cosine``)."""
    group = parser.add_argument_group("MoEC cosine router (--moe-router cosine)")
    group.add_argument("--moec-routing-dim", type=int, metavar="R",
                       help="dimension tokens are projected to before the cosine score "
                            "(default 32)")
    group.add_argument("--moec-clusters", type=int, metavar="G",
                       help="expert clusters: contiguous blocks of E/G experts; must divide "
                            "--moe-expert-count (default 1; moec presets: tiny/base 2, big 4)")
    group.add_argument("--moec-var-coef", type=float, metavar="C",
                       help="weight of the within-cluster variance loss moec_var = E*C*Var "
                            "(default 0 = off; moec presets 1.0, the authors' recipe)")
    group.add_argument("--moec-var-type", type=str, metavar="T",
                       help=f"variance of the mean routing probabilities: one of "
                            f"{list(MOEC_VAR_TYPES)} (default cluster)")
    group.add_argument("--moec-expert-dropout", type=float, metavar="P",
                       help="training only: drop a fraction P of the experts of every "
                            "cluster (at least one is kept), 0 <= P < 1 (default 0; "
                            "moec presets: tiny 0, base/big 0.5)")
    group.add_argument("--moec-dropout-interval", type=int, metavar="N",
                       help="draw a new set of kept experts every N training forward "
                            "calls (default 1; moec presets 250, the authors' recipe)")


def add_smoe_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the SMoE stratified router (``--moe-router stratified``)."""
    group = parser.add_argument_group("SMoE stratified router (--moe-router stratified)")
    group.add_argument("--smoe-strata", type=str, metavar="N1,N2,...",
                       help="experts per stratum, summing to --moe-expert-count, e.g. 4,12: "
                            "a token at stratum i picks its top-k among strata i.., moves on "
                            "to (stratum of its top-1 expert)+1 and leaves after the last "
                            "(smoe presets: tiny 2,2; base 2,2,2,2; big 4,12)")
    group.add_argument("--smoe-stratum-layernorm", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="a LayerNorm on the tokens entering each stratum after the "
                            "first (default on, as in the paper; --no-smoe-stratum-layernorm "
                            "feeds the raw residual stream)")


def set_defaults(args: argparse.Namespace, **values) -> None:
    """Set each flag the user (or an older checkpoint) left unset (None or missing)."""
    for name, value in values.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def moe_defaults(args: argparse.Namespace, expert_count: int) -> None:
    """Fill MoE flags the user left unset (architectures call this)."""
    set_defaults(
        args,
        moe_expert_count=expert_count,
        moe_freq=2,
        moe_top_k=2,
        moe_router="linear",
        moe_capacity_factor=1.0,
        moe_eval_capacity_token_fraction=1.0,
        moe_second_expert_policy="sampling",
        moe_normalize_gates=False,
        moe_jitter_eps=0.0,
        moe_expert_ffn_dim=None,
        moec_routing_dim=32,
        moec_clusters=1,
        moec_var_coef=0.0,
        moec_var_type="cluster",
        moec_expert_dropout=0.0,
        moec_dropout_interval=1,
        smoe_strata=None,
        smoe_stratum_layernorm=True,
    )


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
    validate_moec_args(args)
    validate_smoe_args(args)
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


def validate_moec_args(args: argparse.Namespace) -> None:
    """The ``--moec-*`` flags (checked whatever the router; the defaults are valid)."""
    E = args.moe_expert_count
    dim = getattr(args, "moec_routing_dim", 32)
    if dim is None or dim < 1:
        raise MoEConfigError(f"--moec-routing-dim must be a positive integer, got {dim}")
    G = getattr(args, "moec_clusters", 1)
    if G is None or G < 1 or E % G != 0:
        raise MoEConfigError(
            f"--moec-clusters must be a positive integer dividing --moe-expert-count {E}, "
            f"got {G}"
        )
    var_type = getattr(args, "moec_var_type", "cluster")
    if var_type not in MOEC_VAR_TYPES:
        raise MoEConfigError(
            f"--moec-var-type must be one of {list(MOEC_VAR_TYPES)}, got {var_type!r}"
        )
    coef = getattr(args, "moec_var_coef", 0.0)
    if coef is None or coef < 0:
        raise MoEConfigError(f"--moec-var-coef must be >= 0, got {coef}")
    if args.moe_router == "cosine" and coef > 0:
        if var_type in ("cluster", "gap") and E // G < 2:
            raise MoEConfigError(
                f"--moec-var-type {var_type} with --moec-var-coef > 0 needs at least 2 "
                f"experts per cluster (--moec-clusters {G}, --moe-expert-count {E})"
            )
        if var_type == "gap" and G < 2:
            raise MoEConfigError("--moec-var-type gap needs --moec-clusters >= 2")
    p = getattr(args, "moec_expert_dropout", 0.0)
    if p is None or not 0 <= p < 1:
        raise MoEConfigError(f"--moec-expert-dropout must be in [0, 1), got {p}")
    interval = getattr(args, "moec_dropout_interval", 1)
    if interval is None or interval < 1:
        raise MoEConfigError(f"--moec-dropout-interval must be >= 1, got {interval}")
    if args.moe_router == "cosine" and p > 0:
        alive = G * kept_per_cluster(E // G, p)
        if alive < args.moe_top_k:
            raise MoEConfigError(
                f"--moec-expert-dropout {p} keeps {alive} of {E} experts "
                f"(--moec-clusters {G}), fewer than --moe-top-k {args.moe_top_k}"
            )


def validate_smoe_args(args: argparse.Namespace) -> None:
    """The ``--smoe-*`` flags."""
    spec = getattr(args, "smoe_strata", None)
    stratified = args.moe_router == "stratified"
    if spec is None:
        if stratified:
            raise MoEConfigError(
                "--moe-router stratified needs --smoe-strata (experts per stratum, e.g. 4,12)"
            )
        return
    if not stratified:
        raise MoEConfigError(
            f"--smoe-strata {spec} needs --moe-router stratified (or an smoe_transformer_* "
            f"arch), got --moe-router {args.moe_router}"
        )
    try:
        strata = parse_strata(spec)
    except ValueError as e:
        raise MoEConfigError(f"--smoe-strata: {e}") from None
    E = args.moe_expert_count
    if sum(strata) != E:
        raise MoEConfigError(
            f"--smoe-strata {spec} has {sum(strata)} experts, --moe-expert-count is {E}: "
            "the strata must add up to it"
        )
    if args.moe_top_k > strata[-1]:
        raise MoEConfigError(
            f"--moe-top-k {args.moe_top_k} is larger than the last stratum of --smoe-strata "
            f"{spec} ({strata[-1]} experts): tokens there could not pick {args.moe_top_k}"
        )
