"""Every accepted label form (tensor of any integer type, lists, tuples, tensors per row, CSR, no labels at all)."""

from __future__ import annotations

import pytest
import torch

from recsys.lsh_output import LSHConfig, LSHOutputLayer, label_pairs
from tests.lsh.test_lsh_output import (
    _assert_close,
    _bce_by_hand,
    _record_selection,
    _softmax_cross_entropy_by_hand,
    _targets,
)

CPU = torch.device("cpu")
LISTS = [[1, 5], [], [2]]  # three rows, one without labels
FLAT_VALUES, FLAT_ROWS = [1, 5, 2], [0, 0, 2]


def _assert_pairs(got: tuple[torch.Tensor, torch.Tensor, bool], values: list[int], rows: list[int], multi: bool):
    """Flat int64 class ids (what indexing and ``F.cross_entropy`` need) and int64 row ids."""
    got_values, got_rows, got_multi = got
    assert got_values.dtype == torch.int64 and got_rows.dtype == torch.int64
    assert got_values.tolist() == values and got_rows.tolist() == rows and got_multi is multi


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_label_pairs_of_one_label_per_row(dtype):
    _assert_pairs(label_pairs(torch.tensor([4, 0, 7], dtype=dtype), 3, CPU), [4, 0, 7], [0, 1, 2], False)


@pytest.mark.parametrize(
    "labels",
    [
        LISTS,
        tuple(LISTS),  # a tuple of label lists is a sequence of sequences, not CSR
        [torch.tensor(row, dtype=torch.int64) for row in LISTS],  # one tensor per row
        (torch.tensor(FLAT_VALUES, dtype=torch.int32), torch.tensor([0, 2, 2, 3])),  # CSR with int32 values
        (torch.tensor(FLAT_VALUES), torch.tensor([0, 2, 2, 3], dtype=torch.int32)),
    ],
    ids=["lists", "tuple-of-lists", "tensor-per-row", "csr-int32-values", "csr-int32-offsets"],
)
def test_label_pairs_of_label_lists(labels):
    _assert_pairs(label_pairs(labels, 3, CPU), FLAT_VALUES, FLAT_ROWS, True)


@pytest.mark.parametrize(
    "labels", [[torch.tensor([3, 1]), torch.tensor([0])], ([3, 1], [0])], ids=["tensor-per-row", "tuple-of-lists"]
)
def test_label_pairs_of_two_rows_are_lists_not_csr(labels):
    """Two rows look like ``(values, offsets)`` by length; only a *tuple* holding tensors is CSR."""
    _assert_pairs(label_pairs(labels, 2, CPU), [3, 1, 0], [0, 0, 1], True)


NO_LABELS_CSR = (torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("labels", [[[], [], []], NO_LABELS_CSR], ids=["lists", "csr"])
def test_label_pairs_of_a_batch_without_labels(labels):
    _assert_pairs(label_pairs(labels, 3, CPU), [], [], True)


def test_label_pairs_of_an_empty_batch():
    """A replica may get an empty shard: no rows, no labels (and still int64 ids)."""
    _assert_pairs(label_pairs([], 0, CPU), [], [], True)
    _assert_pairs(label_pairs(torch.zeros(0, dtype=torch.int64), 0, CPU), [], [], False)


def test_label_pairs_reject_the_wrong_count():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        label_pairs(torch.tensor([1, 2]), 3, CPU)
    with pytest.raises(ValueError, match="4 entries"):
        label_pairs((torch.tensor([1]), torch.tensor([0, 1])), 3, CPU)
    with pytest.raises(ValueError, match="2 label lists for a batch of 3"):
        label_pairs([[1], [2]], 3, CPU)


def _layer(seed: int = 0, **config) -> LSHOutputLayer:
    defaults = dict(num_tables=2, num_bits=3, sample_size=30, schedule="fixed", rebuild_period=10_000, seed=seed)
    return LSHOutputLayer(6, 80, LSHConfig(**{**defaults, **config})).double()


def test_int32_labels_train_and_evaluate_like_int64_labels():
    """A loader may hand out int32 ids: the training step draws and scores the same, eval gives the full softmax."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 80, (5,), generator=g)
    losses = [_layer()(hidden, labels.to(dtype)) for dtype in (torch.int64, torch.int32)]
    assert float(losses[0]) == float(losses[1])
    layer = _layer().eval()
    expected, _ = _softmax_cross_entropy_by_hand(hidden @ layer.weight.detach().t(), labels)
    _assert_close(layer(hidden, labels.to(torch.int32)).detach(), expected)  # observed relative error 0


def test_a_batch_without_any_label_is_all_negatives(monkeypatch):
    """BCE with all-zero targets: ``sum softplus(logits) / B`` over the sample (training) or all classes (eval)."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 6, generator=g, dtype=torch.float64)
    layer = _layer()
    drawn = _record_selection(monkeypatch)
    for labels in ([[], [], []], NO_LABELS_CSR):
        loss = layer(hidden, labels).detach()
        sample = drawn["sample"]
        assert sample.numel() == 30
        expected, _ = _bce_by_hand(hidden @ layer.weight.detach()[sample].t(), torch.zeros(3, 30, dtype=torch.float64))
        _assert_close(loss, expected)  # observed relative error 0
    stats = layer.stats()
    assert stats["steps"] == 2 and stats["label_recall_in_sample"] == 0.0 and stats["label_recall_own_bucket"] == 0.0
    full, _ = _bce_by_hand(hidden @ layer.weight.detach().t(), torch.zeros(3, 80, dtype=torch.float64))
    _assert_close(layer.eval()(hidden, [[], [], []]).detach(), full)


def test_full_loss_takes_raw_labels_of_any_form():
    """``full_loss`` is public: one label per row (softmax), or label lists (BCE), with B != D and a 3-row list."""
    g = torch.Generator().manual_seed(5)
    layer = _layer()
    hidden = torch.randn(3, 6, generator=g, dtype=torch.float64)
    logits = hidden @ layer.weight.detach().t()
    labels = torch.tensor([7, 0, 79])
    expected, _ = _softmax_cross_entropy_by_hand(logits, labels)
    _assert_close(layer.full_loss(hidden, labels).detach(), expected)
    lists = [[3, 9], [0], [79, 1, 2]]
    expected, _ = _bce_by_hand(logits, _targets(lists, torch.arange(80)))
    _assert_close(layer.full_loss(hidden, lists).detach(), expected)
    _assert_close(layer.full_loss(hidden, tuple(lists)).detach(), expected)
