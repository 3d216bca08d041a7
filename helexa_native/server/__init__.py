"""The OpenAI-compatible HTTP server: a Flask app over one or more loaded Engines.

Routes (routes/, one module per group)
  POST /v1/chat/completions, POST /v1/completions   generation.py  (JSON or server-sent events)
  GET  /v1/models, GET /v1/models/<id>              models.py
  POST /v1/models/load, POST /v1/models/unload      models.py      (admin: load, replace, drop)
  POST /tokenize, POST /detokenize                  tokens.py
  GET  /health, GET /metrics                        monitoring.py  (/health never needs the API key)

The rest
  app.py       create_app: the Flask app, the API-key check, error handlers, route groups
  state.py     AppState, what the routes of one app share
  slots.py     ModelSlot (one model and its FIFO queue) and ModelRegistry (load, replace, unload)
  run.py       RequestRun: one generation request from its queue place to the end of its stream
  replies.py   a RequestRun as the OpenAI reply: one JSON object or server-sent events
  errors.py    exception -> OpenAI error envelope (status, code, Retry-After)
  json_io.py   the request's JSON body, unknown fields, JSON responses
  paths.py     where /v1/models/load may open files (--model-root)
  serve.py     the `helexa-native serve` command

Concurrency: an Engine holds one KV cache, so each model serves one request at
a time. Requests for a model wait in its FIFO queue; one beyond `max_queue`
waiting gets 503 with Retry-After. Generation runs in the request's own
worker thread. A client that goes away stops its generation within a token:
the engine's cancel check reads waitress's disconnect flag, and closing the
SSE generator (waitress does when a write fails) closes the engine stream.

Every error, including unknown routes and wrong methods, is answered with the
OpenAI envelope {"error": {"message", "type", "param", "code"}}; an exception
nobody expected becomes a 500 envelope and the server keeps serving.
"""

from .app import create_app
from .errors import to_api_error
from .paths import resolve_model_path
from .serve import add_serve_arguments, run_from_args
from .slots import ModelRegistry, ModelSlot, model_name_for

__all__ = [
    "create_app",
    "ModelRegistry",
    "ModelSlot",
    "add_serve_arguments",
    "run_from_args",
    "model_name_for",
    "resolve_model_path",
    "to_api_error",
]
