"""``POST /v1/score``, ``/v1/rank`` and ``/v1/recommend`` answered straight from ASGI, past FastAPI's router.

Why: on the rank path the event loop is the bottleneck (``docs/service.md``), and of a request's time in
the process FastAPI and Starlette took about a tenth (in-process, 1 thread, the demo export: 3.4 ms a
rank request through the app, 3.1 ms for its work alone): route matching, building a ``Request``,
solving the dependencies, wrapping the endpoint. These three routes need none of it: their body is read
as bytes and validated by ``service.body``, their parts live on ``app.state``, and their answers are
built by the same functions the FastAPI routes call (``score_rows``, ``rank_candidates``,
``recommend_items``), so the answers, 4xx and 503 included, are the same bytes. The FastAPI routes stay:
they publish the OpenAPI schema and answer every other method on these paths (405).

This layer sits inside ``LimitsAndMetricsMiddleware`` (load shedding, body limit and metrics still hold)
and outside Starlette's exception middleware, so it renders its own errors with ``service.errors``; an
exception it does not expect propagates to Starlette's 500 as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.responses import Response

from service.body import HOT_ROUTE_BODIES, validate_body
from service.deps import Scorer, served_model_of
from service.errors import ServiceError, error_response, validation_error_response
from service.routes.recommend import recommend_items
from service.routes.scoring import rank_candidates, score_rows

Handler = Callable[[BaseModel, Scorer], Awaitable[Response]]
HANDLERS: dict[str, Handler] = {"/v1/score": score_rows, "/v1/rank": rank_candidates, "/v1/recommend": recommend_items}
assert HANDLERS.keys() == HOT_ROUTE_BODIES.keys()


class HotRoutes:
    """ASGI middleware: the hot POST routes handled here, everything else passed to ``app``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        handler = HANDLERS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        if raw is None:  # the client went away before sending its body
            return
        state = scope["app"].state
        try:
            scorer = Scorer(served_model_of(state), state.batcher, state.metrics)
            response = await handler(validate_body(raw, HOT_ROUTE_BODIES[scope["path"]]), scorer)
        except RequestValidationError as exc:
            response = validation_error_response(exc)
        except ServiceError as exc:
            response = error_response(exc.status, exc.message, headers=exc.headers)
        await response(scope, receive, send)


async def _read_body(receive) -> bytes | None:
    """The whole request body, or ``None`` on a disconnect before its end."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
