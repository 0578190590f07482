"""The operator page: every stream's answers, what the ViT looked at, and what it saved.

`start_dashboard("127.0.0.1:8080")` serves the page from the watching process (uvicorn on a
background thread) and returns an Observer to hand to the watcher (`--dashboard`). The page
updates live over server-sent events; `GET /api/streams` returns the same data as JSON.
It binds to loopback unless told otherwise, has no authentication, and never shows the
server's admin key.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
import threading
import time

from codecsight_client.dashboard.cards import HISTORY_SECONDS, StreamCard
from codecsight_client.dashboard.frames import STATUS_NO_VIDEO, STATUS_OFF, ThumbnailWorker
from codecsight_client.observe import (Observer, StreamEvent, WindowRecord, iso,
                                       redact_text, utc_now)

__all__ = ["Dashboard", "DashboardError", "parse_bind", "start_dashboard"]

STARTUP_TIMEOUT_S = 15.0
STATUS_ENDED = "the stream ended before a sampled frame was drawn here"
STATUS_NO_SOURCE = "no video: the source is not open (see the reconnect events below)"
STATUS_SOURCE_OPEN = "the source is open; a sampled frame is drawn here once one is answered"
REDACTED = "[admin key]"


class DashboardError(RuntimeError):
    """The page cannot be served as asked (bad address, port in use, non-loopback bind)."""


def parse_bind(bind: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT", "[V6]:PORT" or ":PORT" (host 127.0.0.1); port 0 picks
    a free port. Raises DashboardError naming the problem."""
    host, sep, port = str(bind).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DashboardError(f"--dashboard {bind!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard(Observer):
    """The page's state and its web server; an Observer of the watcher's streams.

    url: where the page is served. close(): stop the server and the thumbnail decoder.
    The streams' threads call on_*; they only update small in-memory cards and queue work.
    """

    def __init__(self, admin_key: str | None = None, thumbnail_interval_s: float = 1.0):
        self._secret = admin_key or None
        self.cards: dict[str, StreamCard] = {}
        self._codecs: dict[str, str] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: set[asyncio.Queue] = set()
        self._watchers = 0
        self._closing = threading.Event()
        self._plots: dict[str, tuple[int, bytes]] = {}
        self.thumbnails = ThumbnailWorker(self._on_thumbnail, thumbnail_interval_s)
        self.url = ""
        self._server = self._thread = None

    # --- Observer: called from the streams' threads -------------------------------------------
    @property
    def wants_chunks(self) -> bool:   # type: ignore[override]
        """Only while a page is connected: otherwise no chunk is even queued."""
        return self._watchers > 0

    def _card(self, stream_id: str, question: str = "", settings=None) -> StreamCard:
        with self._lock:
            card = self.cards.get(stream_id)
            if card is None:
                card = self.cards[stream_id] = StreamCard(stream_id, question, settings)
                card.thumbnail_status = STATUS_OFF
            return card

    def on_stream(self, stream_id: str, question: str, settings) -> None:
        with self._lock:
            self.cards[stream_id] = StreamCard(stream_id, question, settings)
            self._codecs[stream_id] = getattr(settings, "codec", None) or "h264"
        self._notify(stream_id)

    def on_window(self, record: WindowRecord) -> None:
        self._card(record.stream_id, record.question).add_record(record)
        if record.parse.codec:   # the watcher's settings may not say; the server does
            self._codecs[record.stream_id] = record.parse.codec
        if self.wants_chunks:
            self.thumbnails.submit_record(record.stream_id, record)
        self._notify(record.stream_id)

    def on_event(self, event: StreamEvent) -> None:
        card = self._card(event.stream_id)
        card.add_event(event, self._redact(event.message))
        if event.kind == "ended":   # no more video: the card says so rather than "waiting"
            card.end(STATUS_ENDED)
        elif event.kind in ("source_lost", "reconnect", "connected") and self._watchers \
                and card.thumbnail is None:   # a page is open and waits: say for what
            card.set_thumbnail(None, STATUS_SOURCE_OPEN if event.kind == "connected"
                               else STATUS_NO_SOURCE)
        self._notify(event.stream_id)

    def on_chunk(self, stream_id: str, chunk) -> None:
        if self.wants_chunks:
            self.thumbnails.submit_chunk(stream_id, self._codecs.get(stream_id, "h264"), chunk)

    def _redact(self, text: str) -> str:
        """Stream text as the page may show it: no admin key, no credentials in URLs."""
        text = redact_text(text)   # the watcher's one masking of credentials in URLs
        return text.replace(self._secret, REDACTED) if self._secret else text

    def _on_thumbnail(self, stream_id: str, thumbnail, status: str) -> None:
        self._card(stream_id).set_thumbnail(thumbnail, status)
        self._notify(stream_id)

    # --- the web side ---------------------------------------------------------------------------
    def card_json(self, card: StreamCard) -> dict:
        data = card.to_json()
        if self._secret:   # belt and braces: no stream text may carry the admin key out
            text = json.dumps(data)
            if self._secret in text:
                data = json.loads(self._redact(text))
        return data

    def snapshot(self) -> dict:
        """GET /api/streams: {"generated_at", "streams": [card JSON, by stream ID]}."""
        with self._lock:
            cards = [self.cards[k] for k in sorted(self.cards)]
        return {"generated_at": iso(utc_now()), "streams": [self.card_json(c) for c in cards]}

    def image(self, stream_id: str, kind: str, version: int | None = None) -> bytes | None:
        """PNG bytes of a stream's frame, overlay (of that thumbnail version; None: the
        latest) or plot; None when there is none (yet, or any more)."""
        card = self.cards.get(stream_id)
        if card is None:
            return None
        if kind == "plot":
            from codecsight_client.dashboard.plots import render_plot

            version, points = card.plot_points()
            cached = self._plots.get(stream_id)
            if not points:
                return None
            if cached is None or cached[0] != version:
                cached = self._plots[stream_id] = (version, render_plot(
                    points, HISTORY_SECONDS / 60))
            return cached[1]
        thumb = card.thumbnail_at(version)
        if thumb is None:
            return None
        return thumb.frame_png if kind == "frame" else thumb.overlay_png

    def _notify(self, stream_id: str) -> None:
        loop = self._loop
        if loop is None or not self._queues:
            return
        try:
            loop.call_soon_threadsafe(self._fan_out, stream_id)
        except RuntimeError:   # the loop closed under us: the server is stopping
            pass

    def _fan_out(self, stream_id) -> None:
        for q in self._queues:
            q.put_nowait(stream_id)

    async def updates(self):
        """Card JSON for every stream now, then each card that changes, until the page goes
        or the board closes. Each carries sent_at_ms (epoch ms), for latency measurements."""
        self._loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues.add(q)
        if self._watchers == 0:
            self._set_page_open(True)
        self._watchers += 1
        try:
            pending = set(self.cards)
            while not self._closing.is_set():
                for stream_id in sorted(pending):
                    card = self.cards.get(stream_id)
                    if card is not None:
                        yield {**self.card_json(card), "sent_at_ms": time.time() * 1000.0}
                try:
                    first = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    pending = set()
                    continue
                pending = {first}
                while not q.empty():   # coalesce a burst into one event per card
                    pending.add(q.get_nowait())
                pending.discard(None)
        finally:
            self._queues.discard(q)
            self._watchers -= 1
            if self._watchers == 0:
                self._set_page_open(False)

    def _set_page_open(self, is_open: bool) -> None:
        """The first page opened or the last one closed: every card's thumbnail status says
        what happens now (the decoder's own statuses follow, on its thread, as chunks come;
        an ended stream keeps saying it ended). Before chunks are wanted (they would be
        dropped before the decoder is active)."""
        with self._lock:
            cards = list(self.cards.values())
        for card in cards:
            card.set_thumbnail(None, STATUS_OFF if not is_open else STATUS_NO_SOURCE
                               if card.source_open is False else STATUS_NO_VIDEO)
            self._notify(card.stream_id)
        self.thumbnails.set_active(is_open)

    # --- serving ---------------------------------------------------------------------------------
    def serve(self, host: str, port: int, allow_remote: bool = False) -> "Dashboard":
        """Start uvicorn on a background thread; return once it accepts connections.

        Raises DashboardError for a non-loopback host without allow_remote, a port in use, or
        a server that does not start.
        """
        import uvicorn

        from codecsight_client.dashboard.app import build_app

        if not is_loopback(host) and not allow_remote:
            # No option serves it on the network (README "Operator page"): name the way.
            shown_port = port or 8080
            raise DashboardError(
                f"refusing to serve the operator page on {host}: it has no authentication "
                "and shows every stream's answers; serve it on 127.0.0.1 and reach it "
                "from another machine through an SSH tunnel (ssh -L "
                f"{shown_port}:127.0.0.1:{shown_port} THIS-HOST, then open "
                f"http://127.0.0.1:{shown_port}/)")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise DashboardError(f"cannot serve the operator page on {host}:{port}: {why}; "
                                 "choose another with --dashboard HOST:PORT (port 0: any "
                                 "free one)") from None
        sock.listen(64)
        port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/"
        hosts = ["127.0.0.1", "localhost", "::1", host] if not allow_remote else ["*"]
        config = uvicorn.Config(build_app(self, hosts), log_level="warning",
                                access_log=False, lifespan="off", http="h11", ws="none",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="dashboard-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise DashboardError(f"the operator page did not start on {self.url}")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        """Stop serving (open pages see the stream end) and stop decoding thumbnails."""
        self._closing.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._fan_out, None)
            except RuntimeError:
                pass
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self.thumbnails.stop()


def start_dashboard(bind: str, admin_key: str | None = None, *,
                    allow_remote: bool = False) -> Dashboard:
    """Serve the operator page at bind ("HOST:PORT"); returns the Observer (with .url and
    .close()). admin_key: the server's admin key, if the watcher has one: never shown, and
    removed from any stream text that would carry it. Raises DashboardError (see serve)."""
    host, port = parse_bind(bind)
    return Dashboard(admin_key=admin_key).serve(host, port, allow_remote=allow_remote)
