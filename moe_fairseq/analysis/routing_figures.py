"""Figures of the routing report, drawn from :meth:`RoutingCounts.summary` outputs.

Every ``*_figure`` function takes ``models``, a list of ``(label, summary)`` (one or
more models, drawn side by side in that order), and returns a matplotlib ``Figure``, or
None when the figure does not apply (no SMoE or MoEC layer); :data:`FIGURES` pairs each
with its PNG file name, :func:`save` writes one and :func:`draw_all` writes them all.

Legends stand outside their axes, to the right (constrained layout makes room), so
they cannot cover a bar or a line: those are clipped to the axes box. Bar charts' y
axes go 10% of their range above the highest bar or reference line, so the tallest
bar never ends on the frame. Figures are drawn by the Agg canvas without pyplot, with
matplotlib's default font.
"""

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .routing_counts import merge_summaries

Models = Sequence[Tuple[str, dict]]
DPI = 100
ANNOTATE_CELLS = 96  # write the percentage in heat map cells up to this many cells
HEADROOM = 0.1  # of the y range, above the highest bar or line
LEGEND_ROWS = 12  # entries per legend column (many languages: more columns, not a tower)
LEGEND_WIDTH = 1.4  # inches added to a panel's width for its legend


def _layer(summary: dict, name: str) -> Optional[dict]:
    return next((l for l in summary["layers"] if l["name"] == name), None)


def save(fig: Figure, out_dir: str, name: str) -> str:
    """Write ``fig`` as ``out_dir/name`` (PNG); ``name``."""
    # tight: the saved image holds everything drawn, legends outside the axes included
    fig.savefig(os.path.join(out_dir, name), dpi=DPI, bbox_inches="tight")
    return name


def _grid(rows: int, cols: int, width: float, height: float, legend: bool = True):
    """``rows x cols`` panels of 4 x 2.8 to 12 x 8 inches (room for two-line titles; many
    experts or languages do not make a poster), each widened for a legend beside it."""
    width, height = min(max(width, 4.0), 12.0), min(max(height, 2.8), 8.0)
    if legend:
        width += LEGEND_WIDTH
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global registry of figures to close
    return fig, fig.subplots(rows, cols, squeeze=False)


def _missing(ax, text="no MoE layer here"):
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _legend(ax, handles=None):
    """The legend of ``ax`` right of its frame, top-aligned with it."""
    handles = handles if handles is not None else ax.get_legend_handles_labels()[0]
    return ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, fontsize=7,
                     ncol=max(1, math.ceil(len(handles) / LEGEND_ROWS)))


def _highest(ax) -> float:
    """The highest y (data units) of the bars, lines and line collections in ``ax``
    (NaN = no bar, skipped); -inf when nothing is drawn."""
    ys = []
    for c in ax.containers:
        if isinstance(c, BarContainer):
            ys += [r.get_y() + r.get_height() for r in c]
    for line in ax.lines:
        ys += list(np.asarray(line.get_ydata(), dtype=float))
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            ys += [y for seg in coll.get_segments() for y in np.asarray(seg, dtype=float)[:, 1]]
    ys = [y for y in ys if np.isfinite(y)]
    return max(ys) if ys else -math.inf


def _headroom(ax, bottom: float = 0.0, at_least: float = -math.inf) -> None:
    """y from ``bottom`` to HEADROOM of the range above the highest thing drawn (or above
    ``at_least``, for a scale shared by panels or fixed by the quantity's range)."""
    top = max(_highest(ax), at_least)
    if not top > bottom:  # nothing above the bottom (e.g. every I = 0): a unit range
        top = bottom + 1.0
    ax.set_ylim(bottom, bottom + (1.0 + HEADROOM) * (top - bottom))


def _experts(first: int, size: int) -> str:
    return f"e{first}" if size == 1 else f"e{first}-e{first + size - 1}"


def language_heatmaps_figure(models: Models, side: str) -> Figure:
    """Per MoE layer (rows) and model (columns): the share of each ``side`` language's
    tokens whose first choice is each expert (rows of the map sum to 1)."""
    names = merge_summaries(dict(models))
    langs = max(len(s["layers"][0][f"{side}_language"]["languages"]) for _, s in models)
    experts = max(l["num_experts"] for _, s in models for l in s["layers"])
    fig, axes = _grid(len(names), len(models), 1.5 + 0.45 * experts, 1.3 + 0.38 * langs,
                      legend=False)  # a colour bar, no legend
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
    return fig


def expert_load_figure(models: Models) -> Figure:
    """Per MoE layer and model: each expert's share of the token-expert assignments,
    coloured by SMoE stratum or MoEC cluster, the fair share 1/E (dashed) and starved
    experts (< 10% of it, red, hatched); a legend per panel names them."""
    names = merge_summaries(dict(models))
    experts = max(l["num_experts"] for _, s in models for l in s["layers"])
    fig, axes = _grid(len(names), len(models), 1.5 + 0.35 * experts, 2.3)
    # one y scale for every panel
    top = max(max(max(l["load_share"]), l["fair_share"]) for _, s in models for l in s["layers"])
    for r, name in enumerate(names):
        for c, (label, summary) in enumerate(models):
            ax = axes[r][c]
            layer = _layer(summary, name)
            if layer is None:
                _missing(ax)
                continue
            share = np.array(layer["load_share"])
            E = share.size
            if layer.get("strata"):
                sizes = list(layer["strata"]["sizes"])
                kind = "stratum"
            elif layer.get("clusters"):
                sizes = [layer["clusters"]["cluster_size"]] * layer["clusters"]["count"]
                kind = "cluster"
            else:
                sizes, kind = [E], None  # one colour, nothing to name
            group = np.repeat(np.arange(len(sizes)), sizes)[:E]
            bars = ax.bar(range(E), share, color=[f"C{g % 10}" for g in group])
            for e in layer["starved"]:
                bars[e].set_color("red")
                bars[e].set_hatch("//")
            fair = ax.axhline(layer["fair_share"], color="black", linestyle="--", linewidth=1,
                              label="fair share 1/E")
            handles = []
            if kind:
                starts = np.cumsum([0] + sizes[:-1])
                handles += [Patch(color=f"C{g % 10}", label=f"{kind} {g} ({_experts(a, n)})")
                            for g, (a, n) in enumerate(zip(starts, sizes))]
            handles.append(fair)
            if layer["starved"]:
                handles.append(Patch(color="red", hatch="//", label="starved (< 10% of 1/E)"))
            ax.set_xticks(range(E))
            ax.set_xlabel("expert")
            ax.set_ylabel("share of assignments")
            starved = f", starved: {layer['starved']}" if layer["starved"] else ""
            groups = (f", strata {'+'.join(map(str, layer['strata']['sizes']))}" if layer.get("strata")
                      else f", {layer['clusters']['count']} clusters" if layer.get("clusters") else "")
            ax.set_title(f"{label}: {name}\nCV {layer['load_cv']:.2f}{groups}{starved}", fontsize=9)
            _headroom(ax, at_least=top)
            _legend(ax, handles)
    return fig


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


def mutual_information_figure(models: Models) -> Figure:
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
        _headroom(ax)
        _legend(ax)
    return fig


def entropies_figure(models: Models) -> Figure:
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
        _headroom(ax)
        _legend(ax)
    return fig


def smoe_strata_figure(models: Models) -> Optional[Figure]:
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
        _headroom(ax, at_least=1.0)  # a share: the full range
        ax.set_ylabel("share of tokens reaching")
        ax.set_title(f"{label}: tokens reaching each stratum", fontsize=10)
        _legend(ax)
        ax = axes[r][1]
        langs = list(layers[0]["strata"]["requested_capacity_by_target_language"])
        _bars(ax, names, [(lang, [l["strata"]["requested_capacity_by_target_language"].get(
            lang, np.nan) for l in layers]) for lang in langs])
        # from one pass (every token) to one pass per stratum, the most it can be
        _headroom(ax, bottom=1.0, at_least=strata)
        ax.set_ylabel("expert passes per token")
        ax.set_title(f"{label}: requested capacity per target language", fontsize=10)
        _legend(ax)
    return fig


def moec_clusters_figure(models: Models) -> Optional[Figure]:
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
            _headroom(ax)
            _legend(ax)
    return fig


# (file name, figure builder), in report order
FIGURES: List[Tuple[str, Callable[[Models], Optional[Figure]]]] = [
    ("heatmap_target_language.png", lambda models: language_heatmaps_figure(models, "target")),
    ("heatmap_source_language.png", lambda models: language_heatmaps_figure(models, "source")),
    ("expert_load.png", expert_load_figure),
    ("mutual_information.png", mutual_information_figure),
    ("entropies.png", entropies_figure),
    ("smoe_strata.png", smoe_strata_figure),
    ("moec_clusters.png", moec_clusters_figure),
]


def draw_all(models: Models, out_dir: str) -> List[str]:
    """Every figure that applies to ``models``, written into ``out_dir``; their file
    names, in report order."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, build in FIGURES:
        fig = build(models)  # one at a time: each is freed once saved
        if fig is not None:
            written.append(save(fig, out_dir, name))
    return written
