"""Nested dataclass configs as command lines and YAML files: one flag per field, one home per default.

Why: a command's config is a frozen dataclass that holds the model's configs whole (``TrainConfig.model:
DLRMConfig``, ``TrainConfig.tt: TTConfig``, ``OutputLayerConfig.lsh: LSHConfig``), so each default is written
once, where the model reads it. This module turns such a config into

- flags: ``--batch-size`` for a field of the command, ``--tt.num-cores`` for a field of a nested config (the
  dotted names tyro and jsonargparse use), help texts from the field's ``help`` metadata, the class
  docstring's ``Args:`` section or the comment after the field;
- the flags of the flat configs of earlier versions (``--tt-cores``, ``--lsh-bits`` ...), which scripts use: a
  config class lists them in ``FLAT_ALIASES``, each with the field it sets now and how its values translate
  (``--tt-lr 0`` meant "the embedding learning rate", now ``tt.learning_rate = None``);
- YAML files and stored records (checkpoints, ``metrics.json``): nested sections, or the flat keys of earlier
  versions through the same aliases.

Precedence: dataclass default < ``--config FILE.yaml`` < flags given on the command line.

Why not tyro or jsonargparse: both build nested flags from dataclasses, but neither keeps a flat flag whose
*value* means something else now (``--tt-optimizer same``, ``--tt-lr 0``) without a translation layer as large
as this module, and every command's flags must stay as users script them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import logging
import re
import tokenize
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Alias:
    """A flag (and record key) of a flat config of an earlier version: the field it sets now.

    Args:
        path: the dotted field it sets, e.g. ``tt.num_cores``.
        values: old values that mean something else now, and what they mean (``{"same": None}``).
        note: what the old flag meant, for ``--help``, when the values translate.
        implies: old values that set other fields too, unless those are given (``--lsh-hash dwta`` trained no
            projection: ``{"dwta": {"lsh.learned": False}}``).
    """

    path: str
    values: Mapping[Any, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    implies: Mapping[Any, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def apply(self, tree: dict, value: Any, source: str) -> None:
        """Set the field this alias names (and the ones its value implies) in the nested ``tree``."""
        _set_path(tree, self.path, self.translate(value), source)
        try:
            implied = self.implies.get(value, {})
        except TypeError:
            implied = {}
        for path, implied_value in implied.items():
            if not _has_path(tree, path):
                _set_path(tree, path, implied_value, source)

    def translate(self, value: Any) -> Any:
        try:
            return self.values.get(value, value)
        except TypeError:  # an unhashable value (a list) has no translation
            return value


# -- types ----------------------------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; a union of ``int`` and ``tuple[int, ...]`` (TT ranks) -> the tuple."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        tuples = [a for a in args if typing.get_origin(a) is tuple]
        if len(tuples) == 1:
            return tuples[0]
    return tp


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return {name: _unwrap_optional(tp) for name, tp in typing.get_type_hints(cls).items()}


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} has no default")


def _coerce(tp: Any, value: Any) -> Any:
    """A YAML / JSON value as the field's type: lists become tuples."""
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


# -- help texts -----------------------------------------------------------------------------------
def _docstring_args(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Args:`` section of the class docstring (``a / b:`` and ``a, b:`` too)."""
    doc = inspect.getdoc(cls) or ""
    section = re.split(r"^Args:\s*$", doc, maxsplit=1, flags=re.M)
    if len(section) < 2:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in section[1].splitlines():
        match = re.match(r"^ {4}([\w ,/]+):\s*(.*)$", line)
        if match:
            names = [n.strip() for n in re.split(r"[,/]", match.group(1)) if n.strip()]
            for name in names:
                out[name] = match.group(2).strip()
        elif line.startswith("        ") and names:
            for name in names:
                out[name] += " " + line.strip()
        elif line.strip():
            names = []
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of the class body (``num_bits: int = 8  # K bits per table``)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            match = re.match(r"^\s+(\w+)\s*:", token.line)
            if match:
                out[match.group(1)] = token.string.lstrip("#").strip()
    return out


@cache
def field_help(cls: type) -> dict[str, str]:
    """Help text per field: ``help`` metadata, else the docstring's ``Args:``, else the field's comment."""
    texts = {**_field_comments(cls), **_docstring_args(cls)}
    for f in _fields(cls):
        if "help" in f.metadata:
            texts[f.name] = f.metadata["help"]
    return texts


# -- flags ----------------------------------------------------------------------------------------
def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def _tuple_parser(item_type: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item_type(p) for p in text.split(",") if p != "")
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from exc

    return parse


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return "unset" if value is None else str(value)


def _plain(text: str) -> str:
    """A docstring's text as help: no reST literals, no closing full stop before ``(default: ...)``."""
    return text.replace("``", "").rstrip(".")


def _add_flag(
    group: argparse._ActionsContainer,
    flag: str,
    dest: str,
    tp: Any,
    help_text: str,
    metavar: str,
    extra_choices: tuple = (),
) -> None:
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(tp) is Literal:
        group.add_argument(flag, choices=(*typing.get_args(tp), *extra_choices), **kwargs)
    elif typing.get_origin(tp) is tuple:
        group.add_argument(flag, type=_tuple_parser(typing.get_args(tp)[0]), metavar="A,B,...", **kwargs)
    else:
        group.add_argument(flag, type=tp, metavar=metavar, **kwargs)


def _walk(cls: type, default: Any = None, prefix: str = ""):
    """``(path, field type, default value, help)`` of every leaf field, nested configs flattened.

    Defaults are the fields' own (a nested config's from the field's default instance), not those a config
    resolves in ``__post_init__``: ``--help`` shows ``None`` where a value follows another flag.
    """
    for f in _fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, path = _hints(cls)[f.name], prefix + f.name
        value = getattr(default, f.name) if default is not None else _default(f)
        if _is_config(tp):
            yield from _walk(tp, value, path + ".")
        else:
            yield path, tp, value, field_help(cls).get(f.name, "")


def _derived(cls: type) -> frozenset[str]:
    return frozenset(getattr(cls, "DERIVED", ()))


def leaf_paths(cls: type) -> dict[str, Any]:
    """Every settable dotted path of ``cls`` and its type (derived fields, set by the config itself, left out)."""
    return {path: tp for path, tp, *_ in _walk(cls) if path not in _derived(cls)}


def _section_help(cls: type, section: str) -> str:
    """The help of the field that holds a nested config (else the first line of that config's docstring)."""
    owner = cls
    *parents, name = section.split(".")
    for part in parents:
        owner = _hints(owner)[part]
    text = field_help(owner).get(name) or (inspect.getdoc(_hints(owner)[name]) or "").splitlines()[0]
    return _plain(text)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls`` and of its nested configs, and the flat flags of ``cls.FLAT_ALIASES``.

    Defaults stay unset in the namespace so that a YAML file can fill them; ``--help`` shows the resolved
    defaults of the fields.
    """
    groups: dict[str, argparse._ActionsContainer] = {}
    derived = _derived(cls)
    for path, tp, value, help_text in _walk(cls):
        if path in derived:
            continue
        section = path.rpartition(".")[0]
        if section and section not in groups:
            groups[section] = parser.add_argument_group(f"{_flag(section)}.*", _section_help(cls, section))
        metavar = path.rpartition(".")[2].upper()
        help_text = f"{_plain(help_text)} (default: {_shown(value)})"
        _add_flag(groups.get(section, parser), _flag(path), path, tp, help_text, metavar)
    aliases: Mapping[str, Alias] = getattr(cls, "FLAT_ALIASES", {})
    if aliases:
        legacy = parser.add_argument_group(
            "flat flags",
            "short forms of nested fields and the flags of earlier versions, accepted on the command line and in "
            "--config files; each sets the field it names",
        )
        targets = leaf_paths(cls)
        for name, alias in aliases.items():
            note = f": {alias.note}" if alias.note else ""
            _add_flag(
                legacy,
                _flag(name),
                f"alias:{name}",
                targets[alias.path],
                f"= {_flag(alias.path)}{note}",
                alias.path.rpartition(".")[2].upper(),
                extra_choices=tuple(v for v in alias.values if isinstance(v, str)),
            )


# -- building configs -----------------------------------------------------------------------------
def _set_path(tree: dict, path: str, value: Any, source: str) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{source}: {part} must be a section of keys, got {node!r}")
        tree = node
    tree[leaf] = value


def _has_path(tree: Mapping, path: str) -> bool:
    for part in path.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return False
        tree = tree[part]
    return True


def _pop_path(tree: dict, path: str) -> None:
    """Remove ``path`` from the nested ``tree`` if it is there."""
    if _has_path(tree, path):
        *parents, leaf = path.split(".")
        for part in parents:
            tree = tree[part]
        del tree[leaf]


def _unflatten(cls: type, values: Mapping[str, Any], source: str, strict: bool = True) -> dict:
    """A record (nested sections, flat keys of earlier versions, or both) as a nested dict of current fields."""
    aliases: Mapping[str, Alias] = getattr(cls, "FLAT_ALIASES", {})
    names = {f.name for f in _fields(cls)}
    unknown = sorted(set(values) - names - set(aliases))
    if unknown and strict:
        raise ValueError(f"{source}: unknown config keys {unknown}; known: {sorted(names | set(aliases))}")
    if unknown:
        log.warning("%s: ignoring config keys this version does not know: %s", source, unknown)
    tree = {k: v for k, v in values.items() if k in names}
    for key in values.keys() & aliases.keys():
        alias = aliases[key]
        if _has_path(tree, alias.path):
            raise ValueError(f"{source}: both {key} and {alias.path} are set; keep {alias.path}")
        alias.apply(tree, values[key], source)
    return tree


def config_from_dict(cls: type[T], values: Mapping[str, Any], source: str = "config", strict: bool = True) -> T:
    """Rebuild ``cls`` from a record: YAML, a checkpoint's or ``metrics.json``'s ``config``, old or new layout.

    A nested section updates the field's default (``lsh: {num_bits: 10}`` keeps the command's other LSH
    defaults); top-level keys of no field are an error that names the known ones, or (``strict=False``, for
    records written by other versions) are logged and left out.
    """
    tree = _unflatten(cls, values, source, strict)
    for path in _derived(cls):  # a stored record holds the derived value; the config sets it again
        _pop_path(tree, path)
    return _build(cls, tree, source)


def _build(cls: type[T], tree: Mapping[str, Any], source: str, base: Any = None) -> T:
    """``cls`` from ``base`` (or its defaults) with the values of ``tree``; nested sections merge the same way."""
    hints = _hints(cls)
    fields = {f.name: f for f in _fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown} of {cls.__name__}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        current = getattr(base, name) if base is not None else _default(f)
        if name not in tree:
            kwargs[name] = current
        elif _is_config(tp) and not isinstance(tree[name], tp):
            section = tree[name] if tree[name] is not None else {}
            if not isinstance(section, Mapping):
                raise ValueError(f"{source}: {name} must be a section of {tp.__name__} keys, got {section!r}")
            kwargs[name] = _build(tp, section, f"{source}: {name}", base=current)
        else:
            kwargs[name] = _coerce(tp, tree[name])
    return cls(**kwargs)


def build_config(cls: type[T], args: argparse.Namespace, config_file: Path | None = None) -> T:
    """Defaults < YAML file < flags given on the command line (new dotted flags and old flat ones)."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{config_file}: expected a mapping of config keys, got {type(loaded).__name__}")
        tree = _unflatten(cls, loaded, str(config_file))
        for path in _derived(cls):
            if _has_path(tree, path):
                raise ValueError(f"{config_file}: {path} is not a setting: the config derives it (see --help)")
    given = vars(args)
    paths = leaf_paths(cls)
    aliases: Mapping[str, Alias] = getattr(cls, "FLAT_ALIASES", {})
    for name, alias in aliases.items():
        if f"alias:{name}" in given:
            if alias.path in given:
                raise ValueError(f"both {_flag(name)} and {_flag(alias.path)} are given; keep {_flag(alias.path)}")
            alias.apply(tree, given[f"alias:{name}"], "flags")
    for path in paths:
        if path in given:
            _set_path(tree, path, given[path], "flags")
    return config_from_dict(cls, tree, "flags" if config_file is None else str(config_file))


def config_to_dict(config: Any) -> dict:
    """JSON-friendly nested dict of a dataclass config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


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
    p.add_argument(
        "--config", type=Path, default=None, help="YAML file of config values, nested as the flags (flags override it)"
    )
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    add_dataclass_arguments(p, config_cls)
    return p


def start_command(parser: argparse.ArgumentParser, config_cls: type[T], argv: list[str] | None) -> tuple[Any, T]:
    """Parse ``argv``, set up logging into ``OUT/train.log``, build and log the config: ``(args, config)``."""
    import json

    from recsys.logs import setup_logging

    args = parser.parse_args(argv)
    setup_logging("INFO", args.out / "train.log")
    try:
        config = build_config(config_cls, args, args.config)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    logging.getLogger("pipelines").info("config: %s", json.dumps(config_to_dict(config)))
    return args, config
