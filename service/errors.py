"""Every answer other than 200 as one JSON shape (``ErrorResponse``) with a sentence that names the field.

Why one place: FastAPI's validation errors, Starlette's HTTP errors and the service's own refusals
(not ready, overloaded, bad item) all reach the client the same way, and the routes only raise.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import ErrorResponse

MAX_LISTED_ERRORS = 5
NOT_UTF8_JSON = "body: not valid JSON (could not decode it as UTF-8 JSON)"


class ServiceError(Exception):
    """An answer other than 200, with the sentence the client sees."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, detail: list | None = None, headers: dict | None = None) -> JSONResponse:
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


def validation_message(errors: list[dict]) -> str:
    parts = [_describe(e) for e in errors[:MAX_LISTED_ERRORS]]
    more = f" (and {len(errors) - MAX_LISTED_ERRORS} more)" if len(errors) > MAX_LISTED_ERRORS else ""
    return "; ".join(parts) + more


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """The 422 of an invalid body: one sentence naming the fields, and each error's location and type."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return error_response(422, validation_message(errors), errors)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI's undecodable body
            return error_response(422, NOT_UTF8_JSON)
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.message, headers=exc.headers)
