"""A thread that notices a tensor-parallel step running past its limit.

Collectives bound their own waits (the in-process barrier's timeout, gloo's
per-operation timeout), but a rank stuck in its own computation, or a step
stuck somewhere no timeout covers, would never report. The watchdog sees
the step's age from outside: when a step outlives `limit` it calls
`on_overrun(step, seconds)` once, from its own thread, and the backend marks
itself failed (health turns false at once, even while the stuck call still
blocks its thread). Between checks it calls `on_tick()` every `interval`
seconds, which the multi-process leader uses to watch its followers'
heartbeats.

On GPUs the stuck work is on the devices, out of reach of a Python timeout:
the GPU backends' `on_overrun` sets every rank's host-mapped abort word (the
peer all-reduce's waits give up) and aborts the workers' NCCL communicators
(ncclCommAbort, from this thread, since the workers are blocked in the
step), so the ranks' jobs return and the step can fail with the rank named.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)


class StepWatchdog:
    """Watches the step in flight; see the module docstring."""

    def __init__(
        self,
        limit: float,
        on_overrun: Callable[[int, float], None],
        interval: Optional[float] = None,
        on_tick: Optional[Callable[[], None]] = None,
        name: str = "hx-tp-watchdog",
    ):
        self.limit = float(limit)
        self.interval = float(interval) if interval is not None else max(0.05, min(1.0, self.limit / 10))
        self._on_overrun = on_overrun
        self._on_tick = on_tick
        self._cv = threading.Condition()
        self._step: Optional[int] = None
        self._since = 0.0
        self._reported = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def begin(self, step: int) -> None:
        """Step `step` starts now."""
        with self._cv:
            self._step, self._since, self._reported = step, time.monotonic(), False
            self._cv.notify()

    def end(self) -> None:
        """The step in flight is over (finished or failed)."""
        with self._cv:
            self._step = None

    def close(self) -> None:
        """Stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        next_tick = time.monotonic() + self.interval
        while True:
            overrun = None
            with self._cv:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    watching = self._step is not None and not self._reported
                    if watching and now - self._since >= self.limit:
                        self._reported = True
                        overrun = (self._step, now - self._since)
                        break
                    if now >= next_tick:
                        break
                    wait = next_tick - now
                    if watching:
                        wait = min(wait, self._since + self.limit - now)
                    self._cv.wait(wait)
            try:
                if overrun is not None:
                    self._on_overrun(*overrun)
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.interval
                    if self._on_tick is not None:
                        self._on_tick()
            except Exception:
                log.exception("tensor-parallel watchdog check failed")
