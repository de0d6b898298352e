"""A fixed-size, thread-safe buffer that keeps the newest items."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RingBuffer(Generic[T]):
    """The last `capacity` appended items, oldest first.

    One thread appends (the sampler or the engine loop) while others read, so every
    access takes a lock. Appending never blocks on a reader for longer than one copy.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[T] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def append(self, item: T) -> None:
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[T]:
        """Copy of the items, oldest first."""
        with self._lock:
            return list(self._items)

    def items_after(self, key: Callable[[T], float], after: float | None) -> list[T]:
        """Items whose `key` is greater than `after` (all items when `after` is None), oldest first."""
        items = self.snapshot()
        if after is None:
            return items
        return [item for item in items if key(item) > after]

    def last(self) -> T | None:
        with self._lock:
            return self._items[-1] if self._items else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
