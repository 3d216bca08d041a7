"""The OpenAI-compatible HTTP server: a Flask app over one or more loaded Engines.

Routes
  POST /v1/chat/completions, POST /v1/completions   (JSON or server-sent events)
  GET  /v1/models, GET /v1/models/<id>
  POST /v1/models/load, POST /v1/models/unload        (admin: load, replace, drop)
  POST /tokenize, POST /detokenize
  GET  /health                                         (never needs the API key)
  GET  /metrics                                        (Prometheus text)

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
from __future__ import annotations

import argparse
import hmac
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import defaults
from .errors import (ChatTemplateError, ContextLengthError, DeviceError, EngineClosedError,
                     ModelLoadError, TokenizerError)
from .metrics import ServerMetrics
from .openai_protocol import (SSE_DONE, ApiError, GenerationRequest, bad_request, chat_chunk,
                              chat_completion, chat_usage_chunk, completion, completion_chunk,
                              completion_logprobs, completion_usage_chunk, dumps, error_body,
                              model_card, opt_bool, opt_int, opt_str, parse_chat_request,
                              parse_completion_request, parse_json_body, parse_messages,
                              parse_tools, sse, template_kwargs, token_id_list)

__all__ = ["create_app", "ModelRegistry", "add_serve_arguments", "run_from_args", "model_name_for"]

log = logging.getLogger("helexa_native.server")

PROG = "helexa-native"

# An env var may set the key's default so it stays out of the process list.
API_KEY_ENV = "HELEXA_NATIVE_API_KEY"

# Requests are JSON; anything this large is a mistake or an attack.
MAX_BODY_BYTES = 32 * 1024 * 1024

# Retry-After seconds: a full queue drains within a request or two; a model
# still loading takes longer; a poisoned device needs a restart by an operator.
RETRY_QUEUE_FULL = 1
RETRY_LOADING = 5
RETRY_DEVICE = 30

# At shutdown running generations are cancelled; this bounds the wait for them.
SHUTDOWN_WAIT_SECONDS = 10.0

# How often a queued request checks whether its client is still there.
QUEUE_POLL_SECONDS = 0.2

# Paths that answer without the API key (load balancers probe them).
OPEN_PATHS = frozenset({"/health"})


def model_name_for(path) -> str:
    """The name a model is served under by default: its file name without .gguf, or its folder name."""
    p = Path(str(path))
    return p.stem if p.suffix.lower() == ".gguf" else (p.name or str(path))


def engine_healthy(engine) -> bool:
    """False when the engine is closed or its backend reports a poisoned device."""
    try:
        backend = engine.backend
        check = getattr(backend, "is_healthy", None)
        return bool(check()) if callable(check) else True
    except Exception:
        return False


# ---------------------------------------------------------------------------
# models and their queues

class _Retired(Exception):
    """The slot was replaced or unloaded while a request waited for it."""


class ClientGone(Exception):
    """The client disconnected before its request got its turn."""


class ModelSlot:
    """One served model: its Engine and the FIFO queue of requests for it."""

    def __init__(self, name: str, engine, max_queue: int) -> None:
        self.name = name
        self.engine = engine
        self.max_queue = int(max_queue)
        self.created = int(time.time())
        self._cv = threading.Condition()
        self._waiting: deque = deque()
        self._running: Optional[object] = None
        self.retired = False

    def admit(self) -> object:
        """A ticket in the queue, or 503 when max_queue requests already wait."""
        with self._cv:
            if self.retired:
                raise _Retired()
            # One request runs and max_queue wait behind it. A ticket admitted
            # while nothing runs is next to run even before it calls wait_turn,
            # so it does not take one of the waiting places.
            if (self._running is not None) + len(self._waiting) > self.max_queue:
                raise ApiError(503, f"the queue for model '{self.name}' is full ({self.max_queue} "
                               "requests waiting); retry shortly", "server_error", None, "queue_full",
                               {"Retry-After": str(RETRY_QUEUE_FULL)})
            ticket = object()
            self._waiting.append(ticket)
            return ticket

    def wait_turn(self, ticket, gone: Callable[[], bool]) -> str:
        """Block until `ticket` may generate: 'run', or 'retired' / 'gone' after leaving the queue."""
        with self._cv:
            while True:
                if self.retired:
                    self._leave(ticket)
                    return "retired"
                if self._running is None and self._waiting and self._waiting[0] is ticket:
                    self._waiting.popleft()
                    self._running = ticket
                    return "run"
                if gone():
                    self._leave(ticket)
                    return "gone"
                self._cv.wait(QUEUE_POLL_SECONDS)

    def _leave(self, ticket) -> None:
        try:
            self._waiting.remove(ticket)
        except ValueError:
            pass
        self._cv.notify_all()

    def release(self, ticket) -> None:
        """The ticket's request is over (ran, failed or abandoned)."""
        with self._cv:
            if self._running is ticket:
                self._running = None
            else:
                try:
                    self._waiting.remove(ticket)
                except ValueError:
                    pass
            self._cv.notify_all()

    def counts(self) -> Tuple[int, int]:
        """(waiting, running)."""
        with self._cv:
            return len(self._waiting), (1 if self._running is not None else 0)

    def healthy(self) -> bool:
        return engine_healthy(self.engine)

    def retire(self, timeout: Optional[float] = None) -> bool:
        """Take no new requests, send waiters elsewhere, let the running one finish, then free the model.

        Returns False (model left open) when the running request outlasts `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self.retired = True
            self._cv.notify_all()
            while self._running is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        self.engine.close()
        return True

    def card(self) -> dict:
        root = getattr(self.engine, "model_path", None)
        return model_card(self.name, self.created, getattr(self.engine, "n_ctx", None),
                          str(root) if root is not None else None)


def _default_loader(path, device="auto", n_ctx=None, progress=False):
    from .engine import Engine
    return Engine(path, device=device, n_ctx=n_ctx, progress=progress)


class ModelRegistry:
    """The models a server serves, by name; loads and unloads them."""

    def __init__(self, loader: Optional[Callable[..., Any]] = _default_loader,
                 max_queue: int = defaults.DEFAULT_MAX_QUEUE, device: str = "auto",
                 n_ctx: Optional[int] = None) -> None:
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        self.loader = loader
        self.max_queue = max_queue
        self.device = device
        self.n_ctx = n_ctx
        self.default_name: Optional[str] = None
        self.load_error: Optional[str] = None
        self._lock = threading.Lock()
        self._admin = threading.Lock()     # one load or unload at a time
        self._slots: Dict[str, ModelSlot] = {}
        self._loading: Dict[str, float] = {}

    def add(self, name: str, engine, default: bool = False) -> Optional[ModelSlot]:
        """Serve `engine` as `name`; returns the slot it replaced (the caller retires it)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a model name must be a non-empty string")
        slot = ModelSlot(name, engine, self.max_queue)
        with self._lock:
            old = self._slots.get(name)
            self._slots[name] = slot
            if default or self.default_name is None:
                self.default_name = name
        return old

    def get(self, name: Optional[str]) -> ModelSlot:
        """The slot for `name` (None: the default model), or the matching API error."""
        with self._lock:
            key = name
            if key is None:
                key = self.default_name if self.default_name in self._slots else next(iter(self._slots), None)
            slot = self._slots.get(key) if key is not None else None
            if slot is not None:
                return slot
            if (key is not None and key in self._loading) or (name is None and self._loading):
                raise ApiError(503, f"model '{key or next(iter(self._loading))}' is still loading",
                               "server_error", None, "model_loading",
                               {"Retry-After": str(RETRY_LOADING)})
            if name is None:
                raise ApiError(503, "no model is loaded", "server_error", "model", "model_not_loaded",
                               {"Retry-After": str(RETRY_LOADING)})
            have = ", ".join(self._slots) or "none"
            raise ApiError(404, f"the model '{name}' does not exist (available: {have})",
                           "invalid_request_error", "model", "model_not_found")

    def slots(self) -> List[ModelSlot]:
        with self._lock:
            return list(self._slots.values())

    def loading(self) -> List[str]:
        with self._lock:
            return list(self._loading)

    def load(self, path, name: Optional[str] = None, device: Optional[str] = None,
             n_ctx: Optional[int] = None, default: bool = False, **loader_kwargs) -> Tuple[ModelSlot, bool]:
        """Load `path` and serve it as `name`, replacing a model of that name; returns (slot, replaced).

        The old model keeps serving until the new one is ready; then its
        running request finishes and its memory is freed (Engine.close).
        """
        if self.loader is None:
            raise ApiError(400, "this server cannot load models", "invalid_request_error", None,
                           "unsupported")
        name = name or model_name_for(path)
        with self._admin:
            with self._lock:
                self._loading[name] = time.time()
            try:
                engine = self.loader(path, device=device or self.device,
                                     n_ctx=n_ctx if n_ctx is not None else self.n_ctx, **loader_kwargs)
            finally:
                with self._lock:
                    self._loading.pop(name, None)
            old = self.add(name, engine, default=default)
            if old is not None:
                old.retire()
        return self.get(name), old is not None

    def mark_loading(self, name: str) -> None:
        """Announce a model that is about to load (health and requests report 'loading')."""
        with self._lock:
            self._loading[name] = time.time()

    def unload(self, name: str) -> None:
        """Stop serving `name` and free its memory once its running request ends."""
        with self._admin:
            with self._lock:
                slot = self._slots.pop(name, None)
            if slot is None:
                raise ApiError(404, f"the model '{name}' does not exist", "invalid_request_error",
                               "model", "model_not_found")
            slot.retire()

    def close(self, timeout: Optional[float] = None) -> None:
        """Free every model, waiting at most `timeout` seconds for each one's running request."""
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for s in slots:
            try:
                if not s.retire(timeout):
                    log.warning("model %s still busy at shutdown; left to the process exit", s.name)
            except Exception:
                log.exception("closing model %s failed", s.name)


# ---------------------------------------------------------------------------
# errors

def to_api_error(exc: BaseException, param: Optional[str] = None) -> ApiError:
    """The API error an exception stands for."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), "invalid_request_error", param, "context_length_exceeded")
    if isinstance(exc, ChatTemplateError):
        return ApiError(400, str(exc), "invalid_request_error", "messages", "chat_template_error")
    if isinstance(exc, DeviceError):
        return ApiError(503, f"the model's device is unavailable: {exc}", "server_error", None,
                        "device_unavailable", {"Retry-After": str(RETRY_DEVICE)})
    if isinstance(exc, EngineClosedError):
        return ApiError(503, "the model was unloaded while this request ran; retry", "server_error",
                        None, "model_unavailable", {"Retry-After": str(RETRY_QUEUE_FULL)})
    if isinstance(exc, ModelLoadError):
        return ApiError(400, str(exc), "invalid_request_error", param, "model_load_failed")
    if isinstance(exc, (ValueError, TokenizerError)):
        return ApiError(400, str(exc) or type(exc).__name__, "invalid_request_error", param)
    log.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
    return ApiError(500, f"internal server error ({type(exc).__name__})", "server_error", None,
                    "internal_error")


def _json(obj, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(dumps(obj), status=status, mimetype="application/json", headers=headers or {})


def _error_response(e: ApiError) -> Response:
    return _json(e.body(), e.status, e.headers)


# ---------------------------------------------------------------------------
# one generation

class _AppState:
    def __init__(self, registry: ModelRegistry, api_key: Optional[str], default_sampling: dict) -> None:
        self.registry = registry
        self.api_key = api_key
        self.default_sampling = default_sampling
        self.stopping = threading.Event()
        self.metrics = ServerMetrics(self._gauges)

    def _gauges(self):
        for s in self.registry.slots():
            waiting, running = s.counts()
            yield s.name, waiting, running, s.healthy()


class _Run:
    """A generation request bound to a model slot: queueing, the engine stream, metrics."""

    def __init__(self, state: _AppState, req: GenerationRequest, endpoint: str,
                 disconnected: Callable[[], bool]) -> None:
        self.state = state
        self.req = req
        self.endpoint = endpoint
        self.disconnected = disconnected
        self.t0 = time.perf_counter()
        self.slot: Optional[ModelSlot] = None
        self.ticket = None
        self.stream = None
        self.prompt_ids: List[int] = []
        self.started = False
        self.final = None
        self.closed = False
        self._bind(state.registry.get(req.model))

    @property
    def param(self) -> str:
        return "messages" if self.req.kind == "chat" else "prompt"

    def _cancelled(self) -> bool:
        return self.state.stopping.is_set() or self.disconnected()

    def _bind(self, slot: ModelSlot) -> None:
        if not slot.healthy():
            raise ApiError(503, f"the device of model '{slot.name}' is unusable after an earlier error",
                           "server_error", None, "device_unavailable", {"Retry-After": str(RETRY_DEVICE)})
        try:
            ticket = slot.admit()
        except _Retired:
            return self._bind(self.state.registry.get(slot.name))
        try:
            ids, stream = self._prepare(slot.engine)
        except BaseException as e:
            slot.release(ticket)
            raise to_api_error(e, self.param) from e
        self.slot, self.ticket, self.prompt_ids, self.stream = slot, ticket, ids, stream

    def _prepare(self, engine):
        req = self.req
        if req.kind == "chat":
            kwargs = dict(req.chat_template_kwargs)
            agp = kwargs.pop("add_generation_prompt", True)
            ids = engine.apply_chat_template(req.messages, add_generation_prompt=bool(agp), tools=req.tools,
                                             tokenize=True, **kwargs)
        elif isinstance(req.prompt, str):
            ids = engine.tokenize(req.prompt)
        else:
            ids = list(req.prompt)
        sampling = dict(self.state.default_sampling)
        sampling.update(req.sampling)
        stream = engine.generate_stream(ids, cancel=self._cancelled, **sampling)
        return list(ids), stream

    def _await_turn(self) -> None:
        while True:
            outcome = self.slot.wait_turn(self.ticket, self.disconnected)
            if outcome == "run":
                return
            self.ticket = None
            if outcome == "gone":
                raise ClientGone()
            # Replaced or unloaded while waiting: follow the name to its new model.
            self.stream.close()
            self._bind(self.state.registry.get(self.slot.name))

    @property
    def model(self) -> str:
        return self.slot.name

    @property
    def engine(self):
        return self.slot.engine

    def events(self):
        """The engine's StreamChunks, after this request's turn has come."""
        self._await_turn()
        m, name = self.state.metrics, self.slot.name
        m.prompt_tokens.labels(name).inc(len(self.prompt_ids))
        self.started = True
        last = None
        for ch in self.stream:
            n = len(ch.token_ids)
            if n:
                now = time.perf_counter()
                m.generation_tokens.labels(name).inc(n)
                if last is None:
                    m.ttft.labels(name).observe(now - self.t0)
                else:
                    gap = (now - last) / n
                    for _ in range(n):
                        m.itl.labels(name).observe(gap)
                last = now
            if ch.finish_reason is not None:
                self.final = ch
            yield ch

    def close(self) -> None:
        """End the request: stop the engine stream, leave the queue, count the outcome."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.stream is not None:
                self.stream.close()
        finally:
            if self.slot is not None:
                if self.ticket is not None:
                    self.slot.release(self.ticket)
                self._count()

    def _count(self) -> None:
        m, name = self.state.metrics, self.slot.name
        gone = self.disconnected()
        reason = self.final.finish_reason if self.final is not None else None
        if reason is None:
            reason = "cancelled" if gone else "error"
        if reason == "cancelled" and gone:
            m.cancelled.labels(name).inc()
        m.requests.labels(name, self.endpoint, reason).inc()
        if self.started:
            m.e2e.labels(name).observe(time.perf_counter() - self.t0)


def _fingerprint(run: _Run) -> str:
    from . import __version__
    return f"helexa-native-{__version__}-{getattr(run.engine, 'device', 'cpu')}"


def _sse_response(run: _Run, pieces) -> Response:
    def gen():
        err = None
        try:
            for piece in pieces:
                yield piece
        except ClientGone:
            return
        except Exception as e:
            err = e
        finally:
            pieces.close()
            run.close()
        if err is not None:
            yield sse(to_api_error(err, run.param).body())
        yield SSE_DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    resp = Response(gen(), status=200, mimetype="text/event-stream", headers=headers)
    # A generator closed before its first step never runs its finally: the
    # WSGI server's close() must still give the queue ticket back.
    resp.call_on_close(run.close)
    return resp


def _chat_pieces(run: _Run):
    req = run.req
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model, fp = run.model, _fingerprint(run)
    iu = req.include_usage
    yield sse(chat_chunk(cid, created, model, fp, {"role": "assistant", "content": ""}, include_usage=iu))
    final = None
    for ch in run.events():
        if ch.text or (req.logprobs and ch.logprobs):
            yield sse(chat_chunk(cid, created, model, fp, {"content": ch.text},
                                 logprobs=ch.logprobs if req.logprobs else None, include_usage=iu))
        if ch.finish_reason is not None:
            final = ch
    usage = final.usage if final is not None else None
    yield sse(chat_chunk(cid, created, model, fp, {}, final.finish_reason if final else "stop",
                         include_usage=iu, usage=usage))
    if iu:
        yield sse(chat_usage_chunk(cid, created, model, fp, usage))


def _completion_pieces(run: _Run):
    req = run.req
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model, fp = run.model, _fingerprint(run)
    iu = req.include_usage
    offset = 0
    if req.echo:
        text = _echo_text(run)
        offset = len(text)
        yield sse(completion_chunk(cid, created, model, fp, text, include_usage=iu))
    final = None
    for ch in run.events():
        if ch.text or (req.logprobs and ch.logprobs):
            lp, offset = completion_logprobs(ch.logprobs if req.logprobs else None, offset)
            yield sse(completion_chunk(cid, created, model, fp, ch.text, logprobs=lp, include_usage=iu))
        if ch.finish_reason is not None:
            final = ch
    usage = final.usage if final is not None else None
    yield sse(completion_chunk(cid, created, model, fp, "", final.finish_reason if final else "stop",
                               include_usage=iu, usage=usage))
    if iu:
        yield sse(completion_usage_chunk(cid, created, model, fp, usage))


def _echo_text(run: _Run) -> str:
    p = run.req.prompt
    return p if isinstance(p, str) else run.engine.detokenize(run.prompt_ids)


def _collect(run: _Run):
    parts, lps, final = [], None, None
    try:
        for ch in run.events():
            parts.append(ch.text)
            if ch.logprobs is not None:
                lps = (lps or []) + list(ch.logprobs)
            if ch.finish_reason is not None:
                final = ch
    finally:
        run.close()
    usage = final.usage if final is not None else {"prompt_tokens": len(run.prompt_ids),
                                                     "completion_tokens": 0}
    return "".join(parts), lps, (final.finish_reason if final else "stop"), usage


# ---------------------------------------------------------------------------
# the app

def _disconnect_probe() -> Callable[[], bool]:
    probe = request.environ.get("waitress.client_disconnected")
    if callable(probe):
        return probe
    return lambda: False


def _body() -> dict:
    return parse_json_body(request.get_data(cache=False))


def resolve_model_path(path: str, roots: Optional[Sequence[Path]]) -> str:
    """The path /v1/models/load may open for `path`, given the server's model roots.

    roots None: any path the server can read (relative to its working
    directory). Otherwise the path must lie, after following symlinks and
    '..', inside one of `roots`; a relative path is looked up in each root in
    turn. An empty `roots` turns loading over HTTP off.
    """
    if roots is None:
        return path
    if not roots:
        raise ApiError(403, "this server does not load models over HTTP (start it with --model-root DIR "
                       "to allow loading from DIR)", "permission_error", "model", "model_load_forbidden")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    p = Path(path).expanduser()
    candidates = [Path(os.path.realpath(c)) for c in ([p] if p.is_absolute() else [r / p for r in roots])]
    inside = [c for c in candidates if any(c == r or r in c.parents for r in real_roots)]
    if not inside:
        raise ApiError(403, f"'{path}' is outside the directories this server loads models from "
                       f"(--model-root)", "permission_error", "model", "model_load_forbidden")
    found = next((c for c in inside if c.exists()), None)
    if found is None:
        raise ApiError(400, f"model not found under the model roots: {path}", "invalid_request_error",
                       "model", "model_load_failed")
    return str(found)


def create_app(engine_or_registry=None, api_key: Optional[str] = None,
               served_model_name: Optional[str] = None, max_queue: int = defaults.DEFAULT_MAX_QUEUE,
               default_sampling: Optional[dict] = None, loader: Optional[Callable[..., Any]] = _default_loader,
               device: str = "auto", model_roots: Optional[Sequence[Any]] = None) -> Flask:
    """A Flask app serving an Engine (as `served_model_name`) or every model of a ModelRegistry.

    api_key: when set, every route but /health needs `Authorization: Bearer <key>`.
    max_queue: requests that may wait per model behind the running one.
    default_sampling: sampling arguments applied where a request sets none.
    loader(path, device=..., n_ctx=...) builds the Engine for /v1/models/load.
    model_roots: directories /v1/models/load may open files in (symlinks and
        '..' resolved first); None allows any readable path, [] turns the
        route off.
    """
    roots = None if model_roots is None else [Path(r).expanduser() for r in model_roots]
    if isinstance(engine_or_registry, ModelRegistry):
        registry = engine_or_registry
        if served_model_name:
            registry.default_name = served_model_name
    else:
        registry = ModelRegistry(loader=loader, max_queue=max_queue, device=device)
        if engine_or_registry is not None:
            name = served_model_name or model_name_for(getattr(engine_or_registry, "model_path", "model"))
            registry.add(name, engine_or_registry, default=True)
        elif served_model_name:
            registry.default_name = served_model_name
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    default_sampling = dict(default_sampling or {})
    if default_sampling:
        from .request_params import resolve_params
        resolve_params(default_sampling, {})

    state = _AppState(registry, api_key, default_sampling)
    app = Flask("helexa_native.server")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["helexa_native"] = state

    @app.before_request
    def _auth():
        if state.api_key is None or request.path in OPEN_PATHS:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            err = ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")
        elif scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                    state.api_key.encode()):
            err = ApiError(401, "incorrect API key provided", "invalid_request_error", None,
                           "invalid_api_key")
        else:
            return None
        err.headers["WWW-Authenticate"] = "Bearer"
        return _error_response(err)

    @app.after_request
    def _count(resp):
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        state.metrics.http.labels(rule, str(resp.status_code)).inc()
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return _error_response(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
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
        return _json(error_body(msg, etype, None, kind), code, headers)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        return _error_response(to_api_error(e))

    # ------------------------------------------------------------ generation

    @app.post("/v1/chat/completions")
    def chat_completions():
        req = parse_chat_request(_body())
        return _generate(req, "chat")

    @app.post("/v1/completions")
    def completions():
        req = parse_completion_request(_body())
        return _generate(req, "completions")

    def _generate(req: GenerationRequest, endpoint: str) -> Response:
        run = _Run(state, req, endpoint, _disconnect_probe())
        if req.stream:
            pieces = _chat_pieces(run) if req.kind == "chat" else _completion_pieces(run)
            return _sse_response(run, pieces)
        try:
            text, lps, finish, usage = _collect(run)
        except ClientGone:
            raise ApiError(499, "the client closed the request", "invalid_request_error", None,
                           "client_closed")
        except Exception as e:
            raise to_api_error(e, run.param) from e
        fp = _fingerprint(run)
        created = int(time.time())
        if req.kind == "chat":
            return _json(chat_completion(f"chatcmpl-{uuid.uuid4().hex}", created, run.model, fp, text,
                                         finish, usage, lps))
        lp = None
        offset = 0
        prefix = ""
        if req.echo:
            prefix = _echo_text(run)
            offset = len(prefix)
        if req.logprobs:
            lp, _ = completion_logprobs(lps or [], offset)
        return _json(completion(f"cmpl-{uuid.uuid4().hex}", created, run.model, fp, prefix + text,
                                finish, usage, lp))

    # ------------------------------------------------------------ models

    @app.get("/v1/models")
    def list_models():
        return _json({"object": "list", "data": [s.card() for s in registry.slots()]})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        return _json(registry.get(model_id).card())

    @app.post("/v1/models/load")
    def load_model():
        body = _body()
        _only(body, ("model", "name", "device", "n_ctx"))
        path = opt_str(body, "model")
        if not path:
            raise bad_request("model (a GGUF file or Hugging Face folder path) is required", "model")
        name = opt_str(body, "name")
        if name is not None and not name.strip():
            raise bad_request("name must not be empty", "name")
        device = opt_str(body, "device")
        n_ctx = opt_int(body, "n_ctx", minimum=1)
        name = name or model_name_for(path)   # named after the path asked for, not its link target
        path = resolve_model_path(path, roots)
        t0 = time.perf_counter()
        try:
            slot, replaced = registry.load(path, name=name, device=device, n_ctx=n_ctx)
        except ApiError:
            raise
        except (DeviceError, ValueError) as e:
            raise ApiError(400, str(e), "invalid_request_error", "device" if isinstance(e, DeviceError)
                           or "device" in str(e) else "model", "model_load_failed") from e
        except (ModelLoadError, OSError) as e:
            raise ApiError(400, str(e), "invalid_request_error", "model", "model_load_failed") from e
        out = slot.card()
        out.update(replaced=replaced, load_seconds=round(time.perf_counter() - t0, 3),
                   device=str(getattr(slot.engine, "device", "")))
        log.info("loaded model %s from %s (%s)", slot.name, path, "replaced" if replaced else "new")
        return _json(out)

    @app.post("/v1/models/unload")
    def unload_model():
        body = _body()
        _only(body, ("model",))
        name = opt_str(body, "model")
        if not name:
            raise bad_request("model (the served name) is required", "model")
        registry.unload(name)
        log.info("unloaded model %s", name)
        return _json({"id": name, "object": "model", "deleted": True})

    # ------------------------------------------------------------ tokens

    @app.post("/tokenize")
    def tokenize():
        body = _body()
        _only(body, ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                     "tools", "chat_template_kwargs", "return_token_strs"))
        slot = registry.get(opt_str(body, "model"))
        engine = slot.engine
        strs = opt_bool(body, "return_token_strs")
        try:
            if body.get("messages") is not None:
                if body.get("prompt") is not None:
                    raise bad_request("send either prompt or messages, not both", "prompt")
                messages = parse_messages(body["messages"])
                kwargs = template_kwargs(body)
                kwargs.pop("add_generation_prompt", None)
                ids = engine.apply_chat_template(
                    messages, add_generation_prompt=opt_bool(body, "add_generation_prompt", True),
                    tools=parse_tools(body.get("tools")), tokenize=True, **kwargs)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise bad_request("prompt must be a string (or send messages)", "prompt")
                ids = engine.tokenize(prompt, add_special_tokens=opt_bool(body, "add_special_tokens", True))
        except ApiError:
            raise
        except Exception as e:
            raise to_api_error(e, "messages" if "messages" in body else "prompt") from e
        out = {"model": slot.name, "tokens": list(ids), "count": len(ids),
               "max_model_len": getattr(engine, "n_ctx", None)}
        if strs:
            out["token_strs"] = [bytes(engine.tokenizer.token_bytes(t)).decode("utf-8", errors="replace")
                                 for t in ids]
        return _json(out)

    @app.post("/detokenize")
    def detokenize():
        body = _body()
        _only(body, ("model", "tokens"))
        slot = registry.get(opt_str(body, "model"))
        ids = body.get("tokens")
        if ids == []:
            return _json({"model": slot.name, "prompt": ""})
        ids = token_id_list(ids, "tokens")
        try:
            text = slot.engine.detokenize(ids)
        except Exception as e:
            raise to_api_error(e, "tokens") from e
        return _json({"model": slot.name, "prompt": text})

    # ------------------------------------------------------------ operations

    @app.get("/health")
    def health():
        slots = registry.slots()
        models = {s.name: ("ok" if s.healthy() else "unhealthy") for s in slots}
        for name in registry.loading():
            models.setdefault(name, "loading")
        if not slots:
            if registry.load_error:
                return _json({"status": "error", "error": registry.load_error, "models": models}, 503)
            status = "loading" if models else "no_model"
            return _json({"status": status, "models": models}, 503, {"Retry-After": str(RETRY_LOADING)})
        if any(v == "unhealthy" for v in models.values()):
            return _json({"status": "unhealthy", "models": models}, 503, {"Retry-After": str(RETRY_DEVICE)})
        return _json({"status": "ok", "models": models})

    @app.get("/metrics")
    def metrics():
        data, ctype = state.metrics.render()
        return Response(data, status=200, headers={"Content-Type": ctype})

    return app


def _only(body: dict, allowed) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0],
                          "unknown_parameter")


# ---------------------------------------------------------------------------
# command line

def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Add the server's options to the `serve` subcommand (model and sampling options come from the CLI)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default=defaults.DEFAULT_HOST,
                   help=f"address to listen on (default {defaults.DEFAULT_HOST})")
    g.add_argument("--port", type=int, default=defaults.DEFAULT_PORT,
                   help=f"port to listen on; 0 picks a free one (default {defaults.DEFAULT_PORT})")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV}, else no key)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model name clients send (default: the model file's name without .gguf)")
    g.add_argument("--max-queue", type=int, default=defaults.DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests that may wait per model behind the running one; more get 503 "
                        f"(default {defaults.DEFAULT_MAX_QUEUE})")
    g.add_argument("--model-root", action="append", default=None, metavar="DIR",
                   help="let /v1/models/load open models only inside DIR (repeatable; symlinks and '..' "
                        "are resolved first). Default: any path the server can read")
    g.add_argument("--no-model-load", action="store_true",
                   help="turn /v1/models/load off (the model given at start-up is served as usual)")
    g.add_argument("--debug", action="store_true", help="run Flask's development server instead of waitress")


def _sampling_defaults(args) -> dict:
    keys = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _startup_load(registry: ModelRegistry, path, name: str, progress: bool, on_fail: Callable[[], None]) -> None:
    t0 = time.perf_counter()
    try:
        slot, _ = registry.load(path, name=name, default=True, progress=progress)
    except BaseException as e:
        registry.load_error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
        log.error("%s: error: could not load the model: %s", PROG, registry.load_error)
        on_fail()
        return
    log.info("%s: model '%s' ready on %s (%.1f s)", PROG, slot.name,
             getattr(slot.engine, "device", "?"), time.perf_counter() - t0)


def _loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _model_roots(args) -> Optional[List[Path]]:
    """--no-model-load / --model-root as create_app's model_roots (None: any path)."""
    if getattr(args, "no_model_load", False):
        return []
    roots = getattr(args, "model_root", None)
    if roots is None:
        return None
    out = []
    for r in roots:
        p = Path(r).expanduser()
        if not p.is_dir():
            raise ValueError(f"--model-root must be a directory, got {r!r}")
        out.append(p)
    return out


def run_from_args(args) -> int:
    """Run `helexa-native serve` until interrupted; returns the exit status."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)

    if getattr(args, "model", None) is None:
        from .engine import default_model_path
        path = default_model_path()
    else:
        path = Path(args.model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model not found: {path}")
    name = args.served_model_name or model_name_for(path)
    progress = args.progress if getattr(args, "progress", None) is not None else sys.stderr.isatty()

    registry = ModelRegistry(_default_loader, max_queue=args.max_queue, device=args.device,
                             n_ctx=getattr(args, "n_ctx", None))
    registry.mark_loading(name)
    roots = _model_roots(args)
    app = create_app(registry, api_key=api_key, served_model_name=name, max_queue=args.max_queue,
                     default_sampling=_sampling_defaults(args), model_roots=roots)
    if api_key is None and roots is None and not _loopback(args.host):
        log.warning("%s: warning: listening on %s without --api-key: anyone who can reach it may load any "
                    "file this process can read through /v1/models/load (limit it with --model-root DIR "
                    "or --no-model-load)", PROG, args.host)
    state: _AppState = app.extensions["helexa_native"]
    failed = threading.Event()

    def stop_main():
        state.stopping.set()
        import _thread
        _thread.interrupt_main()

    def fail():
        failed.set()
        stop_main()

    loader = threading.Thread(target=_startup_load, args=(registry, path, name, progress, fail),
                              name="model-loader", daemon=True)

    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            state.stopping.set()
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)

    try:
        if args.debug:
            loader.start()
            app.run(host=args.host, port=args.port, debug=True, use_reloader=False, threaded=True)
        else:
            import waitress
            server = waitress.create_server(
                app, host=args.host, port=args.port, threads=max(4, args.max_queue + 4),
                # Keep reading each connection while its request runs, so a
                # client that hangs up is noticed at once (client_disconnected).
                channel_request_lookahead=1, ident=PROG)
            for host, port in _listening(server, args):
                log.info("%s: listening on http://%s:%d (model '%s' loading)", PROG, host, port, name)
            loader.start()
            try:
                server.run()
            finally:
                state.stopping.set()
                server.close()
    except KeyboardInterrupt:
        pass
    finally:
        state.stopping.set()
        registry.close(timeout=SHUTDOWN_WAIT_SECONDS)
    return 1 if failed.is_set() else 0


def _listening(server, args) -> List[Tuple[str, int]]:
    port = getattr(server, "effective_port", None)
    if port is not None:
        host = getattr(server, "effective_host", args.host)
        return [(host, int(port))]
    out = []
    for s in getattr(server, "effective_listen", None) or []:
        out.append((s[0], int(s[1])))
    return out or [(args.host, args.port)]
