"""Thumbnails for the operator page: the frame the server sampled, decoded here, with the merge
groups the ViT saw highlighted.

Decoding happens on one background thread, only while a page is connected, never on a
stream's thread or the serving path: the streams' threads only queue the chunks they sent
(`Observer.on_chunk`). A chunk is decoded when its window's answer arrives, because only the
answer's PARSE_STATS says which frame the server sampled (`kept_masks[-1]["time_s"]`): the
decoded frame with that presentation time is the one drawn, so the overlay matches it. At most
one thumbnail per stream per `min_interval_s` is converted and drawn; the other frames are
decoded (a decoder cannot skip them) and dropped. A decoder started mid-GOP (a page opened
while streams run) can only begin at the next keyframe; the card says so meanwhile. A sampled
frame still waits while its frame may come out later (a decoder holds B-frames back until the
next chunk's packets); once a later frame has come out, or a newer answer's frame is waiting
too, the card says it was not decoded here, and why, rather than waiting silently.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import queue
import threading
import time
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from codecsight import protocol as P
from codecsight_client.dashboard.cards import Thumbnail

PTS_RATE = 90_000            # packets get presentation times in 1/90 kHz ticks (MPEG's clock)
MATCH_TOLERANCE_S = 0.002    # the server reports a sampled frame's time to the millisecond
MAX_QUEUED_CHUNKS = 120      # per stream; beyond, the decoder has fallen behind: restart it
THUMBNAIL_WIDTH = 480        # px, at most; cells stay whole pixels (see render_thumbnail)
KEPT_RGBA = (0, 255, 120, 90)   # tint of a kept merge group
DROPPED_RGBA = (0, 0, 0, 150)   # shade of a merge group the ViT did not see

MAX_WANTED = 2               # sampled frames waiting to come out of a stream's decoder
STATUS_OFF = "decoded only while a page is open"
STATUS_NO_VIDEO = "no video from this stream yet since the page opened"
STATUS_WAITING = "waiting for the stream's next keyframe (this decoder started mid-GOP)"
STATUS_DECODING = "decoding; the next sampled frame is drawn here"
STATUS_BEHIND = "thumbnail decoder fell behind and restarts at the next keyframe"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)   # fast: ~2 ms at 476x272
    return out.getvalue()


def render_thumbnail(frame: av.VideoFrame, entry: dict, served_size, rotation: int,
                     stats_kept_groups: int, window_end_s: float,
                     max_width: int = THUMBNAIL_WIDTH) -> Thumbnail:
    """The sampled frame as the ViT saw it (upright, scaled to served_size, zero-padded to
    whole merge groups), shrunk so each group is `cell_px` whole pixels, plus the same image
    with the kept groups tinted and the others shaded (Pillow alpha compositing).

    entry: a PARSE_STATS kept_masks dict (protocol.pack_kept_mask); served_size: [width,
    height] px; rotation: degrees clockwise. Raises ValueError on a mask that does not unpack.
    """
    keep = P.unpack_kept_mask(entry)
    grid_h, grid_w = keep.shape
    group_px = int(entry["group_px"])
    width, height = (int(n) for n in served_size)
    cell = max(2, min(group_px, max_width // grid_w))
    pic_w = min(grid_w * cell, max(1, round(width * cell / group_px)))
    pic_h = min(grid_h * cell, max(1, round(height * cell / group_px)))
    # Scale in the source orientation, then turn upright (the server's order, codec.Picture).
    src_w, src_h = (pic_h, pic_w) if rotation in (90, 270) else (pic_w, pic_h)
    pixels = frame.reformat(width=src_w, height=src_h, format="rgb24",
                            interpolation="AREA").to_ndarray()
    if rotation % 360:
        pixels = np.rot90(pixels, -rotation // 90)
    canvas = np.zeros((grid_h * cell, grid_w * cell, 3), np.uint8)
    canvas[:pic_h, :pic_w] = pixels
    base = Image.fromarray(canvas).convert("RGBA")
    cells = Image.fromarray(keep.astype(np.uint8) * 255, "L").resize(base.size, Image.NEAREST)
    layer = Image.composite(Image.new("RGBA", base.size, KEPT_RGBA),
                            Image.new("RGBA", base.size, DROPPED_RGBA), cells)
    overlay = Image.alpha_composite(base, layer).convert("RGB")
    return Thumbnail(frame_png=png(base.convert("RGB")), overlay_png=png(overlay),
                     time_s=float(entry["time_s"]), t=int(entry["t"]), grid=[grid_h, grid_w],
                     cell_px=cell, picture_px=[pic_w, pic_h], kept_groups=int(keep.sum()),
                     stats_kept_groups=int(stats_kept_groups), window_end_s=window_end_s)


@dataclasses.dataclass
class _Wanted:
    entry: dict
    served_size: list
    rotation: int
    stats_kept_groups: int
    window_end_s: float


class _StreamDecoder:
    def __init__(self, codec: str):
        self.context = av.CodecContext.create(codec, "r")
        self.codec = codec
        self.chunks: collections.deque = collections.deque()
        self.synced = False            # a frame came out: the decoder passed a keyframe
        self.wanted: collections.deque = collections.deque()   # _Wanted, oldest first
        self.first_time: float | None = None   # s: this decoder's first frame (a keyframe)
        self.last_time: float | None = None    # s: the previous frame's time, as the server
        self.interval: float | None = None     # s: the source's frame interval (AU_PTS steps)
        self.last_drawn = -1e9         # monotonic s
        self.errors = 0


def frame_time(state: _StreamDecoder, pts: float) -> float:
    """A decoded frame's stream time as the server gives it (codecsight.parser.StreamParser.
    frame_time): its own presentation time, or, where that is not after the previous frame's
    (an RTSP source's first access units can share time 0), the previous one's + a frame
    interval; the server then reports every later frame of that run a frame later too, and
    so must the match. s; updates state.last_time."""
    last = state.last_time
    if last is None or pts > last + 1e-6 or state.interval is None:
        state.last_time = pts
    else:
        state.last_time = last + state.interval
    return state.last_time


class ThumbnailWorker:
    """One thread decoding every watched stream's chunks and drawing its thumbnails.

    on_thumbnail(stream_id, Thumbnail | None, status): called on the worker thread.
    submit_* never block: a stream whose queue overflows restarts its decoder.
    """

    def __init__(self, on_thumbnail, min_interval_s: float = 1.0, max_tasks: int = 10_000):
        self.on_thumbnail = on_thumbnail
        self.min_interval_s = min_interval_s
        self.tasks: queue.Queue = queue.Queue(maxsize=max_tasks)
        self.active = False
        self.streams: dict[str, _StreamDecoder] = {}
        self._lost: set[str] = set()   # streams a full queue dropped work of: restart them
        self.thread = threading.Thread(target=self._run, name="dashboard-thumbnails",
                                       daemon=True)
        self.thread.start()

    # --- called from any thread ---------------------------------------------------------------
    def _put(self, task) -> None:
        stream_id = task[1]
        try:
            if stream_id in self._lost:
                # In queue order: after the work queued before the loss, before this.
                self.tasks.put_nowait(("reset", stream_id, None))
                self._lost.discard(stream_id)
            self.tasks.put_nowait(task)
        except queue.Full:   # far behind: work is lost, the stream restarts at a keyframe
            if stream_id is not None:
                self._lost.add(stream_id)

    def set_active(self, active: bool) -> None:
        self._put(("active", None, active))

    def submit_chunk(self, stream_id: str, codec: str, chunk) -> None:
        self._put(("chunk", stream_id, (codec, chunk)))

    def submit_record(self, stream_id: str, record) -> None:
        self._put(("record", stream_id, record))

    def stop(self) -> None:
        self.tasks.put(("stop", None, None))
        self.thread.join(timeout=5)

    # --- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, stream_id, value = self.tasks.get()
            if kind == "stop":
                return
            try:
                if kind == "active":
                    self._set_active(value)
                elif not self.active:
                    continue
                elif kind == "chunk":
                    self._chunk(stream_id, *value)
                elif kind == "record":
                    self._record(stream_id, value)
                elif kind == "reset" and self.streams.pop(stream_id, None) is not None:
                    self.on_thumbnail(stream_id, None, STATUS_BEHIND)
            except Exception as e:  # a bad chunk or frame never stops the page
                self.streams.pop(stream_id, None)
                self.on_thumbnail(stream_id, None, f"thumbnail decoder restarted after an "
                                  f"error: {e}")

    def _set_active(self, active: bool) -> None:
        if active == self.active:
            return
        self.active = active
        ids = list(self.streams)
        self.streams.clear()   # frees the decoders; a new page starts them at a keyframe
        for stream_id in ids:
            self.on_thumbnail(stream_id, None, STATUS_WAITING if active else STATUS_OFF)

    def _chunk(self, stream_id: str, codec: str, chunk) -> None:
        state = self.streams.get(stream_id)
        if state is None or state.codec != codec:
            state = self.streams[stream_id] = _StreamDecoder(codec)
            keyframe = getattr(chunk, "starts_with_keyframe", False)
            self.on_thumbnail(stream_id, None, STATUS_DECODING if keyframe else STATUS_WAITING)
        state.chunks.append(chunk)
        if len(state.chunks) > MAX_QUEUED_CHUNKS:   # no answers for a long while
            del self.streams[stream_id]
            self.on_thumbnail(stream_id, None, "thumbnail decoder restarted: no answers "
                              f"for {MAX_QUEUED_CHUNKS} chunks")

    def _record(self, stream_id: str, record) -> None:
        state = self.streams.get(stream_id)
        if state is None:
            return
        masks = record.parse.kept_masks or []
        now = time.monotonic()
        if masks and record.parse.served_size and now - state.last_drawn >= self.min_interval_s:
            per_frame = record.parse.groups_kept_per_frame
            if len(state.wanted) >= MAX_WANTED:   # a newer answer's frame replaces it
                self._missed(stream_id, state, state.wanted.popleft(),
                             "a newer answer's frame is due first")
            state.wanted.append(_Wanted(masks[-1], record.parse.served_size,
                                        record.parse.rotation, per_frame[len(masks) - 1],
                                        record.window_end_s))
        # Decode up to and including the answered chunk: its frames are now explained.
        while state.chunks:
            chunk = state.chunks.popleft()
            self._decode(stream_id, state, chunk)
            if record.chunk is None or chunk is record.chunk or chunk == record.chunk:
                break

    def _decode(self, stream_id: str, state: _StreamDecoder, chunk) -> None:
        steps = sorted(b - a for a, b in zip(sorted(chunk.au_pts), sorted(chunk.au_pts)[1:])
                       if b - a > 1e-6)
        if steps:
            state.interval = steps[len(steps) // 2]
        for data, pts in chunk.access_units():
            packet = av.Packet(data)
            packet.pts = round(pts * PTS_RATE)
            packet.time_base = Fraction(1, PTS_RATE)
            try:
                frames = state.context.decode(packet)
            except av.error.FFmpegError:
                # Before the first keyframe every packet fails (no parameter sets yet).
                state.errors += state.synced
                continue
            for frame in frames:
                if not state.synced:
                    state.synced = True
                    self.on_thumbnail(stream_id, None, STATUS_DECODING)
                self._offer(stream_id, state, frame)

    def _offer(self, stream_id: str, state: _StreamDecoder, frame: av.VideoFrame) -> None:
        if frame.pts is None:   # never from _decode's packets (each has a pts); say so if so
            self.on_thumbnail(stream_id, None, "a decoded frame has no presentation time: "
                              "its sampled frame cannot be found")
            return
        time_s = frame_time(state, frame.pts / PTS_RATE)
        if state.first_time is None:
            state.first_time = time_s
        while state.wanted:
            wanted = state.wanted[0]
            target = wanted.entry["time_s"]
            if abs(time_s - target) <= MATCH_TOLERANCE_S:
                state.wanted.popleft()
                thumbnail = render_thumbnail(frame, wanted.entry, wanted.served_size,
                                             wanted.rotation, wanted.stats_kept_groups,
                                             wanted.window_end_s)
                state.last_drawn = time.monotonic()
                self.on_thumbnail(stream_id, thumbnail,
                                  f"sampled frame at {thumbnail.time_s:.2f} s")
                return
            if time_s < target:
                return   # frames come out in display order: it may still come
            state.wanted.popleft()
            self._missed(stream_id, state, wanted, f"frames came out at {time_s:.3f} s "
                         "and later instead")

    def _missed(self, stream_id: str, state: _StreamDecoder, wanted: _Wanted,
                why: str) -> None:
        """A sampled frame that will not be drawn: the card says why (unless it lay before
        this decoder's first keyframe, where the card already says it waits for one)."""
        target = wanted.entry["time_s"]
        if state.first_time is None or target < state.first_time - MATCH_TOLERANCE_S:
            return
        self.on_thumbnail(stream_id, None, f"the frame the server sampled at {target:.3f} s "
                          f"was not decoded here ({why}); waiting for the next")
