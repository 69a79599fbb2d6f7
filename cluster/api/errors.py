"""OpenAI-shaped errors: one exception type, its JSON body and the app's exception handlers.

Every failure the server answers (bad JSON, wrong types, unknown model, overload, bugs) leaves
as `{"error": {"message", "type", "param", "code"}}`, never FastAPI's `{"detail": ...}`.
Bodies are ASCII-escaped JSON, so user text echoed in a message (lone surrogates included)
can never break the error path itself.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from cluster.client import Overloaded

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)=")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready (nobody reads the response)."""


class APIError(Exception):
    """An error the client sees with this status and OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self._reason = reason

    @property
    def reason(self) -> str:
        """The `reason` label of the rejected-requests counter (the code, unless told a finer one)."""
        return self._reason or self.code or ("invalid" if self.status < 500 else "error")

    def response(self) -> Response:
        return error_response(self.status, self.message, param=self.param, code=self.code, headers=self.headers)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    content = json.dumps(error_body(status, message, param, code))  # ensure_ascii: always encodable
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation(exc: ValidationError | RequestValidationError) -> APIError:
    """The first problem pydantic found, as `field.path: what is wrong`."""
    errors = exc.errors()
    if not errors:
        return invalid("invalid request")
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # the deepest: most specific among union branches
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(str(p))]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    extra = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return invalid(f"{'.'.join(loc)}: {message}{extra}" if loc else message + extra, param=loc[0] if loc else None)


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member it tried inside `loc` (`str`, `list[TextPart]`); not a field."""
    return "[" in part or part in ("str", "int", "float", "bool")


def from_value_error(exc: ValueError) -> APIError:
    """A ValueError from SamplingParams or engine validation: 400, naming the field where it can."""
    message = str(exc)
    match = _SAMPLING_FIELD.search(message)
    return invalid(message, param=match.group(1) if match else None)


def from_overloaded(exc: Overloaded) -> APIError:
    retry_after = str(max(1, math.ceil(exc.retry_after_s)))
    if exc.unavailable:
        return APIError(503, f"service unavailable: {exc}", code="unavailable", headers={"Retry-After": retry_after})
    return APIError(429, f"server overloaded, retry later: {exc}", code="overloaded", headers={"Retry-After": retry_after},
                    reason=exc.reason)


def guarded(route):
    """Wrap a route so a bug answers 500 with the OpenAI body from inside the route.

    (Starlette's catch-all handler also answers, but then re-raises, and uvicorn drops the connection.)
    """
    @functools.wraps(route)
    async def wrapper(request: Request) -> Response:
        try:
            return await route(request)
        except (APIError, ClientGone):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is our bug; the client gets a clean 500
            logger.exception("unhandled error serving %s", request.url.path)
            return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")

    return wrapper


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        return from_validation(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error serving %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
