"""One generation request: its place in the model's queue, the engine stream, its metrics.

Generation runs in the request's own worker thread. A client that goes away
stops its generation within a token: the engine's cancel check reads the
disconnect probe (waitress's flag), and closing the run closes the engine
stream.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

from ..engine import GenerationResult, collect_choices
from ..openai_protocol import ApiError, GenerationRequest
from .errors import RETRY_DEVICE, to_api_error
from .slots import ModelSlot, SlotRetired
from .state import AppState


class ClientGone(Exception):
    """The client disconnected before its request got its turn."""


class RequestRun:
    """A generation request bound to a model slot: queueing, the engine stream, metrics.

    Built when the request arrives: the prompt is tokenized and the sampling
    checked at once, so a bad request fails before it queues. `events()`
    waits for the request's turn and yields the engine's chunks; `close()`
    ends it, whatever happened.
    """

    def __init__(
        self, state: AppState, req: GenerationRequest, endpoint: str, disconnected: Callable[[], bool]
    ) -> None:
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
        """The request field an input error points at."""
        if self.endpoint == "responses":
            return "input"
        return "messages" if self.req.kind == "chat" else "prompt"

    @property
    def model(self) -> str:
        return self.slot.name

    @property
    def engine(self):
        return self.slot.engine

    def _cancelled(self) -> bool:
        return self.state.stopping.is_set() or self.disconnected()

    def _bind(self, slot: ModelSlot) -> None:
        if not slot.healthy():
            raise ApiError(
                503,
                f"the device of model '{slot.name}' is unusable after an earlier error",
                "server_error",
                None,
                "device_unavailable",
                {"Retry-After": str(RETRY_DEVICE)},
            )
        try:
            ticket = slot.admit()
        except SlotRetired:
            return self._bind(self.state.registry.get(slot.name))
        try:
            ids, stream = self._prepare(slot.engine)
        except BaseException as e:
            slot.release(ticket)
            raise to_api_error(e, self.param) from e
        self.slot, self.ticket, self.prompt_ids, self.stream = slot, ticket, ids, stream

    def _prepare(self, engine):
        req = self.req
        sampling = dict(self.state.default_sampling)
        sampling.update(req.sampling)
        sampling.update(req.engine_options())
        if req.kind == "chat":
            stream = engine.chat_stream(
                req.messages,
                tools=req.tools,
                cancel=self._cancelled,
                chat_template_kwargs=dict(req.chat_template_kwargs),
                **sampling,
            )
            return list(stream.prompt_ids), stream
        ids = engine.tokenize(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
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

    def collect(self) -> List[GenerationResult]:
        """Wait for the turn, generate to the end and close the run; one result per choice (n)."""
        try:
            results = collect_choices(self.events(), [], self.req.n)
        finally:
            self.close()
        # The prompt is known only once the turn came: a model replaced while
        # the request waited tokenized it afresh.
        for r in results:
            r.prompt_token_ids = list(self.prompt_ids)
        return results

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
