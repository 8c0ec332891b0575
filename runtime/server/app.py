"""The FastAPI app: routes, middleware, engine lifecycle (load in the background, drain on shutdown)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response

from runtime.server.config import ServerConfig
from runtime.server.epd_api import router as epd_router
from runtime.server.errors import error_response, install_handlers
from runtime.server.metrics import AccessLogMiddleware, Metrics
from runtime.server.openai_api import router as openai_router
from runtime.server.security import SecurityMiddleware
from runtime.server.serving import Frontend
from runtime.server.sglang_api import router as sglang_router

log = logging.getLogger("epdlang.server")


def load_engine(config: ServerConfig) -> Any:
    """Start the deployment's instances and router (blocking; runs on a worker thread at start-up)."""
    from runtime.cluster.deployment import Deployment
    from runtime.planner.switching import move_chooser

    chooser = move_chooser(config.model_path, config.topology, config.slo, **config.engine_overrides)
    return Deployment(config.model_path, config.topology, transfer=config.transfer,
                      max_waiting_requests=config.max_waiting_requests, ray=config.ray,
                      move_chooser=chooser, **config.engine_overrides)


def create_app(config: ServerConfig, engine_factory=load_engine) -> FastAPI:
    """The app serves 503 until `engine_factory(config)` has returned a `Deployment`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.ensure_future(_start_engine(app, config, engine_factory))
        try:
            yield
        finally:
            loader.cancel()
            await _stop_engine(app)

    app = FastAPI(title="epdlang", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")  # behind the API key like every route but /health
    app.state.config, app.state.frontend, app.state.started = config, None, int(time.time())
    app.state.metrics = metrics = Metrics()
    app.state.load_error = None
    app.state.on_load_failure = lambda: None
    install_handlers(app)
    app.include_router(openai_router)
    app.include_router(sglang_router)
    app.include_router(epd_router)
    _add_ops_routes(app)
    endpoints = frozenset(_route_paths(app))
    app.add_middleware(SecurityMiddleware, api_key=config.api_key, max_body_bytes=config.limits.max_body_bytes)
    app.add_middleware(AccessLogMiddleware, metrics=metrics, endpoints=endpoints)
    return app


async def _start_engine(app: FastAPI, config: ServerConfig, factory) -> None:
    try:
        deployment = await asyncio.to_thread(factory, config)
    except Exception as exc:
        log.exception("the engine failed to load")
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        app.state.on_load_failure()
        return
    app.state.frontend = Frontend(deployment, config, app.state.metrics)
    app.state.metrics.ready.set(1)
    log.info("engine ready: %s", config.model_path)


async def _stop_engine(app: FastAPI) -> None:
    fe: Frontend | None = app.state.frontend
    app.state.frontend = None
    app.state.metrics.ready.set(0)
    if fe is not None:
        await fe.close()
        await asyncio.to_thread(fe.deployment.shutdown)


def _add_ops_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        fe = request.app.state.frontend
        if fe is None or not fe.deployment.is_alive():
            reason = request.app.state.load_error or "the engine is not ready"
            return error_response(503, reason, "not_ready")
        return Response(b"", status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        m: Metrics = request.app.state.metrics
        fe = request.app.state.frontend
        if fe is not None:
            m.update_engine(await fe.deployment.snapshot())
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def setup_logging(level: str = "info") -> None:
    """Plain lines for the server log; the access log lines are JSON objects already."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("epdlang.access")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def run_server(config: ServerConfig, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM; uvicorn then drains open requests before the engine stops."""
    setup_logging(log_level)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, access_log=False, log_config=None, log_level=log_level,
        timeout_graceful_shutdown=config.graceful_shutdown_s, lifespan="on"))
    app.state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    return 0 if app.state.load_error is None else 1


def _route_paths(app: FastAPI) -> list[str]:
    paths = [getattr(r, "path", None) for r in app.routes]
    paths += [r.path for router in (openai_router, sglang_router, epd_router) for r in router.routes]
    return [p for p in paths if p]
