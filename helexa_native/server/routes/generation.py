"""POST /v1/chat/completions and POST /v1/completions: JSON, or server-sent events when stream is set."""

from __future__ import annotations

from typing import Callable

from flask import Flask, Response, request

from ...openai_protocol import GenerationRequest, parse_chat_request, parse_completion_request
from ..json_io import json_body
from ..replies import json_reply, sse_reply
from ..run import RequestRun
from ..state import AppState


def register(app: Flask, state: AppState) -> None:
    @app.post("/v1/chat/completions")
    def chat_completions():
        return _generate(state, parse_chat_request(json_body()), "chat")

    @app.post("/v1/completions")
    def completions():
        return _generate(state, parse_completion_request(json_body()), "completions")


def _generate(state: AppState, req: GenerationRequest, endpoint: str) -> Response:
    run = RequestRun(state, req, endpoint, disconnect_probe())
    return sse_reply(run) if req.stream else json_reply(run)


def disconnect_probe() -> Callable[[], bool]:
    """True once the current request's client has hung up (waitress tells; other servers never do)."""
    probe = request.environ.get("waitress.client_disconnected")
    if callable(probe):
        return probe
    return lambda: False
