"""OpenAI-style error bodies, the server's own error types, and the exception handlers that use them."""
from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from epdlang.errors import EpdError, InvalidRequest

log = logging.getLogger("epdlang.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 503: "service_unavailable"}


class ApiError(EpdError):
    """An error raised by the HTTP layer itself, with an explicit status, code and offending field."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code or ERROR_TYPES.get(status, "error"), param


class MediaNotAllowed(InvalidRequest):
    """An image source the server's policy refuses (a file outside the allowed dirs, a disabled scheme)."""

    status = 403
    code = "media_not_allowed"


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(error_body(status, message, code, param)), status_code=status,
                    media_type="application/json", headers=headers)


def error_headers(exc: BaseException) -> dict[str, str] | None:
    """`Retry-After` for an error that says when to come back (an overloaded server's 503)."""
    retry = getattr(exc, "retry_after_s", None)
    return {"Retry-After": str(retry)} if retry is not None else None


def from_exception(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """(status, message, code, param) for any exception; unknown ones become an opaque 500."""
    if isinstance(exc, EpdError):
        return exc.status, str(exc), exc.code, getattr(exc, "param", None)
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return 400, *validation_message(exc)
    return 500, "internal server error", "internal_error", None


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str, str | None]:
    """The first pydantic error as (message, code, param), e.g. param 'messages.0.content'."""
    err = exc.errors()[0] if exc.errors() else {"msg": str(exc), "loc": (), "type": "invalid"}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    code = "invalid_json" if err.get("type") == "json_invalid" else "invalid_value"
    where = f" (at {param})" if param else ""
    return f"{err.get('msg', 'invalid request')}{where}", code, param


def install_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> Response:
        status, message, code, param = from_exception(exc)
        if status >= 500:
            log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(status, message, code, param, error_headers(exc))

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), None, None)

    app.add_exception_handler(EpdError, on_error)
    app.add_exception_handler(ValidationError, on_error)
    app.add_exception_handler(RequestValidationError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
