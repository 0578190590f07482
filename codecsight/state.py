"""Per-stream state kept inside a model instance: created on START, freed on END, evicted
after an idle TTL or, least recently used first, when the instance exceeds its byte cap.

Triton's sequence batcher does not tell a model when a sequence times out (checked on
tritonserver 2.51: the idle timeout frees the batcher's slot and nothing reaches the model), so
every stateful model owns its eviction.
"""
from __future__ import annotations

import collections
import ctypes
import gc
import time
from typing import Callable, Generic, TypeVar

from codecsight.protocol import StreamAlreadyActive, StreamNotFound

S = TypeVar("S")

# How many evicted stream IDs to remember, so their next request says why the state is gone.
_FORGET_AFTER = 4096


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Return the heap an ended stream freed to the OS.

    glibc keeps freed pages for reuse, so without this a server's RSS stays at its
    high-water mark (measured: ~100 MB held after streams end, 0 after a trim).
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class StreamStates(Generic[S]):
    """Stream ID -> state, with idle-TTL and LRU byte-cap eviction."""

    def __init__(self, ttl_s: float, max_bytes: int, size_of: Callable[[S], int],
                 clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError("ttl_s and max_bytes must be positive")
        self.ttl_s, self.max_bytes = ttl_s, max_bytes
        self._size_of, self._clock = size_of, clock
        self._states: collections.OrderedDict[str, S] = collections.OrderedDict()
        self._seen: dict[str, float] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._states

    def start(self, stream_id: str, state: S, replace: bool = False) -> S:
        """Install fresh state for a stream; a START for an active stream is refused
        (StreamAlreadyActive).

        Refusing protects a live stream from a second client that reuses its ID. replace=True
        is for models behind the one that refuses: their copy may outlive an eviction there.
        """
        self.expire()
        if stream_id in self._states and not replace:
            raise StreamAlreadyActive(
                stream_id, "a START for a stream that is already active (another client with "
                "the same ID?); send END first, use another ID, or "
                f"wait {self.ttl_s:g} s for it to expire")
        self._states.pop(stream_id, None)
        self._gone.pop(stream_id, None)
        self._states[stream_id] = state
        self._seen[stream_id] = self._clock()
        self.expire()  # the newest stream is the most recently used: evicted last
        return state

    def get(self, stream_id: str) -> S:
        """The stream's state, marked as used now; StreamNotFound if it has none."""
        self.expire()
        if stream_id not in self._states:
            why = self._gone.get(stream_id)
            reason = f"its state was {why}" if why else "it has no state on this server"
            raise StreamNotFound(stream_id, f"{reason}; restart the stream with a START request")
        self._states.move_to_end(stream_id)
        self._seen[stream_id] = self._clock()
        return self._states[stream_id]

    def end(self, stream_id: str) -> None:
        """Free the stream's state (END, eviction) and give its memory back to the OS."""
        self._seen.pop(stream_id, None)
        if self._states.pop(stream_id, None) is not None:
            release_freed_memory()

    def nbytes(self) -> int:
        return sum(self._size_of(s) for s in self._states.values())

    def expire(self) -> list[str]:
        """Evict idle streams, then least-recently-used ones while over the byte cap."""
        now, evicted = self._clock(), []
        for stream_id in [s for s, t in self._seen.items() if now - t > self.ttl_s]:
            self._evict(stream_id, f"evicted after {self.ttl_s:g} s idle")
            evicted.append(stream_id)
        while len(self._states) > 1 and self.nbytes() > self.max_bytes:
            stream_id = next(iter(self._states))
            self._evict(stream_id, f"evicted to keep this instance under {self.max_bytes} bytes")
            evicted.append(stream_id)
        return evicted

    def _evict(self, stream_id: str, why: str) -> None:
        self.end(stream_id)
        self._gone[stream_id] = why
        while len(self._gone) > _FORGET_AFTER:
            self._gone.popitem(last=False)
