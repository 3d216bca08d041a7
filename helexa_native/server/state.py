"""What every route of one app shares."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional

from .. import defaults
from ..metrics import ServerMetrics
from .response_store import ResponseStore
from .slots import ModelRegistry


class AppState:
    """One app's registry, API key, default sampling, model roots, stored responses, stopping flag and metrics.

    model_roots: directories /v1/models/load may open files in; None allows
    any readable path, [] turns the route off.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        api_key: Optional[str],
        default_sampling: dict,
        model_roots: Optional[List[Path]] = None,
        response_store_size: int = defaults.DEFAULT_RESPONSE_STORE_SIZE,
    ) -> None:
        self.registry = registry
        self.api_key = api_key
        self.default_sampling = default_sampling
        self.model_roots = model_roots
        self.responses = ResponseStore(response_store_size)
        self.stopping = threading.Event()
        self.metrics = ServerMetrics(self._gauges)

    def _gauges(self):
        for s in self.registry.slots():
            waiting, running = s.counts()
            load = getattr(s.engine, "load", None)
            try:
                stats = load() if callable(load) else {}
            except Exception:
                stats = {}
            yield s.name, waiting, running, s.healthy(), stats
