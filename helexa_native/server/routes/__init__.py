"""The app's routes, one module per group; each module's register(app, state) adds its routes.

generation.py  POST /v1/chat/completions, POST /v1/completions
responses.py   POST /v1/responses, GET and DELETE /v1/responses/<id>
embeddings.py  POST /v1/embeddings
models.py      GET /v1/models, GET /v1/models/<id>, POST /v1/models/load, POST /v1/models/unload
tokens.py      POST /tokenize, POST /detokenize
monitoring.py  GET /health, GET /metrics
"""

from __future__ import annotations

from flask import Flask

from ..state import AppState
from . import embeddings, generation, models, monitoring, responses, tokens

GROUPS = (generation, responses, embeddings, models, tokens, monitoring)


def register_routes(app: Flask, state: AppState) -> None:
    """Add every route group to `app`."""
    for group in GROUPS:
        group.register(app, state)
