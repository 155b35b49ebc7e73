"""Synthetic next-item logs: the file format of the real log, and Amazon Beauty's statistics at its size.

The reference is the real log (``RECSYS_DATA_DIR/sequences/amazon_beauty.txt``): the generator's default
config (Beauty's users and items) must give its interactions, history lengths and popularity skew.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from pipelines.data.generate import main as generate_main
from pipelines.data.next_item_synthetic import NextItemLogConfig, write_next_item_log
from pipelines.data.sequences import read_sequences


def _stats(path) -> dict:
    histories = [[int(v) for v in line.split()[1:]] for line in path.read_text().splitlines()]
    lengths = np.array([len(h) for h in histories])
    counts = np.sort(np.array(list(collections.Counter(i for h in histories for i in h).values())))[::-1]
    return {
        "users": len(histories),
        "interactions": int(lengths.sum()),
        "length_quantiles": np.percentile(lengths, [50, 90, 99]),
        "top10_share": counts[: counts.size // 10].sum() / counts.sum(),
        "repeats": sum(len(h) - len(set(h)) for h in histories),
    }


def test_the_default_log_has_the_shape_of_amazon_beauty(data_dir, tmp_path):
    real = _stats(data_dir / "sequences" / "amazon_beauty.txt")
    write_next_item_log(tmp_path / "syn.txt", NextItemLogConfig())
    syn = _stats(tmp_path / "syn.txt")
    # real: 198,502 interactions; lengths 6 / 14 / 43 at the 50/90/99th percentile; top 10% of items 0.428
    # observed: 195,430; 6 / 14 / 46; 0.415
    assert syn["users"] == real["users"] and syn["repeats"] == real["repeats"] == 0
    assert abs(syn["interactions"] / real["interactions"] - 1) < 0.05
    np.testing.assert_allclose(syn["length_quantiles"], real["length_quantiles"], rtol=0.15)
    assert abs(syn["top10_share"] - real["top10_share"]) < 0.03


def test_ids_are_dense_in_order_of_first_appearance_and_the_reader_takes_the_file(tmp_path):
    shape = write_next_item_log(tmp_path / "s.txt", NextItemLogConfig(users=3000, items=20_000, seed=4))
    lines = (tmp_path / "s.txt").read_text().splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(1, 3001))
    first_seen = []
    for line in lines:
        first_seen += [i for i in map(int, line.split()[1:]) if i not in set(first_seen)]
    assert first_seen == list(range(1, shape["items"] + 1))
    log = read_sequences(tmp_path / "s.txt")
    assert log.num_users == 3000 and log.num_items == shape["items"] and log.items.numel() == shape["interactions"]
    assert not (tmp_path / "s.txt.partial").exists()


def test_the_same_seed_writes_the_same_log_and_another_seed_another(tmp_path):
    config = NextItemLogConfig(users=500, items=2000, seed=1)
    write_next_item_log(tmp_path / "a.txt", config)
    write_next_item_log(tmp_path / "b.txt", config)
    write_next_item_log(tmp_path / "c.txt", NextItemLogConfig(users=500, items=2000, seed=2))
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    assert (tmp_path / "a.txt").read_text() != (tmp_path / "c.txt").read_text()


def _recurring_pair_share(histories: list[list[int]]) -> float:
    pairs = collections.Counter((a, b) for h in histories for a, b in itertools.pairwise(h))
    return sum(n for n in pairs.values() if n >= 2) / sum(pairs.values())


def test_the_next_item_follows_the_last_one_as_in_the_real_log(data_dir, tmp_path):
    """The signal a history encoder learns: consecutive pairs recur across users far more often than in the
    same histories with their order shuffled (Beauty: 18% against 7.6%, 2.4x; observed here 2.5x)."""
    rng = np.random.default_rng(0)
    write_next_item_log(tmp_path / "s.txt", NextItemLogConfig())
    ratios = {}
    for name, path in (("synthetic", tmp_path / "s.txt"), ("beauty", data_dir / "sequences" / "amazon_beauty.txt")):
        histories = [[int(v) for v in line.split()[1:]] for line in path.read_text().splitlines()]
        shuffled = [rng.permutation(h).tolist() for h in histories]
        ratios[name] = _recurring_pair_share(histories) / _recurring_pair_share(shuffled)
    assert ratios["beauty"] > 2.0 and abs(ratios["synthetic"] - ratios["beauty"]) < 0.5, ratios


def test_the_command_writes_a_next_item_log_and_refuses_a_bad_size(tmp_path, capsys):
    generate_main(["--kind", "next-item", "--users", "200", "--items", "1000", "--out", str(tmp_path / "s.txt")])
    assert read_sequences(tmp_path / "s.txt").num_users == 200
    with pytest.raises(SystemExit):
        generate_main(["--kind", "next-item", "--items", "1", "--out", str(tmp_path / "x.txt")])
    assert "items >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["--out", str(tmp_path / "x.tsv")])
    assert "--rows is required" in capsys.readouterr().err


def test_the_popularity_exponent_flag_sets_the_skew(tmp_path, capsys):
    """A larger exponent puts more of the interactions on the top 10% of items (exponent 0: no popularity skew)."""
    shares = {}
    for exponent in ("0", "0.67", "1.2"):
        out = tmp_path / f"s{exponent}.txt"
        generate_main(["--kind", "next-item", "--users", "2000", "--items", "3000", "--popularity-exponent", exponent,
                       "--out", str(out)])  # fmt: skip
        shares[exponent] = _stats(out)["top10_share"]
    # observed: 0.18 (the category and complement structure alone), 0.40, 0.69
    assert shares["0"] < shares["0.67"] - 0.1 < shares["1.2"] - 0.2
    with pytest.raises(SystemExit):
        generate_main(["--kind", "next-item", "--popularity-exponent", "-1", "--out", str(tmp_path / "x.txt")])
    assert "popularity_exponent must be >= 0" in capsys.readouterr().err


def test_the_length_flags_write_long_histories_of_distinct_items(tmp_path, capsys):
    """The long-history log of docs/sequence_transformer.md: median ~600 items, none longer than --max-length."""
    out = tmp_path / "long.txt"
    generate_main(["--kind", "next-item", "--users", "60", "--items", "4000", "--categories", "8",
                   "--home-categories", "4", "--length-median", "600", "--length-sigma", "0.45",
                   "--max-length", "900", "--out", str(out)])  # fmt: skip
    histories = [line.split()[1:] for line in out.read_text().splitlines()]
    lengths = np.array([len(h) for h in histories])
    assert len(histories) == 60 and 350 < np.median(lengths) < 800 and lengths.max() <= 900, lengths
    assert all(len(set(h)) == len(h) for h in histories)  # no item twice in a history
    short = tmp_path / "short.txt"
    generate_main(["--kind", "next-item", "--users", "60", "--items", "4000", "--out", str(short)])
    assert np.median([len(line.split()) - 1 for line in short.read_text().splitlines()]) < 12  # Beauty-like
    with pytest.raises(SystemExit):
        generate_main(["--kind", "next-item", "--max-length", "4", "--out", str(tmp_path / "x.txt")])
    assert "max_length must be >= 5" in capsys.readouterr().err
