"""Exceptions as OpenAI error envelopes: each exception class has one HTTP status and error code.

Every error, including unknown routes and wrong methods, is answered with
{"error": {"message", "type", "param", "code"}}; an exception nobody expected
becomes a 500 envelope and the server keeps serving.
"""

from __future__ import annotations

import logging
from typing import Optional

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..errors import (
    ChatTemplateError,
    ContextLengthError,
    DeviceError,
    EngineClosedError,
    ModelLoadError,
)
from ..kv_blocks import OutOfBlocks
from ..openai_protocol import ApiError, error_body
from .json_io import MAX_BODY_BYTES, json_response

log = logging.getLogger(__name__)

# Retry-After seconds: a full queue drains within a request or two; a model
# still loading takes longer; a poisoned device needs a restart by an operator.
RETRY_QUEUE_FULL = 1
RETRY_LOADING = 5
RETRY_DEVICE = 30


def to_api_error(exc: BaseException, param: Optional[str] = None) -> ApiError:
    """The API error an exception stands for."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), "invalid_request_error", param, "context_length_exceeded")
    if isinstance(exc, ChatTemplateError):
        return ApiError(400, str(exc), "invalid_request_error", "messages", "chat_template_error")
    if isinstance(exc, DeviceError):
        return ApiError(
            503,
            f"the model's device is unavailable: {exc}",
            "server_error",
            None,
            "device_unavailable",
            {"Retry-After": str(RETRY_DEVICE)},
        )
    if isinstance(exc, EngineClosedError):
        return ApiError(
            503,
            "the model was unloaded while this request ran; retry",
            "server_error",
            None,
            "model_unavailable",
            {"Retry-After": str(RETRY_QUEUE_FULL)},
        )
    if isinstance(exc, ModelLoadError):
        return ApiError(400, str(exc), "invalid_request_error", param, "model_load_failed")
    if isinstance(exc, OutOfBlocks):
        return ApiError(
            503,
            f"the model's KV cache is full: {exc}",
            "server_error",
            None,
            "kv_cache_full",
            {"Retry-After": str(RETRY_QUEUE_FULL)},
        )
    if isinstance(exc, ValueError):
        # InvalidParameterError and ConstraintError name the field at fault.
        return ApiError(
            400, str(exc) or type(exc).__name__, "invalid_request_error", getattr(exc, "field", None) or param
        )
    log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, f"internal server error ({type(exc).__name__})", "server_error", None, "internal_error")


def error_response(e: ApiError) -> Response:
    """The envelope response of an API error, with its status and headers."""
    return json_response(e.body(), e.status, e.headers)


def http_error_response(e: HTTPException) -> Response:
    """The envelope for an error Flask raises itself: unknown route, wrong method, body too large."""
    code = e.code or 500
    headers = {}
    if code == 404:
        msg, kind = f"unknown route: {request.method} {request.path}", "not_found"
    elif code == 405:
        allowed = sorted(getattr(e, "valid_methods", None) or [])
        msg, kind = f"method {request.method} is not allowed for {request.path}", "method_not_allowed"
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    elif code == 413:
        msg, kind = f"the request body is larger than {MAX_BODY_BYTES} bytes", "request_too_large"
    else:
        msg, kind = e.description or e.name, None
    etype = "invalid_request_error" if code < 500 else "server_error"
    return json_response(error_body(msg, etype, None, kind), code, headers)


def install_error_handlers(app: Flask) -> None:
    """Answer every error `app` meets with the OpenAI envelope."""
    app.register_error_handler(ApiError, error_response)
    app.register_error_handler(HTTPException, http_error_response)
    app.register_error_handler(Exception, lambda e: error_response(to_api_error(e)))
