"""Learning curves of several fairseq-train runs on one figure: validation loss against
wall-clock time and against updates.

Read from the runs' own logs (``--log-format json``, the default text format works for
the fields used too): every ``| valid | {...}`` record gives a point (updates from
``valid_num_updates``, loss from ``valid_loss``, in base 2 as fairseq logs it); its
time is the log line's timestamp less that of the run's first ``begin training epoch``
line (model building and data loading before it are left out; validation passes
after it are in, as they are in any wall-clock comparison of runs that validate alike).
Timestamps have a resolution of one second.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Dict, List, Mapping, Optional, Sequence

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
_VALID = re.compile(r"\| valid \| (\{.*\})\s*$")


def _stamp(line: str) -> Optional[_dt.datetime]:
    m = _STAMP.match(line)
    return _dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S") if m else None


def _number(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def valid_points(log_text: str, subset: str = "valid") -> List[dict]:
    """``[{"updates", "seconds", "loss", "epoch"}]`` of every validation record in a
    fairseq-train log, in log order (``subset``: the record tag, ``valid`` unless
    fairseq was given another ``--valid-subset``)."""
    pattern = _VALID if subset == "valid" else re.compile(
        rf"\| {re.escape(subset)} \| (\{{.*\}})\s*$")
    start = None
    first = None
    points = []
    for line in log_text.splitlines():
        when = _stamp(line)
        if when is not None and first is None:
            first = when
        if start is None and when is not None and "begin training epoch" in line:
            start = when
        m = pattern.search(line)
        if not m:
            continue
        try:
            record = json.loads(m.group(1))
        except ValueError:
            continue
        loss = _number(record.get(f"{subset}_loss"))
        updates = _number(record.get(f"{subset}_num_updates"))
        if loss is None or updates is None:
            continue
        origin = start or first
        seconds = (when - origin).total_seconds() if when is not None and origin else None
        points.append({"updates": int(updates), "seconds": seconds, "loss": loss,
                       "epoch": _number(record.get("epoch"))})
    return points


def plot_learning_curves(curves: Mapping[str, Sequence[dict]], path: str,
                         title: str = "") -> str:
    """One PNG, two panels (validation loss against seconds, and against updates), one
    line per run of ``curves`` (name -> :func:`valid_points`). Runs without points
    are named in the legend as such. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_updates) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^vP*Xh"
    for i, (name, points) in enumerate(curves.items()):
        style = dict(marker=markers[i % len(markers)], markersize=3.5, linewidth=1.4)
        timed = [p for p in points if p.get("seconds") is not None]
        label = name if points else f"{name} (no validation)"
        by_time.plot([p["seconds"] for p in timed], [p["loss"] for p in timed], label=label,
                     **style)
        by_updates.plot([p["updates"] for p in points], [p["loss"] for p in points],
                        label=label, **style)
    by_time.set_xlabel("wall-clock seconds since training began")
    by_updates.set_xlabel("updates")
    for ax in (by_time, by_updates):
        ax.set_ylabel("validation loss (bits per token)")
        ax.grid(alpha=0.3)
    by_updates.legend(loc="upper right", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_markdown(curves: Mapping[str, Sequence[dict]]) -> List[str]:
    """A table line per run: validation points, last updates, seconds and loss, best
    loss."""
    lines = ["| run | points | last update | last s | last valid loss | best valid loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, points in curves.items():
        if not points:
            lines.append(f"| {name} | 0 | – | – | – | – |")
            continue
        last = points[-1]
        secs = "–" if last["seconds"] is None else f"{last['seconds']:.0f}"
        lines.append(f"| {name} | {len(points)} | {last['updates']} | {secs} | "
                     f"{last['loss']:.3f} | {min(p['loss'] for p in points):.3f} |")
    return lines


def read_curves(logs: Mapping[str, str]) -> Dict[str, List[dict]]:
    """``{name: valid_points}`` from ``{name: log file path}``."""
    out = {}
    for name, path in logs.items():
        with open(path, encoding="utf-8", errors="replace") as f:
            out[name] = valid_points(f.read())
    return out
