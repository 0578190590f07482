"""One card per stream: what the operator page shows, kept from the watcher's records.

Every figure on a card is read from the wire's statistics (protocol.ParseStats, LlmStats) or
the watcher's own WindowRecord; the few derived ones say how they are derived (`DERIVED`).
Cards are updated from the streams' threads and read from the web server's: each holds its
own lock.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

from codecsight_client.observe import StreamEvent, WindowRecord, iso

TIMELINE_LENGTH = 40         # answers kept for the card's timeline
EVENTS_KEPT = 12             # latest events listed on a card
THUMBNAILS_KEPT = 4          # thumbnail versions still served (at most 1 new per second)
HISTORY_SECONDS = 300.0      # the plot covers the last 5 minutes
PLOT_EVERY_S = 5.0           # the plot is redrawn at most this often per stream (matplotlib
                             # costs ~30-60 ms a figure on the 2-core machine)
# The stream settings a card shows; nothing else from the settings object (it could hold
# secrets of the watcher's config) ever reaches the page.
SHOWN_SETTINGS = ("policy", "refresh", "analysis_fps", "window_seconds", "codec", "source_fps",
                  "rotation")
DERIVED = {
    "tokens_dense": "what a dense, full-refresh window would prefill: the window's text rows "
                    "(LLM_STATS kv_rows - visual_tokens) + window_frames x merge groups per "
                    "frame (the kept mask's grid) + the question's tokens (tokens_prefilled - "
                    "tokens_new - tokens_refreshed)",
    "bytes_raw_rgb": "frames_sampled x served width x served height x 3 (PARSE_STATS "
                     "served_size): the RGB the server's sampled frames hold",
    "rest_ms": "ViT + queueing + transport = request - parser - LLM prefill - LLM decode "
               "(the ViT's own time is not on the wire)",
}


def _share(part, whole):
    return None if not whole else round(part / whole, 4)


def dense_tokens(record: WindowRecord, groups_per_frame: int | None) -> int | None:
    """Tokens a dense (every group), full-refresh prefill of this window would run, or None
    when the stats do not say (no answer, no grid known yet). See DERIVED["tokens_dense"]."""
    llm = record.llm
    if not llm.answered or llm.kv_rows is None or llm.visual_tokens is None \
            or groups_per_frame is None:
        return None
    question = llm.tokens_prefilled - (llm.tokens_new or 0) - llm.tokens_refreshed
    return llm.kv_rows - llm.visual_tokens + llm.window_frames * groups_per_frame + question


@dataclasses.dataclass
class Thumbnail:
    """The latest sampled frame as decoded here, with its kept-patch overlay (PNG bytes)."""

    frame_png: bytes
    overlay_png: bytes
    time_s: float          # the sampled frame's stream time (PARSE_STATS kept mask)
    t: int                 # its temporal index
    grid: list             # [grid_h, grid_w] merge groups
    cell_px: int           # a merge group's side in the PNGs
    picture_px: list       # [width, height] of the picture in the PNGs (the rest is padding)
    kept_groups: int       # groups set in the mask (True cells)
    stats_kept_groups: int  # the same frame's PARSE_STATS groups_kept_per_frame entry
    window_end_s: float    # the window whose stats carried the mask


class StreamCard:
    """The page's state for one stream."""

    def __init__(self, stream_id: str, question: str = "", settings=None):
        self.stream_id = stream_id
        self.question = question
        self.settings = {k: getattr(settings, k) for k in SHOWN_SETTINGS
                         if settings is not None and hasattr(settings, k)}
        self.lock = threading.Lock()
        self.version = 0
        self.latest: dict | None = None
        self.windows = 0
        self.timeline: collections.deque = collections.deque(maxlen=TIMELINE_LENGTH)
        self.history: collections.deque = collections.deque()  # (monotonic s, share, ms)
        self.plot_version = 0
        self._plot_at = -1e9
        self.totals = collections.Counter()
        self.window_savings: dict = {}
        self.stages: dict = {}
        self.reconnects = self.dropped_windows = 0
        self.event_counts = collections.Counter()
        self.events: collections.deque = collections.deque(maxlen=EVENTS_KEPT)
        self.groups_per_frame: int | None = None
        self.thumbnail: Thumbnail | None = None
        self.thumbnail_version = 0
        # The last few by version: a page (or a test) holding a URL of a card's JSON gets
        # that very frame and overlay, never a newer one that arrived in between.
        self.thumbnails: collections.OrderedDict = collections.OrderedDict()
        self.thumbnail_status = "decoded only while a page is open"
        self.ended = False     # an "ended" event came: no more video, no more decoder states
        self.source_open: bool | None = None   # from the events: connected / lost (None: yet)

    def add_record(self, record: WindowRecord) -> None:
        """Take one answered window."""
        parse, llm = record.parse, record.llm
        with self.lock:
            self.version += 1
            self.question = record.question or self.question
            masks = parse.kept_masks or []
            if masks:
                grid_h, grid_w = masks[-1]["grid"]
                self.groups_per_frame = grid_h * grid_w
            previous = self.latest["answer"] if self.latest else None
            changed = previous is not None and record.answer != previous
            self.windows += 1
            self.latest = {
                "answer": record.answer, "answered_at": iso(record.answered_at),
                "window_start_s": round(record.window_start_s, 3),
                "window_end_s": round(record.window_end_s, 3),
                "latency_ms": round(record.latency_ms, 1),
                "request_ms": round(record.request_ms, 1), "changed": changed,
            }
            self.timeline.append({"window_start_s": round(record.window_start_s, 3),
                                  "window_end_s": round(record.window_end_s, 3),
                                  "answered_at": iso(record.answered_at),
                                  "answer": record.answer, "changed": changed})
            raw = (parse.frames_sampled * parse.served_size[0] * parse.served_size[1] * 3
                   if parse.served_size else 0)
            dense = dense_tokens(record, self.groups_per_frame)
            window = {"patches_kept": parse.patches_kept, "patches_total": parse.patches_total,
                      "tokens_prefilled": llm.tokens_prefilled if llm.answered else None,
                      "tokens_dense": dense, "bytes_sent": record.bytes_sent,
                      "bytes_raw_rgb": raw}
            self.window_savings = {**window,
                                   "patches_kept_share": _share(parse.patches_kept,
                                                                parse.patches_total)}
            for key, value in window.items():
                self.totals[key] += value or 0
            if dense is not None:
                # Only windows where both numbers are known count towards the token totals.
                self.totals["tokens_prefilled_vs_dense"] += llm.tokens_prefilled
                self.totals["tokens_dense_known"] += dense
            prefill = llm.prefill_ms or 0.0
            llm_decode = llm.decode_ms or 0.0
            self.stages = {
                "parser_ms": round(parse.parser_ms, 1),
                "llm_prefill_ms": None if llm.prefill_ms is None else round(prefill, 1),
                "llm_decode_ms": None if llm.decode_ms is None else round(llm_decode, 1),
                "request_ms": round(record.request_ms, 1),
                "rest_ms": round(record.request_ms - parse.parser_ms - prefill - llm_decode, 1),
            }
            self.reconnects = record.reconnects
            self.dropped_windows = record.dropped_windows
            now = time.monotonic()
            self.history.append((now, _share(parse.patches_kept, parse.patches_total),
                                 round(record.latency_ms, 1)))
            while self.history and self.history[0][0] < now - HISTORY_SECONDS:
                self.history.popleft()
            if now - self._plot_at >= PLOT_EVERY_S:
                self._plot_at, self.plot_version = now, self.plot_version + 1

    def add_event(self, event: StreamEvent, message: str) -> None:
        """Take one stream event; message: its text with any secret already removed."""
        with self.lock:
            self.version += 1
            self.event_counts[event.kind] += 1
            if event.kind in ("connected", "source_lost", "reconnect"):
                self.source_open = event.kind == "connected"
            self.events.append({"kind": event.kind, "message": message, "at": iso(event.at)})

    def set_thumbnail(self, thumbnail: Thumbnail | None, status: str) -> None:
        """A new thumbnail and/or status. After the stream ended only a thumbnail (the
        decoder catching up on its last answers) changes the card."""
        with self.lock:
            if self.ended:
                if thumbnail is None:
                    return
                status += "; the stream has ended"
            if thumbnail is not None:
                self.thumbnail = thumbnail
                self.thumbnail_version += 1
                self.thumbnails[self.thumbnail_version] = thumbnail
                while len(self.thumbnails) > THUMBNAILS_KEPT:
                    self.thumbnails.popitem(last=False)
            if thumbnail is not None or status != self.thumbnail_status:
                self.version += 1
            self.thumbnail_status = status

    def end(self, status_without_frame: str) -> None:
        """The stream ended: a card without a thumbnail says status_without_frame; one with
        a thumbnail keeps it and says the stream ended."""
        with self.lock:
            if not self.ended:
                self.ended = True
                self.version += 1
                self.thumbnail_status = status_without_frame if self.thumbnail is None else (
                    f"last sampled frame drawn at {self.thumbnail.time_s:.2f} s; "
                    "the stream has ended")

    def thumbnail_at(self, version: int | None) -> Thumbnail | None:
        """The thumbnail of that version (None: the latest), or None when gone or never made."""
        with self.lock:
            return self.thumbnail if version is None else self.thumbnails.get(version)

    def plot_points(self) -> tuple[int, list]:
        """(plot version, [(seconds ago, kept share, latency ms)])."""
        with self.lock:
            now = time.monotonic()
            return self.plot_version, [(at - now, share, ms) for at, share, ms in self.history]

    def to_json(self) -> dict:
        """The card as the page and GET /api/streams get it (stream text is data, never HTML:
        the page sets it with textContent)."""
        from urllib.parse import quote

        base = f"/streams/{quote(self.stream_id, safe='')}"
        with self.lock:
            totals = self.totals
            thumb = self.thumbnail
            return {
                "stream_id": self.stream_id,
                "question": self.question,
                "settings": dict(self.settings),
                "version": self.version,
                "windows": self.windows,
                "latest": dict(self.latest) if self.latest else None,
                "timeline": list(self.timeline),
                "savings": {
                    "window": dict(self.window_savings),
                    "total": {
                        "patches_kept": totals["patches_kept"],
                        "patches_total": totals["patches_total"],
                        "patches_kept_share": _share(totals["patches_kept"],
                                                     totals["patches_total"]),
                        "tokens_prefilled": totals["tokens_prefilled_vs_dense"],
                        "tokens_dense": totals["tokens_dense_known"],
                        "tokens_share": _share(totals["tokens_prefilled_vs_dense"],
                                               totals["tokens_dense_known"]),
                        "bytes_sent": totals["bytes_sent"],
                        "bytes_raw_rgb": totals["bytes_raw_rgb"],
                        "bytes_share": _share(totals["bytes_sent"], totals["bytes_raw_rgb"]),
                    },
                    "derived": DERIVED,
                },
                "stages": dict(self.stages),
                "health": {"reconnects": self.reconnects,
                           "dropped_windows": self.dropped_windows,
                           "errors": self.event_counts["server_error"],
                           "event_counts": dict(self.event_counts),
                           "events": list(self.events)},
                "thumbnail": {
                    "status": self.thumbnail_status,
                    "frame_url": f"{base}/frame.png?v={self.thumbnail_version}" if thumb else None,
                    "overlay_url": f"{base}/overlay.png?v={self.thumbnail_version}"
                    if thumb else None,
                    **({"time_s": thumb.time_s, "t": thumb.t, "grid": thumb.grid,
                        "cell_px": thumb.cell_px, "picture_px": thumb.picture_px,
                        "kept_groups": thumb.kept_groups,
                        "stats_kept_groups": thumb.stats_kept_groups,
                        "stats_kept_share": _share(thumb.stats_kept_groups,
                                                   thumb.grid[0] * thumb.grid[1]),
                        "window_end_s": thumb.window_end_s} if thumb else {}),
                },
                "plot_url": f"{base}/plot.png?v={self.plot_version}" if self.history else None,
            }
