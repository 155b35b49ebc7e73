"""The FastAPI app: it assembles the service's parts; the routes live in ``service/routes/``.

``create_app(settings)`` builds one app: the model store, the micro-batcher and the metrics on
``app.state`` (what ``service.deps`` hands the routes), the error handlers, the body-limit and
metrics middleware, the hot routes' fast path (``service.hot_routes``), and the routers.
``python -m service`` runs it with uvicorn.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from recsys.logs import setup_logging
from service.admin import ADMIN_PREFIX
from service.batching import MicroBatcher
from service.body import document_bodies
from service.errors import ServiceError, install_error_handlers
from service.hot_routes import HotRoutes
from service.metrics import ServiceMetrics
from service.middleware import LimitsAndMetricsMiddleware
from service.model_store import ModelStore
from service.routes import operations, recommend, scoring
from service.schemas import ErrorResponse
from service.settings import Settings, settings_from_environment

__all__ = ["LimitsAndMetricsMiddleware", "ServiceError", "app_from_environment", "create_app"]

log = logging.getLogger("service")


def create_app(settings: Settings) -> FastAPI:
    """The service app for ``settings`` (tests build their own)."""
    metrics = ServiceMetrics()
    store = ModelStore(settings.model, metrics)
    batcher = MicroBatcher(
        settings.max_batch_rows,
        settings.max_wait_ms,
        settings.max_queue,
        metrics,
        deadline_ms=settings.deadline_ms,
        loop_forward_rows=settings.loop_forward_rows,
    )

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
    app.add_middleware(HotRoutes)  # added first: inside the limits and metrics
    app.add_middleware(
        LimitsAndMetricsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        metrics=metrics,
        max_in_flight=settings.max_in_flight,
    )

    install_error_handlers(app)
    for router in (scoring.router, recommend.router, operations.router):
        app.include_router(router)
    app.openapi = lambda: _openapi(app, admin=settings.admin_token is not None)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, admin: bool) -> dict:
    """FastAPI's schema, plus the body models the hot routes read themselves (``service.body``), and without the
    admin routes when they are off: the schema offers exactly what is accepted."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        document_bodies(schema)
        if not admin:
            for path in [p for p in schema["paths"] if p.startswith(ADMIN_PREFIX)]:
                del schema["paths"][path]
            schema["components"].pop("securitySchemes", None)
    return app.openapi_schema


def app_from_environment() -> FastAPI:
    """The app of ``RECSYS_*`` environment settings: what each of ``--workers N`` processes runs."""
    settings = settings_from_environment()
    setup_logging(settings.log_level)
    return create_app(settings)
