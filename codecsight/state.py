"""Per-stream state kept inside a model instance: created on START, freed on END, evicted
after an idle TTL or, least recently used first, when the instance exceeds its byte cap.

Triton's sequence batcher does not tell a model when a sequence times out (checked on
tritonserver 2.51: the idle timeout frees the batcher's slot and nothing reaches the model), so
every stateful model owns its eviction.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import gc
import hashlib
import time
from typing import Callable, Generic, TypeVar

from codecsight.protocol import (InvalidRequest, StreamAlreadyActive, StreamNotFound,
                                 StreamNotOwned, StreamsFull)

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
    """Stream ID -> state, with idle-TTL and LRU byte-cap eviction, an optional cap on the
    number of streams (admission) and an optional owner token per stream.

    max_streams: None admits any number of streams (the byte cap still holds).
    """

    def __init__(self, ttl_s: float, max_bytes: int, size_of: Callable[[S], int],
                 clock: Callable[[], float] = time.monotonic, max_streams: int | None = None):
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError("ttl_s and max_bytes must be positive")
        if max_streams is not None and max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self.ttl_s, self.max_bytes, self.max_streams = ttl_s, max_bytes, max_streams
        self._size_of, self._clock = size_of, clock
        self._states: collections.OrderedDict[str, S] = collections.OrderedDict()
        self._seen: dict[str, float] = {}
        self._owners: dict[str, str] = {}
        self._gone: collections.OrderedDict[str, str] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, stream_id: str) -> bool:
        return stream_id in self._states

    def start(self, stream_id: str, state: S, replace: bool = False,
              owner: str | None = None) -> S:
        """Install fresh state for a stream, bound to owner (a token; None: no owner).

        A START for an active stream replaces it when replace=True or when owner is the
        token the stream was started with (the owner restarting after a crash); otherwise it
        is refused (StreamAlreadyActive), which protects a live stream from a second client
        that reuses its ID. replace=True is for models behind the one that checks owners:
        their copy may outlive an eviction there. A new stream beyond max_streams is
        refused (StreamsFull) and nothing is installed.
        """
        self.expire()
        if stream_id in self._states and not replace and (
                owner is None or self._owners.get(stream_id) != owner):
            raise StreamAlreadyActive(
                stream_id, "a START for a stream that is already active under another owner "
                "(another client with the same ID?); use another ID, let its owner send END, "
                f"or wait {self.ttl_s:g} s after its last request for it to expire")
        if stream_id not in self._states and self.max_streams is not None \
                and len(self._states) >= self.max_streams:
            raise StreamsFull(
                stream_id, f"this instance already serves its cap of max_streams="
                f"{self.max_streams} streams; retry later, or send the stream to another "
                "server or instance")
        self.end(stream_id)
        self._gone.pop(stream_id, None)
        self._states[stream_id] = state
        self._seen[stream_id] = self._clock()
        if owner is not None:
            self._owners[stream_id] = owner
        self.expire()  # the newest stream is the most recently used: evicted last
        return state

    def is_owner(self, stream_id: str, owner: str | None) -> bool:
        """True when the stream is active and bound to this owner token."""
        return stream_id in self._states and self._owners.get(stream_id) == owner

    def get(self, stream_id: str, owner: str | None = None) -> S:
        """The stream's state, marked as used now.

        owner: the request's token; a stream bound to another token refuses it
        (StreamNotOwned) and stays exactly as it was, its idle clock included.
        StreamNotFound if the stream has no state.
        """
        self.expire()
        if stream_id not in self._states:
            why = self._gone.get(stream_id)
            reason = f"its state was {why}" if why else "it has no state on this server"
            raise StreamNotFound(stream_id, f"{reason}; restart the stream with a START request")
        bound = self._owners.get(stream_id)
        if bound is not None and bound != owner:
            raise StreamNotOwned(
                stream_id, "the request's STREAM_TOKEN is not the one this stream was started "
                "with: another client owns this stream ID; use your own stream ID (a client "
                "restarting its own stream must send its START with its original token)")
        self._states.move_to_end(stream_id)
        self._seen[stream_id] = self._clock()
        return self._states[stream_id]

    def end(self, stream_id: str) -> None:
        """Free the stream's state (END, eviction) and give its memory back to the OS."""
        self._seen.pop(stream_id, None)
        self._owners.pop(stream_id, None)
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


class ChunkOrder:
    """A stream's chunk numbers (CHUNK_SEQ): which one comes next, and the last one's bytes.

    A proxy or the client itself may re-send a chunk the server already processed (a retry
    after UNAVAILABLE or a timeout); decoding it again would add its frames, and their time,
    to the stream twice. The exact last chunk again is therefore a duplicate to drop; any
    other number out of line is a gap or a reorder that the decoder cannot make sense of.
    """

    def __init__(self, first: int, owner_restart: bool = False):
        """first: START's number. owner_restart: this START replaced the owner's still-active
        stream (a restarted client), so a late chunk of the old session is told why."""
        self.next = first             # the number the next new chunk must carry
        self._last_digest: bytes | None = None
        self._restarted_at = time.monotonic() if owner_restart else None

    @staticmethod
    def digest(chunk: bytes) -> bytes:
        return hashlib.blake2b(chunk, digest_size=16).digest()

    def is_duplicate(self, stream_id, seq: int, chunk: bytes, end: bool = False) -> bool:
        """False for the next chunk, True for an exact copy of the last one processed.

        An empty END is never out of order: it carries no video to misplace, only closes
        the stream (a client that gave up waiting for its START's answer sends one).
        Raises InvalidRequest for any other number (a gap or a reorder), and for the last
        number with other bytes; either names the number expected.
        """
        if seq == self.next or (end and not chunk):
            return False
        last = self.next - 1
        if seq == last and self._last_digest is not None:
            if self.digest(chunk) == self._last_digest:
                return True
            raise InvalidRequest(stream_id, f"chunk {seq} was already processed with other "
                                 f"bytes; the next chunk must be number {self.next}")
        what = "a gap: chunks are missing" if seq > self.next else "out of order or repeated"
        why = "" if self._restarted_at is None else (
            f"; the stream was restarted {time.monotonic() - self._restarted_at:.0f} s ago by a "
            "START carrying its owner's token: is another process streaming with the same "
            "stream ID and client secret?")
        raise InvalidRequest(stream_id, f"chunk {seq} is {what}; expected chunk {self.next} "
                             "(CHUNK_SEQ is +1 per request after START's); restart the stream "
                             f"with START to resynchronise{why}")

    def processed(self, seq: int, chunk: bytes) -> None:
        """Record that chunk number seq was decoded: the next one is seq + 1."""
        self.next, self._last_digest = seq + 1, self.digest(chunk)


@dataclasses.dataclass
class OrderedStream(Generic[S]):
    """A stream's state with its chunk order and its count of timeline discontinuities."""

    state: S
    order: ChunkOrder
    time_jumps: int = 0     # requests whose TIME_JUMP was nonzero

    @property
    def nbytes(self) -> int:
        return self.state.nbytes
