"""One error model for every route, and the handlers that render it.

Every failure is an `APIError(status, message, error_type, field)`; it is rendered in the
wire format of the API the route belongs to:

- TGI and every other route (TGI-compatible, plus the offending field):
      {"error": str, "error_type": str, "field": str | null}
- /v1/* (OpenAI-compatible; the `openai` package reads `error.message`):
      {"error": {"message": str, "type": str, "param": str | null, "code": str | int}}
  in OpenAI's terms: a request error is a 400 (not 422) of type "invalid_request_error";
  `code` is OpenAI's code where one exists ("model_not_found", "context_length_exceeded"),
  else the HTTP status (vLLM's convention).

Same message, same field; only the envelope, and on /v1 the status and type, differ (see
docs/api.md).
No stack trace ever reaches a client; unexpected errors are logged and answered 500.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.core.scheduler import SchedulerCapacityError
from app.options.checks import ParamValidationError

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
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.field = field
        self.headers = headers
        self.code = code  # OpenAI's error code, where it has one (/v1 only)


class ClientDisconnected(APIError):
    """The client went away before the answer was ready (logged as 499, never sent)."""

    def __init__(self) -> None:
        super().__init__(499, "client closed the connection", "client_closed_request")


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


# /v1: the types OpenAI (and vLLM) give request errors; the others keep ours.
_OPENAI_TYPES = {"validation": "invalid_request_error", "not_found": "invalid_request_error"}


def wire_status(err: APIError, path: str) -> int:
    """The status sent: a request error is a 422 (TGI) everywhere but on /v1, where OpenAI
    and vLLM answer 400 (the `openai` package raises BadRequestError for it)."""
    if err.status_code == 422 and is_openai_path(path):
        return 400
    return err.status_code


def error_body(
    message: str,
    error_type: str,
    field: str | None = None,
    *,
    openai: bool = False,
    status: int,
    code: str | None = None,
) -> dict[str, Any]:
    if openai:
        return {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(error_type, error_type),
                "param": field,
                "code": status if code is None else code,
            }
        }
    return {"error": message, "error_type": error_type, "field": field}


def error_json(err: APIError, path: str) -> dict[str, Any]:
    return error_body(
        err.message,
        err.error_type,
        err.field,
        openai=is_openai_path(path),
        status=wire_status(err, path),
        code=err.code,
    )


def error_response(err: APIError, path: str) -> JSONResponse:
    return JSONResponse(error_json(err, path), wire_status(err, path), err.headers)


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


# pydantic puts the union member that failed into an error's location, e.g.
# ("prompt", "list[int]", 0); a client knows the field, not the member.
_UNION_MEMBER = re.compile(
    r"^(str|int|float|bool|bytes|none|any|constrained-\w+|[A-Z]\w*"
    r"|(list|dict|tuple|set|frozenset|literal|function-\w+)\[.*\])$"
)


def _is_member(part: object) -> bool:
    return isinstance(part, str) and _UNION_MEMBER.match(part) is not None


def _loc_to_field(loc: tuple[object, ...], user_key: bool = False) -> str:
    """Dotted field path without pydantic's union-member tags. With `user_key` the last part
    is a key the client sent (an unknown field), kept even when it looks like a tag ("A")."""
    head, tail = (loc[:-1], [str(loc[-1])]) if user_key and loc else (loc, [])
    parts = [str(p) for p in head if p != "body" and not _is_member(p)] + tail
    return ".".join(parts) or "body"


def _union_field(errors: list[Any]) -> str | None:
    """The field, when every error is one alternative of the same union (nothing fit)."""
    prefixes = set()
    for error in errors:
        loc = tuple(error.get("loc", ()))
        member = next((i for i, part in enumerate(loc) if _is_member(part)), None)
        if member is None:
            return None
        prefixes.add(loc[:member])
    return _loc_to_field(prefixes.pop()) if len(prefixes) == 1 else None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    kind = first.get("type")
    field = _loc_to_field(tuple(first.get("loc", ())), user_key=kind == "extra_forbidden")
    union = _union_field(errors) if len(errors) > 1 else None
    if union is not None:
        allowed = "; or ".join(dict.fromkeys(str(e.get("msg", "")) for e in errors))
        return APIError(422, f"`{union}`: {allowed}", "validation", union)
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


def body_parse_error(exc: StarletteHTTPException) -> APIError | None:
    """FastAPI answers a bare 400 when the body cannot be decoded at all (bytes that are not
    UTF-8, JSON nested past the parser's recursion limit); like any malformed body that is a
    422 naming `body`, with the reason."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        reason = f"it is not valid UTF-8 (byte {cause.start})"
    elif isinstance(cause, RecursionError):
        reason = "it is nested too deeply"
    else:
        reason = type(cause).__name__
    return APIError(422, f"the request body is not valid JSON: {reason}", "validation", "body")


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
        unparsable = body_parse_error(exc)
        if unparsable is not None:
            return error_response(unparsable, request.url.path)
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
