"""The models a server serves: one ModelSlot (Engine + FIFO queue) per name, held by a ModelRegistry.

An Engine batches the requests it is given (continuous batching), so a slot
lets up to the engine's max_num_seqs requests run at once; more wait in the
slot's FIFO queue, and one beyond `max_queue` waiting gets 503 with
Retry-After. Loading a model under a name already served replaces it: the
old slot is retired (waiters follow the name to the new model, the running
requests finish) and then its Engine is closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import defaults
from ..openai_protocol import ApiError, model_card
from .errors import RETRY_LOADING, RETRY_QUEUE_FULL

log = logging.getLogger(__name__)

# How often a queued request checks whether its client is still there.
QUEUE_POLL_SECONDS = 0.2


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


def load_engine(path, device="auto", n_ctx=None, progress=False, **engine_options):
    """The registry's default loader: an Engine for `path` (engine_options: max_num_seqs, kv_cache_memory, ...)."""
    from ..engine import Engine

    return Engine(path, device=device, n_ctx=n_ctx, progress=progress, **engine_options)


class SlotRetired(Exception):
    """The slot was replaced or unloaded while a request waited for it."""


class ModelSlot:
    """One served model: its Engine, the requests running on it and the FIFO queue behind them."""

    def __init__(self, name: str, engine, max_queue: int) -> None:
        self.name = name
        self.engine = engine
        self.max_queue = int(max_queue)
        # Requests the engine runs together; an engine without a scheduler runs one.
        self.capacity = max(1, int(getattr(engine, "max_num_seqs", 1) or 1))
        self.created = int(time.time())
        self._cv = threading.Condition()
        self._waiting: deque = deque()
        self._running: set = set()
        self.retired = False

    def admit(self) -> object:
        """A ticket in the queue, or 503 when max_queue requests already wait."""
        with self._cv:
            if self.retired:
                raise SlotRetired()
            # `capacity` requests run and max_queue wait behind them. A ticket
            # admitted while a run place is free is next to run even before it
            # calls wait_turn, so it does not take one of the waiting places.
            if len(self._running) + len(self._waiting) >= self.capacity + self.max_queue:
                raise ApiError(
                    503,
                    f"the queue for model '{self.name}' is full ({self.max_queue} requests waiting); retry shortly",
                    "server_error",
                    None,
                    "queue_full",
                    {"Retry-After": str(RETRY_QUEUE_FULL)},
                )
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
                if len(self._running) < self.capacity and self._waiting and self._waiting[0] is ticket:
                    self._waiting.popleft()
                    self._running.add(ticket)
                    self._cv.notify_all()  # the next waiter may run too
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
            if ticket in self._running:
                self._running.discard(ticket)
            else:
                try:
                    self._waiting.remove(ticket)
                except ValueError:
                    pass
            self._cv.notify_all()

    def counts(self) -> Tuple[int, int]:
        """(waiting, running)."""
        with self._cv:
            return len(self._waiting), len(self._running)

    def healthy(self) -> bool:
        return engine_healthy(self.engine)

    def retire(self, timeout: Optional[float] = None) -> bool:
        """Take no new requests, send waiters elsewhere, let the running ones finish, then free the model.

        Returns False (model left open) when a running request outlasts `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self.retired = True
            self._cv.notify_all()
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        self.engine.close()
        return True

    def card(self) -> dict:
        root = getattr(self.engine, "model_path", None)
        return model_card(
            self.name, self.created, getattr(self.engine, "n_ctx", None), str(root) if root is not None else None
        )


class ModelRegistry:
    """The models a server serves, by name; loads and unloads them."""

    def __init__(
        self,
        loader: Optional[Callable[..., Any]] = load_engine,
        max_queue: int = defaults.DEFAULT_MAX_QUEUE,
        device: str = "auto",
        n_ctx: Optional[int] = None,
        engine_options: Optional[dict] = None,
    ) -> None:
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        self.loader = loader
        self.max_queue = max_queue
        self.device = device
        self.n_ctx = n_ctx
        self.engine_options = dict(engine_options or {})
        self.default_name: Optional[str] = None
        self.load_error: Optional[str] = None
        self._lock = threading.Lock()
        self._admin = threading.Lock()  # one load or unload at a time
        self._slots: Dict[str, ModelSlot] = {}
        self._loading: Dict[str, float] = {}
        self._closed = False

    def add(self, name: str, engine, default: bool = False) -> Optional[ModelSlot]:
        """Serve `engine` as `name`; returns the slot it replaced (the caller retires it).

        A closed registry serves nothing new: 503 shutting_down.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a model name must be a non-empty string")
        slot = ModelSlot(name, engine, self.max_queue)
        with self._lock:
            if self._closed:
                raise _shutting_down()
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
                raise ApiError(
                    503,
                    f"model '{key or next(iter(self._loading))}' is still loading",
                    "server_error",
                    None,
                    "model_loading",
                    {"Retry-After": str(RETRY_LOADING)},
                )
            if name is None:
                raise ApiError(
                    503,
                    "no model is loaded",
                    "server_error",
                    "model",
                    "model_not_loaded",
                    {"Retry-After": str(RETRY_LOADING)},
                )
            have = ", ".join(self._slots) or "none"
            raise ApiError(
                404,
                f"the model '{name}' does not exist (available: {have})",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def slots(self) -> List[ModelSlot]:
        with self._lock:
            return list(self._slots.values())

    def loading(self) -> List[str]:
        with self._lock:
            return list(self._loading)

    def load(
        self,
        path,
        name: Optional[str] = None,
        device: Optional[str] = None,
        n_ctx: Optional[int] = None,
        default: bool = False,
        **loader_kwargs,
    ) -> Tuple[ModelSlot, bool]:
        """Load `path` and serve it as `name`, replacing a model of that name; returns (slot, replaced).

        The old model keeps serving until the new one is ready; then its
        running request finishes and its memory is freed (Engine.close).
        """
        if self.loader is None:
            raise ApiError(400, "this server cannot load models", "invalid_request_error", None, "unsupported")
        name = name or model_name_for(path)
        with self._admin:
            with self._lock:
                if self._closed:
                    raise _shutting_down()
                self._loading[name] = time.time()
            try:
                kwargs = dict(self.engine_options)
                kwargs.update(loader_kwargs)
                engine = self.loader(
                    path, device=device or self.device, n_ctx=n_ctx if n_ctx is not None else self.n_ctx, **kwargs
                )
            finally:
                with self._lock:
                    self._loading.pop(name, None)
            try:
                old = self.add(name, engine, default=default)
            except ApiError:
                # The registry closed while this model loaded: nothing will
                # ever serve it, so free it now rather than leak it.
                engine.close()
                raise
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
                raise ApiError(
                    404, f"the model '{name}' does not exist", "invalid_request_error", "model", "model_not_found"
                )
            slot.retire()

    def close(self, timeout: Optional[float] = None) -> bool:
        """Free every model and refuse new loads.

        Waits at most `timeout` seconds for a load in progress and for each
        model's running request. Returns True when nothing is left running:
        no load (a model that finishes loading later is freed by its load),
        no request, every model closed. False tells a process about to exit
        that some thread may still be inside the engine.
        """
        with self._lock:
            self._closed = True
        acquired = self._admin.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        idle = acquired
        try:
            with self._lock:
                slots = list(self._slots.values())
                self._slots.clear()
            for s in slots:
                try:
                    if not s.retire(timeout):
                        idle = False
                        log.warning("model %s still busy at shutdown; left to the process exit", s.name)
                except Exception:
                    log.exception("closing model %s failed", s.name)
        finally:
            if acquired:
                self._admin.release()
        return idle


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        "the server is shutting down",
        "server_error",
        None,
        "shutting_down",
        {"Retry-After": str(RETRY_LOADING)},
    )
