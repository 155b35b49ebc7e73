"""``python -m service --model DIR --host H --port P``: serve an export over HTTP with uvicorn.

Example::

    python -m service --model exports/dlrm --port 8000
    RECSYS_MODEL=exports/dlrm RECSYS_PORT=8000 python -m service     # the same from the environment
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from recsys.logs import setup_logging
from recsys.serving import ExportFormatError, read_manifest
from service.app import create_app
from service.settings import PROG, settings_from_command_line
from service.workers import GRACEFUL_SHUTDOWN_S, reuse_port_socket, serve

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_command_line(argv)  # exits with the usage line on a bad flag or variable
    setup_logging(settings.log_level)
    try:
        read_manifest(settings.model)  # a clear one-line error instead of a failed startup's traceback
    except (ExportFormatError, OSError) as exc:
        argparse.ArgumentParser(prog=PROG).error(f"--model {settings.model}: {exc}")
    if settings.workers > 1:  # one process per worker, each with its own socket on the port
        try:
            reuse_port_socket(settings.host, settings.port).close()  # a taken port: one clear error, no worker
        except OSError as exc:
            argparse.ArgumentParser(prog=PROG).error(f"--host {settings.host} --port {settings.port}: {exc}")
        sys.exit(serve(settings))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the format set above
        access_log=settings.access_log,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


if __name__ == "__main__":
    main()
