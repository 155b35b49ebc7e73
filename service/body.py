"""Request bodies decoded and validated in one pass (pydantic-core's ``model_validate_json`` on the raw bytes).

Why not FastAPI's body parameter: FastAPI decodes a JSON body with ``json.loads`` into Python objects and
then validates those, two passes in which the first builds every list and dict of a 100-candidate rank
body only to walk them again. On the hot routes (``/v1/score``, ``/v1/rank``, ``/v1/recommend``) the
body is instead read as bytes and validated by pydantic-core from them. The answers to a bad body stay
FastAPI's (a ``RequestValidationError`` with ``body`` locations, rendered by ``service.errors``); a body
that is not JSON is decoded again by ``json.loads`` only to name the character where it breaks, as before.
The OpenAPI schema still documents each body: ``service.app`` calls :func:`document_bodies` when it
builds the schema (at the first request for it, not at import: so that the mutation tests reach it).
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.errors import NOT_UTF8_JSON, ServiceError
from service.schemas import RankRequest, RecommendRequest, ScoreRequest

M = TypeVar("M", bound=BaseModel)

HOT_ROUTE_BODIES: dict[str, type[BaseModel]] = {
    "/v1/score": ScoreRequest,
    "/v1/rank": RankRequest,
    "/v1/recommend": RecommendRequest,
}
"""The POST routes that read their body with :func:`parse_body`, and its model (what their schema documents)."""


def document_bodies(schema: dict) -> None:
    """Declare each hot route's JSON body in an OpenAPI ``schema`` (FastAPI cannot see a body read by hand)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in HOT_ROUTE_BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        reference = {"$ref": f"#/components/schemas/{model.__name__}"}
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": reference}},
        }


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's body as ``model``; a ``RequestValidationError`` as FastAPI's body parameter would raise."""
    return validate_body(await request.body(), model)


def validate_body(raw: bytes, model: type[M]) -> M:
    """A raw JSON body as ``model`` (``service.hot_routes`` reads the bytes itself; the FastAPI routes by
    :func:`parse_body`)."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark: ignored (RFC 8259 8.1)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise _not_json(raw) from None
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _not_json(raw: bytes) -> Exception:
    """The error of a body pydantic-core could not parse: where ``json.loads`` breaks, or that it is not UTF-8."""
    try:
        json.loads(raw)
    except UnicodeDecodeError:
        return ServiceError(422, NOT_UTF8_JSON)
    except json.JSONDecodeError as exc:
        return RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}])
    # json.loads takes what pydantic-core does not (a lone surrogate escape such as "\\ud800")
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}])
