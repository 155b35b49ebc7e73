"""Service settings, from flags or ``RECSYS_*`` environment variables, in one place.

Precedence: defaults < environment (``RECSYS_MODEL``, ``RECSYS_PORT``, ...: ``RECSYS_`` + the
field name in capitals) < command-line flags. ``python -m service --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "RECSYS_"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    """Everything the service depends on."""

    model: Path = field(default=Path("exports/model"), metadata=_help("export directory written by pipelines.export"))
    host: str = field(default="127.0.0.1", metadata=_help("interface to listen on (0.0.0.0: all)"))
    port: int = field(default=8000, metadata=_help("TCP port"))
    max_batch_rows: int = field(
        default=2048, metadata=_help("most rows scored in one forward pass (concurrent requests are merged)")
    )
    max_wait_ms: float = field(
        default=0.0,
        metadata=_help("how long a forward pass waits for more requests once one is queued (0: take what is queued)"),
    )
    max_queue: int = field(default=512, metadata=_help("requests waiting for the model before new ones get 503"))
    max_body_bytes: int = field(default=8 << 20, metadata=_help("largest request body; larger ones get 413"))
    reload_interval_s: float = field(
        default=0.0, metadata=_help("check the export directory for a new version every N seconds (0: never)")
    )
    torch_threads: int = field(default=1, metadata=_help("torch intra-op threads of the forward pass"))
    workers: int = field(
        default=1,
        metadata=_help(
            "server processes sharing the port, each with its own model and batcher (one per core: the GIL "
            "makes one process use about one core); POST /v1/admin/reload reaches one of them, so use "
            "--reload-interval-s with several"
        ),
    )
    access_log: bool = field(default=False, metadata=_help("log every request (uvicorn's access log)"))
    log_level: str = field(default="info", metadata=_help("debug, info, warning or error"))

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_rows", "max_queue", "max_body_bytes", "torch_threads", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "reload_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {text!r}")


def _converter(tp: typing.Any) -> typing.Callable[[str], typing.Any]:
    return _parse_bool if tp is bool else tp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} (env {env}; default: {f.default})"
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_converter(hints[f.name]), default=None, help=help_text)


def to_environment(settings: Settings) -> dict[str, str]:
    """``settings`` as ``RECSYS_*`` variables: how worker processes started by uvicorn receive them."""
    out = {}
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        out[ENV_PREFIX + f.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


def settings_from(args: argparse.Namespace | None = None, environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Defaults < environment < flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Settings)
    values: dict[str, typing.Any] = {}
    for f in dataclasses.fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        if env in environ:
            try:
                values[f.name] = _converter(hints[f.name])(environ[env])
            except ValueError as exc:
                raise ValueError(f"environment variable {env}={environ[env]!r}: {exc}") from exc
        if args is not None and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return Settings(**values)
