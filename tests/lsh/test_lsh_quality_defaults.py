"""On default flags, the LSH output layer ranks next items within 90% of the full softmax (equal epochs).

Reference: the same command with ``--output-layer full`` (same encoder, data, seed and epochs). The logs
are generated (``pipelines.data.next_item_synthetic``) at two catalogue sizes and two popularity skews, both
larger than the default sample (2,048 classes), so the layer scores a sample and not the whole catalogue.
At Beauty's size and on 10^5 items the same comparison is in docs/lsh_output.md.
"""

from __future__ import annotations

import pytest

from pipelines.data.next_item_synthetic import NextItemLogConfig, write_next_item_log
from pipelines.training.next_item import main

pytestmark = pytest.mark.slow

SMALL_RUN = ["--epochs", "3", "--hidden", "64", "--item-dim", "32", "--max-len", "20", "--no-progress"]


@pytest.mark.parametrize(
    ("items", "users", "exponent"),
    [
        (5_000, 8_000, 0.67),  # Beauty's skew
        (20_000, 12_000, 1.0),  # a heavier head over a larger catalogue
    ],
)
def test_default_lsh_layer_keeps_90_percent_of_full_softmax_recall_and_ndcg(tmp_path, items, users, exponent):
    log = tmp_path / "log.txt"
    write_next_item_log(log, NextItemLogConfig(users=users, items=items, popularity_exponent=exponent, seed=3))
    results = {
        layer: main(["--data", str(log), "--out", str(tmp_path / layer), "--output-layer", layer, *SMALL_RUN])
        for layer in ("lsh", "full")
    }
    lsh, full = results["lsh"], results["full"]
    assert lsh["config"]["lsh"]["sample_size"] < items  # a sample, not the catalogue
    assert full["recall@10"] > 0.05  # the reference learned something to compare against
    print(f"{items} items: LSH {lsh['recall@10']:.4f} / {lsh['ndcg@10']:.4f}, full {full['recall@10']:.4f} / "
          f"{full['ndcg@10']:.4f} (Recall@10 / NDCG@10)")  # fmt: skip
    for metric in ("recall@10", "ndcg@10"):
        assert lsh[metric] >= 0.9 * full[metric], (metric, lsh[metric], full[metric])
