"""The FastAPI app: ``create_app(settings)`` builds it; the model is loaded in the lifespan.

Routes: ``POST /v1/score``, ``POST /v1/rank``, ``POST /v1/recommend``, ``GET /v1/model``,
``POST /v1/admin/reload``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.
Every error is JSON ``{"message": ..., "detail": ...}`` whose message names the field.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.criteo import DENSE_COLUMNS, SPARSE_COLUMNS
from pipelines.export_format import ExportedModel, ExportFormatError
from service.batching import MicroBatcher, QueueFullError
from service.metrics import ServiceMetrics
from service.model_store import ModelStore
from service.schemas import (
    ErrorResponse,
    HealthResponse,
    RankedItem,
    RankRequest,
    RankResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    Row,
    ScoreRequest,
    ScoreResponse,
)
from service.settings import Settings, settings_from

log = logging.getLogger("service")

_DENSE_INDEX = {name: i for i, name in enumerate(DENSE_COLUMNS)}
_SPARSE_INDEX = {name: i for i, name in enumerate(SPARSE_COLUMNS)}
_ROUTES = {
    "/v1/score",
    "/v1/rank",
    "/v1/recommend",
    "/v1/model",
    "/v1/admin/reload",
    "/healthz",
    "/readyz",
    "/metrics",
}


class ServiceError(Exception):
    """An answer other than 200, with the sentence the client sees."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, detail: list | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(message=message, detail=detail).model_dump(), status_code=status, headers=headers)


def _field_path(loc: tuple | list) -> str:
    """``("body", "rows", 0, "dense", 3)`` -> ``rows[0].dense[3]``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "body"


def _describe(error: dict) -> str:
    loc = list(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return f"body: not valid JSON{at}"
    return f"{_field_path(loc)}: {error.get('msg', 'invalid')}"


def _validation_message(errors: list[dict]) -> str:
    parts = [_describe(e) for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


class LimitsAndMetricsMiddleware:
    """Refuses bodies over ``max_body_bytes`` (413) and records latency and status per route."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        start = time.perf_counter()
        status = {"code": 500}
        limit = self.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reply(send, 413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
            self._record(route, 413, start)
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # chunked body: read it here, up to the limit, then hand it to the app
            chunks, received, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                received += len(chunks[-1])
                more = message.get("more_body", False)
                if received > limit:
                    await self._reply(send, 413, f"request body exceeds the limit of {limit} bytes")
                    self._record(route, 413, start)
                    return
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            original_receive = receive

            async def replay():
                return pending.pop() if pending else await original_receive()

            receive = replay

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:  # an exception no handler took is answered 500 outside this middleware: count it as one
            self._record(route, status["code"], start)

    def _record(self, route: str, status: int, start: float) -> None:
        self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)
        self.metrics.requests.labels(route=route, status=str(status)).inc()

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = _error(status, message).body
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _json(body: BaseModel) -> Response:
    """``body`` serialised by pydantic-core in one call: FastAPI would validate it again and walk it in Python.

    The route's ``response_model`` still documents it in the OpenAPI schema.
    """
    return Response(body.model_dump_json(), media_type="application/json")


def _rows_of(rows: list[Row]) -> tuple[list[list[int | None]], list[list[str | None]]]:
    return [r.dense for r in rows], [r.sparse for r in rows]


def create_app(settings: Settings) -> FastAPI:
    """The service app for ``settings`` (tests build their own)."""
    metrics = ServiceMetrics()
    store = ModelStore(settings.model, metrics)
    batcher = MicroBatcher(settings.max_batch_rows, settings.max_wait_ms, settings.max_queue, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        await store.reload(force=True)
        model = store.current
        assert model is not None
        log.info(
            "serving %s (version %s, %s embeddings, %s) on http://%s:%d",
            settings.model,
            model.version,
            model.manifest["model"]["embeddings"],
            f"{model.manifest['compression']['ratio']:.1f}x smaller tables than dense",
            settings.host,
            settings.port,
        )
        await batcher.start()
        store.start_watching(settings.reload_interval_s)
        gc.collect()
        gc.freeze()  # the model's and the libraries' objects: out of every later collection (shorter pauses)
        yield
        await store.stop()
        await batcher.stop()

    app = FastAPI(
        title="recsys-tt",
        version="1",
        summary="Click-through scoring, ranking and recommendation with an exported (TT-compressed) DLRM.",
        lifespan=lifespan,
        responses={
            413: {"model": ErrorResponse, "description": "request body too large"},
            422: {"model": ErrorResponse, "description": "invalid request: the message names the field"},
            503: {"model": ErrorResponse, "description": "not ready or overloaded; retry"},
        },
    )
    app.state.settings, app.state.store, app.state.batcher, app.state.metrics = settings, store, batcher, metrics
    app.add_middleware(LimitsAndMetricsMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return _error(422, _validation_message(errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI's undecodable body
            return _error(422, "body: not valid JSON (could not decode it as UTF-8 JSON)")
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.message, headers=exc.headers)

    def served_model() -> ExportedModel:
        model = store.current
        if model is None or not batcher.running:
            raise ServiceError(503, "the model is not loaded yet", {"Retry-After": "1"})
        return model

    async def score_rows(model: ExportedModel, dense, sparse) -> np.ndarray:
        try:
            encoded = model.encoder.encode(dense, sparse)
        except ValueError as exc:  # the schema checks the same; this names the field if it ever differs
            raise ServiceError(422, str(exc)) from exc
        return await score_encoded(model, *encoded)

    async def score_encoded(model: ExportedModel, dense: np.ndarray, ids: np.ndarray) -> np.ndarray:
        try:
            return await batcher.score(model, dense, ids)
        except QueueFullError as exc:
            metrics.rejected.labels(reason="queue_full").inc()
            raise ServiceError(503, f"overloaded: {exc}; retry shortly", {"Retry-After": "1"}) from exc

    @app.post("/v1/score", response_model=ScoreResponse, tags=["model"])
    async def score(body: ScoreRequest) -> Response:
        """Click probability of each raw Criteo row, preprocessed exactly as in training."""
        model = served_model()
        scores = await score_rows(model, *_rows_of(body.rows))
        return _json(ScoreResponse.model_construct(scores=scores.tolist(), model=model.version))

    @app.post("/v1/rank", response_model=RankResponse, tags=["model"])
    async def rank(body: RankRequest) -> Response:
        """Candidates sorted by click probability: each candidate is the context row with its own columns."""
        model = served_model()
        dense = [{_DENSE_INDEX[k]: v for k, v in c.dense.items()} for c in body.candidates]
        sparse = [{_SPARSE_INDEX[k]: v for k, v in c.sparse.items()} for c in body.candidates]
        try:
            encoded = model.encoder.encode_variants(body.context.dense, body.context.sparse, dense, sparse)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from exc
        scores = await score_encoded(model, *encoded)
        order = np.argsort(-scores, kind="stable")[: body.top_k or len(scores)]
        items = [
            RankedItem.model_construct(id=body.candidates[i].id, score=float(scores[i]), index=int(i)) for i in order
        ]
        return _json(RankResponse.model_construct(items=items, model=model.version))

    @app.post(
        "/v1/recommend",
        response_model=RecommendResponse,
        tags=["model"],
        responses={501: {"model": ErrorResponse, "description": "the model has no retrieval (LSH) layer"}},
    )
    async def recommend(body: RecommendRequest) -> Response:
        """Items retrieved by the export's LSH output layer from the user's history, re-ranked by the DLRM.

        The history encoder gives the user's hidden vector; ``LSHOutputLayer.topk`` the ``candidates``
        items of its buckets with the best inner product; each is put into the context row's re-rank
        column (the manifest's ``retrieval.rerank``) and scored like a ``/v1/rank`` candidate.
        """
        model = served_model()
        retrieval = model.retrieval
        if retrieval is None:
            raise ServiceError(
                501,
                f"/v1/recommend needs an LSH output layer in the export; model {model.version} was exported "
                "without one (export with `python -m pipelines.export ... --retrieval NEXT_ITEM_RUN --item-column "
                "C?`). Rank your own candidates with POST /v1/rank.",
            )
        if body.top_k > body.candidates:
            raise ServiceError(422, f"top_k: {body.top_k} is more than candidates ({body.candidates})")
        try:
            retrieval.classes_of(body.history)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from exc
        items, retrieval_scores = await batcher.call(retrieval.retrieve, body.history, body.candidates)
        if len(items) == 0:
            return _json(RecommendResponse(items=[], retrieved=0, model=model.version))
        try:
            encoded = model.encode_items(items, body.context.dense, body.context.sparse)
        except ValueError as exc:
            raise ServiceError(422, str(exc)) from exc
        scores = await score_encoded(model, *encoded)
        order = np.argsort(-scores, kind="stable")[: body.top_k]
        answer = [
            RecommendedItem.model_construct(
                id=int(items[i]),
                score=float(scores[i]),
                retrieval_score=float(retrieval_scores[i]),
                retrieval_rank=int(i),
            )
            for i in order
        ]
        return _json(RecommendResponse.model_construct(items=answer, retrieved=len(items), model=model.version))

    @app.get("/v1/model", tags=["operations"])
    async def model_summary() -> dict:
        """The manifest of the served export: version, model and feature config, tables, compression, metrics."""
        return served_model().summary()

    @app.post("/v1/admin/reload", response_model=ReloadResponse, tags=["operations"])
    async def reload() -> ReloadResponse:
        """Load the export directory again if it changed; in-flight requests finish on the old model."""
        try:
            result = await store.reload()
        except ExportFormatError as exc:
            current = store.current.version if store.current else "nothing"
            raise ServiceError(409, f"the export was refused ({exc}); still serving {current}") from exc
        return ReloadResponse(reloaded=result.reloaded, model=result.version, previous=result.previous)

    @app.get("/healthz", response_model=HealthResponse, tags=["operations"])
    async def healthz() -> HealthResponse:
        """The process answers."""
        return HealthResponse(status="ok", model=store.current.version if store.current else None)

    @app.get(
        "/readyz",
        response_model=HealthResponse,
        tags=["operations"],
        responses={503: {"model": ErrorResponse, "description": "not ready"}},
    )
    async def readyz() -> HealthResponse:
        """A model is loaded and the batcher runs: requests will be scored."""
        model = served_model()
        return HealthResponse(status="ready", model=model.version)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: requests, latency, batch sizes, queue depth, model version, reloads."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_environment() -> FastAPI:
    """The app of ``RECSYS_*`` environment settings: what each of ``--workers N`` processes runs."""
    from service.__main__ import setup_logging

    settings = settings_from(None)
    setup_logging(settings.log_level)
    return create_app(settings)
