"""LFU helpers of kernels.tt_cache against counts by hand."""

from __future__ import annotations

import torch

from kernels.tt_cache import count_rows


def test_count_rows_adds_zero_for_listed_rows_the_batch_never_references():
    """``unique`` may list rows the batch does not reference (a fixed-size or merged list of ids): they are
    counted 0 times, whatever their position."""
    counts = torch.tensor([5, 0, 0, 2, 0, 0, 0, 9], dtype=torch.int32)
    unique = torch.tensor([1, 3, 6, 7])
    count_rows(counts, unique, torch.tensor([1, 0, 1, 1]))  # rows 3, 1, 3, 3; rows 6 and 7 not looked up
    assert counts.tolist() == [5, 1, 0, 5, 0, 0, 0, 9]
    count_rows(counts, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))  # an empty batch
    assert counts.tolist() == [5, 1, 0, 5, 0, 0, 0, 9]
