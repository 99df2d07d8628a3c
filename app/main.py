"""create_app(settings) -> FastAPI; the lifespan loads the model, runs the engine and drains.

Shutdown: on SIGTERM the server stops admitting (generation routes answer 503, /ready says
"draining") but keeps serving in-flight requests for up to `shutdown_grace_seconds`; then
it cuts what is left (a final 503 error event / response) and hands the signal to uvicorn,
which closes the connections and exits. A second SIGTERM exits at once. The same drain runs
in the lifespan shutdown when the server stops for another reason.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app import __version__
from app.api.errors import install_error_handlers, is_openai_path
from app.api.middleware import ApiMiddleware
from app.api.protocol.chat import ChatCompletionChunk
from app.api.protocol.fewshot import FewShotStreamEvent
from app.api.protocol.openai import CompletionChunk
from app.api.routes import (
    admin,
    chat,
    fewshot,
    generate,
    lora,
    openai,
    playground,
    watermark,
)
from app.api.streaming import sse_event_schema
from app.config import Settings
from app.metrics import ServerMetrics
from app.state import ServerState, build_state

logger = logging.getLogger("kogpt.server")

DESCRIPTION = """Inference server for Korean GPT-2 (KoGPT-2) models.

* **TGI-compatible**: `POST /generate`, `POST /generate_stream`, `POST /` (the
  `text-generation` client and `huggingface_hub.InferenceClient` work unchanged).
* **OpenAI-compatible**: `POST /v1/completions`, `POST /v1/chat/completions` (KoGPT-2 chatbot
  template), `GET /v1/models` (the `openai` package works unchanged; any generate option is an
  extra body field).
* **Few-shot**: `POST /few-shot`.
* **Watermark detection**: `POST /watermark/detect` (transformers' `WatermarkDetector`).
* Every `model.generate` option is a parameter; omitted options take the checkpoint's
  generation_config defaults, exactly as `model.generate` does.

Errors have one shape: `{"error", "error_type", "field"}`, wrapped as
`{"error": {"message", "type", "param", "code"}}` on `/v1/*`. 401: API key missing or wrong;
413: body too large; 422: invalid option (named, with its allowed range) or prompt too
long; 429 (with Retry-After): waiting queue full; 503: draining for shutdown.
"""

STREAM_MODELS: tuple[type[BaseModel], ...] = (
    CompletionChunk,
    ChatCompletionChunk,
    FewShotStreamEvent,
)


async def drain(server: ServerState, grace_seconds: float) -> None:
    """Stop admitting; wait for in-flight requests up to the grace period; cut the rest."""
    server.engine.draining = True
    loop = asyncio.get_running_loop()

    def busy() -> bool:
        return server.inflight > 0 or server.engine.num_active > 0

    deadline = loop.time() + grace_seconds
    if busy():
        logger.info("draining: %d request(s) in flight", server.inflight)
    while busy() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if busy():
        logger.warning("grace period over: cutting %d request(s)", server.inflight)
        server.cutoff.set()
        end = loop.time() + 2.0
        while server.inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.02)


def install_sigterm_drain(server: ServerState, grace_seconds: float) -> Callable[[], None]:
    """Run `drain` on SIGTERM, then pass the signal on (uvicorn's handler). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    async def drain_then_exit(signum: int, frame: FrameType | None) -> None:
        await drain(server, grace_seconds)
        forward(signum, frame)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if server.engine.draining:  # a second SIGTERM: exit now
            forward(signum, frame)
            return
        server.engine.draining = True
        logger.info("SIGTERM: draining for up to %.0f s", grace_seconds)
        loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit(signum, frame)))

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """OpenAPI with the stream event schemas (referenced by the SSE responses) and, with an
    API key, the bearer security scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in STREAM_MODELS:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in js.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas.setdefault(model.__name__, js)
        for route, path in schema.get("paths", {}).items():  # SSE bodies are events
            openai_route = is_openai_path(route)
            error = "OpenAIErrorResponse" if openai_route else "ErrorResponse"
            error_ref = f"#/components/schemas/{error}"
            for operation in path.values():
                for response in operation.get("responses", {}).values():
                    sse = response.get("content", {}).get("text/event-stream", {})
                    if "$ref" in sse.get("schema", {}):
                        ref = sse["schema"]["$ref"]
                        sse["schema"] = sse_event_schema(ref, error_ref, done=openai_route)
        if settings.api_key is not None:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    """Build the app. `state` lets tests share one loaded model between apps."""
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if state is not None and state.metrics is not None:
        metrics = state.metrics
    else:
        name = settings.served_model_names[0]
        metrics = ServerMetrics(state.model_name if state is not None else name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = state or build_state(settings)
        app.state.server = server
        metrics.model = server.model_name
        server.metrics = metrics
        metrics.bind_engine(server.engine)
        server.engine.start()
        # The model, tokenizer and imports are millions of objects that live for ever: each
        # full collection traversed them all (100-300 ms on whichever thread allocated, often
        # the event loop's, stalling /health under the largest accepted body). Frozen after a
        # last collection, they are out of every later one (and back in at the end, so exit
        # frees them as before).
        gc.collect()
        gc.freeze()
        server.ready = True
        if state is not None:  # a shared state is drained and stopped by its owner
            try:
                yield
            finally:
                gc.unfreeze()
            return
        restore = install_sigterm_drain(server, settings.shutdown_grace_seconds)
        try:
            yield
        finally:
            restore()
            await drain(server, settings.shutdown_grace_seconds)
            server.ready = False
            server.engine.stop()
            gc.unfreeze()

    app = FastAPI(
        title="kogpt-serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(admin.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(lora.router)
    app.include_router(fewshot.router)
    app.include_router(playground.router)
    app.include_router(chat.router)
    app.include_router(watermark.router)
    app.add_middleware(
        ApiMiddleware,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout=settings.body_read_timeout_seconds,
        max_request_sequences=settings.max_request_sequences,
        public_probes=settings.public_health_metrics,
        metrics=metrics,
    )
    if settings.cors_allow_origins:
        origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    install_openapi(app, settings)
    return app
