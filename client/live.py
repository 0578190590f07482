"""The watcher: follow many cameras (or files paced like cameras) in real time.

Each camera runs two threads joined by a bounded queue of chunks:
- its reader opens the source, demuxes it into stride-long Annex-B chunks (never decodes),
  paces a replayed file at its own frame rate (--replay-realtime; a live source paces
  itself), and queues each chunk as soon as it is complete. A lost source is reopened at
  once, then with bounded exponential backoff and jitter (tenacity); the packets before its
  first keyframe are dropped, so the stream restarts from a keyframe.
- its sender takes the chunks one request at a time (one stride of video per request) and
  reports each answered window to the observers (codecsight_client.observe). At a new
  connection or picture size it STARTs the sequence anew (same owner token: the server
  replaces its state at once), so the server's state is never a mix of two connections.
  On stop it ENDs the stream, so the server frees its state at once.

Back-pressure: when the server is slower than real time, chunks pile up; past the queue's
depth the oldest unsent chunk is merged into the next one (merge_chunks): all of its bytes
are still sent (the decoder needs them) but only one window is answered for both, so
nothing waits behind a backlog. Each merge is one dropped window, counted per stream. Video
the merged request's window could not hold anyway is cut at a keyframe, so a request never
grows past about a window plus a GOP (and a stride) of video: under sustained overload,
capture-to-answer latency is about one such request's time.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections import deque
from typing import Callable

import tenacity
from tritonclient.utils import InferenceServerException

from codecsight_client import settings as defaults
from codecsight_client.demux import Chunk, is_keyframe_unit, is_live, iter_chunks, probe
from codecsight_client.observe import (Observer, StreamEvent, WindowRecord, utc_now)
from codecsight_client.stream import StreamClient, StreamRefused, StreamSettings

# Codecs the server decodes (codec_parser); any other camera is a source error, retried.
SERVED_CODECS = ("h264", "hevc")


@dataclasses.dataclass(frozen=True)
class Camera:
    """One camera to follow: what to ask, how often, and how hard to retry its source.

    This is also what observers get as on_stream's settings.
    """

    stream_id: str
    source: str                       # rtsp://... URL, or a file
    question: str = defaults.QUESTION
    policy: str = defaults.PATCH_POLICY
    refresh: str = defaults.REFRESH_POLICY
    analysis_fps: float = defaults.ANALYSIS_FPS
    window_seconds: float = defaults.WINDOW_SECONDS
    stride_seconds: float | None = None   # None: settings.stride_seconds' rule
    replay_realtime: bool = False     # a file: pace it at its own frame rate, like a camera
    max_attempts: int | None = None   # failed opens in a row before giving up; None: never
    video_track: int | None = None

    @property
    def stride(self) -> float:
        """Video per request, seconds."""
        return defaults.stride_seconds(self.window_seconds, self.stride_seconds)

    @property
    def live(self) -> bool:
        return is_live(self.source)

    @property
    def paced(self) -> bool:
        """Chunks arrive at the source's own pace (merging when the server lags); otherwise
        a file is read as fast as the server answers (the reader waits, nothing dropped)."""
        return self.live or self.replay_realtime


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Reconnect delays: initial_s, doubling up to max_s, plus up to jitter_s random."""

    initial_s: float = defaults.BACKOFF_INITIAL_S
    max_s: float = defaults.BACKOFF_MAX_S
    jitter_s: float = defaults.BACKOFF_JITTER_S

    def wait(self):
        return tenacity.wait_exponential_jitter(initial=self.initial_s, max=self.max_s,
                                                jitter=self.jitter_s)


def merge_chunks(older: Chunk, newer: Chunk, *, keep_s: float | None = None,
                 codec: str = "h264") -> Chunk:
    """One request's chunk from two consecutive ones: older's access units, then newer's.

    The result keeps older's start, index and keyframe flag (it is decodable wherever older
    was) and each access unit's own presentation time (AU_PTS), so the server samples frames
    at their true times; the removed time jumps add up. keep_s: the video the server's
    window holds (seconds); access units before the last keyframe that is at least keep_s
    before the end are cut (the window would drop their frames right away, and a decoder
    can start at that keyframe), so the merged chunk starts there.
    """
    sizes = older.au_sizes + newer.au_sizes
    pts = older.au_pts + newer.au_pts
    data = older.data + newer.data
    end_s = max(older.end_s, newer.end_s)
    first, start_keyframe = 0, older.starts_with_keyframe
    if keep_s is not None:
        offset = 0
        for i, (size, t) in enumerate(zip(sizes, pts)):
            if t > end_s - keep_s:
                break
            if i and is_keyframe_unit(data[offset:offset + size], codec):
                first = i
            offset += size
        if first:
            data = data[sum(sizes[:first]):]
            sizes, pts, start_keyframe = sizes[first:], pts[first:], True
    return dataclasses.replace(
        older, data=data, start_s=min(pts), end_s=end_s, starts_with_keyframe=start_keyframe,
        au_sizes=sizes, au_pts=pts, time_jump_s=older.time_jump_s + newer.time_jump_s)


@dataclasses.dataclass(frozen=True)
class Pending:
    """A chunk waiting in a camera's queue, and what the sender needs to send it."""

    chunk: Chunk
    captured_at: object             # datetime: when its last video arrived from the source
    session: int                    # the source connection it came from (1, 2, ...)
    settings: StreamSettings        # the stream settings of that connection
    offset_s: float = 0.0           # added to its stream times in the output (a reconnected
    #                                 source starts at 0 again; the output keeps increasing)
    restart: str | None = None      # why the stream (re)starts here: "connected",
    #                                 "resolution_change", or None
    merged: int = 0                 # windows merged into this request (dropped)

    @property
    def start_s(self) -> float:
        """Its chunk's start in the output's stream time (offset_s added), seconds."""
        return self.chunk.start_s + self.offset_s

    @property
    def end_s(self) -> float:
        """Its chunk's end in the output's stream time (offset_s added), seconds."""
        return self.chunk.end_s + self.offset_s


class ChunkQueue:
    """A camera's chunks not yet sent: at most depth of them.

    merge=True (a paced source): putting one more merges the oldest two (merge_chunks), one
    dropped window each time, and never blocks. Chunks of different connections, or across
    a picture-size change, are never merged: the older is discarded (also a drop), since
    its sequence is about to end. merge=False (a file read as fast as the server answers):
    put waits for room instead.
    """

    def __init__(self, depth: int, *, merge: bool, keep_s: float | None = None):
        if depth < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self.depth, self.merge, self.keep_s = depth, merge, keep_s
        self._items: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Pending) -> int:
        """Queue item; returns the windows dropped to make room (0 or 1)."""
        with self._cond:
            while not self.merge and len(self._items) >= self.depth and not self._closed:
                self._cond.wait()
            self._items.append(item)
            dropped = 0
            while len(self._items) > self.depth:
                older, newer = self._items.popleft(), self._items.popleft()
                self._items.appendleft(self._merged(older, newer))
                dropped += 1
            self._cond.notify_all()
            return dropped

    def _merged(self, older: Pending, newer: Pending) -> Pending:
        merged = older.merged + newer.merged + 1
        if newer.session != older.session or newer.restart:
            return dataclasses.replace(newer, merged=merged)
        chunk = merge_chunks(older.chunk, newer.chunk, keep_s=self.keep_s,
                             codec=older.settings.codec)
        return dataclasses.replace(older, chunk=chunk, captured_at=newer.captured_at,
                                   merged=merged)

    def get(self) -> Pending | None:
        """The oldest chunk, waiting for one; None once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self, discard: bool = False) -> None:
        """No more chunks: get drains what is left (nothing, if discard) then returns None."""
        with self._cond:
            self._closed = True
            if discard:
                self._items.clear()
            self._cond.notify_all()


class SourceLost(Exception):
    """A source could not be opened or read (the message names the camera and the cause)."""


class CameraWatcher:
    """One camera: a reader thread and a sender thread (see the module docstring)."""

    def __init__(self, camera: Camera, client, observer: Observer, *, token: str,
                 stop: threading.Event, queue_depth: int = defaults.QUEUE_DEPTH,
                 backoff: Backoff = Backoff(), server: str | None = None,
                 request_timeout_s: float = defaults.REQUEST_TIMEOUT_S,
                 source_timeout_s: tuple[float, float] = (defaults.SOURCE_OPEN_TIMEOUT_S,
                                                          defaults.SOURCE_READ_TIMEOUT_S)):
        self.camera, self.client, self.observer = camera, client, observer
        self.token, self.stop = token, stop
        self.backoff = backoff
        self.server = server         # the gRPC address, named when it is unreachable
        self.request_timeout_s = request_timeout_s
        self.source_timeout_s = source_timeout_s
        self.queue = ChunkQueue(queue_depth, merge=camera.paced, keep_s=camera.window_seconds)
        self.dropped_windows = 0     # running counts, reported with every window
        self.reconnects = 0          # reconnects that delivered video again
        self.attempts = 0            # reopen attempts after a failure (reconnect events)
        self.windows = 0
        self.gave_up: str | None = None   # why the reader stopped trying, if it did
        self.done = threading.Event()     # set once the sender has ended the stream
        self._info = None            # the source's SourceInfo, probed at its first opening
        self._session = 0
        self._delivered_before = False   # some connection delivered video already
        self._restarting = False    # the sender's stream STARTs anew over its old sequence
        self._offset_s = 0.0         # where the next connection's stream time starts
        self._threads = [threading.Thread(target=self._guard, args=(self._read,),
                                          name=f"{camera.stream_id}-reader", daemon=True),
                         threading.Thread(target=self._guard, args=(self._send,),
                                          name=f"{camera.stream_id}-sender", daemon=True)]

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "CameraWatcher":
        self.observer.on_stream(self.camera.stream_id, self.camera.question, self.camera)
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the sender (it ENDs the stream last); True once it is done.

        An Event, not Thread.join: a KeyboardInterrupt landing inside Thread.join can leave
        the thread looking finished while it still runs (CPython 3.11), and the END unsent.
        """
        return self.done.wait(timeout)

    def event(self, kind: str, message: str) -> None:
        self.observer.on_event(StreamEvent(self.camera.stream_id, kind, message))

    def _guard(self, loop: Callable[[], None]) -> None:
        """A bug in one camera's thread is reported and ends that camera only."""
        try:
            loop()
        except Exception as e:
            if loop == self._read:   # the sender's `ended` event says why, once
                self.gave_up = f"the reader stopped by an unexpected error: {e!r}"
            else:
                self.event("ended", f"stopped by an unexpected error: {e!r}")
        finally:
            if loop == self._read:
                self.queue.close()
            else:
                self.done.set()

    # -- reader --------------------------------------------------------------------------

    def _read(self) -> None:
        camera = self.camera
        while not self.stop.is_set():
            retrying = tenacity.Retrying(
                wait=self.backoff.wait(),
                # A file that failed does not come back: one attempt. A camera may.
                stop=(tenacity.stop_after_attempt(1) if not camera.live else
                      tenacity.stop_after_attempt(camera.max_attempts) if camera.max_attempts
                      else tenacity.stop_never) | tenacity.stop_when_event_set(self.stop),
                retry=tenacity.retry_if_exception_type(SourceLost),
                sleep=self.stop.wait, before_sleep=self._before_reconnect, reraise=True)
            try:
                outcome = retrying(self._connection)
            except SourceLost as e:
                if not self.stop.is_set():   # the sender's one `ended` event says why
                    self.gave_up = (f"gave up on the source after {camera.max_attempts} "
                                    f"failed attempt(s) in a row: {e}" if camera.live else
                                    f"the file failed; a file is not reopened: {e}")
                return
            if outcome != "lost":      # a file ended, or stopped
                return
            # It delivered video, then failed: try again at once, with a fresh backoff.

    def _before_reconnect(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.upcoming_sleep
        self.attempts += 1
        self.event("reconnect", f"attempt {state.attempt_number + 1} in {delay:.1f} s "
                   f"(the last failed: {error})")

    def _notice(self, message: str) -> None:
        self.event("source_note", message)

    def _connection(self) -> str:
        """Open the source and queue its chunks until it ends or fails.

        Returns "ended" (a file's end), "stopped", or "lost" (a live source that delivered
        video, then failed or ended). Raises SourceLost when it failed before any video.
        """
        camera = self.camera
        delivered = False
        try:
            if self._info is None:
                info = probe(camera.source, camera.video_track, notice=self._notice,
                             timeout=self.source_timeout_s)
                if info.codec not in SERVED_CODECS:
                    raise SourceLost(f"{camera.source}: its video is {info.codec}, not H.264 "
                                     "or HEVC; set the camera to H.264")
                self._info = info
            info = self._info
            settings = StreamSettings(
                question=camera.question, codec=info.codec, source_fps=info.fps,
                analysis_fps=camera.analysis_fps, window_seconds=camera.window_seconds,
                policy=camera.policy, refresh=camera.refresh, rotation=info.rotation)
            self._session += 1
            chunks = iter_chunks(camera.source, camera.stride, video_track=info.track,
                                 notice=self._notice, from_keyframe=True,
                                 timeout=self.source_timeout_s)
            wall_origin = None      # monotonic time of stream time 0 (paced replay)
            end_s = 0.0
            for chunk in chunks:
                if self.stop.is_set():
                    return "stopped"
                if camera.replay_realtime and not camera.live:
                    # A camera delivers a chunk once its last frame has been shown.
                    if wall_origin is None:
                        wall_origin = time.monotonic() - chunk.start_s
                    if self.stop.wait(max(0.0, wall_origin + chunk.end_s - time.monotonic())):
                        return "stopped"
                restart = None
                if not delivered:
                    restart = "connected"
                    if self._delivered_before:
                        self.reconnects += 1
                    self._delivered_before = True
                    self.event("connected", f"{camera.source}: {info.codec} @ {info.fps:g} "
                               f"fps, first keyframe at stream time "
                               f"{chunk.start_s + self._offset_s:.3f} s (connection "
                               f"{self._session}, reconnects {self.reconnects})")
                elif chunk.resolution_change:
                    restart = "resolution_change"
                    w, h = chunk.picture_size
                    self.event("resolution_change", f"the picture is now {w}x{h} from stream "
                               f"time {chunk.start_s + self._offset_s:.3f} s; the stream "
                               "restarts at this keyframe")
                delivered = True
                end_s = max(end_s, chunk.end_s)
                self.queue.put(Pending(chunk, utc_now(), self._session, settings,
                                       self._offset_s, restart))
            if not camera.live:
                return "ended"
            cause = "the source ended the stream"
        except SourceLost:
            raise
        except Exception as e:   # av.error.* (OSError), ValueError from probe, ...
            cause = f"{type(e).__name__}: {e}"
        finally:
            if delivered:
                self._offset_s += end_s
        if not delivered or not camera.live:   # a file that failed midway is not reopened
            raise SourceLost(f"{camera.source}: {cause}")
        self.event("source_lost", f"{camera.source}: {cause}; reconnecting")
        return "lost"

    # -- sender --------------------------------------------------------------------------

    def _new_stream(self, settings: StreamSettings) -> StreamClient:
        return StreamClient(self.client, self.camera.stream_id, settings,
                            timeout_s=self.request_timeout_s,
                            reconnect_s=self.request_timeout_s,
                            notice=self._stream_notice, token=self.token)

    def _stream_notice(self, message: str) -> None:
        """StreamClient's notices: a server it is retrying is an error, the rest notes (less
        the server taking the stream back at our own keyframe restart: reported already)."""
        if self._restarting and "took the stream back" in message:
            return
        if "unreachable" in message:
            where = f"server {self.server}" if self.server else "server"
            self.event("server_error", message.replace("server unreachable",
                                                       f"{where} unreachable"))
        else:
            self.event("server_note", message)

    def _send(self) -> None:
        stream: StreamClient | None = None
        session = None
        reason = "the source ended"
        while True:
            item = self.queue.get()
            if item is None or self.stop.is_set():
                if self.stop.is_set():
                    reason = "stopped"
                elif self.gave_up:
                    reason = self.gave_up
                break
            if stream is None or item.session != session or item.restart:
                restarting = stream is not None and stream.started
                stream, session = self._new_stream(item.settings), item.session
                if restarting:
                    # START anew under the same owner token: the server replaces the old
                    # sequence's state at once (an END first would cost a round trip more,
                    # answering a window nobody wants, before the camera is back).
                    self._restarting = True
                    self.event("keyframe_restart", "the stream starts again (START, replacing "
                               "the server's state for it) from the keyframe at stream time "
                               f"{item.start_s:.3f} s")
            if item.merged:
                self.dropped_windows += item.merged
                self.event("drop", f"the server is slower than the camera: {item.merged} "
                           f"window(s) not answered, their video sent with the next request "
                           f"(stream time {item.start_s:.3f}-{item.end_s:.3f} s; "
                           f"{self.dropped_windows} dropped so far)")
            if self.observer.wants_chunks:
                self.observer.on_chunk(self.camera.stream_id, item.chunk)
            try:
                window = stream.send(item.chunk)
                self._restarting = False
            except StreamRefused as e:
                self.event("refused", f"{e}; trying again with the next chunk")
                continue
            except InferenceServerException as e:
                self.event("server_error", f"request for stream time "
                           f"{item.start_s:.3f}-{item.end_s:.3f} s failed: "
                           f"{e.status()}: {e.message()}; going on with the next chunk")
                continue
            self.windows += 1
            self.observer.on_window(WindowRecord(
                stream_id=self.camera.stream_id, question=self.camera.question,
                window_start_s=item.start_s, window_end_s=item.end_s,
                captured_at=item.captured_at, answered_at=utc_now(), answer=window.answer,
                request_ms=window.latency_s * 1000.0, bytes_sent=window.bytes_sent,
                dropped_windows=self.dropped_windows, reconnects=self.reconnects,
                parse=window.parse, llm=window.llm, chunk=item.chunk))
        ended = stream is not None and stream.started
        if ended:
            stream.end()
        self.event("ended", f"{'END sent' if ended else 'no stream open'} ({reason}); "
                   f"{self.windows} window(s) answered, {self.dropped_windows} dropped, "
                   f"{self.reconnects} successful reconnect(s) in {self.attempts} "
                   "reconnect attempt(s)")


class Watcher:
    """Many cameras at once, each independent of the others (CameraWatcher)."""

    def __init__(self, client, cameras: list[Camera], observer: Observer, *,
                 tokens: dict[str, str], **options):
        ids = [c.stream_id for c in cameras]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"stream ID {duplicates[0]!r} is used by more than one camera")
        self.stop_event = threading.Event()
        self.cameras = [CameraWatcher(c, client, observer, token=tokens[c.stream_id],
                                      stop=self.stop_event, **options) for c in cameras]

    def start(self) -> "Watcher":
        for c in self.cameras:
            c.start()
        return self

    def stop(self) -> None:
        """Stop every camera: each sender ENDs its stream once its request in flight is
        answered (or times out)."""
        self.stop_event.set()
        for c in self.cameras:
            c.queue.close(discard=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every camera to end; True when all have (files ended, or stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for c in self.cameras:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not c.join(left):
                return False
        return True


# -- what codecsight-client prints ------------------------------------------------------

class EventPrinter(Observer):
    """Every stream event as one line on stderr (or out), naming the camera."""

    def __init__(self, out=None):
        self.out, self._lock = out, threading.Lock()

    def on_event(self, event: StreamEvent) -> None:
        with self._lock:
            print(f"codecsight-client: {event.line()}", file=self.out or sys.stderr, flush=True)


class JsonLinesPrinter(Observer):
    """Every answered window as one JSON object per line (WindowRecord.to_json) on stdout."""

    def __init__(self, out=None):
        self.out, self._lock = out, threading.Lock()

    def on_window(self, record: WindowRecord) -> None:
        line = json.dumps(record.to_json(), ensure_ascii=False)
        with self._lock:
            print(line, file=self.out or sys.stdout, flush=True)


class TextPrinter(Observer):
    """Every answered window as one readable line on stdout."""

    def __init__(self, out=None):
        self.out, self._lock = out, threading.Lock()

    def on_window(self, r: WindowRecord) -> None:
        with self._lock:
            print(f"[{r.stream_id}] video {r.window_start_s:7.2f}-{r.window_end_s:7.2f} s "
                  f"kept {r.parse.patches_kept}/{r.parse.patches_total} patches, prefilled "
                  f"{r.llm.tokens_prefilled} tokens, latency {r.latency_ms:7.1f} ms "
                  f"(request {r.request_ms:.0f} ms), dropped {r.dropped_windows}, "
                  f"reconnects {r.reconnects}  answer: {r.answer!r}",
                  file=self.out or sys.stdout, flush=True)
