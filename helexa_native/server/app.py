"""create_app: the Flask app over a registry of Engines: API-key check, error envelopes, routes."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from flask import Flask, Response, request

from .. import defaults
from ..openai_protocol import ApiError
from .errors import error_response, install_error_handlers
from .json_io import MAX_BODY_BYTES
from .routes import register_routes
from .slots import ModelRegistry, load_engine, model_name_for
from .state import AppState

# Paths that answer without the API key (load balancers probe them).
OPEN_PATHS = frozenset({"/health"})


def create_app(
    engine_or_registry=None,
    api_key: Optional[str] = None,
    served_model_name: Optional[str] = None,
    max_queue: int = defaults.DEFAULT_MAX_QUEUE,
    default_sampling: Optional[dict] = None,
    loader: Optional[Callable[..., Any]] = load_engine,
    device: str = "auto",
    model_roots: Optional[Sequence[Any]] = None,
    response_store_size: int = defaults.DEFAULT_RESPONSE_STORE_SIZE,
) -> Flask:
    """A Flask app serving an Engine (as `served_model_name`) or every model of a ModelRegistry.

    api_key: when set, every route but /health needs `Authorization: Bearer <key>`.
    max_queue: requests that may wait per model behind the running one.
    default_sampling: sampling arguments applied where a request sets none.
    loader(path, device=..., n_ctx=...) builds the Engine for /v1/models/load.
    model_roots: directories /v1/models/load may open files in (symlinks and
        '..' resolved first); None allows any readable path, [] turns the
        route off.
    response_store_size: responses kept in memory for previous_response_id
        (least recently used dropped first; 0 keeps none).
    """
    roots = None if model_roots is None else [Path(r).expanduser() for r in model_roots]
    registry = _registry(engine_or_registry, served_model_name, loader, max_queue, device)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    default_sampling = dict(default_sampling or {})
    if default_sampling:
        from ..request_params import resolve_params

        resolve_params(default_sampling, {})

    state = AppState(registry, api_key, default_sampling, roots, response_store_size)
    app = Flask("helexa_native.server")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["helexa_native"] = state
    app.before_request(lambda: check_api_key(state))
    app.after_request(lambda resp: count_response(state, resp))
    install_error_handlers(app)
    register_routes(app, state)
    return app


def _registry(engine_or_registry, served_model_name, loader, max_queue, device) -> ModelRegistry:
    if isinstance(engine_or_registry, ModelRegistry):
        registry = engine_or_registry
        if served_model_name:
            registry.default_name = served_model_name
        return registry
    registry = ModelRegistry(loader=loader, max_queue=max_queue, device=device)
    if engine_or_registry is not None:
        name = served_model_name or model_name_for(getattr(engine_or_registry, "model_path", "model"))
        registry.add(name, engine_or_registry, default=True)
    elif served_model_name:
        registry.default_name = served_model_name
    return registry


def check_api_key(state: AppState) -> Optional[Response]:
    """A 401 envelope when the app has a key and the request does not carry it; None lets it through."""
    if state.api_key is None or request.path in OPEN_PATHS:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        err = ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_request_error", None, "invalid_api_key"
        )
    elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        err = ApiError(401, "incorrect API key provided", "invalid_request_error", None, "invalid_api_key")
    else:
        return None
    err.headers["WWW-Authenticate"] = "Bearer"
    return error_response(err)


def count_response(state: AppState, resp: Response) -> Response:
    """Count the response by route and status in the app's metrics."""
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    state.metrics.http.labels(rule, str(resp.status_code)).inc()
    return resp
