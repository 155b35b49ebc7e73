"""Dataclass configs as command lines: one flag per field, a YAML file underneath.

Why: a config is written once, as a frozen dataclass with a help text per field, and the
command line, ``--help``, YAML files and ``metrics.json`` all come from it. Precedence:
dataclass default < ``--config FILE.yaml`` < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


def _tuple_parser(item_type: type) -> typing.Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item_type(p) for p in text.split(",") if p != "")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from exc

    return parse


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field of ``cls``; defaults stay unset so YAML can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is Literal:
            parser.add_argument(flag, choices=typing.get_args(tp), **kwargs)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, type=_tuple_parser(typing.get_args(tp)[0]), metavar="A,B,...", **kwargs)
        else:
            parser.add_argument(flag, type=tp, **kwargs)


def build_config(cls: type[T], args: argparse.Namespace, config_file: Path | None = None) -> T:
    """Defaults < YAML file < flags given on the command line."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        unknown = set(loaded) - names
        if unknown:
            raise ValueError(f"{config_file}: unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for key, value in loaded.items():
            values[key] = tuple(value) if typing.get_origin(_unwrap_optional(hints[key])) is tuple else value
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def config_to_dict(config: Any) -> dict:
    """JSON-friendly dict of a dataclass config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def command_parser(
    prog: str,
    description: str,
    config_cls: type,
    inputs: dict[str, dict[str, Any]] | None = None,
    out_help: str = "run directory (metrics.json, curves.png, train.log, checkpoints/)",
    resume: bool = False,
) -> argparse.ArgumentParser:
    """The parser of a training command: its inputs, ``--out``, ``--config``, ``--no-progress``, its config's flags."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for flag, options in (inputs or {}).items():
        p.add_argument(flag, **options)
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--config", type=Path, default=None, help="YAML file of config values (flags override it)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_dataclass_arguments(p, config_cls)
    return p


def start_command(parser: argparse.ArgumentParser, config_cls: type[T], argv: list[str] | None) -> tuple[Any, T]:
    """Parse ``argv``, set up logging into ``OUT/train.log``, build and log the config: ``(args, config)``."""
    import json
    import logging

    from recsys.logs import setup_logging

    args = parser.parse_args(argv)
    setup_logging("INFO", args.out / "train.log")
    try:
        config = build_config(config_cls, args, args.config)
    except ValueError as exc:
        parser.error(str(exc))
    logging.getLogger("pipelines").info("config: %s", json.dumps(config_to_dict(config)))
    return args, config
