"""create_app(settings) -> FastAPI; the lifespan loads the model and runs the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import routes_admin, routes_generate
from app.api.errors import install_error_handlers
from app.config import Settings
from app.state import ServerState, build_state


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    """Build the app. `state` lets tests share one loaded model between apps."""
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = state or build_state(settings)
        app.state.server = server
        server.engine.start()
        server.ready = True
        try:
            yield
        finally:
            server.ready = False
            server.engine.draining = True
            if state is None:  # a shared state is stopped by its owner
                server.engine.stop()

    app = FastAPI(
        title="kogpt-serve",
        version=__version__,
        description="Inference server for Korean GPT-2 (KoGPT-2) models.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(routes_admin.router)
    app.include_router(routes_generate.router)
    return app
