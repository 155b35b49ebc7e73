"""Service settings, from flags or ``RECSYS_*`` environment variables, in one place (pydantic-settings).

Precedence: defaults < environment (``RECSYS_MODEL``, ``RECSYS_PORT``, ...: ``RECSYS_`` + the field
name in capitals) < command-line flags (``--max-batch-rows``: the field name in kebab case).
``python -m service --help`` lists them all with their variables and defaults.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

ENV_PREFIX = "RECSYS_"
PROG = "python -m service"


class Settings(BaseSettings):
    """Serve an export written by pipelines.export over HTTP (FastAPI + uvicorn): POST /v1/score, /v1/rank,
    /v1/recommend; GET /v1/model, /healthz, /readyz, /metrics; POST /v1/admin/reload. Every flag can also be
    given as an environment variable RECSYS_<FIELD> (flags win). OpenAPI schema at /openapi.json, docs at /docs.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        cli_prog_name=PROG,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        cli_exit_on_error=True,
    )

    model: Path = Field(Path("exports/model"), description="export directory written by pipelines.export")
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0: all)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    max_batch_rows: int = Field(
        2048, ge=1, description="most rows scored in one forward pass (concurrent requests are merged)"
    )
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="how long a forward pass waits for more requests once one is queued (0: take what is queued)",
    )
    loop_forward_rows: int = Field(
        1024,
        ge=0,
        description="forward passes of at most this many rows run on the event loop's thread (no thread hand-over: "
        "lower latency for rank and small score requests); larger ones on a forward thread while the loop keeps "
        "reading requests (0: every pass on the forward thread)",
    )
    max_in_flight: int = Field(
        32,
        ge=1,
        description="scoring requests (/v1/score, /v1/rank, /v1/recommend) a process handles at once; more get 503 "
        "with Retry-After at once, before their body is read (bounds the latency of the accepted ones)",
    )
    max_queue: int = Field(512, ge=1, description="requests waiting for the model before new ones get 503")
    deadline_ms: float = Field(
        1000.0,
        ge=0,
        description="a request whose forward pass has not started after this long is answered 503 (Retry-After) "
        "instead of scored late (0: no deadline)",
    )
    max_body_bytes: int = Field(8 << 20, ge=1, description="largest request body; larger ones get 413")
    reload_interval_s: float = Field(
        0.0, ge=0, description="check the export directory for a new version every N seconds (0: never)"
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of the forward pass")
    workers: int = Field(
        1,
        ge=1,
        description="server processes on the port, each with its own model, batcher and listening socket "
        "(SO_REUSEPORT: the kernel spreads connections over them; one per core: the GIL makes one process use about "
        "one core); POST /v1/admin/reload reaches one of them, so use --reload-interval-s with several",
    )
    admin_token: SecretStr | None = Field(
        None,
        min_length=1,
        description="bearer token of the admin routes (POST /v1/admin/reload: 'Authorization: Bearer <token>'); "
        "unset, the admin routes answer 403",
    )
    access_log: bool = Field(False, description="log every request (uvicorn's access log)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="the service's log level")


Settings.__doc__ = inspect.cleandoc(Settings.__doc__ or "")  # the --help description, without source indentation


def _readable(exc: ValidationError, argv: Sequence[str] = ()) -> str:
    """One line per invalid setting, named as the user gave it: the flag if given, else its ``RECSYS_*`` variable."""
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        flag = "--" + name.replace("_", "-")
        given = any(a == flag or a.startswith(flag + "=") for a in argv)
        parts.append(f"{flag if given else ENV_PREFIX + name.upper()}={error.get('input')!r}: {error['msg']}")
    return "; ".join(parts)


def settings_from_environment() -> Settings:
    """Defaults < ``RECSYS_*`` environment: what each of ``--workers N`` processes builds its app from."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ValueError(f"environment variable {_readable(exc)}") from None


def settings_from_command_line(argv: Sequence[str] | None) -> Settings:
    """Defaults < environment < flags; exits with the usage line on a bad flag (``--help`` lists them)."""
    try:
        return CliApp.run(Settings, cli_args=list(argv) if argv is not None else None)
    except ValidationError as exc:
        argparse.ArgumentParser(prog=PROG).error(_readable(exc, sys.argv[1:] if argv is None else argv))


def to_environment(settings: Settings) -> dict[str, str]:
    """``settings`` as ``RECSYS_*`` variables: how worker processes started by uvicorn receive them."""
    out = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:  # unset stays unset (not the string "None")
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        out[ENV_PREFIX + name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out
