"""One error model for every route, and the handlers that render it.

Every failure is an `APIError(status, message, error_type, field)`; it is rendered in the
wire format of the API the route belongs to:

- TGI and every other route (TGI-compatible, plus the offending field):
      {"error": str, "error_type": str, "field": str | null}
- /v1/* (OpenAI-compatible; the `openai` package reads `error.message`):
      {"error": {"message": str, "type": str, "param": str | null, "code": int}}

Same message, same type, same field; only the envelope differs (see docs/api.md).
No stack trace ever reaches a client; unexpected errors are logged and answered 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.sampling_params import ParamValidationError
from app.engine.scheduler import SchedulerCapacityError

logger = logging.getLogger("kogpt.api")

OPENAI_PREFIX = "/v1/"

# error_type for a bare HTTP status (routing errors, middleware rejections).
_STATUS_TYPES = {
    400: "validation",
    401: "authentication",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation",
    429: "overloaded",
    499: "client_closed_request",
    503: "unavailable",
}


class APIError(Exception):
    """A client-facing failure: status code, message, type and (optionally) the field."""

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


class ClientDisconnected(APIError):
    """The client went away before the answer was ready (logged as 499, never sent)."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the connection", "client_closed_request")


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_body(
    message: str, error_type: str, field: str | None = None, *, openai: bool = False, status: int
) -> dict[str, Any]:
    if openai:
        return {"error": {"message": message, "type": error_type, "param": field, "code": status}}
    return {"error": message, "error_type": error_type, "field": field}


def error_json(err: APIError, path: str) -> dict[str, Any]:
    return error_body(
        err.message,
        err.error_type,
        err.field,
        openai=is_openai_path(path),
        status=err.status_code,
    )


def error_response(err: APIError, path: str) -> JSONResponse:
    return JSONResponse(error_json(err, path), err.status_code, err.headers)


def error_bytes(err: APIError, path: str) -> bytes:
    """The error body as bytes, for middleware that answers before the app runs."""
    return json.dumps(error_json(err, path), ensure_ascii=False).encode()


def param_error(exc: ParamValidationError, renames: dict[str, str] | None = None) -> APIError:
    """A 422 for an invalid generate option, named as the caller's API names it."""
    field = exc.field
    message = str(exc)
    if renames and field in renames:
        alias = renames[field]
        message = message.replace(f"`{field}`", f"`{alias}`")
        if alias not in message:
            message = f"`{alias}`: {message}"
        field = alias
    return APIError(422, message, "validation", field)


def _loc_to_field(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _loc_to_field(tuple(first.get("loc", ())))
    kind = first.get("type")
    if kind == "extra_forbidden":
        message = f"unknown field `{field}`"
    elif kind == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('msg', '')}".rstrip(": ")
        field = "body"
    else:
        message = f"`{field}`: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(422, message, "validation", field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(ParamValidationError)
    async def _param_error(request: Request, exc: ParamValidationError) -> JSONResponse:
        return error_response(param_error(exc), request.url.path)

    @app.exception_handler(SchedulerCapacityError)
    async def _capacity_error(request: Request, exc: SchedulerCapacityError) -> JSONResponse:
        return error_response(APIError(422, str(exc), "validation"), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(
            exc.status_code,
            str(exc.detail),
            _STATUS_TYPES.get(exc.status_code, "http"),
            headers=getattr(exc, "headers", None),
        )
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        err = APIError(500, "internal server error", "internal")
        return error_response(err, request.url.path)
