"""fairseq's batch_by_size must place every index (moe_fairseq.fairseq_fixes.batching)."""

import numpy as np

import moe_fairseq  # noqa: F401  (installs the fix)
from fairseq.data import data_utils


def _sizes(i):
    return 3 + int(i) % 5


def test_every_index_is_batched_with_a_batch_multiple():
    indices = np.arange(60, dtype=np.int64)
    batches = data_utils.batch_by_size(
        indices, _sizes, max_tokens=None, max_sentences=32, required_batch_size_multiple=8
    )
    placed = np.concatenate(batches)
    assert sorted(placed.tolist()) == list(range(60))
    assert [len(b) for b in batches] == [32, 24, 4]
    # limits still hold for the given-back batch
    assert all(len(b) <= 32 for b in batches)


def test_tiny_input_is_not_lost():
    batches = data_utils.batch_by_size(
        np.array([5, 1, 2]), _sizes, max_tokens=1000, required_batch_size_multiple=8
    )
    assert sorted(np.concatenate(batches).tolist()) == [1, 2, 5]


def test_full_batches_unchanged():
    indices = np.arange(64, dtype=np.int64)
    batches = data_utils.batch_by_size(
        indices, _sizes, max_tokens=None, max_sentences=32, required_batch_size_multiple=8
    )
    assert [len(b) for b in batches] == [32, 32]
