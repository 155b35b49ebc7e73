"""Nested configs as flags, YAML and stored records (``pipelines.cli_config``), old flat layouts included.

The reference for every flat flag or key of an earlier version is the nested config written out by hand:
``--tt-cores 4`` must build exactly ``TrainConfig(tt=TTConfig(num_cores=4))``.
"""

from __future__ import annotations

import json

import pytest

from pipelines.cli_config import build_config, command_parser, config_from_dict, config_to_dict, leaf_paths
from pipelines.training.dlrm import TrainConfig
from pipelines.training.dlrm import build_parser as train_parser
from pipelines.training.next_item import NextItemConfig
from pipelines.training.next_item import build_parser as next_item_parser
from pipelines.training.xmc import XMCConfig
from pipelines.training.xmc import build_parser as xmc_parser
from recsys.configs import DLRMConfig, TTConfig
from recsys.lsh_output import LSHConfig

TRAIN_BASE = ["--data", "d", "--out", "o"]
XMC_BASE = ["--data", "d", "--out", "o"]


def _train(argv: list[str], config_file=None) -> TrainConfig:
    args = train_parser().parse_args([*TRAIN_BASE, *argv])
    return build_config(TrainConfig, args, config_file)


def _xmc(argv: list[str]) -> XMCConfig:
    args = xmc_parser().parse_args([*XMC_BASE, *argv])
    return build_config(XMCConfig, args)


def test_dotted_flags_set_the_nested_configs():
    config = _train(["--model.embedding-dim", "8", "--model.dense-arch", "32,8", "--tt.num-cores", "4",
                     "--tt.ranks", "8,12,8", "--tt.optimizer", "sgd", "--tt.learning-rate", "0.5",
                     "--tt.dense-tables", "t_C1,t_C2", "--embeddings", "tt"])  # fmt: skip
    want = TrainConfig(
        model=DLRMConfig(embedding_dim=8, dense_arch=(32, 8)),
        tt=TTConfig(num_cores=4, ranks=(8, 12, 8), optimizer="sgd", learning_rate=0.5, dense_tables=("t_C1", "t_C2")),
        embeddings="tt",
    )
    assert config == want


def test_flat_flags_of_earlier_versions_build_the_same_config_as_the_nested_ones():
    old = _train(["--embedding-dim", "8", "--dense-arch", "32,8", "--over-arch", "16,1", "--interaction", "dcn",
                  "--tt-ranks", "8", "--tt-threshold", "500", "--tt-cores", "2", "--tt-cache-size", "64",
                  "--tt-optimizer", "adagrad", "--tt-lr", "0.1"])  # fmt: skip
    want = TrainConfig(
        model=DLRMConfig(embedding_dim=8, dense_arch=(32, 8), over_arch=(16, 1), interaction="dcn"),
        tt=TTConfig(ranks=8, threshold=500, num_cores=2, cache_size=64, optimizer="adagrad", learning_rate=0.1),
    )
    assert old == want


def test_tt_optimizer_follows_the_embedding_optimizer_unless_set():
    # the old flags' meanings: --tt-optimizer same and --tt-lr 0 follow --embedding-optimizer / --embedding-lr
    for argv in ([], ["--tt-optimizer", "same", "--tt-lr", "0"]):
        config = _train(["--embedding-optimizer", "adagrad", "--embedding-lr", "0.3", *argv])
        assert (config.tt.optimizer, config.tt.learning_rate) == ("adagrad", 0.3), argv
    config = _train(["--embedding-optimizer", "adagrad", "--tt.optimizer", "sgd", "--tt.learning-rate", "0.7"])
    assert (config.tt.optimizer, config.tt.learning_rate) == ("sgd", 0.7)
    # a collection built from TTConfig alone has concrete settings all the same
    group = TTConfig().build_group([100, 200], 4)
    assert (group.optimizer.name, group.learning_rate) == ("EXACT_ROWWISE_ADAGRAD", 0.02)


def test_an_old_flag_and_its_new_name_together_are_refused():
    with pytest.raises(ValueError, match=r"--tt-cores and --tt\.num-cores"):
        _train(["--tt-cores", "2", "--tt.num-cores", "4"])


def test_yaml_nested_flat_and_flags_in_order_of_precedence(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("batch_size: 64\nmodel:\n  embedding_dim: 8\n  dense_arch: [32, 8]\ntt:\n  num_cores: 2\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("batch_size: 64\nembedding_dim: 8\ndense_arch: [32, 8]\ntt_cores: 2\n")
    want = TrainConfig(batch_size=64, model=DLRMConfig(embedding_dim=8, dense_arch=(32, 8)), tt=TTConfig(num_cores=2))
    assert _train([], nested) == want
    assert _train([], flat) == want
    # flags beat the file, the old flag names as much as the new
    assert _train(["--tt-cores", "4"], nested).tt.num_cores == 4
    assert _train(["--tt.num-cores", "4"], flat).tt.num_cores == 4
    # a section keeps the defaults of the fields it does not name
    assert _train([], nested).model.over_arch == DLRMConfig().over_arch


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model:\n  embeding_dim: 8\n", "embeding_dim"),
        ("modle:\n  embedding_dim: 8\n", "modle"),
        ("model: 8\n", "section"),
        ("tt_cores: 2\ntt:\n  num_cores: 4\n", "tt_cores and tt.num_cores"),
        ("- 1\n- 2\n", "mapping"),
    ],
)
def test_bad_yaml_is_refused_with_the_key_it_got_wrong(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        _train([], path)


def test_the_command_reports_a_bad_config_as_a_usage_error(tmp_path, capsys):
    from pipelines.cli_config import start_command

    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embedding_dim: 8\n")  # dense_arch still ends with 16
    with pytest.raises(SystemExit) as exit_info:
        start_command(train_parser(), TrainConfig, ["--data", "d", "--out", str(tmp_path / "o"), "--config", str(path)])
    assert exit_info.value.code == 2
    assert "dense_arch must end with embedding_dim=8" in capsys.readouterr().err


def test_lsh_flags_old_and_new_and_the_derived_seed():
    new = _xmc(["--lsh.num-tables", "4", "--lsh.num-bits", "6", "--lsh.sample-size", "99", "--no-lsh.learned",
                "--lsh.hash-margin", "0.3", "--seed", "7"])  # fmt: skip
    old = _xmc(["--lsh-tables", "4", "--lsh-bits", "6", "--sample-size", "99", "--no-learned-hash",
                "--lsh.hash-margin", "0.3", "--seed", "7"])  # fmt: skip
    want = XMCConfig(
        seed=7,
        lsh=LSHConfig(num_tables=4, num_bits=6, sample_size=99, learned=False, hash_margin=0.3),
    )
    assert new == old == want
    assert want.lsh.seed == 7  # the layer's seed is the run's
    assert "--lsh.seed" not in xmc_parser().format_help()
    # the commands run the layer's own defaults: bits, sample and read cap follow the catalogue
    assert XMCConfig().lsh == LSHConfig()
    assert XMCConfig().for_catalogue(670_000).lsh == LSHConfig().resolved(670_000)


def test_a_derived_field_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lsh:\n  seed: 3\n")
    args = xmc_parser().parse_args([*XMC_BASE, "--config", str(path)])
    with pytest.raises(ValueError, match=r"lsh\.seed is not a setting"):
        build_config(XMCConfig, args, path)


def test_old_dwta_flag_trains_no_projection_and_the_new_one_says_why_it_cannot():
    # (DWTA's 8**K buckets per table: K = 3 here)
    want = LSHConfig(hash="dwta", num_bits=3, learned=False)
    assert _xmc(["--lsh-hash", "dwta", "--lsh-bits", "3"]).lsh == want
    with pytest.raises(ValueError, match="supports neither learned"):
        _xmc(["--lsh.hash", "dwta", "--lsh.num-bits", "3", "--lsh.learned"])
    assert _xmc(["--lsh.hash", "dwta", "--lsh.num-bits", "3"]).lsh == want


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(embeddings="tt", model=DLRMConfig(interaction="dcn"), tt=TTConfig(ranks=(4, 8), cache_size=8)),
        NextItemConfig(max_len=7, seed=3, lsh=LSHConfig(num_bits=5, logq=True, per_query_quota=True)),
        XMCConfig(output_layer="full", dropout=0.1),
    ],
)
def test_a_record_round_trips_through_json(config):
    record = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(type(config), record) == config


def test_flat_records_of_earlier_versions_rebuild_the_same_config():
    # the ``config`` of a checkpoint / metrics.json written before the configs were nested
    old_train = {"batch_size": 256, "embedding_dim": 8, "dense_arch": [32, 8], "over_arch": [64, 1],
                 "interaction": "dot", "embeddings": "tt", "tt_ranks": [8], "tt_threshold": 500, "tt_cores": 3,
                 "tt_optimizer": "same", "tt_lr": 0.0, "tt_cache_size": 64, "embedding_lr": 0.05}  # fmt: skip
    assert config_from_dict(TrainConfig, old_train) == TrainConfig(
        batch_size=256,
        model=DLRMConfig(embedding_dim=8, dense_arch=(32, 8), over_arch=(64, 1)),
        embeddings="tt",
        tt=TTConfig(ranks=8, threshold=500, cache_size=64),
        embedding_lr=0.05,
    )
    old_next_item = {"lsh_tables": 6, "lsh_bits": 4, "lsh_hash": "simhash", "sample_size": 96, "learned_hash": True,
                     "max_per_bucket": 128, "hash_every": 10, "max_len": 10, "seed": 2, "gone_field": 1}  # fmt: skip
    with pytest.raises(ValueError, match="gone_field"):
        config_from_dict(NextItemConfig, old_next_item)
    rebuilt = config_from_dict(NextItemConfig, old_next_item, strict=False)
    lsh = LSHConfig(num_tables=6, num_bits=4, sample_size=96, hash_every=10, learned=True, max_per_bucket=128)
    assert rebuilt == NextItemConfig(max_len=10, seed=2, lsh=lsh)
    assert rebuilt.lsh.seed == 2


@pytest.mark.parametrize("parser", [train_parser, xmc_parser, next_item_parser])
def test_every_flag_has_a_help_text(parser):
    for action in parser()._actions:
        if action.option_strings and action.dest != "help":
            text = (action.help or "").split("(default:")[0].strip()
            assert text, f"{action.option_strings} has no help"


def test_every_numeric_field_is_a_flag_that_sets_what_it_names():
    parser = command_parser("t", "t", TrainConfig)
    samples = {int: "3", float: "0.25"}
    checked, invalid = [], []
    for path, tp in leaf_paths(TrainConfig).items():
        if tp not in samples:
            continue
        args = parser.parse_args(["--out", "o", "--" + path.replace("_", "-"), samples[tp]])
        try:
            node = build_config(TrainConfig, args)
        except ValueError:  # the sample value is not valid for this field (its check is tested elsewhere)
            invalid.append(path)
            continue
        for part in path.split("."):
            node = getattr(node, part)
        assert node == tp(samples[tp]), path
        checked.append(path)
    assert invalid == ["model.embedding_dim"], invalid  # 3 is not the dense arch's last size
    assert {"tt.num_cores", "tt.learning_rate", "model.dcn_low_rank", "embedding_lr", "batch_size"} <= set(checked)


def test_the_over_arch_needs_two_layers_as_torchrec_does():
    from torchrec.models.dlrm import OverArch

    with pytest.raises(ValueError, match="multiple layers"):
        OverArch(8, [1])  # the rule the config states early, with the flag's name
    with pytest.raises(ValueError, match="over_arch must have at least two layers"):
        _train(["--model.over-arch", "1"])
    assert _train(["--model.over-arch", "4,1"]).model.over_arch == (4, 1)
