"""Command-line flags of the MoE layers, their validation and their parsed form.

Flags are spelled as in fairseq's MoE branch (``--moe-expert-count``, ``--moe-freq``,
...) so its users feel at home. Every bad value is refused at start-up with a
:class:`MoEConfigError` whose message names the flag and what is allowed;
``moe_fairseq`` installs an exception hook that prints such an error as one line.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from .args_version import apply_args_version, set_defaults
from .errors import OneLineError
from .routers import ROUTERS
from .routers.base import CAPACITY_RULES
from .routers.cosine import VAR_TYPES as MOEC_VAR_TYPES
from .routers.cosine import kept_per_cluster
from .routers.stratified import STRATUM_NORMS, parse_strata
from .routers.top_k import EVAL_SECOND_EXPERT_POLICIES, SECOND_EXPERT_POLICIES


# --moe-token-order: which tokens keep their expert capacity when it binds.
TOKEN_ORDERS = ("batch-major", "seq-major")
# --moe-kernels: how the experts run (see MoELayer.uses_fused_kernels).
KERNEL_CHOICES = ("auto", "triton", "torch")


class MoEConfigError(OneLineError, ValueError):
    """A bad MoE configuration; the message names the flag."""


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Mixture of Experts (moe_fairseq)")
    group.add_argument("--moe-expert-count", type=int, metavar="E",
                       help="experts per MoE layer (arch presets: tiny 4, base 8, big 16)")
    group.add_argument("--moe-freq", type=int, metavar="N",
                       help="every N-th FFN (1-based) of encoder and decoder is an MoE layer "
                            "(default 2: layers 2, 4, 6, ...; moec base/big presets 4: layer 4 "
                            "of 6, the authors' 0-based --encoder-moe-layers 3)")
    group.add_argument("--moe-top-k", type=int, metavar="K",
                       help="experts per token: 1 (Switch) or 2 (GShard); default 2")
    group.add_argument("--moe-router", type=str, metavar="NAME",
                       help=f"routing method, one of {sorted(ROUTERS)}; default linear")
    group.add_argument("--moe-capacity-factor", type=float, metavar="C",
                       help="training capacity per expert, by --moe-capacity-rule (default "
                            "ceil(C * k * tokens / E)); assignments past it are dropped and "
                            "the token's residual passes through (default 1.0); 0 = dropless: "
                            "no capacity limit in training, no token is ever dropped")
    group.add_argument("--moe-capacity-rule", type=str, metavar="RULE",
                       help=f"training capacity rule, one of {list(CAPACITY_RULES)}: joint = "
                            "ceil(C*k*T/E) (default), per-slot = k*ceil(C*T/E) (fairseq's "
                            "top2gating, the SMoE authors; smoe presets), tokens = int(C*T) "
                            "(the MoEC authors; moec presets)")
    group.add_argument("--moe-eval-capacity-token-fraction", type=float, metavar="F",
                       help="inference capacity per expert = ceil(F * tokens); 1.0 or -1 "
                            "never drops (default 1.0)")
    group.add_argument("--moe-second-expert-policy", type=str, metavar="P",
                       help=f"top-2 second expert in training: one of {list(SECOND_EXPERT_POLICIES)} "
                            "(default sampling)")
    group.add_argument("--moe-eval-second-expert-policy", type=str, metavar="P",
                       help=f"top-2 second expert at inference: one of "
                            f"{list(EVAL_SECOND_EXPERT_POLICIES)}; default all (the second-best, "
                            "deterministic); sampling = Gumbel-sampled as in fairseq's "
                            "top2gating and the SMoE authors' code")
    group.add_argument("--moe-normalize-gates", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="top-2: renormalize a token's gate weights to sum to 1 after "
                            "capacity dropping (fairseq's rule; default on for top-2; "
                            "--no-moe-normalize-gates keeps the raw softmax probabilities)")
    group.add_argument("--moe-normalize-gate-prob-before-dropping", action="store_true",
                       default=None,
                       help="renormalize the top-2 gates before capacity dropping instead of after")
    group.add_argument("--moe-output-dropout", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="apply the layer's --dropout to the MoE block's output before the "
                            "residual, as fairseq does for every FFN (default on; the MoEC "
                            "authors' layer does not: moec presets off)")
    group.add_argument("--moe-token-order", type=str, metavar="ORDER",
                       help=f"order in which tokens claim expert capacity, one of "
                            f"{list(TOKEN_ORDERS)}: batch-major (default) = sentence by "
                            "sentence, as fairseq's MoE branch and the SMoE/MoEC authors "
                            "route x.transpose(0, 1): the first sentences of a batch keep "
                            "their tokens when capacity binds; seq-major = position by "
                            "position across the batch (fairseq's [T, B] layout; checkpoints "
                            "written before MoE args version 3)")
    group.add_argument("--moe-kernels", type=str, metavar="MODE",
                       help=f"how the experts run, one of {list(KERNEL_CHOICES)}: auto "
                            "(default) = the fused Triton kernels (gather + FFN + combine in "
                            "two kernels each way) on CUDA in fp16/bf16 when the layer "
                            "qualifies (experts all local, one sublayer, relu/gelu/linear, no "
                            "activation dropout in training), else the PyTorch path; triton = "
                            "always the fused kernels, fp32 included (an error at the first "
                            "forward if they cannot run: no CUDA and no TRITON_INTERPRET=1, "
                            "or the layer does not qualify); torch = always the PyTorch path")
    group.add_argument("--moe-encoder-layers", type=str, metavar="I1,I2,...",
                       help="1-based encoder layers that are MoE (overrides --moe-freq for "
                            "the encoder), e.g. 4")
    group.add_argument("--moe-decoder-layers", type=str, metavar="I1,I2,...",
                       help="1-based decoder layers that are MoE (overrides --moe-freq for "
                            "the decoder)")
    group.add_argument("--moe-layer-expert-counts", type=str, metavar="E1,E2,...",
                       help="experts of each MoE layer, in module order (encoder layers "
                            "first); written by scripts/prune_experts.py; default "
                            "--moe-expert-count in every layer")
    group.add_argument("--moe-jitter-eps", type=float, metavar="EPS",
                       help="training only: multiply the router input by U(1-EPS, 1+EPS) "
                            "(Switch jitter; default 0)")
    group.add_argument("--moe-expert-ffn-dim", type=int, metavar="D",
                       help="hidden size of each expert FFN (default: the layer's FFN dim)")
    group.add_argument("--moe-attentive-dim", type=int, metavar="R",
                       help="--moe-router attentive: size r of the query and of each expert's "
                            "representation U_e x (default 16)")
    add_nllb_args(parser)
    add_moec_args(parser)
    add_smoe_args(parser)


def add_nllb_args(parser: argparse.ArgumentParser) -> None:
    """NLLB-MoE's regularizers (arXiv 2207.04672) and batch-prioritized routing (V-MoE,
    arXiv 2106.05974), spelled as fairseq's MoE code spells them."""
    group = parser.add_argument_group("NLLB-MoE regularizers and batch-prioritized routing")
    group.add_argument("--moe-eom", type=float, metavar="P",
                       help="expert output masking: in training each token-expert output is "
                            "dropped with probability P (only the residual and the token's "
                            "other expert pass), at inference every expert output is scaled "
                            "by 1-P (NLLB-MoE; their recipes 0.2); 0 <= P < 1, default 0")
    group.add_argument("--moe-cmr", action="store_true", default=None,
                       help="conditional MoE routing: a sigmoid gate g per token mixes a "
                            "shared dense FFN (the layer's FFN width) and the MoE layer, "
                            "(1-g) FFN(x) + g MoE(x); the budget term is the criterion's "
                            "--cmr-gate-loss-wt/--cmr-gate-loss-p (NLLB-MoE)")
    group.add_argument("--cmr-gate-drop", type=float, metavar="P",
                       help="--moe-cmr: dropout on the CMR gate g in training (as torch's "
                            "Dropout: kept gates scaled by 1/(1-P), as fairseq's CMR); "
                            "0 <= P < 1, default 0")
    group.add_argument("--moe-batch-prioritized-routing", action="store_true", default=None,
                       help="when capacity binds, tokens with the highest router probability "
                            "claim it first (first choices before second choices), instead of "
                            "the earliest tokens (V-MoE; fairseq's top2gating); needs a "
                            "capacity (--moe-capacity-factor > 0)")


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
    group.add_argument("--moec-output-mixing", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="output a*FFN_e(x) + (1-a)*x with a = sigmoid(cos/tau) of the chosen "
                            "expert, x for a token dropped for capacity (the authors' layer; "
                            "moec presets on, needs --moe-top-k 1; default off)")
    group.add_argument("--moec-expert-sublayers", type=int, metavar="N",
                       help="each expert is N stacked sublayers LN(x + FFN(x)) with the "
                            "second FFN matrix zero-initialised (the authors' --moe-sublayers; "
                            "moec base/big presets 3; default 1 = a plain FFN); any router")


def add_smoe_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the SMoE stratified router (``--moe-router stratified``)."""
    group = parser.add_argument_group("SMoE stratified router (--moe-router stratified)")
    group.add_argument("--smoe-strata", type=str, metavar="N1,N2,...",
                       help="experts per stratum, summing to --moe-expert-count, e.g. 4,12: "
                            "a token at stratum i picks its top-k among strata i.., moves on "
                            "to (stratum of its top-1 expert)+1 and leaves after the last "
                            "(smoe presets: tiny 2,2; base 2,2,2,2; big 4,12)")
    group.add_argument("--smoe-stratum-norm", type=str, metavar="MODE",
                       help=f"one of {list(STRATUM_NORMS)}: post-ln (default, the authors' "
                            "--hmoe-layernorm 1) = a stratum i>=1 continues from LN(stream) and "
                            "the block outputs LN(final stream); gate-input = LN only on what "
                            "strata i>=1 route, the stream stays raw; none = no LayerNorm "
                            "(--hmoe-layernorm 0)")


def moe_defaults(args: argparse.Namespace, expert_count: int) -> None:
    """Fill MoE flags the user left unset (architectures call this): first by the
    rules of the namespace's args version (see ``args_version.py``), then by today's."""
    apply_args_version(args)
    top_k = args.moe_top_k if getattr(args, "moe_top_k", None) is not None else 2
    set_defaults(
        args,
        moe_expert_count=expert_count,
        moe_freq=2,
        moe_top_k=2,
        moe_router="linear",
        moe_capacity_factor=1.0,
        moe_eval_capacity_token_fraction=1.0,
        moe_second_expert_policy="sampling",
        moe_eval_second_expert_policy="all",
        moe_normalize_gates=top_k == 2,
        moe_normalize_gate_prob_before_dropping=False,
        moe_capacity_rule="joint",
        moe_encoder_layers=None,
        moe_decoder_layers=None,
        moe_layer_expert_counts=None,
        moe_output_dropout=True,
        moe_token_order="batch-major",
        moe_kernels="auto",
        moe_jitter_eps=0.0,
        moe_expert_ffn_dim=None,
        moe_attentive_dim=16,
        moe_eom=0.0,
        moe_cmr=False,
        cmr_gate_drop=0.0,
        moe_batch_prioritized_routing=False,
        moec_routing_dim=32,
        moec_clusters=1,
        moec_var_coef=0.0,
        moec_var_type="cluster",
        moec_expert_dropout=0.0,
        moec_dropout_interval=1,
        moec_output_mixing=False,
        moec_expert_sublayers=1,
        smoe_strata=None,
        smoe_stratum_norm="post-ln",
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
    normalize_before_dropping: bool = False
    eval_second_expert_policy: str = "all"
    capacity_rule: str = "joint"
    expert_sublayers: int = 1
    encoder_layers: Optional[List[int]] = None  # 1-based; None = every --moe-freq-th
    decoder_layers: Optional[List[int]] = None
    output_dropout: bool = True
    token_order: str = "batch-major"
    kernels: str = "auto"  # --moe-kernels
    layer_expert_counts: Optional[List[int]] = None  # per MoE layer; None = expert_count
    eom: float = 0.0  # --moe-eom
    cmr: bool = False  # --moe-cmr
    cmr_gate_drop: float = 0.0  # --cmr-gate-drop
    batch_prioritized: bool = False  # --moe-batch-prioritized-routing

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
            normalize_before_dropping=bool(args.moe_normalize_gate_prob_before_dropping),
            eval_second_expert_policy=args.moe_eval_second_expert_policy,
            capacity_rule=args.moe_capacity_rule,
            expert_sublayers=args.moec_expert_sublayers,
            encoder_layers=parse_layer_list(args.moe_encoder_layers),
            decoder_layers=parse_layer_list(args.moe_decoder_layers),
            output_dropout=bool(args.moe_output_dropout),
            token_order=args.moe_token_order,
            kernels=getattr(args, "moe_kernels", None) or "auto",
            layer_expert_counts=parse_expert_counts(getattr(args, "moe_layer_expert_counts", None)),
            eom=float(getattr(args, "moe_eom", 0.0) or 0.0),
            cmr=bool(getattr(args, "moe_cmr", False)),
            cmr_gate_drop=float(getattr(args, "cmr_gate_drop", 0.0) or 0.0),
            batch_prioritized=bool(getattr(args, "moe_batch_prioritized_routing", False)),
        )

    def for_layer(self, ordinal: int, num_layers: int) -> "MoEOptions":
        """The options of the ``ordinal``-th of ``num_layers`` MoE layers (module order,
        encoder first): its own expert count under ``--moe-layer-expert-counts``."""
        counts = self.layer_expert_counts
        if counts is None:
            return self
        if len(counts) != num_layers:
            raise MoEConfigError(f"--moe-layer-expert-counts gives {len(counts)} counts, the "
                                 f"model has {num_layers} MoE layers")
        return dataclasses.replace(self, expert_count=counts[ordinal])

    def moe_layer_indices(self, num_layers: int, placement: Optional[List[int]] = None) -> List[int]:
        """0-based indices of the MoE layers in a stack of ``num_layers``: the 1-based
        ``placement`` list if given, else every ``--moe-freq``-th layer."""
        if placement is not None:
            return sorted(i - 1 for i in placement)
        return [i for i in range(num_layers) if (i + 1) % self.freq == 0]


def parse_expert_counts(spec) -> Optional[List[int]]:
    """``"4,2,4,3"`` -> ``[4, 2, 4, 3]``; None stays None."""
    if spec is None:
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise MoEConfigError(f"--moe-layer-expert-counts must be comma-separated integers >= 1, "
                             f"got {spec!r}")
    return [int(p) for p in parts]


def parse_layer_list(spec) -> Optional[List[int]]:
    """``"2,4"`` -> ``[2, 4]`` (1-based layers); None stays None; ValueError if malformed."""
    if spec is None:
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"expected comma-separated layer numbers >= 1, got {spec!r}")
    return sorted({int(p) for p in parts})


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
    C = args.moe_capacity_factor
    if not (C == 0 or (C > 0 and math.isfinite(C))):
        raise MoEConfigError(
            f"--moe-capacity-factor must be a finite number > 0, or 0 for dropless routing, got {C}"
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
    if args.moe_eval_second_expert_policy not in EVAL_SECOND_EXPERT_POLICIES:
        raise MoEConfigError(
            f"--moe-eval-second-expert-policy must be one of {list(EVAL_SECOND_EXPERT_POLICIES)}, "
            f"got {args.moe_eval_second_expert_policy!r}"
        )
    if args.moe_capacity_rule not in CAPACITY_RULES:
        raise MoEConfigError(
            f"--moe-capacity-rule must be one of {list(CAPACITY_RULES)}, "
            f"got {args.moe_capacity_rule!r}"
        )
    if args.moe_token_order not in TOKEN_ORDERS:
        raise MoEConfigError(
            f"--moe-token-order must be one of {list(TOKEN_ORDERS)}, got {args.moe_token_order!r}"
        )
    kernels = getattr(args, "moe_kernels", None) or "auto"
    if kernels not in KERNEL_CHOICES:
        raise MoEConfigError(
            f"--moe-kernels must be one of {list(KERNEL_CHOICES)}, got {kernels!r}"
        )
    sub = args.moec_expert_sublayers
    if sub is None or sub < 1:
        raise MoEConfigError(f"--moec-expert-sublayers must be an integer >= 1, got {sub}")
    for flag, spec, stack in (("--moe-encoder-layers", args.moe_encoder_layers, "encoder_layers"),
                              ("--moe-decoder-layers", args.moe_decoder_layers, "decoder_layers")):
        try:
            layers = parse_layer_list(spec)
        except ValueError as e:
            raise MoEConfigError(f"{flag}: {e}") from None
        n = getattr(args, stack, None)
        if layers and n and max(layers) > n:
            raise MoEConfigError(
                f"{flag} {spec} names layer {max(layers)}, the model has {n} "
                f"({stack.replace('_', ' ')}; layers are numbered from 1)"
            )
    if not 0 <= args.moe_jitter_eps < 1:
        raise MoEConfigError(f"--moe-jitter-eps must be in [0, 1), got {args.moe_jitter_eps}")
    if args.moe_expert_ffn_dim is not None and args.moe_expert_ffn_dim < 1:
        raise MoEConfigError(
            f"--moe-expert-ffn-dim must be a positive integer, got {args.moe_expert_ffn_dim}"
        )
    r = args.moe_attentive_dim
    if r is None or r < 1:
        raise MoEConfigError(f"--moe-attentive-dim must be a positive integer, got {r}")
    validate_moec_args(args)
    validate_smoe_args(args)
    validate_nllb_args(args)
    counts = parse_expert_counts(getattr(args, "moe_layer_expert_counts", None))
    if counts is not None:
        if min(counts) < args.moe_top_k:
            raise MoEConfigError(f"--moe-layer-expert-counts {args.moe_layer_expert_counts}: every "
                                 f"layer needs at least --moe-top-k {args.moe_top_k} experts")
        if args.moe_router == "stratified" or (args.moe_router == "cosine"
                                               and (args.moec_clusters or 1) > 1):
            raise MoEConfigError("--moe-layer-expert-counts works with the linear, attentive and "
                                 "one-cluster cosine routers (SMoE's strata and MoEC's clusters "
                                 "are set for all layers at once)")
    freq = args.moe_freq
    enc = getattr(args, "encoder_layers", 0) or 0
    dec = getattr(args, "decoder_layers", 0) or 0
    placed = args.moe_encoder_layers is not None and args.moe_decoder_layers is not None
    if freq is None or freq < 1 or (freq > max(enc, dec) and not placed):
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


def validate_nllb_args(args: argparse.Namespace) -> None:
    """``--moe-eom``, ``--moe-cmr``/``--cmr-gate-drop`` and
    ``--moe-batch-prioritized-routing``, and the routers they make no sense with."""
    for flag, name in (("--moe-eom", "moe_eom"), ("--cmr-gate-drop", "cmr_gate_drop")):
        p = getattr(args, name, 0.0) or 0.0
        if not 0 <= p < 1:  # nan fails too
            raise MoEConfigError(f"{flag} must be in [0, 1), got {p}")
    cmr = bool(getattr(args, "moe_cmr", False))
    drop = getattr(args, "cmr_gate_drop", 0.0) or 0.0
    if drop > 0 and not cmr:
        raise MoEConfigError(f"--cmr-gate-drop {drop} needs --moe-cmr (it drops out the CMR gate)")
    if cmr and args.moe_router == "stratified" and getattr(
            args, "smoe_stratum_norm", "post-ln") == "post-ln":
        raise MoEConfigError(
            "--moe-cmr mixes an FFN's output with the MoE layer's, but --moe-router stratified "
            "with --smoe-stratum-norm post-ln returns the whole block (residual and LayerNorm "
            "included); use --smoe-stratum-norm gate-input or none")
    if getattr(args, "moe_batch_prioritized_routing", False) and args.moe_capacity_factor == 0:
        raise MoEConfigError(
            "--moe-batch-prioritized-routing orders tokens for capacity, but "
            "--moe-capacity-factor 0 is dropless (no token is ever dropped): give a capacity "
            "factor > 0 or leave the flag out")


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
    if coef is None or not (coef >= 0 and math.isfinite(coef)):  # nan fails both
        raise MoEConfigError(f"--moec-var-coef must be a finite number >= 0, got {coef}")
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
    if getattr(args, "moec_output_mixing", False):
        if args.moe_router != "cosine":
            raise MoEConfigError(
                f"--moec-output-mixing needs --moe-router cosine (a moec_transformer_* arch), "
                f"got --moe-router {args.moe_router}"
            )
        if args.moe_top_k != 1:
            raise MoEConfigError(
                f"--moec-output-mixing needs --moe-top-k 1 (one gate a per token), got "
                f"--moe-top-k {args.moe_top_k}"
            )
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
    norm = getattr(args, "smoe_stratum_norm", "post-ln")
    if norm not in STRATUM_NORMS:
        raise MoEConfigError(
            f"--smoe-stratum-norm must be one of {list(STRATUM_NORMS)}, got {norm!r}"
        )
    if args.moe_top_k > strata[-1]:
        raise MoEConfigError(
            f"--moe-top-k {args.moe_top_k} is larger than the last stratum of --smoe-strata "
            f"{spec} ({strata[-1]} experts): tokens there could not pick {args.moe_top_k}"
        )
