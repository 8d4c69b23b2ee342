"""Figures of the routing report, drawn from :meth:`RoutingCounts.summary` outputs.

Every function takes ``models``, a list of ``(label, summary)`` (one or more models,
drawn side by side in that order), and the output folder; it writes one PNG and
returns its file name, or None when the figure does not apply (no SMoE or MoEC
layer). matplotlib runs headless (Agg) with its default font.
"""

import os
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .routing_counts import merge_summaries  # noqa: E402

Models = Sequence[Tuple[str, dict]]
DPI = 100
ANNOTATE_CELLS = 96  # write the percentage in heat map cells up to this many cells


def _layer(summary: dict, name: str) -> Optional[dict]:
    return next((l for l in summary["layers"] if l["name"] == name), None)


def _save(fig, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name


def _grid(rows: int, cols: int, width: float, height: float):
    """``rows x cols`` panels of 4 x 2.8 to 12 x 8 inches (room for two-line titles; many
    experts or languages do not make a poster)."""
    width, height = min(max(width, 4.0), 12.0), min(max(height, 2.8), 8.0)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows),
                             squeeze=False, layout="constrained")
    return fig, axes


def _missing(ax, text="no MoE layer here"):
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def language_heatmaps(models: Models, out_dir: str, side: str) -> str:
    """Per MoE layer (rows) and model (columns): the share of each ``side`` language's
    tokens whose first choice is each expert (rows of the map sum to 1)."""
    names = merge_summaries(dict(models))
    langs = max(len(s["layers"][0][f"{side}_language"]["languages"]) for _, s in models)
    experts = max(l["num_experts"] for _, s in models for l in s["layers"])
    fig, axes = _grid(len(names), len(models), 1.5 + 0.45 * experts, 1.3 + 0.38 * langs)
    image = None
    for r, name in enumerate(names):
        for c, (label, summary) in enumerate(models):
            ax = axes[r][c]
            layer = _layer(summary, name)
            if layer is None:
                _missing(ax)
                continue
            d = layer[f"{side}_language"]
            share = np.array(d["share"], dtype=float)  # [L, E]
            image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_xticks(range(share.shape[1]))
            ax.set_yticks(range(share.shape[0]), d["languages"])
            ax.set_xlabel("expert")
            if c == 0:
                ax.set_ylabel(f"{side} language")
            ax.set_title(f"{label}: {name}\nI(expert; {side} lang) = {d['mi_bits']:.2f} of "
                         f"{d['h_language_bits']:.2f} bits", fontsize=9)
            if share.size <= ANNOTATE_CELLS:
                for (i, j), v in np.ndenumerate(share):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6,
                     label=f"share of the {side} language's tokens (first choice)")
    return _save(fig, out_dir, f"heatmap_{side}_language.png")


def expert_load(models: Models, out_dir: str) -> str:
    """Per MoE layer and model: each expert's share of the token-expert assignments,
    the fair share 1/E (dashed) and starved experts (< 10% of it, red, hatched)."""
    names = merge_summaries(dict(models))
    experts = max(l["num_experts"] for _, s in models for l in s["layers"])
    fig, axes = _grid(len(names), len(models), 1.5 + 0.35 * experts, 2.3)
    top = 1.1 * max(max(l["load_share"]) for _, s in models for l in s["layers"])  # same y scale
    for r, name in enumerate(names):
        for c, (label, summary) in enumerate(models):
            ax = axes[r][c]
            layer = _layer(summary, name)
            if layer is None:
                _missing(ax)
                continue
            share = np.array(layer["load_share"])
            E = share.size
            group = np.zeros(E, dtype=int)  # colour by stratum (SMoE) or cluster (MoEC)
            if layer.get("strata"):
                group = np.repeat(np.arange(len(layer["strata"]["sizes"])), layer["strata"]["sizes"])
            elif layer.get("clusters"):
                group = np.arange(E) // layer["clusters"]["cluster_size"]
            colours = [f"C{g % 10}" for g in group]
            bars = ax.bar(range(E), share, color=colours)
            for e in layer["starved"]:
                bars[e].set_color("red")
                bars[e].set_hatch("//")
            ax.axhline(layer["fair_share"], color="black", linestyle="--", linewidth=1,
                       label="fair share 1/E")
            ax.set_xticks(range(E))
            ax.set_xlabel("expert")
            ax.set_ylabel("share of assignments")
            starved = f", starved: {layer['starved']}" if layer["starved"] else ""
            groups = (f", strata {'+'.join(map(str, layer['strata']['sizes']))}" if layer.get("strata")
                      else f", {layer['clusters']['count']} clusters" if layer.get("clusters") else "")
            ax.set_title(f"{label}: {name}\nCV {layer['load_cv']:.2f}{groups}{starved}", fontsize=9)
            ax.set_ylim(0, top)
            if r == 0 and c == 0:
                ax.legend(fontsize=7, loc="upper right")
    return _save(fig, out_dir, "expert_load.png")


def _bars(ax, names: List[str], series) -> None:
    """Grouped bars: one group per x label in ``names``, one bar per ``(label, values)``
    of ``series`` (values aligned with ``names``; NaN = no bar)."""
    x = np.arange(len(names))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label,
               color=f"C{i % 10}")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)


def _grouped_bars(ax, names: List[str], models: Models, value, ylabel: str):
    """One bar per model and MoE layer: ``value(layer summary)`` (None = no bar)."""
    series = []
    for label, summary in models:
        values = []
        for name in names:
            layer = _layer(summary, name)
            v = value(layer) if layer is not None else None
            values.append(np.nan if v is None else v)
        series.append((label, values))
    _bars(ax, names, series)
    ax.set_ylabel(ylabel)


def mutual_information(models: Models, out_dir: str) -> str:
    """I(expert; target language) and I(expert; source language) per MoE layer, bars per
    model, with H(language), the largest value it can take (dotted)."""
    names = merge_summaries(dict(models))
    fig, axes = _grid(1, 2, max(4.0, 0.9 * len(names) * len(models) + 1.5), 3.2)
    for ax, side in zip(axes[0], ("target", "source")):
        _grouped_bars(ax, names, models, lambda l: l[f"{side}_language"]["mi_bits"],
                      "bits")
        for x, name in enumerate(names):  # H(language) of the layer's tokens: the most I can be
            h = max((_layer(s, name) or {}).get(f"{side}_language", {}).get("h_language_bits", 0.0)
                    for _, s in models)
            ax.hlines(h, x - 0.45, x + 0.45, color="black", linestyle=":", linewidth=1.2,
                      label=f"H({side} language)" if x == 0 else None)
        ax.set_title(f"I(expert; {side} language), first choice", fontsize=10)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "mutual_information.png")


def entropies(models: Models, out_dir: str) -> str:
    """Per MoE layer: mean per-token gate entropy H_s (0 = sure routing) and expert-usage
    entropy H_u (log2 E, dashed, = every expert used equally), bits."""
    names = merge_summaries(dict(models))
    fig, axes = _grid(1, 2, max(4.0, 0.9 * len(names) * len(models) + 1.5), 3.2)
    for ax, key, title in ((axes[0][0], "gate_entropy_bits", "per-token gate entropy H_s"),
                           (axes[0][1], "usage_entropy_bits", "expert-usage entropy H_u")):
        _grouped_bars(ax, names, models, lambda l: l[key], "bits")
        top = max(l["max_entropy_bits"] for _, s in models for l in s["layers"])
        ax.axhline(top, color="black", linestyle="--", linewidth=1, label="log2 E")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "entropies.png")


def smoe_strata(models: Models, out_dir: str) -> Optional[str]:
    """SMoE models (rows): share of tokens reaching each stratum per layer, and requested
    capacity (expert passes per token) per target language per layer."""
    rows = [(label, s) for label, s in models if any(l.get("strata") for l in s["layers"])]
    if not rows:
        return None
    fig, axes = _grid(len(rows), 2, 5.0, 3.0)
    for r, (label, summary) in enumerate(rows):
        layers = [l for l in summary["layers"] if l.get("strata")]
        names = [l["name"] for l in layers]
        ax = axes[r][0]
        strata = max(len(l["strata"]["sizes"]) for l in layers)
        _bars(ax, names, [(f"stratum {i}", [l["strata"]["share_reaching"][i]
                                           if i < len(l["strata"]["share_reaching"]) else np.nan
                                           for l in layers]) for i in range(strata)])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of tokens reaching")
        ax.set_title(f"{label}: tokens reaching each stratum", fontsize=10)
        ax.legend(fontsize=7)
        ax = axes[r][1]
        langs = list(layers[0]["strata"]["requested_capacity_by_target_language"])
        _bars(ax, names, [(lang, [l["strata"]["requested_capacity_by_target_language"].get(
            lang, np.nan) for l in layers]) for lang in langs])
        ax.set_ylim(1.0, max(len(l["strata"]["sizes"]) for l in layers))
        ax.set_ylabel("expert passes per token")
        ax.set_title(f"{label}: requested capacity per target language", fontsize=10)
        ax.legend(fontsize=7, ncol=min(len(langs), 5))
    return _save(fig, out_dir, "smoe_strata.png")


def moec_clusters(models: Models, out_dir: str) -> Optional[str]:
    """Clustered-router models (rows): load share of each cluster per layer, and the CV
    of the load inside each cluster (0 = its experts share it evenly)."""
    rows = [(label, s) for label, s in models if any(l.get("clusters") for l in s["layers"])]
    if not rows:
        return None
    fig, axes = _grid(len(rows), 2, 5.0, 3.0)
    for r, (label, summary) in enumerate(rows):
        layers = [l for l in summary["layers"] if l.get("clusters")]
        names = [l["name"] for l in layers]
        G = max(l["clusters"]["count"] for l in layers)
        for ax, key, ylabel, title in (
                (axes[r][0], "load_share", "share of assignments", "load per cluster"),
                (axes[r][1], "within_cluster_cv", "CV of load inside the cluster",
                 "within-cluster spread")):
            _bars(ax, names, [(f"cluster {g}", [l["clusters"][key][g] if g < l["clusters"]["count"]
                                                else np.nan for l in layers]) for g in range(G)])
            ax.set_ylabel(ylabel)
            ax.set_title(f"{label}: {title}", fontsize=10)
            ax.legend(fontsize=7)
    return _save(fig, out_dir, "moec_clusters.png")


def draw_all(models: Models, out_dir: str) -> List[str]:
    """Every figure that applies to ``models``; their file names, in report order."""
    os.makedirs(out_dir, exist_ok=True)
    names = [language_heatmaps(models, out_dir, "target"),
             language_heatmaps(models, out_dir, "source"),
             expert_load(models, out_dir),
             mutual_information(models, out_dir),
             entropies(models, out_dir),
             smoe_strata(models, out_dir),
             moec_clusters(models, out_dir)]
    return [n for n in names if n]
