"""What the routes share, as FastAPI dependencies: the served model and the scoring through the batcher.

The app's parts (settings, model store, micro-batcher, metrics) live on ``app.state``, set once by
``service.app.create_app``; a route asks for what it needs with ``Depends``. The dependencies are ``async``
although they never await: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request (four per rank request, about a fifth of the event loop's time under load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from recsys.serving import ExportedModel
from service.batching import DeadlineExceededError, MicroBatcher, QueueFullError
from service.errors import ServiceError
from service.metrics import ServiceMetrics
from service.model_store import ModelStore


async def store_of(request: Request) -> ModelStore:
    return request.app.state.store


async def batcher_of(request: Request) -> MicroBatcher:
    return request.app.state.batcher


async def metrics_of(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def served_model(request: Request) -> ExportedModel:
    """The model requests are scored with; 503 until one is loaded and the batcher runs."""
    return served_model_of(request.app.state)


def served_model_of(state) -> ExportedModel:
    """``served_model`` of an app's ``state`` (``service.hot_routes`` has no ``Request``)."""
    model = state.store.current
    if model is None or not state.batcher.running:
        raise ServiceError(503, "the model is not loaded yet", {"Retry-After": "1"})
    return model


@dataclass
class Scorer:
    """Encoded or raw rows -> click probabilities through the micro-batcher (merged with concurrent requests)."""

    model: ExportedModel
    batcher: MicroBatcher
    metrics: ServiceMetrics

    async def raw_rows(self, dense, sparse) -> np.ndarray:
        try:
            encoded = self.model.encoder.encode(dense, sparse)
        except ValueError as exc:  # the schema checks the same; this names the field if it ever differs
            raise ServiceError(422, str(exc)) from exc
        return await self.encoded(*encoded)

    async def encoded(self, dense: np.ndarray, ids: np.ndarray, variants: bool = False) -> np.ndarray:
        """Probabilities of encoded rows; ``variants``: the candidates of one context (see ``MicroBatcher.score``)."""
        try:
            return await self.batcher.score(self.model, dense, ids, variants)
        except QueueFullError as exc:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise ServiceError(503, f"overloaded: {exc}; retry shortly", {"Retry-After": "1"}) from exc
        except DeadlineExceededError as exc:  # counted by the batcher
            raise ServiceError(503, f"overloaded: {exc}; retry shortly", {"Retry-After": "1"}) from exc


async def scorer(request: Request) -> Scorer:
    return Scorer(await served_model(request), request.app.state.batcher, request.app.state.metrics)


ServedModel = Annotated[ExportedModel, Depends(served_model)]
ScorerDep = Annotated[Scorer, Depends(scorer)]
Store = Annotated[ModelStore, Depends(store_of)]
Batcher = Annotated[MicroBatcher, Depends(batcher_of)]
Metrics = Annotated[ServiceMetrics, Depends(metrics_of)]


def json_response(body: BaseModel) -> Response:
    """``body`` serialised by pydantic-core in one call: FastAPI would validate it again and walk it in Python.

    The route's ``response_model`` still documents it in the OpenAPI schema.
    """
    return Response(body.model_dump_json(), media_type="application/json")
