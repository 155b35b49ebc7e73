"""The two commands end to end on tiny files, the readers, and the ranking metrics against hand counts."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.output_layer_training import ranking_metrics
from pipelines.sequences import next_item_splits, read_sequences
from pipelines.xmc_data import read_xmc


def _write_xmc(path, points, features, labels, seed):
    g = torch.Generator().manual_seed(seed)
    lines = [f"{points} {features} {labels}"]
    for i in range(points):
        ls = sorted(set(torch.randint(0, labels, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()))
        fs = sorted(set(torch.randint(0, features, (5,), generator=g).tolist()))
        lines.append(",".join(map(str, ls)) + " " + " ".join(f"{f}:{(i % 3) + 0.5}" for f in fs))
    path.write_text("\n".join(lines) + "\n")


def test_read_xmc_matches_the_lines(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("3 6 4\n0,2 1:0.5 5:2.0\n 3:1.0\n3 0:1.5\n")
    data = read_xmc(path)
    assert data.num_points == 3 and data.num_features == 6 and data.num_labels == 4
    assert data.label_values.tolist() == [0, 2, 3] and data.label_offsets.tolist() == [0, 2, 2, 3]
    assert data.feature_indices.tolist() == [1, 5, 3, 0] and data.feature_values.tolist() == [0.5, 2.0, 1.0, 1.5]
    sub = data.rows(torch.tensor([2, 0]))
    assert sub.label_values.tolist() == [3, 0, 2] and sub.feature_indices.tolist() == [0, 1, 5]
    path.write_text("2 6 4\n0 1:0.5\n")
    with pytest.raises(ValueError, match="header says 2 points"):
        read_xmc(path)


def test_next_item_splits_hold_out_the_last_two_items(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("1 1 2 3 4\n2 5 6\n3 7 8 9\n")
    splits = next_item_splits(read_sequences(path), max_len=3)
    hist, tgt = splits["test"]
    assert tgt.tolist() == [3, 8] and hist.tolist() == [[0, 1, 2], [-1, 6, 7]]
    hist, tgt = splits["validation"]
    assert tgt.tolist() == [2, 7] and hist.tolist() == [[-1, 0, 1], [-1, -1, 6]]
    hist, tgt = splits["train"]
    assert tgt.tolist() == [1, 5] and hist.tolist() == [[-1, -1, 0], [-1, -1, 4]]


def test_ranking_metrics_by_hand():
    top = torch.tensor([[3, 1, 2], [0, 4, 5]])
    values, rows = torch.tensor([1, 2, 9, 7]), torch.tensor([0, 0, 0, 1])
    m = ranking_metrics(top, values, rows, [1, 3])
    assert m["p@1"] == pytest.approx(0.0)
    assert m["p@3"] == pytest.approx(2 / 3)
    ideal = 1 + 1 / torch.log2(torch.tensor(3.0)) + 0.5
    dcg = 1 / torch.log2(torch.tensor(3.0)) + 0.5
    assert m["ndcg@3"] == pytest.approx(float(dcg / ideal))
    assert m["recall@3"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("layer", ["lsh", "full"])
def test_train_xmc_writes_metrics(tmp_path, layer):
    from pipelines.train_xmc import main

    _write_xmc(tmp_path / "d.txt", 300, 40, 30, seed=1)
    out = tmp_path / layer
    main(["--data", str(tmp_path / "d.txt"), "--train-rows", "240", "--out", str(out), "--output-layer", layer,
          "--epochs", "2", "--batch-size", "32", "--sample-size", "64", "--lsh-bits", "3", "--lsh-tables", "2",
          "--no-progress", "--encoder-width", "16", "--hidden", "8"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("p@1", "p@3", "p@5", "step_time_median"):
        assert key in metrics
    assert 0.0 <= metrics["p@1"] <= 1.0 and (out / "curves.png").is_file()
    assert any((out / "checkpoints").iterdir())


def test_train_next_item_writes_metrics(tmp_path):
    from pipelines.train_next_item import main

    g = torch.Generator().manual_seed(0)
    lines = [f"{u} " + " ".join(str(v) for v in (torch.randint(1, 60, (8,), generator=g)).tolist()) for u in range(80)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    main(["--data", str(tmp_path / "s.txt"), "--out", str(out), "--output-layer", "lsh", "--epochs", "1",
          "--batch-size", "64", "--sample-size", "32", "--lsh-bits", "3", "--lsh-tables", "2", "--hidden", "8",
          "--item-dim", "8", "--max-len", "5", "--no-progress"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["recall@10"] <= 1.0 and "ndcg@10" in metrics and "retrieval_recall@10" in metrics
