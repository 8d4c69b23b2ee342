"""Keep fairseq from silently dropping the last batch of every epoch.

fairseq main's ``data_utils.batch_by_size`` discards the last batch when its size
is not a multiple of ``--required-batch-size-multiple`` (default 8). For
``fairseq-generate`` that means test sentences are never translated and the BLEU
of a test set is computed on a subset, without a warning (seen: 56 of 60 test
sentences decoded). We give the dropped batch back: it was formed under the same
``--max-tokens``/``--batch-size`` limits, it is only not a multiple of 8.
"""

import numpy as np


def install() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported."""
    from fairseq.data import data_utils

    if getattr(data_utils.batch_by_size, "_moe_fairseq_keeps_last", False):
        return
    original = data_utils.batch_by_size

    def batch_by_size(indices, *args, **kwargs):
        batches = original(indices, *args, **kwargs)
        if isinstance(indices, np.ndarray):
            wanted = indices
        else:
            wanted = np.fromiter(indices, dtype=np.int64, count=-1)
        placed = sum(len(b) for b in batches)
        if placed < len(wanted):
            seen = np.concatenate(batches) if batches else np.zeros(0, dtype=wanted.dtype)
            missing = wanted[~np.isin(wanted, seen)]
            if len(missing):
                batches = list(batches) + [missing.astype(np.int64)]
        return batches

    batch_by_size._moe_fairseq_keeps_last = True
    data_utils.batch_by_size = batch_by_size
