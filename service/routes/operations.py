"""Operations: the served model's manifest, reload, liveness, readiness and Prometheus metrics.

``reload`` delegates to ``reload_export``, a plain function the mutation tests can reach (mutmut mutates
undecorated functions only); the other handlers are one line each.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from recsys.serving import ExportFormatError
from service.admin import Admin
from service.deps import Metrics, ServedModel, Store
from service.errors import ServiceError
from service.model_store import ModelStore
from service.schemas import ErrorResponse, HealthResponse, ReloadResponse

router = APIRouter(tags=["operations"])


@router.get("/v1/model")
async def model_summary(model: ServedModel) -> dict:
    """The manifest of the served export: version, model and feature config, tables, compression, metrics."""
    return model.summary()


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    dependencies=[Admin],
    responses={
        401: {"model": ErrorResponse, "description": "no or wrong bearer token"},
        403: {"model": ErrorResponse, "description": "admin routes are off (no --admin-token)"},
        409: {"model": ErrorResponse, "description": "the export was refused; the served model stays"},
    },
)
async def reload(store: Store) -> ReloadResponse:
    """Load the export directory again if it changed; in-flight requests finish on the old model.

    Needs ``Authorization: Bearer <token>`` with the service's ``--admin-token``.
    """
    return await reload_export(store)


async def reload_export(store: ModelStore) -> ReloadResponse:
    """The work of ``POST /v1/admin/reload``: a refused export leaves the served model in place (409)."""
    try:
        result = await store.reload()
    except ExportFormatError as exc:
        current = store.current.version if store.current else "nothing"
        raise ServiceError(409, f"the export was refused ({exc}); still serving {current}") from exc
    return ReloadResponse(reloaded=result.reloaded, model=result.version, previous=result.previous)


@router.get("/healthz", response_model=HealthResponse)
async def healthz(store: Store) -> HealthResponse:
    """The process answers."""
    return HealthResponse(status="ok", model=store.current.version if store.current else None)


@router.get(
    "/readyz", response_model=HealthResponse, responses={503: {"model": ErrorResponse, "description": "not ready"}}
)
async def readyz(model: ServedModel) -> HealthResponse:
    """A model is loaded and the batcher runs: requests will be scored."""
    return HealthResponse(status="ready", model=model.version)


@router.get("/metrics", response_class=Response)
async def prometheus(metrics: Metrics) -> Response:
    """Prometheus text format: requests, latency, batch sizes, queue depth, model version, reloads."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
