"""Run records of the studies (examples/specialization, examples/cluster_study).

One JSON line per finished run, appended and fsynced as the run ends, so an
interrupted study keeps every run that finished and a rerun can skip them; reports
are written to a temporary file and renamed, so a crash never leaves half a table.
"""

import json
import os
from statistics import mean, pstdev, stdev
from typing import List, Sequence

from ..atomic_files import write_atomically


def read_records(path: str) -> List[dict]:
    """Every record in ``path`` (a JSON object per line); [] when it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_record(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def mean_std(values: Sequence[float], digits: int = 3, population: bool = False) -> str:
    """``"m ± s"`` (sample std, or population std as some authors report), one value
    as itself, ``"-"`` for none."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    spread = pstdev(values) if population else stdev(values)
    return f"{mean(values):.{digits}f} ± {spread:.{digits}f}"
