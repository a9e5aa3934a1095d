"""The node's HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, and routes other modules add.

A Starlette app served by uvicorn in a background thread, bound to 127.0.0.1 by default
(`http: {bind, port}`): monitoring and a reverse proxy reach it on the host; it is not meant to
face the hospital network directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ie_gateway.config import HttpSettings
from ie_gateway.errors import HttpError
from ie_gateway.ops import metrics
from ie_gateway.ops.health import Health

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0


def build_app(health: Health, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The app: health and metrics routes, then ``extra_routes`` (e.g. the admin page)."""

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    # Sync handlers: Starlette runs them in its thread pool, off the event loop (they query SQLite).
    def readyz(_: Request) -> Response:
        checks = health.checks()
        ready = all(c.ok for c in checks)
        body = {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        return JSONResponse(body, status_code=200 if ready else 503)

    def metrics_text(_: Request) -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_text),
        *extra_routes,
    ]
    return Starlette(routes=routes)


class HttpServer:
    """uvicorn serving an app in a daemon thread; start() returns once it listens."""

    def __init__(self, settings: HttpSettings, app: Starlette) -> None:
        config = uvicorn.Config(
            app, host=settings.bind, port=settings.port, log_config=None, access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise HttpError(
                    f"HTTP endpoint could not listen on {self._server.config.host}:"
                    f"{self._server.config.port} (in use? see the log)"
                )
            if time.monotonic() > deadline:
                raise HttpError("HTTP endpoint did not start in time")
            time.sleep(0.05)  # poll interval of this deadline loop
        log.info("http listening", bind=self._server.config.host, port=self.port)

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
