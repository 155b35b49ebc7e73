"""Request bodies decoded and validated in one pass (pydantic-core's ``model_validate_json`` on the raw bytes).

Why not FastAPI's body parameter: FastAPI decodes a JSON body with ``json.loads`` into Python objects and
then validates those, two passes in which the first builds every list and dict of a 100-candidate rank
body only to walk them again. On the hot routes (``/v1/score``, ``/v1/rank``, ``/v1/recommend``) the
body is instead read as bytes and validated by pydantic-core from them. The answers to a bad body stay
FastAPI's (a ``RequestValidationError`` with ``body`` locations, rendered by ``service.errors``); a body
that is not JSON is decoded again by ``json.loads`` only to name the character where it breaks, as before.
The OpenAPI schema still documents each body: :func:`documented` declares it, and ``service.app`` adds
the models to the schema's components.
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from service.errors import NOT_UTF8_JSON, ServiceError

M = TypeVar("M", bound=BaseModel)

BODY_MODELS: list[type[BaseModel]] = []
"""Every model a route reads with :func:`parse_body`: ``service.app`` puts their schemas into the components."""


def documented(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of a route whose JSON body is ``model``, read by :func:`parse_body`."""
    if model not in BODY_MODELS:
        BODY_MODELS.append(model)
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's body as ``model``; a ``RequestValidationError`` as FastAPI's body parameter would raise."""
    raw = await request.body()
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
    # json.loads takes what pydantic-core does not (NaN, lone surrogates, numbers past its limits)
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}])
