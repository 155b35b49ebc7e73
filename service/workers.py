"""``--workers N``: N server processes, each listening on its own socket of the same port (``SO_REUSEPORT``).

Why not uvicorn's workers: they share one listening socket, and asyncio accepts every connection queued
on it in one wake-up, so the keep-alive connections a client opens together mostly land in one process
while the other idles (measured with 8 connections and 2 processes: all 8 in one process in 2 tries of
3; 1.6x the throughput the one time they split 6/2). With a socket per process the kernel spreads new
connections over the processes by a hash of their addresses, and a process starts listening only once
its app has started (its model is loaded), so no connection waits on a process that is still loading.

The supervisor (this module's :func:`serve`) forwards SIGTERM / SIGINT to every worker as SIGTERM (a
terminal's Ctrl-C reaches the workers too; uvicorn forces an exit on a second SIGINT only, not on a
SIGTERM after it), each drains its requests in flight (uvicorn's graceful shutdown), and the supervisor
ends by the signal it got. A worker that exits on its own ends the service (the others are stopped): the orchestrator
restarts it whole, rather than a half-sized service running on unnoticed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from types import FrameType

import uvicorn

from service.app import app_from_environment
from service.settings import Settings, settings_from_environment, to_environment

log = logging.getLogger("service")

GRACEFUL_SHUTDOWN_S = 10  # uvicorn's drain of the requests in flight, per worker
_PARENT_POLL_S = 1.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not yet listening (uvicorn listens on it)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes until a signal or a worker's exit; returns the exit status.

    Stopped by SIGTERM / SIGINT with every worker drained, the supervisor ends as one uvicorn process
    does: by the same signal, re-raised. A worker that ended otherwise gives the status (128 + signal
    for a killed one).
    """
    context = multiprocessing.get_context("spawn")  # no torch state forked into the workers
    environment = to_environment(settings)
    workers = [
        context.Process(target=_worker, args=(environment,), name=f"service-worker-{i}", daemon=False)
        for i in range(settings.workers)
    ]
    received: list[int] = []  # the signal that stopped the service, if one did
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            log.info("%s: stopping %d workers (each finishes its requests in flight)", signal.Signals(signum).name,
                     len(workers))  # fmt: skip
            received.append(signum)
            stopping.set()
            _signal_all(workers, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        log.info("%d worker processes on %s:%d (SO_REUSEPORT)", len(workers), settings.host, settings.port)
        running = list(workers)
        while running:
            ended = wait([w.sentinel for w in running], timeout=_PARENT_POLL_S)
            for worker in [w for w in running if w.sentinel in ended]:
                worker.join()
                running.remove(worker)
                if not stopping.is_set():
                    log.error("%s exited with code %s: stopping the service", worker.name, worker.exitcode)
                    stopping.set()
                    _signal_all(running, signal.SIGTERM)
    finally:
        _kill_stragglers(workers)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    drained = {0, -signal.SIGTERM, -signal.SIGINT}  # uvicorn re-raises the signal it drained for (Ctrl-C: SIGINT)
    failed = [w.exitcode for w in workers if w.exitcode not in drained]
    if failed:
        return 128 - failed[0] if failed[0] < 0 else failed[0]
    if received:
        signal.raise_signal(received[0])  # the default action again: end as the signal's
    return 0


def _signal_all(workers: list, signum: int) -> None:
    for worker in workers:
        if worker.pid is not None and worker.is_alive():
            os.kill(worker.pid, signum)


def _kill_stragglers(workers: list) -> None:
    deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S + 5
    for worker in workers:
        if worker.pid is not None:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()


def _worker(environment: dict[str, str]) -> None:
    """One server process: its own socket on the shared port, its own app from the ``RECSYS_*`` settings."""
    os.environ.update(environment)
    app = app_from_environment()  # sets up logging at the settings' level
    settings = settings_from_environment()
    _exit_with_parent()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    uvicorn.Server(config).run(sockets=[reuse_port_socket(settings.host, settings.port)])


def _exit_with_parent() -> None:
    """SIGTERM this worker when the supervisor is gone (killed with SIGKILL: it could forward nothing)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
