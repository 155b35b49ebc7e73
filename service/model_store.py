"""The model being served, and its replacement without a restart.

``current`` is one reference, swapped in a single assignment once a new export is fully
loaded and checked; a request reads it once and keeps that model to the end (its jobs in
the batcher carry it), so a reload never fails or mixes an in-flight request. A broken new
export is refused and the old model stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from recsys.serving import MANIFEST_DIGEST_FILE, ExportedModel, ExportFormatError, load_exported
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    reloaded: bool
    version: str
    previous: str | None


class ModelStore:
    """Holds the served :class:`ExportedModel` of ``path`` and reloads it when the export changes."""

    def __init__(self, path: Path, metrics: ServiceMetrics | None = None) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.current: ExportedModel | None = None
        self.last_error: str | None = None
        self._digest: str | None = None
        self._watcher: asyncio.Task | None = None
        self._running: asyncio.Future | None = None  # the reload in progress, which concurrent calls share

    def _read_digest(self) -> str | None:
        try:
            return (self.path / MANIFEST_DIGEST_FILE).read_text().strip()
        except OSError:
            return None

    async def reload(self, force: bool = False) -> ReloadResult:
        """Load the export at ``path`` if it changed (or ``force``); raises ``ExportFormatError`` and keeps the old.

        Concurrent calls are coalesced: a call made while a reload runs gets that reload's result (or error)
        instead of loading again. The reload is shielded: a caller that goes away does not cancel it.
        """
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._reload(force))
        return await asyncio.shield(self._running)

    async def _reload(self, force: bool) -> ReloadResult:
        """One reload at a time: :meth:`reload` starts one only when none is running."""
        previous = self.current.version if self.current else None
        digest = self._read_digest()
        if not force and self.current is not None and digest == self._digest:
            return ReloadResult(False, self.current.version, previous)
        try:
            model = await asyncio.to_thread(load_exported, self.path)
        except (ExportFormatError, OSError, ValueError, KeyError) as exc:
            self.last_error = str(exc)
            if self.metrics:
                self.metrics.reloads.labels(result="refused").inc()
            log.error("could not load %s: %s; still serving %s", self.path, exc, previous or "nothing")
            raise ExportFormatError(str(exc)) from exc
        # warm up outside the request path: the first pass builds caches
        await asyncio.to_thread(_warm_up, model)
        self.current, self._digest, self.last_error = model, digest, None
        if self.metrics:
            self.metrics.reloads.labels(result="loaded").inc()
            self.metrics.set_model(model.version)
        if previous is not None:
            log.info("now serving %s (was %s)", model.version, previous)
        return ReloadResult(previous != model.version or force, model.version, previous)

    def start_watching(self, interval_s: float) -> None:
        """Poll ``manifest.sha256`` every ``interval_s`` seconds and reload when it changes."""
        if interval_s > 0:
            self._watcher = asyncio.create_task(self._watch(interval_s), name="model-watcher")

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self._read_digest() not in (None, self._digest):
                with contextlib.suppress(ExportFormatError):
                    await self.reload()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher


def _warm_up(model: ExportedModel) -> None:
    features = model.encoder
    dense = [[0] * len(features.dense_columns)] * 4
    sparse = [[None] * len(features.sparse_columns)] * 4
    model.score_rows(dense, sparse)
    if model.retrieval is not None:
        model.recommend([], dense[0], sparse[0], k=1, candidates=10)
