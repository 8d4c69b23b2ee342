"""Tables and figures of the cluster study, next to the authors' numbers.

The authors' figures (Chen et al. 2022, from their notebooks' printed results; MoE rows
are 10-run means with the mean dispatch entropy, single-model rows ONE run each):
settings 1 and 3 only.
"""

import math
import os
from statistics import mean, median
from typing import Dict, List

from moe_fairseq.analysis.run_records import mean_std

# setting -> model -> (test accuracy %, std or None, dispatch entropy or None)
PAPER = {
    1: {"single_linear": (68.31, None, None), "single_nonlinear": (79.57, None, None),
        "moe_linear": (93.00, 2.11, 1.30), "moe_nonlinear": (99.46, 0.55, 0.098)},
    3: {"single_linear": (74.30, None, None), "single_nonlinear": (73.72, None, None),
        "moe_linear": (95.93, 1.34, 1.16), "moe_nonlinear": (99.99, 0.02, 0.008)},
}
ORDER = ["single_linear", "single_nonlinear", "moe_linear", "moe_nonlinear"]
# A nonlinear MoE seed below this accuracy counts as collapsed (one cluster split
# between experts or two clusters on one expert).
COLLAPSE_BELOW = 98.0


def group(runs: List[dict]) -> Dict[int, Dict[str, List[dict]]]:
    out: Dict[int, Dict[str, List[dict]]] = {}
    for r in runs:
        out.setdefault(r["setting"], {}).setdefault(r["model"], []).append(r)
    return out


def _ms(values, digits=2):
    return mean_std(values, digits, population=True)  # the authors report np.std


def checks(runs: List[dict]) -> List[str]:
    """The issue's acceptance checks for settings 1 and 3, PASS/FAIL lines."""
    by = group(runs)
    lines = []
    limits = {1: dict(median=99.0, ent=0.30, lin=(90.0, 96.5), single=("single_nonlinear",), cap=82.0),
              3: dict(median=99.5, ent=0.25, lin=(92.0, 98.5), single=("single_linear", "single_nonlinear"), cap=77.0)}
    for s, lim in limits.items():
        models = by.get(s, {})
        nl, li = models.get("moe_nonlinear", []), models.get("moe_linear", [])
        if nl:
            acc = [r["test_accuracy"] for r in nl]
            ent = mean(r["dispatch_entropy"] for r in nl)
            ok = median(acc) >= lim["median"] and mean(acc) >= 97.5 and ent <= lim["ent"]
            lines.append(f"{'PASS' if ok else 'FAIL'} S{s} MoE nonlinear: median {median(acc):.2f} "
                         f"(>= {lim['median']}), mean {mean(acc):.2f} (>= 97.5), entropy {ent:.3f} "
                         f"(<= {lim['ent']})")
        if li:
            acc = mean(r["test_accuracy"] for r in li)
            ent = mean(r["dispatch_entropy"] for r in li)
            gap = mean(r["test_accuracy"] for r in nl) - acc if nl else float("nan")
            lo, hi = lim["lin"]
            ok = lo <= acc <= hi and ent >= 0.9 and gap >= 3.0
            lines.append(f"{'PASS' if ok else 'FAIL'} S{s} MoE linear: mean {acc:.2f} (in {lo}-{hi}), "
                         f"entropy {ent:.3f} (>= 0.9), {gap:.2f} points below MoE nonlinear (>= 3)")
        for name in lim["single"]:
            rs = models.get(name, [])
            if rs:
                acc = mean(r["test_accuracy"] for r in rs)
                ok = acc <= lim["cap"]
                lines.append(f"{'PASS' if ok else 'FAIL'} S{s} {name}: mean {acc:.2f} (<= {lim['cap']})")
    return lines


def markdown(runs: List[dict], header: str = "", with_checks: bool = True) -> str:
    by = group(runs)
    out = [header] if header else []
    out += ["| setting | model | seeds | test accuracy % | median | min | dispatch entropy "
            "| authors' accuracy | authors' entropy | collapsed seeds | epochs | s per run |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sorted(by):
        for name in ORDER:
            rs = by[s].get(name)
            if not rs:
                continue
            acc = [r["test_accuracy"] for r in rs]
            ent = [r["dispatch_entropy"] for r in rs if r.get("dispatch_entropy") is not None]
            paper = PAPER.get(s, {}).get(name)
            p_acc = "-" if paper is None else (f"{paper[0]:.2f}" + (f" ± {paper[1]:.2f}" if paper[1] else " (1 run)"))
            p_ent = "-" if paper is None or paper[2] is None else f"{paper[2]:.3f}"
            collapsed = (str(sum(a < COLLAPSE_BELOW for a in acc))
                         if name == "moe_nonlinear" else "-")
            out.append(f"| {s} | {name} | {len(rs)} | {_ms(acc)} | {median(acc):.2f} | {min(acc):.2f} | "
                       f"{_ms(ent, 3) if ent else '-'} | {p_acc} | {p_ent} | {collapsed} | "
                       f"{mean(r['epochs'] for r in rs):.0f} | {mean(r['seconds'] for r in rs):.1f} |")
    lines = checks(runs) if with_checks else []
    if with_checks and lines:
        out += ["", "Checks (settings 1 and 3, full protocol):", ""] + [f"- {l}" for l in lines]
    elif not with_checks:
        out += ["", "(No acceptance checks: they apply to the full protocol only.)"]
    return "\n".join(out) + "\n"


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def accuracy_png(path: str, runs: List[dict]) -> str:
    """Test accuracy of every seed, per setting and model (dots), with the mean (bar)."""
    import logging

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    by = group(runs)
    settings = sorted(by)
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings) + 0.5, 3.8),
                             squeeze=False, layout="constrained", sharey=True)
    for ax, s in zip(axes[0], settings):
        names = [n for n in ORDER if n in by[s]]
        for i, name in enumerate(names):
            acc = [r["test_accuracy"] for r in by[s][name]]
            ax.scatter([i] * len(acc), acc, s=14, alpha=0.7)
            ax.hlines(mean(acc), i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_title(f"setting {s}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test accuracy % (each seed; bar = mean)")
    _save(fig, path)
    plt.close(fig)
    return path


def router_centers_png(path: str, run: dict, centers, features) -> str:
    """Cosine similarity of each expert's router weight vector with the true cluster
    centres and feature vectors, for one MoE run."""
    import logging

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt
    import torch

    w = torch.tensor(run["router_weight"], dtype=torch.float64)
    basis = torch.cat([centers.double(), features.double()])
    cos = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (basis / basis.norm(dim=1, keepdim=True)).t()
    K = centers.size(0)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    im = ax.imshow(cos.numpy(), vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
    ax.set_xticks(range(2 * K))
    ax.set_xticklabels([f"c{k + 1}" for k in range(K)] + [f"v{k + 1}" for k in range(K)])
    ax.set_yticks(range(w.size(0)))
    ax.set_yticklabels([f"expert {e + 1}" for e in range(w.size(0))])
    for (i, j), v in ((ij, float(cos[ij])) for ij in [(i, j) for i in range(w.size(0)) for j in range(2 * K)]):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"router weights vs centres c_k and features v_k (cosine): {run['model']}, "
                 f"setting {run['setting']}, seed {run['seed']}", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)
    plt.close(fig)
    return path
