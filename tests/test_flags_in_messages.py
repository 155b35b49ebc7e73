"""Every flag an error message names is a flag of the command whose user reads that message.

Why: a message that says "preprocess with smaller --row-group-rows" when no such flag exists sends the user
nowhere. The messages are read from the source (raised exceptions, ``parser.error``, logged warnings and
errors); each module is mapped to the commands that surface its messages, and each flag must be one of
theirs. Flags of other programs are listed with the program they belong to.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9]")
MESSAGE_CALLS = {"error", "warning", "warn", "exception", "exit", "fail"}
OTHER_PROGRAMS = {"--no-build-isolation": "pip install (the native kernels' build)"}


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    from pipelines.__main__ import build_parser as job
    from pipelines.data.generate import build_parser as generate
    from pipelines.data.preprocess import build_parser as preprocess
    from pipelines.export.writer import build_parser as export
    from pipelines.training.compress import build_parser as compress
    from pipelines.training.dlrm import build_parser as train
    from pipelines.training.next_item import build_parser as train_next_item
    from pipelines.training.sequence import build_parser as train_sequence
    from pipelines.training.xmc import build_parser as train_xmc

    return {
        "pipelines": job,
        "generate": generate,
        "preprocess": preprocess,
        "export": export,
        "compress": compress,
        "train": train,
        "train_xmc": train_xmc,
        "train_next_item": train_next_item,
        "train_sequence": train_sequence,
    }


def _service_flags() -> set[str]:
    from service.settings import Settings

    return {"--" + name.replace("_", "-") for name in Settings.model_fields}


TRAINING = ("train", "train_xmc", "train_next_item", "train_sequence")
# module (path prefix) -> the commands whose users read its messages
READERS = {
    "pipelines/__main__.py": ("pipelines", "train"),
    "pipelines/main_job/": ("pipelines", "train"),
    "pipelines/cli_config.py": TRAINING,
    "pipelines/data/generate.py": ("generate", "pipelines"),
    "pipelines/data/preprocess.py": ("preprocess", "pipelines"),
    "pipelines/data/loader.py": ("train", "pipelines"),
    "pipelines/data/": TRAINING,
    "pipelines/training/engine.py": TRAINING,
    "pipelines/training/dlrm.py": ("train",),
    "pipelines/training/distributed.py": ("train",),
    "pipelines/training/xmc.py": ("train_xmc",),
    "pipelines/training/next_item.py": ("train_next_item",),
    "pipelines/training/output_layer.py": ("train_xmc", "train_next_item"),
    "pipelines/training/sequence.py": ("train_sequence",),
    "pipelines/training/compress.py": ("compress",),
    "pipelines/training/": TRAINING,
    "pipelines/export/": ("export", "train", "train_next_item", "compress"),  # how the exported run was trained
    "recsys/serving/": ("export", "service"),
    "service/": ("service", "export"),
    "recsys/": TRAINING,
    "kernels/": (),
}


def _readers(path: str) -> tuple[str, ...]:
    for prefix, commands in READERS.items():  # the first (most specific) prefix that matches
        if path.startswith(prefix):
            return commands
    raise AssertionError(f"{path}: no commands mapped in READERS")


def _message_flags() -> list[tuple[str, int, str]]:
    """``(path, line, flag)`` for every flag in a message of the project's source."""
    found = []
    for root in ("pipelines", "recsys", "service", "kernels"):
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                parts: list[ast.AST] = []
                if isinstance(node, ast.Raise) and node.exc is not None:
                    parts.append(node.exc)
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in MESSAGE_CALLS
                ):
                    parts.extend(node.args)
                for part in parts:
                    for leaf in ast.walk(part):
                        if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                            rel = str(path.relative_to(REPO))
                            found += [(rel, leaf.lineno, flag) for flag in FLAG.findall(leaf.value)]
    return found


def test_the_scan_finds_the_messages_it_must_check():
    flags = {(path, flag) for path, _, flag in _message_flags()}
    assert ("pipelines/data/loader.py", "--data-streams") in flags
    assert ("service/__main__.py", "--model") in flags
    assert ("pipelines/export/writer.py", "--retrieval") in flags


@pytest.fixture(scope="module")
def command_flags() -> dict[str, set[str]]:
    flags = {
        name: {opt for action in build()._actions for opt in action.option_strings}
        for name, build in _parsers().items()
    }
    flags["service"] = _service_flags()
    return flags


def test_every_flag_named_in_a_message_exists_where_its_reader_runs(command_flags):
    wrong = []
    for path, line, flag in _message_flags():
        if flag in OTHER_PROGRAMS:
            continue
        readers = _readers(path)
        if not any(flag in command_flags[c] for c in readers):
            wrong.append(f"{path}:{line}: {flag} is not a flag of {', '.join(readers) or 'any command'}")
    assert not wrong, "\n".join(wrong)


def test_preprocess_has_the_row_group_flag_its_config_has(tmp_path):
    from pipelines.data.preprocess import build_parser

    args = build_parser().parse_args(["--input", "x.tsv", "--out", str(tmp_path), "--row-group-rows", "1000"])
    assert args.row_group_rows == 1000
