"""Progress bars for slow work (loading, writing models), on stderr.

A bar appears only once the work has run for `PROGRESS_MIN_SECONDS`, so
quick loads print nothing. `progress=False` silences it; `None` means "the
default", which is on unless the environment sets HELEXA_NO_PROGRESS=1.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm import tqdm

from .defaults import PROGRESS_MIN_SECONDS

T = TypeVar("T")

NO_PROGRESS_ENV = "HELEXA_NO_PROGRESS"


def progress_enabled(progress: Optional[bool] = None) -> bool:
    """Resolve a `progress` argument: an explicit bool wins, else the environment default."""
    if progress is not None:
        return bool(progress)
    return os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


class Progress:
    """A delayed tqdm bar, or a no-op with the same methods when disabled.

    Use as a context manager: `with Progress(total, "Loading", unit="B") as p: p.update(n)`.
    """

    def __init__(
        self,
        total: Optional[float] = None,
        desc: str = "",
        *,
        unit: str = "it",
        progress: Optional[bool] = None,
        delay: float = PROGRESS_MIN_SECONDS,
    ) -> None:
        self._bar = None
        if progress_enabled(progress):
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                delay=delay,
                leave=False,
                dynamic_ncols=True,
                unit_scale=unit != "it",
                unit_divisor=1024 if unit == "B" else 1000,
            )

    def update(self, n: float = 1) -> None:
        """Advance the bar by `n` units."""
        if self._bar is not None:
            self._bar.update(n)

    def set_description(self, desc: str) -> None:
        """Change the label shown before the bar."""
        if self._bar is not None:
            self._bar.set_description(desc, refresh=False)

    def close(self) -> None:
        """Remove the bar (if it was ever shown)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(
    items: Iterable[T],
    desc: str = "",
    *,
    total: Optional[int] = None,
    unit: str = "it",
    progress: Optional[bool] = None,
) -> Iterator[T]:
    """Iterate `items`, showing a delayed bar while it takes long."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit, progress=progress) as bar:
        for item in items:
            yield item
            bar.update(1)
