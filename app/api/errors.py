"""One JSON error shape for every route, and the handlers that produce it.

Shape (TGI-compatible, plus the offending field):
    {"error": str, "error_type": str, "field": str | null}
No stack traces ever reach a client; unexpected errors are logged and answered 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.sampling_params import ParamValidationError
from app.engine.scheduler import SchedulerCapacityError

logger = logging.getLogger("kogpt.api")


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        error_type: str = "validation",
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.field = field
        self.headers = headers


def error_body(message: str, error_type: str, field: str | None = None) -> dict[str, object]:
    return {"error": message, "error_type": error_type, "field": field}


def _loc_to_field(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.error_type, exc.field), exc.status_code, exc.headers
        )

    @app.exception_handler(ParamValidationError)
    async def _param_error(_: Request, exc: ParamValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "validation", exc.field), 422)

    @app.exception_handler(SchedulerCapacityError)
    async def _capacity_error(_: Request, exc: SchedulerCapacityError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "validation"), 422)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _loc_to_field(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            message = f"unknown field `{field}`"
        else:
            message = f"`{field}`: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return JSONResponse(error_body(message, "validation", field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), "http"), exc.status_code, getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "internal"), 500)
