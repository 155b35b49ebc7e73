"""The ASGI layer in front of the routes: load shedding (503), body-size limit (413), per-route metrics.

Why raw ASGI and not a Starlette ``BaseHTTPMiddleware``: the limit must hold for chunked bodies too
(read here up to the limit, then replayed to the app), and the metrics must count the answers the
app never made (413 here, and 500 from an exception no handler took).

Load shedding: the scoring routes' requests in flight in this process are counted; past
``max_in_flight`` a request is answered 503 (``Retry-After``) before its body is read. Why here and not
only at the batcher's queue: on a loaded machine the event loop (JSON, validation, encoding), not the
model, is the bottleneck, so requests pile up before they reach the queue; a refusal here costs a
fraction of a scored request, which keeps the latency of the accepted ones bounded under overload.
"""

from __future__ import annotations

import time

from service.errors import error_response
from service.metrics import ServiceMetrics

ROUTES = frozenset(
    {"/v1/score", "/v1/rank", "/v1/recommend", "/v1/model", "/v1/admin/reload", "/healthz", "/readyz", "/metrics"}
)
"""Paths recorded under their own label; anything else is ``other`` (bounded label cardinality)."""
SCORING = frozenset({"/v1/score", "/v1/rank", "/v1/recommend"})
"""The routes whose requests count against ``max_in_flight``."""


class LimitsAndMetricsMiddleware:
    """Refuses bodies over ``max_body_bytes`` (413) and records latency and status per route."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics, max_in_flight: int = 2**31) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.max_in_flight, self.in_flight = max_in_flight, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        if route in SCORING:
            if self.in_flight >= self.max_in_flight:
                message = f"overloaded: {self.in_flight} requests in flight; retry shortly"
                await self._reply(send, 503, message, {"Retry-After": "1"})
                self.metrics.rejected.labels(reason="in_flight").inc()
                self._record(route, 503, start)
                return
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            try:
                await self._handle(scope, receive, send, route, start)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
            return
        await self._handle(scope, receive, send, route, start)

    async def _handle(self, scope, receive, send, route: str, start: float) -> None:
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
    async def _reply(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = error_response(status, message).body
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
