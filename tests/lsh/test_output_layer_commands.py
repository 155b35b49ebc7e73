"""The two commands end to end on tiny files, the readers, and the ranking metrics against hand counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipelines.data.sequences import next_item_sequences, next_item_splits, read_sequences
from pipelines.data.xmc_data import read_xmc
from pipelines.training.checkpoint import load_checkpoint
from pipelines.training.output_layer import ranking_metrics


def _write_xmc(path, points, features, labels, seed) -> list[tuple[list[int], dict[int, float]]]:
    """A random XMC file; returns each point's (labels, {feature: value}) as written."""
    g = torch.Generator().manual_seed(seed)
    lines, rows = [f"{points} {features} {labels}"], []
    for i in range(points):
        ls = sorted(set(torch.randint(0, labels, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()))
        fs = sorted(set(torch.randint(0, features, (5,), generator=g).tolist()))
        lines.append(",".join(map(str, ls)) + " " + " ".join(f"{f}:{(i % 3) + 0.5}" for f in fs))
        rows.append((ls, {f: (i % 3) + 0.5 for f in fs}))
    path.write_text("\n".join(lines) + "\n")
    return rows


def _checkpoint_tensors(run_dir: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
    """The named tensors of the model in the run's (only) checkpoint, read back through DCP."""
    (path,) = (run_dir / "checkpoints").glob("step-*")
    state = {"model": {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}}
    load_checkpoint(path, state)
    return {name: value.double() if value.is_floating_point() else value for name, value in state["model"].items()}


def _top_ids_by_hand(hidden: torch.Tensor, weight: torch.Tensor, k: int, allowed: torch.Tensor | None = None):
    """Each row's ``k`` best classes by inner product (only ``allowed`` ones; ``-1`` where fewer), as lists."""
    scores = hidden @ weight.t()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    top_scores, top_ids = torch.topk(scores, k, dim=1)
    return torch.where(torch.isfinite(top_scores), top_ids, -1).tolist()


def _colliding_by_hand(hidden: torch.Tensor, tensors: dict, tables: int, bits: int) -> torch.Tensor:
    """``(N, C)``: the class shares a bucket with the row in some table of the checkpointed tables (SimHash codes)."""
    signs = (hidden @ tensors["output.projection"] > 0).view(hidden.shape[0], tables, bits).long()
    codes = (signs * 2 ** torch.arange(bits)).sum(-1)  # (N, L)
    return (codes[:, None, :] == tensors["output.codes"][None]).any(-1)


def _precision_and_ndcg(top: list[list[int]], labels: list[list[int]], k: int) -> tuple[float, float]:
    """Mean P@k and nDCG@k over rows (a row without labels scores 0), counted one row at a time."""
    precision = ndcg = 0.0
    for ranked, truth in zip(top, labels, strict=True):
        hits = [rank for rank, c in enumerate(ranked[:k]) if c in truth]
        precision += len(hits) / k
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(k, len(truth))))
        ndcg += sum(1 / math.log2(rank + 2) for rank in hits) / ideal if truth else 0.0
    return precision / len(top), ndcg / len(top)


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


def test_next_item_sequences_hold_every_train_target_once_and_no_held_out_item(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("1 1 2 3 4\n2 5 6\n3 7 8 9\n4 1 2 3 4 5 6 7 8 9 10\n")
    inputs, targets = next_item_sequences(read_sequences(path), max_len=3)
    # user 1: train items 0, 1 (2 and 3 held out); user 2 (2 items): all train; user 3: no train target;
    # user 4: train items 0..7 in windows of 3 targets from the most recent back
    assert inputs.tolist() == [[-1, -1, 0], [-1, -1, 4], [4, 5, 6], [1, 2, 3], [-1, -1, 0]]
    assert targets.tolist() == [[-1, -1, 1], [-1, -1, 5], [5, 6, 7], [2, 3, 4], [-1, -1, 1]]


def test_next_item_sequences_targets_are_the_train_split_and_inputs_the_items_before(tmp_path):
    g = torch.Generator().manual_seed(4)
    lines = [f"{u} " + " ".join(str(v) for v in torch.randint(1, 30, (int(torch.randint(1, 40, (1,), generator=g)),),
                                                               generator=g).tolist()) for u in range(60)]  # fmt: skip
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    log = read_sequences(tmp_path / "s.txt")
    inputs, targets = next_item_sequences(log, max_len=7)
    splits = next_item_splits(log, max_len=7)
    assert sorted(targets[targets >= 0].tolist()) == sorted(splits["train"][1].tolist())
    assert ((inputs >= 0) == (targets >= 0)).all()
    # a row's real slots are consecutive items of one user: the input of slot t + 1 is the target of slot t
    both = (targets[:, :-1] >= 0) & (inputs[:, 1:] >= 0)
    assert (targets[:, :-1][both] == inputs[:, 1:][both]).all()
    assert not (targets[:, :-1] >= 0)[inputs[:, 1:] < 0].any()  # left-padded: no hole inside a row


def test_mean_encoder_batches_are_the_train_split_built_a_batch_at_a_time(tmp_path):
    """The mean encoder's batches build histories per batch; together they are exactly the eager train split."""
    from pipelines.training.next_item import NextItemConfig, example_batches

    g = torch.Generator().manual_seed(11)
    lines = [f"{u} " + " ".join(str(v) for v in torch.randint(1, 50, (int(torch.randint(1, 30, (1,), generator=g)),),
                                                               generator=g).tolist()) for u in range(40)]  # fmt: skip
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    log = read_sequences(tmp_path / "s.txt")
    config = NextItemConfig(encoder="mean", batch_size=7, max_len=6)
    batches, steps, count = example_batches(config, log, torch.device("cpu"))
    seen = list(batches(0))
    hist = torch.cat([inputs[0] for inputs, _ in seen])
    tgt = torch.cat([target for _, target in seen])
    eager_hist, eager_tgt = next_item_splits(log, max_len=6)["train"]
    assert len(seen) == steps and tgt.numel() == count == eager_tgt.numel()
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed * 1000))
    assert torch.equal(hist, eager_hist[order]) and torch.equal(tgt, eager_tgt[order])


def test_next_item_splits_build_only_the_named_splits_and_refuse_unknown_names(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("1 1 2 3 4\n2 5 6\n3 7 8 9\n")
    log = read_sequences(path)
    held_out = next_item_splits(log, max_len=3, names=("validation", "test"))
    assert sorted(held_out) == ["test", "validation"]
    full = next_item_splits(log, max_len=3)
    assert all(torch.equal(held_out[k][i], full[k][i]) for k in held_out for i in (0, 1))
    with pytest.raises(ValueError, match="unknown split"):
        next_item_splits(log, names=("valid",))


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
def test_train_xmc_writes_the_metrics_of_its_checkpointed_model(tmp_path, layer):
    """P@k / nDCG@k in metrics.json equal those recomputed here from the checkpoint: encoder, scores, ranking,
    counts (and, for LSH, retrieval from the checkpointed tables) all written out, none through the pipeline."""
    from pipelines.training.xmc import main

    rows = _write_xmc(tmp_path / "d.txt", 300, 40, 30, seed=1)
    out = tmp_path / layer
    main(["--data", str(tmp_path / "d.txt"), "--train-rows", "240", "--out", str(out), "--output-layer", layer,
          "--epochs", "2", "--batch-size", "32", "--sample-size", "64", "--lsh-bits", "3", "--lsh-tables", "2",
          "--no-progress", "--encoder-width", "16", "--hidden", "8"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "curves.png").is_file() and metrics["step_time_median"] > 0
    f32, i64 = torch.float32, torch.int64
    shapes = {"encoder.bag.weight": ((40, 16), f32), "encoder.bias": ((16,), f32),
              "encoder.proj.weight": ((8, 16), f32), "encoder.proj.bias": ((8,), f32),
              "output.weight": ((30, 8), f32)}  # fmt: skip
    if layer == "lsh":
        shapes |= {"output.projection": ((8, 6), f32), "output.codes": ((30, 2), i64)}
    t = _checkpoint_tensors(out, shapes)
    test_rows = rows[240:]
    bag = torch.zeros(len(test_rows), 40, dtype=torch.float64)  # L2-normalised feature values of each test point
    for i, (_, features) in enumerate(test_rows):
        norm = math.sqrt(sum(v * v for v in features.values()))
        for f, v in features.items():
            bag[i, f] = v / norm
    width = (bag @ t["encoder.bag.weight"] + t["encoder.bias"]).clamp(min=0)  # ReLU; no dropout at evaluation
    hidden = width @ t["encoder.proj.weight"].t() + t["encoder.proj.bias"]
    labels = [ls for ls, _ in test_rows]
    assert sum(1 for ls in labels if ls) > 40  # most test points have labels
    ranked = {"": _top_ids_by_hand(hidden, t["output.weight"], 5)}
    if layer == "lsh":
        allowed = _colliding_by_hand(hidden, t, tables=2, bits=3)
        ranked["retrieval_"] = _top_ids_by_hand(hidden, t["output.weight"], 5, allowed)
    for prefix, top in ranked.items():
        for k in (1, 3, 5):
            precision, ndcg = _precision_and_ndcg(top, labels, k)
            # sums of hit counts / discounts: observed differences <= 7e-18
            assert metrics[f"{prefix}p@{k}"] == pytest.approx(precision, abs=1e-15), (prefix, k)
            assert metrics[f"{prefix}ndcg@{k}"] == pytest.approx(ndcg, abs=1e-15), (prefix, k)


def test_train_next_item_writes_the_metrics_of_its_checkpointed_model(tmp_path):
    """Recall@10 / nDCG@10 (exact and from the LSH tables) recomputed from the checkpoint: history encoder,
    scores, ranking and counts written out here."""
    from pipelines.training.next_item import main

    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, 60, (8,), generator=g).tolist() for _ in range(80)]
    lines = [f"{u} " + " ".join(str(v) for v in items) for u, items in enumerate(sequences)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    main(["--data", str(tmp_path / "s.txt"), "--out", str(out), "--output-layer", "lsh", "--epochs", "1",
          "--batch-size", "64", "--lsh.sample-size", "32", "--lsh.num-bits", "3", "--lsh.num-tables", "2",
          "--hidden", "8", "--item-dim", "8", "--max-len", "5", "--no-progress", "--encoder", "mean"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    num_items = max(max(items) for items in sequences)  # file ids are 1-based: classes 0 .. max - 1
    f32, i64 = torch.float32, torch.int64
    shapes = {"encoder.items.weight": ((num_items + 1, 8), f32), "encoder.positions.weight": ((5, 8), f32),
              "encoder.mlp.0.weight": ((8, 16), f32), "encoder.mlp.0.bias": ((8,), f32),
              "encoder.mlp.2.weight": ((8, 8), f32), "encoder.mlp.2.bias": ((8,), f32),
              "output.weight": ((num_items, 8), f32), "output.projection": ((8, 6), f32),
              "output.codes": ((num_items, 2), i64)}  # fmt: skip
    t = _checkpoint_tensors(out, shapes)
    # test example of a user: the last item; its history the 5 items before (8 items a user: never padded)
    history = torch.tensor([items[2:7] for items in sequences]) - 1
    targets = [[items[7] - 1] for items in sequences]
    x = t["encoder.items.weight"][history] + t["encoder.positions.weight"]  # (U, 5, 8); no dropout at evaluation
    pre = torch.cat([x.mean(1), x[:, -1]], dim=1) @ t["encoder.mlp.0.weight"].t() + t["encoder.mlp.0.bias"]
    gelu = 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
    hidden = gelu @ t["encoder.mlp.2.weight"].t() + t["encoder.mlp.2.bias"]
    allowed = _colliding_by_hand(hidden, t, tables=2, bits=3)
    ranked = {"": _top_ids_by_hand(hidden, t["output.weight"], 10)}
    ranked["retrieval_"] = _top_ids_by_hand(hidden, t["output.weight"], 10, allowed)
    for prefix, top in ranked.items():
        recall, ndcg = _precision_and_ndcg(top, targets, 10)
        recall *= 10  # one target a user: recall@10 = 10 * P@10
        # sums of hit counts / discounts: observed differences <= 3e-17
        assert metrics[f"{prefix}recall@10"] == pytest.approx(recall, abs=1e-15), prefix
        assert metrics[f"{prefix}ndcg@10"] == pytest.approx(ndcg, abs=1e-15), prefix


def test_train_next_item_transformer_writes_the_metrics_of_its_checkpointed_model(tmp_path):
    """--encoder transformer: the run trains on every position and its Recall@10 / nDCG@10 are those of the
    checkpointed transformer's last position (rebuilt here from the checkpoint) ranked over the catalogue."""
    from pipelines.training.next_item import main
    from recsys.sequence_transformer import SequenceTransformer, SequenceTransformerConfig

    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 60, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(80)]  # fmt: skip
    lines = [f"{u} " + " ".join(str(v) for v in items) for u, items in enumerate(sequences)]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    main(["--data", str(tmp_path / "s.txt"), "--out", str(out), "--output-layer", "full", "--epochs", "2",
          "--batch-size", "16", "--hidden", "8", "--max-len", "6", "--heads", "2", "--layers", "2", "--share-layers",
          "--item-factor-dim", "4", "--attention", "reformer", "--no-progress"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    # tie_items is on by default; the factorised embedding leaves the model untied
    assert metrics["config"]["transformer"] | {"ffn_mult": 2} == {
        "layers": 2, "heads": 2, "attention": "reformer", "bucket_size": 32, "n_hashes": 2, "share_layers": True,
        "item_factor_dim": 4, "ffn_mult": 2, "tie_items": True}  # fmt: skip
    rows = sum(-(-(len(items) - 3) // 6) for items in sequences)  # windows of 6 of each user's train targets
    assert rows > 80 and metrics["steps"] == 2 * -(-rows // 16)  # some users give two rows; 16 rows a batch
    num_items = max(max(items) for items in sequences)
    encoder = SequenceTransformer(num_items, 6, 8, 0.0, SequenceTransformerConfig(**metrics["config"]["transformer"]))
    shapes = {f"encoder.{k}": (tuple(v.shape), v.dtype) for k, v in encoder.state_dict().items()}
    t = _checkpoint_tensors(out, shapes | {"output.weight": ((num_items, 8), torch.float32)})
    assert not any(k.startswith("encoder.blocks.1.") for k in t)  # one shared block
    encoder.load_state_dict({k.removeprefix("encoder."): v.float() for k, v in t.items() if k.startswith("encoder.")})
    history = torch.full((len(sequences), 6), -1)
    for row, items in enumerate(sequences):  # the test history: the (up to 6) items before the last
        before = torch.tensor(items[:-1][-6:]) - 1
        history[row, -before.numel() :] = before
    with torch.no_grad():
        hidden = encoder.eval()(history).double()  # history <= 6 items: one chunk, reformer is exact here
    top = _top_ids_by_hand(hidden, t["output.weight"], 10)
    recall, ndcg = _precision_and_ndcg(top, [[items[-1] - 1] for items in sequences], 10)
    assert metrics["recall@10"] == pytest.approx(10 * recall, abs=1e-12)
    assert metrics["ndcg@10"] == pytest.approx(ndcg, abs=1e-12)
