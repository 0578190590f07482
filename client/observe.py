"""What a watcher reports while it follows live streams: answered windows and stream events.

The watcher (codecsight_client.live) produces these; observers consume them: the JSON-lines
printer, the stderr event log and the operator page (codecsight_client.dashboard). Observers
are called from the streams' threads, so they must be quick and thread-safe; an observer
that raises is reported once and never stops a stream.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
import sys
import threading

from codecsight import protocol as P
from codecsight_client.demux import Chunk

# StreamEvent.kind values, one line each on stderr.
EVENT_KINDS = (
    "connected",         # the source opened (first time or after a reconnect)
    "source_lost",       # the source failed or ended unexpectedly; a reconnect follows
    "reconnect",         # a reconnect attempt, with its backoff delay
    "keyframe_restart",  # the stream restarted (START) from the source's next keyframe
    "resolution_change", # the source's picture size changed; the stream restarts
    "drop",              # stale chunks merged into a later request: windows not answered
    "server_error",      # a request failed; the stream goes on with its next chunk
    "refused",           # the server refused to open the stream (its stream cap)
    "ended",             # the stream ended (END sent), with its reason
    "source_note",       # the source's timestamps jumped, or packets before its first
                         # keyframe were dropped: the stream goes on
    "server_note",       # the server took back a stream this client had left open, or
                         # lost the stream's state and it resumed from its last keyframe
)


# user:password@ (or user@) after a URL's scheme: rtsp://admin:hunter2@10.0.0.5/stream1. Up
# to the authority's last @: a password may hold an @ of its own.
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]+@")


def redact_text(text: str) -> str:
    """text with the credentials of every URL in it masked: rtsp://***@10.0.0.5/stream1.

    Every line the watcher or the client prints about a source goes through this (and the
    operator page), so a camera's password never reaches a terminal, a log or a page.
    """
    return URL_CREDENTIALS.sub(r"\1***@", str(text))



def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    """ISO-8601 with milliseconds and an explicit UTC offset."""
    return t.isoformat(timespec="milliseconds")


@dataclasses.dataclass
class WindowRecord:
    """One answered window of one stream.

    Times: window_start_s/window_end_s are stream time in seconds (the chunk's presentation
    times); captured_at is the wall-clock time the window's last video arrived from the
    source; answered_at when the answer came back; latency_ms = answered_at - captured_at.
    """

    stream_id: str
    question: str
    window_start_s: float
    window_end_s: float
    captured_at: dt.datetime
    answered_at: dt.datetime
    answer: str
    request_ms: float            # the gRPC round trip alone, milliseconds
    bytes_sent: int              # compressed bytes of this request
    dropped_windows: int         # running count for this stream
    reconnects: int              # running count for this stream
    parse: P.ParseStats
    llm: P.LlmStats
    chunk: Chunk | None = dataclasses.field(default=None, repr=False)  # what was sent

    @property
    def latency_ms(self) -> float:
        return (self.answered_at - self.captured_at).total_seconds() * 1000.0

    def to_json(self) -> dict:
        """The JSON-lines object (README "Watching live cameras" documents every key)."""
        return {
            "stream_id": self.stream_id,
            "window_start_s": round(self.window_start_s, 3),
            "window_end_s": round(self.window_end_s, 3),
            "captured_at": iso(self.captured_at),
            "answered_at": iso(self.answered_at),
            "answer": self.answer,
            "latency_ms": round(self.latency_ms, 1),
            "request_ms": round(self.request_ms, 1),
            "patches_kept_share": (None if not self.parse.patches_total
                                   else round(self.parse.patches_kept
                                              / self.parse.patches_total, 4)),
            "tokens_prefilled": self.llm.tokens_prefilled,
            "bytes_sent": self.bytes_sent,
            "dropped_windows": self.dropped_windows,
            "reconnects": self.reconnects,
            "policy": self.parse.policy,
        }


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """Something that happened to one stream (EVENT_KINDS), for stderr and the page."""

    stream_id: str
    kind: str
    message: str
    at: dt.datetime = dataclasses.field(default_factory=utc_now)

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown stream event kind {self.kind!r}")
        # Messages name sources, and errors quote them: never a camera's password.
        object.__setattr__(self, "message", redact_text(self.message))

    def line(self) -> str:
        return f"{iso(self.at)} {self.stream_id} {self.kind}: {self.message}"


class Observer:
    """Receives a watcher's output. Override what you need; every method defaults to nothing.

    wants_chunks: when True, on_chunk receives every chunk sent (the operator page decodes
    thumbnails from them). Keep it False unless needed: it costs the streams' threads time.
    """

    wants_chunks = False

    def on_stream(self, stream_id: str, question: str, settings) -> None:
        """A stream is configured (before its source opens)."""

    def on_window(self, record: WindowRecord) -> None:
        """A window was answered."""

    def on_event(self, event: StreamEvent) -> None:
        """A stream event (reconnect, drop, error, ...)."""

    def on_chunk(self, stream_id: str, chunk: Chunk) -> None:
        """A chunk was sent (only when wants_chunks)."""


class Observers(Observer):
    """Fan-out to several observers; one that raises is reported once on stderr and skipped
    afterwards, so a broken observer never stops a stream."""

    def __init__(self, observers: list[Observer]):
        self._observers = list(observers)
        self._lock = threading.Lock()

    @property
    def wants_chunks(self) -> bool:   # type: ignore[override]
        return any(o.wants_chunks for o in self._observers)

    def _call(self, method: str, *args) -> None:
        for o in list(self._observers):
            if method == "on_chunk" and not o.wants_chunks:
                continue
            try:
                getattr(o, method)(*args)
            except Exception as e:  # never let an observer take a stream down
                with self._lock:
                    if o in self._observers:
                        self._observers.remove(o)
                        print(f"codecsight-client: observer {type(o).__name__} failed and "
                              f"was removed: {redact_text(repr(e))}", file=sys.stderr, flush=True)

    def on_stream(self, stream_id, question, settings):
        self._call("on_stream", stream_id, question, settings)

    def on_window(self, record):
        self._call("on_window", record)

    def on_event(self, event):
        self._call("on_event", event)

    def on_chunk(self, stream_id, chunk):
        self._call("on_chunk", stream_id, chunk)
