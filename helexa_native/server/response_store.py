"""Responses kept in memory for `previous_response_id` and GET /v1/responses/{id}.

A bounded LRU: at most `capacity` responses (default
defaults.DEFAULT_RESPONSE_STORE_SIZE, 1000; `serve --response-store-size`),
the least recently stored or read dropped first. Each entry holds the
response object and its conversation as chat messages (input and output,
without instructions). Nothing is written to disk: a restart forgets them,
and a request naming a dropped response gets a 400 saying so.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

from .. import defaults


@dataclass
class StoredResponse:
    """One kept response: the object as returned, and the conversation that continues from it."""

    response: dict
    messages: List[dict]


class ResponseStore:
    """A thread-safe LRU of StoredResponses by response id."""

    def __init__(self, capacity: int = defaults.DEFAULT_RESPONSE_STORE_SIZE) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"the response store's capacity must be a non-negative integer, got {capacity!r}")
        self.capacity = capacity
        self._items: "OrderedDict[str, StoredResponse]" = OrderedDict()
        self._lock = threading.Lock()

    def put(self, rid: str, response: dict, messages: List[dict]) -> None:
        """Keep a response (dropping the least recently used beyond capacity)."""
        if self.capacity == 0:
            return
        with self._lock:
            self._items[rid] = StoredResponse(response, list(messages))
            self._items.move_to_end(rid)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, rid: str) -> Optional[StoredResponse]:
        """The kept response `rid`, or None."""
        with self._lock:
            item = self._items.get(rid)
            if item is not None:
                self._items.move_to_end(rid)
            return item

    def delete(self, rid: str) -> bool:
        """Forget `rid`; False when it was not kept."""
        with self._lock:
            return self._items.pop(rid, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
