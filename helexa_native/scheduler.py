"""Continuous batching: one thread per Engine runs every request's steps together.

Why here: the scheduler is the single owner of the backend and of the KV
block manager, so the Engine's callers (threads, streams, the HTTP server)
never touch either. It lives in Python beside the Engine because a step's
bookkeeping (admission, block tables, stop checks) costs microseconds next
to the device step, and the same loop then drives the CPU reference and the
CUDA backend alike.

Each iteration:
  1. finish cancelled sequences and admit waiting ones, first come first
     served, while a slot is free (max_num_seqs) and the pool has the blocks
     for the request's whole uncached prompt;
  2. build one step under a token budget (max_batch_tokens): one token for
     every running sequence that is decoding, then prompt chunks (chunked
     prefill) for sequences still reading their prompt, oldest first, so a
     long new prompt never stalls running streams for more than a chunk;
  3. take the blocks the step writes; when the pool runs out, preempt the
     most recently admitted sequence (its blocks go back, it waits at the
     head of the queue and later recomputes its prompt and its tokens so
     far, mostly from the prefix cache) instead of failing a request;
  4. run `backend.step_batch`, then hand each sampled token to its
     request's queue, finishing sequences on a stop token, max_tokens, or
     a structured-output grammar that is complete. An iteration's events
     go out together at its end: a few put at once, more handed in one
     batch to a delivery thread, which wakes the callers while this loop
     plans and runs the next step (in order: a batch in flight is never
     overtaken).
A request with a grammar (constraints.GrammarMatcher) has its mask filled
for each of its sampling steps and handed to the backend in its SeqStep,
with its logit_bias; the sampled token then advances the matcher. Where the
backend takes late masks (the CUDA backend), a helper thread fills them
while the step's forward runs on the device, so the grammar's host time is
off the step's critical path; otherwise they are filled before the step.
With decode_steps > 1, an iteration whose running sequences only decode,
need nothing from the host between tokens (no grammar) and nothing the
backend's call cannot run (backend.decode_steps_ok), and where no waiting
request could take a free slot, runs several steps in one
backend.decode_steps call instead of steps 2-4 (_steps_ahead, _run_ahead).
The n sequences of one prompt (n > 1) share its KV blocks through the prefix
cache: the followers wait for admission until the first has read the prompt.
Stop strings, detokenization and streaming happen in the caller's thread
(engine.py), which cancels its sequence once a stop string matched.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import os
import queue
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Deque, List, Optional, Tuple

import torch

from . import defaults
from .backends.base import LateMask, SeqStep
from .constraints import fill_masks
from .errors import EngineClosedError
from .kv_blocks import OutOfBlocks, SeqBlocks
from .params import SamplerState, SamplingParams

# Tokens one step runs at most, decode tokens and prompt chunks together
# (a backend may prefer another: Backend.default_max_batch_tokens).
DEFAULT_MAX_BATCH_TOKENS = defaults.DEFAULT_MAX_BATCH_TOKENS


# A call of several decode steps lasts about this long at most (by the last
# measured step of as many sequences): tokens reach a stream, and a new
# request its first token, at most this much later than one step a call.
# HELEXA_DECODE_CALL_MS sets it, in milliseconds, for schedulers made after.
DEFAULT_DECODE_CALL_SECONDS = 0.1

# An iteration with at most this many events delivers them itself; more go to
# the delivery thread (one hand-off instead of a wake-up per caller).
# HELEXA_INLINE_EVENTS overrides it for a scheduler made after it is set (a
# large value: every event from the loop itself, as an A/B baseline).
INLINE_EVENTS = 4


def _env_int(name: str, default: int) -> int:
    """The integer environment variable `name`, or `default` where it is unset or empty."""
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def check_decode_steps(value: Optional[int], default: int = 1) -> int:
    """Decode steps one backend call may run: `value`, or HELEXA_DECODE_STEPS, or `default` (the backend's)."""
    if value is None:
        value = _env_int("HELEXA_DECODE_STEPS", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= defaults.MAX_DECODE_STEPS:
        raise ValueError(f"decode_steps must be an integer in [1, {defaults.MAX_DECODE_STEPS}], got {value!r}")
    return value


def check_max_batch_tokens(value: Optional[int], default: int = DEFAULT_MAX_BATCH_TOKENS) -> int:
    """Tokens one step runs at most: `value`, or HELEXA_MAX_BATCH_TOKENS, or `default` (the backend's)."""
    if value is None:
        value = _env_int("HELEXA_MAX_BATCH_TOKENS", default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_batch_tokens must be a positive integer, got {value!r}")
    return value


def _inline_events() -> int:
    try:
        return max(0, int(os.environ.get("HELEXA_INLINE_EVENTS", INLINE_EVENTS)))
    except ValueError:
        return INLINE_EVENTS


@dataclass(eq=False)
class Request:
    """One sequence as the scheduler sees it; the caller reads `events`."""

    prompt: List[int]
    params: SamplingParams
    limit: int  # tokens to generate at most
    stop_ids: frozenset = frozenset()
    state: SamplerState = None
    events: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    # A structured-output matcher (constraints.GrammarMatcher); with
    # constraint_after set it applies only once that token was sampled
    # (the end of a reasoning block).
    constraint: Any = None
    constraint_after: Optional[int] = None
    logit_bias: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    # Another sequence of the same prompt: this one is admitted once that one
    # has read the prompt, so its KV blocks come from the prefix cache.
    leader: Optional["Request"] = None
    # Scheduler-owned:
    tokens: List[int] = field(default_factory=list)  # prompt + generated tokens
    computed: int = 0  # leading positions whose KV is written
    blocks: Optional[SeqBlocks] = None
    slot: int = -1
    cached_tokens: int = 0  # prompt positions the prefix cache served
    preemptions: int = 0
    generated: int = 0
    finished: bool = False
    cancelled: bool = False
    t_submit: float = 0.0
    t_admit: Optional[float] = None
    t_first: Optional[float] = None
    t_last: Optional[float] = None
    constraint_on: bool = False

    def cancel(self) -> None:
        """Ask the scheduler to stop this sequence before its next step."""
        self.cancelled = True


# Events on Request.events: ("token", SampleResult), then exactly one of
# ("done", finish_reason, stop_reason) or ("error", exception).


def _fill_late(matchers: list, late) -> None:
    """The filler thread's job: the matchers' masks into the first rows of a late table, then ready or fail."""
    try:
        fill_masks(matchers, torch.from_numpy(late.table)[: len(matchers)])
    except BaseException as e:
        late.fail(f"{type(e).__name__}: {e}")
        raise
    late.ready()


class Scheduler:
    """The batching loop over one backend, on its own thread."""

    def __init__(
        self,
        backend,
        max_num_seqs: Optional[int] = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        name: str = "helexa-scheduler",
        decode_steps: Optional[int] = None,
        decode_call_seconds: Optional[float] = None,
    ):
        self.backend = backend
        self.blocks = backend.blocks
        self.max_num_seqs = int(max_num_seqs or backend.max_num_seqs)
        if self.max_num_seqs > backend.max_num_seqs:
            raise ValueError(
                f"max_num_seqs {self.max_num_seqs} exceeds the backend's {backend.max_num_seqs} sequence slots"
            )
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        self.max_batch_tokens = int(max_batch_tokens)
        self.decode_steps = check_decode_steps(decode_steps, backend.default_decode_steps)
        if decode_call_seconds is None:
            decode_call_seconds = _env_int("HELEXA_DECODE_CALL_MS", round(DEFAULT_DECODE_CALL_SECONDS * 1000)) / 1000
        if decode_call_seconds <= 0:
            raise ValueError(f"decode_call_seconds must be positive, got {decode_call_seconds}")
        self.decode_call_seconds = float(decode_call_seconds)
        # Sequences -> seconds of their last measured decode step (a call of n steps counts 1/n).
        self._step_seconds: dict = {}
        self._cv = threading.Condition()
        self._incoming: List[Request] = []
        self._waiting: Deque[Request] = collections.deque()
        self._running: List[Request] = []
        self._free_slots = list(range(self.max_num_seqs - 1, -1, -1))
        self._stopping = False
        self._abandon = False  # stopping at interpreter exit: leave requests unanswered
        self._closed_error: Optional[BaseException] = None
        # Counters for metrics.
        self.steps = 0
        self.preemptions = 0
        self.batch_hist = collections.Counter()  # sequences per step -> steps
        self.tokens_generated = 0
        self.multi_step_calls = 0  # backend.decode_steps calls (each counts its steps in `steps`)
        self._mask_filler: Optional[concurrent.futures.ThreadPoolExecutor] = None  # late masks (on first use)
        # Events of the current iteration, then handed to the delivery thread in
        # one batch: waking each caller's thread costs microseconds a put, which
        # the delivery thread pays while this loop plans and runs the next step.
        self._pending: List[Tuple["queue.SimpleQueue", tuple]] = []
        self._outbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._handed = self._delivered = 0  # batches; each counter has one writer
        self._inline = _inline_events()
        self._deliverer = threading.Thread(target=self._deliver, name=name + "-events", daemon=True)
        self._deliverer.start()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _close_at_exit(self)

    # ------------------------------------------------------------------ caller side

    def submit(self, req: Request) -> Request:
        """Queue a request; its events arrive on req.events."""
        req.t_submit = time.perf_counter()
        req.tokens = list(req.prompt)
        req.constraint_on = req.constraint is not None and req.constraint_after is None
        if req.state is None:
            req.state = SamplerState(prompt_tokens=list(req.prompt))
        with self._cv:
            if self._stopping:
                raise EngineClosedError("the engine was closed")
            self._incoming.append(req)
            self._cv.notify()
        return req

    def wake(self) -> None:
        """Let the loop notice a cancellation now rather than after its current step."""
        with self._cv:
            self._cv.notify()

    def counts(self) -> dict:
        """Running and waiting sequences (a snapshot; exact only between steps)."""
        with self._cv:
            waiting = len(self._waiting) + len(self._incoming)
        return {"running": len(self._running), "waiting": waiting}

    def stats(self) -> dict:
        """Counters for metrics."""
        out = self.counts()
        out.update(
            steps=self.steps,
            preemptions=self.preemptions,
            tokens_generated=self.tokens_generated,
            multi_step_calls=self.multi_step_calls,
            batch_size_histogram=dict(sorted(self.batch_hist.items())),
        )
        return out

    def close(self, error: Optional[BaseException] = None) -> None:
        """Stop the loop; every unfinished request ends with `error` (EngineClosedError)."""
        self._stop(error or EngineClosedError("the engine was closed"), None)

    def stop_at_exit(self, timeout: Optional[float] = None) -> bool:
        """Let the current step finish and end the loop, answering no request.

        For interpreter exit: the callers' threads are about to stop with the
        process, and an EngineClosedError raised in each would only print
        tracebacks during the shutdown. Waits at most `timeout` seconds for
        the step (a hung device must not hang the exit); False when the loop
        is still inside it.
        """
        return self._stop(None, timeout)

    def _stop(self, error: Optional[BaseException], timeout: Optional[float]) -> bool:
        # error None: abandon the requests (interpreter exit).
        with self._cv:
            self._stopping = True
            if error is None:
                self._abandon = True
            else:
                self._closed_error = error
            self._cv.notify()
        _LIVE.discard(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._deliverer.join(timeout)  # every event of the loop is on its queue
        if self._mask_filler is not None:
            self._mask_filler.shutdown(wait=False)
        return True

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._incoming and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopping:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            try:
                with self.backend.lock:
                    self._iteration()
            except BaseException as e:  # a bug here must not hang every caller
                for r in list(self._running) + list(self._waiting):
                    self._fail(r, e)
                self._running.clear()
                self._waiting.clear()
            self._flush()
        if self._abandon:
            self._outbox.put(None)
            return
        err = self._closed_error
        with self._cv:
            pending = list(self._running) + list(self._waiting) + self._incoming
            self._running, self._incoming = [], []
            self._waiting.clear()
        with self.backend.lock:
            for r in pending:
                self._fail(r, err)
        self._flush()
        self._outbox.put(None)

    def _flush(self) -> None:
        """Deliver the iteration's events, in order: a few at once, more through the delivery thread."""
        if not self._pending:
            return
        if len(self._pending) <= self._inline and self._delivered == self._handed:
            # Nothing of an earlier batch is still in flight, so nothing is overtaken;
            # a small batch is cheaper without the extra thread hop.
            for q, event in self._pending:
                q.put(event)
        else:
            self._handed += 1
            self._outbox.put(self._pending)
        self._pending = []

    def _deliver(self) -> None:
        while True:
            batch = self._outbox.get()
            if batch is None:
                return
            for q, event in batch:
                q.put(event)
            self._delivered += 1

    def _iteration(self) -> None:
        for r in [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled", None)
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled", None)
        self._admit()
        if not self._running:
            return
        ahead = self._steps_ahead()
        if ahead > 1 and self._run_ahead(ahead):
            return
        plan = self._plan()
        if not plan:
            # Every running sequence is short of blocks that nothing will free.
            for r in list(self._running):
                self._fail(r, OutOfBlocks(f"the KV pool ({self.blocks.num_blocks} blocks) is exhausted"))
            return
        steps = []
        masks, filling = self._masks(plan)
        for r, n in plan:
            sample = r.computed + n == len(r.tokens)
            steps.append(
                SeqStep(
                    slot=r.slot,
                    tokens=r.tokens[r.computed : r.computed + n],
                    start_pos=r.computed,
                    block_table=list(r.blocks.table),
                    sample=sample,
                    params=r.params,
                    state=r.state,
                    allowed=masks.get(id(r)) if sample else None,
                    logit_bias=r.logit_bias,
                )
            )
        t0 = time.perf_counter()
        try:
            outs = self.backend.step_batch(steps)
        except BaseException as e:
            if filling is not None:
                # The matchers must be idle before anything moves them; a fill
                # that raised is the step's cause.
                concurrent.futures.wait([filling])
                e = filling.exception() or e
            # A failed step leaves the written blocks unknown: its sequences end
            # with the error; full blocks cached before the step stay valid.
            for r, _ in plan:
                self._fail(r, e)
            return
        if filling is not None:
            filling.result()  # done: the step waited for it before sampling
        now = time.perf_counter()
        if self.decode_steps > 1 and all(n == 1 and step.sample for (_, n), step in zip(plan, steps)):
            self._step_seconds[len(plan)] = now - t0  # a pure decode step: what _steps_ahead budgets by
        self.steps += 1
        self.batch_hist[len(plan)] += 1
        for (r, n), step, out in zip(plan, steps, outs):
            r.computed += n
            self.blocks.commit(r.blocks, r.tokens, r.computed)
            if step.sample:
                self._take(r, out.result, now)

    def _take(self, r: Request, res, now: float) -> bool:
        """Hand r's sampled token to its caller and finish r where it ends; True when r is finished."""
        tok = int(res.token)
        r.tokens.append(tok)
        r.state.generated_tokens.append(tok)
        r.state.step += 1
        r.generated += 1
        self.tokens_generated += 1
        if r.t_first is None:
            r.t_first = now
        r.t_last = now
        if r.constraint is not None and not self._advance(r, tok):
            return True
        self._pending.append((r.events, ("token", res)))
        if tok in r.stop_ids:
            self._finish(r, "stop", tok)
        elif r.constraint_on and r.constraint.is_finished():
            self._finish(r, "stop", None)
        elif r.generated >= r.limit:
            self._finish(r, "length", None)
        return r.finished

    def _steps_ahead(self) -> int:
        """Decode steps every running sequence can take in one backend call (1: plan a normal step).

        More than one only when each running sequence decodes (no prompt left
        to read), needs nothing from the host between tokens (no grammar)
        and nothing its backend's call cannot run (decode_steps_ok)
        and has that many tokens left to generate, no cancellation is
        pending, and no waiting request could be admitted now. A call lasts
        about decode_call_seconds at most, by the last measured decode step
        of this many sequences: a slow step (a large model, a large batch)
        takes fewer per call, so its streams' tokens and newcomers' first
        tokens are not held back longer.
        """
        n = self.decode_steps
        if n <= 1 or ((self._waiting or self._incoming) and self._free_slots):
            return 1
        step = self._step_seconds.get(len(self._running))
        if step:
            n = min(n, max(1, int(self.decode_call_seconds / step)))
        for r in self._running:
            if (
                r.cancelled
                or len(r.tokens) - r.computed != 1
                or r.constraint is not None
                or not self.backend.decode_steps_ok(r.params, r.logit_bias)
            ):
                return 1
            n = min(n, r.limit - r.generated)
        return n

    def _run_ahead(self, n: int) -> bool:
        """n decode steps of every running sequence in one backend call; False (nothing taken) when the pool is short.

        Tokens after a sequence's stop are dropped with the blocks they were
        written to when the sequence finishes.
        """
        running = list(self._running)
        need = sum(max(0, self.blocks.blocks_for(r.computed + n) - len(r.blocks.table)) for r in running)
        if need > self.blocks.free_blocks:
            return False
        for r in running:
            self.blocks.ensure(r.blocks, r.computed + n)
        steps = [
            SeqStep(
                slot=r.slot,
                tokens=[r.tokens[-1]],
                start_pos=r.computed,
                block_table=list(r.blocks.table),
                params=r.params,
                state=r.state,
                logit_bias=r.logit_bias,
            )
            for r in running
        ]
        t0 = time.perf_counter()
        try:
            outs = self.backend.decode_steps(steps, n)
        except BaseException as e:
            for r in running:
                self._fail(r, e)
            return True
        now = time.perf_counter()
        self._step_seconds[len(running)] = (now - t0) / n
        self.steps += n
        self.batch_hist[len(running)] += n
        self.multi_step_calls += 1
        for r, results in zip(running, outs):
            for res in results:
                r.computed += 1
                self.blocks.commit(r.blocks, r.tokens, r.computed)
                if self._take(r, res, now):
                    break
        return True

    def _masks(self, plan: list) -> tuple:
        """Allowed-token bitmasks of the step's constrained samples, by id(request), and the fill still running.

        The masks are computed together: here, or on the filler thread into the
        backend's late table while the step runs (the second value is then the
        fill's future, else None).
        """
        need = [r for r, n in plan if r.constraint_on and r.computed + n == len(r.tokens)]
        if not need:
            return {}, None
        matchers = [r.constraint for r in need]
        # Every matcher of one scheduler serves one model's vocabulary.
        words = matchers[0].mask_words
        late = self.backend.late_masks(words)
        if late is None:
            table = torch.empty(len(need), words, dtype=torch.int32)
            fill_masks(matchers, table)
            return {id(r): table[i] for i, r in enumerate(need)}, None
        if self._mask_filler is None:
            self._mask_filler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="helexa-masks")
        filling = self._mask_filler.submit(_fill_late, matchers, late)
        return {id(r): LateMask(late, i) for i, r in enumerate(need)}, filling

    def _advance(self, r: Request, tok: int) -> bool:
        """Move the request's grammar past `tok`; False (request failed) if the grammar refused it."""
        if not r.constraint_on:
            if tok == r.constraint_after:
                r.constraint_on = True
            return True
        if r.constraint.accept(tok) or tok in r.stop_ids:
            return True
        self._fail(
            r,
            RuntimeError(
                f"token {tok} breaks the request's output grammar "
                f"({r.constraint.error}); the backend ignored the token mask"
            ),
        )
        return False

    def _deferred(self, r: Request) -> bool:
        """True while r's leader is still reading the prompt they share (see Request.leader)."""
        lead = r.leader
        return (
            lead is not None
            and self.blocks.prefix_cache
            and not lead.finished
            and r.blocks is None
            and lead.computed < len(lead.prompt)
        )

    def _admit(self) -> None:
        i = 0
        while i < len(self._waiting) and self._free_slots:
            r = self._waiting[i]
            if self._deferred(r):
                i += 1
                continue
            if r.blocks is None:
                r.blocks, r.computed = self.blocks.open(r.tokens)
                if r.t_admit is None:
                    r.cached_tokens = r.computed
            # The whole uncached prompt (and the first generated token) must fit now.
            need = self.blocks.blocks_for(len(r.tokens) + 1) - len(r.blocks.table)
            if need > self.blocks.free_blocks:
                # Not admitted: give its shared prefix back (it stays cached,
                # idle) so no waiting request pins blocks the running ones need.
                self.blocks.release(r.blocks)
                r.blocks, r.computed = None, 0
                if not self._running:
                    # Nothing will ever free blocks for it: the pool is too small.
                    del self._waiting[i]
                    self._fail(
                        r,
                        OutOfBlocks(
                            f"the KV pool ({self.blocks.num_blocks} blocks of {self.blocks.block_size}) "
                            f"cannot hold a sequence of {len(r.tokens) + 1} positions"
                        ),
                    )
                    continue
                break
            del self._waiting[i]
            r.slot = self._free_slots.pop()
            if r.t_admit is None:
                r.t_admit = time.perf_counter()
            self._running.append(r)

    def _plan(self) -> list:
        """(request, tokens to run) pairs for this step, with their blocks taken."""
        budget = self.max_batch_tokens
        plan = []
        decoding = [r for r in self._running if len(r.tokens) - r.computed == 1]
        reading = [r for r in self._running if len(r.tokens) - r.computed > 1]
        for r in decoding + reading:
            if budget <= 0:
                break
            if r.blocks is None:  # preempted while planning (a running request holds blocks)
                continue
            n = min(len(r.tokens) - r.computed, budget)
            if not self._reserve(r, r.computed + n, plan):
                continue
            plan.append((r, n))
            budget -= n
        return plan

    def _reserve(self, r: Request, positions: int, plan: list) -> bool:
        while True:
            try:
                self.blocks.ensure(r.blocks, positions)
                return True
            except OutOfBlocks:
                planned = {id(p) for p, _ in plan}
                victims = [v for v in self._running if v is not r and id(v) not in planned]
                if not victims:
                    if r is self._running[-1] and len(self._running) > 1:
                        self._preempt(r)
                    return False
                self._preempt(victims[-1])

    def _preempt(self, r: Request) -> None:
        self._running.remove(r)
        self.blocks.release(r.blocks)
        r.blocks = None
        r.computed = 0
        self._free_slots.append(r.slot)
        r.slot = -1
        r.preemptions += 1
        self.preemptions += 1
        self._waiting.appendleft(r)

    def _release(self, r: Request) -> None:
        if r in self._running:
            self._running.remove(r)
        if r.blocks is not None:
            self.blocks.release(r.blocks)
            r.blocks = None
        if r.slot >= 0:
            self._free_slots.append(r.slot)
            r.slot = -1

    def _finish(self, r: Request, reason: str, stop_reason) -> None:
        if r.finished:
            return
        r.finished = True
        self._release(r)
        self._pending.append((r.events, ("done", reason, stop_reason)))

    def _fail(self, r: Request, exc: BaseException) -> None:
        if r.finished:
            return
        r.finished = True
        self._release(r)
        self._pending.append((r.events, ("error", exc)))


# Schedulers whose loop still runs. Their threads are daemons, so a program
# may end while one is inside a step; finalizing the interpreter under a
# thread that is in native code (torch, the extension) ends the process with
# SIGABRT. An exit hook stops them first: each finishes its current step
# and its thread returns; requests left are not answered (their callers'
# threads end with the process).
_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _close_at_exit(scheduler: "Scheduler") -> None:
    with _LIVE_LOCK:
        _LIVE.add(scheduler)
        # Registered again with every scheduler, after its backend (and the
        # device runtime's own exit hook) exists: exit hooks run last
        # registered first, so the loops stop before the devices do, even
        # when the runtime was first imported after an earlier scheduler.
        atexit.unregister(close_all)
        atexit.register(close_all)


# How long the exit hook waits for a scheduler's step: far beyond any step
# (a decode call is bounded near 0.1 s, a prompt pass by its token budget),
# short enough that a hung device does not hold the process forever.
EXIT_WAIT_SECONDS = 60.0


def close_all() -> None:
    """Stop every scheduler still running (at interpreter exit)."""
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    for s in list(_LIVE):
        try:
            if not s.stop_at_exit(max(0.0, deadline - time.monotonic())):
                print(
                    "helexa_native: a step was still running at exit; not waiting for it",
                    file=sys.stderr,
                    flush=True,
                )
        except Exception:
            pass
