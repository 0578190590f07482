"""The operator page (--dashboard) in a real headless Chromium, fed real server answers.

The page's own parts (binding, errors, the admin key) are checked without a browser; the
browser test streams the bundled clip through a real tritonserver as two streams, one asking
a question that holds a <script>, and feeds the watcher's records to the page as the
watcher does (on_chunk before each request, on_window after its answer).
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
from PIL import Image

from codecsight import protocol as P
from codecsight.serve import REPO_ROOT
from codecsight_client.dashboard import (STATUS_ENDED, STATUS_NO_SOURCE, DashboardError,
                                         parse_bind, start_dashboard)
from codecsight.checkpoint import Geometry
from codecsight.parser import StreamParser
from codecsight_client.dashboard.frames import (DROPPED_RGBA, KEPT_RGBA, STATUS_BEHIND,
                                                STATUS_DECODING, STATUS_NO_VIDEO,
                                                STATUS_OFF, STATUS_WAITING, ThumbnailWorker,
                                                render_thumbnail)
from codecsight_client.demux import iter_chunks
from codecsight_client.observe import StreamEvent, WindowRecord, utc_now
from codecsight_client.stream import StreamClient, connect
from tests.streams import CLIP, clip_settings, new_id

CHROMIUM = "/usr/lib/chromium/chromium"
# Without the background-networking flags Chromium keeps calling home on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO_ROOT / "perf" / "out" / "dashboard.png"   # the README's, from the watcher
OBSERVER_SCREENSHOT = REPO_ROOT / "perf" / "out" / "dashboard-observer.png"
CLIENT = REPO_ROOT / ".venv" / "bin" / "codecsight-client"
XSS_QUESTION = 'is <script>window.__xss = 1</script> anyone "moving" & <b>where</b>?'


def wait_until(page, expression: str, timeout_s: float = 30.0) -> None:
    """Poll a JavaScript expression until truthy. (page.wait_for_function evaluates its
    predicate with eval, which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s: {expression}")
        time.sleep(0.1)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


# --- without a browser ------------------------------------------------------------------------

def test_bind_addresses_parse_and_bad_ones_say_what_to_give():
    assert parse_bind("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_bind("[::1]:0") == ("::1", 0)
    assert parse_bind(":9000") == ("127.0.0.1", 9000)
    with pytest.raises(DashboardError, match="give HOST:PORT"):
        parse_bind("localhost")


def test_a_non_loopback_address_is_refused_unless_allowed():
    with pytest.raises(DashboardError, match="no authentication") as refused:
        start_dashboard("0.0.0.0:0")
    # Trial item 7: it names the way that exists (an SSH tunnel), no option that does not.
    assert "SSH tunnel (ssh -L" in str(refused.value)
    assert "explicitly" not in str(refused.value) and "--" not in str(refused.value)


def test_a_port_in_use_is_a_clear_error_and_close_stops_serving():
    board = start_dashboard("127.0.0.1:0")
    try:
        bind = board.url.removeprefix("http://").rstrip("/")
        with pytest.raises(DashboardError, match="port is in use"):
            start_dashboard(bind)
    finally:
        board.close()
    with pytest.raises(urllib.error.URLError):
        get(board.url + "api/streams")


def test_the_watcher_stops_with_status_2_and_the_reason_when_the_port_is_taken(tmp_path):
    board = start_dashboard("127.0.0.1:0")
    try:
        config = tmp_path / "cameras.toml"
        config.write_text(f'[[cameras]]\nstream_id = "cam-1"\nurl = {json.dumps(CLIP)}\n')
        bind = board.url.removeprefix("http://").rstrip("/")
        done = subprocess.run([str(CLIENT), "watch", str(config), "--dashboard", bind],
                              capture_output=True, text=True, timeout=60)
    finally:
        board.close()
    assert done.returncode == 2
    assert f"cannot serve the operator page on {bind}: the port is in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_admin_key_never_leaves_and_chunks_are_wanted_only_while_a_page_is_open():
    board = start_dashboard("127.0.0.1:0", admin_key="s3cret-admin-key")
    try:
        board.on_stream("cam-a", "what moved?", clip_settings())
        board.on_event(StreamEvent("cam-a", "server_error",
                                   "echoed header s3cret-admin-key rejected"))
        board.on_event(StreamEvent("cam-a", "source_lost",
                                   "rtsp://admin:hunter2@10.0.0.5/stream1 went silent"))
        assert not board.wants_chunks
        seen = [get(board.url), get(board.url + "api/streams")]
        with urllib.request.urlopen(board.url + "events", timeout=10) as events:
            seen.append(events.readline() + events.readline())
            assert board.wants_chunks
        deadline = time.monotonic() + 10   # the server notices the page has gone
        while board.wants_chunks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not board.wants_chunks
        text = b"".join(seen).decode()
        assert "s3cret-admin-key" not in text and "[admin key] rejected" in text
        assert "hunter2" not in text and "rtsp://***@10.0.0.5/stream1" in text
        card = json.loads(get(board.url + "api/streams"))["streams"][0]
        assert card["health"]["errors"] == 1 and card["question"] == "what moved?"
        with pytest.raises(urllib.error.HTTPError, match="400"):   # DNS rebinding
            urllib.request.urlopen(urllib.request.Request(
                board.url + "api/streams", headers={"Host": "evil.example"}), timeout=10)
    finally:
        board.close()


def test_a_page_opened_mid_gop_waits_for_a_keyframe_then_draws_the_frames_sampled(tiny_dir):
    """The thumbnail decoder joins at 2 s (the clip's keyframes: every 4.8 s); the server's
    side is a real StreamParser that saw the whole stream."""
    parser = StreamParser(Geometry.from_model_dir(tiny_dir), "h264", 12.5, 2.0,
                          policy="codec")
    seen = []   # (thumbnail or None, status)
    worker = ThumbnailWorker(lambda sid, thumb, status: seen.append((thumb, status)),
                             min_interval_s=0)
    worker.set_active(True)
    sampled = {}
    for chunk in itertools.islice(iter_chunks(CLIP, 2.0), 5):
        stats = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts).stats
        sampled.update({e["time_s"]: n for e, n in zip(stats.kept_masks,
                                                        stats.groups_kept_per_frame)})
        if chunk.index == 0:
            continue   # the page opens now
        worker.submit_chunk("cam", "h264", chunk)
        worker.submit_record("cam", WindowRecord(
            stream_id="cam", question="q", window_start_s=chunk.start_s,
            window_end_s=chunk.end_s, captured_at=utc_now(), answered_at=utc_now(),
            answer="", request_ms=0.0, bytes_sent=len(chunk.data), dropped_windows=0,
            reconnects=0, parse=stats, llm=P.LlmStats.empty(), chunk=chunk))
    worker.stop()
    assert seen[0] == (None, STATUS_WAITING)
    thumbs = [t for t, _ in seen if t is not None]
    # Chunks 4-6 s, 6-8 s and 8-10 s: each answer's last sampled frame, once decodable.
    assert [t.time_s for t in thumbs] == [5.52, 7.52, 9.52]
    for thumb in thumbs:
        assert thumb.stats_kept_groups == sampled[thumb.time_s] == thumb.kept_groups
        assert thumb.grid == [16, 28] and thumb.picture_px == [466, 262]   # 768x432 at 17/28


def test_a_decoder_that_falls_behind_drops_work_and_restarts_at_a_keyframe():
    """The streams' threads never wait for the thumbnail thread: a full queue drops."""
    release, seen = threading.Event(), []

    def slow(stream_id, thumb, status):
        seen.append(status)
        release.wait(10)   # the thumbnail thread is stuck here meanwhile

    worker = ThumbnailWorker(slow, max_tasks=2)
    worker.set_active(True)
    chunks = list(itertools.islice(iter_chunks(CLIP, 2.0), 6))
    started = time.monotonic()
    for chunk in chunks:
        worker.submit_chunk("cam", "h264", chunk)   # the first one blocks the worker
    assert time.monotonic() - started < 1.0, "a stream's thread waited for the thumbnails"
    release.set()
    while not worker.tasks.empty():   # it catches up with what it kept
        time.sleep(0.01)
    worker.submit_chunk("cam", "h264", chunks[0])   # after the loss: a fresh decoder
    worker.stop()
    # chunks[0] starts with a keyframe: each fresh decoder can decode at once
    assert seen == [STATUS_DECODING, STATUS_BEHIND, STATUS_DECODING]


def record_for(chunk, stats) -> WindowRecord:
    """A WindowRecord as the watcher makes one for a chunk's answer (stats: its PARSE_STATS)."""
    return WindowRecord(stream_id="cam", question="q", window_start_s=chunk.start_s,
                        window_end_s=chunk.end_s, captured_at=utc_now(), answered_at=utc_now(),
                        answer="", request_ms=0.0, bytes_sent=len(chunk.data),
                        dropped_windows=0, reconnects=0, parse=stats, llm=P.LlmStats.empty(),
                        chunk=chunk)


def test_access_units_that_share_a_time_are_matched_as_the_server_times_them(tiny_dir):
    """Issue 14's trial: an RTSP source's first two access units both had time 0.0. The
    server times the second frame 1/fps later and every later frame of that run one frame
    later too, so its sampled frame "at 1.52 s" is the access unit at 1.44 s: the page draws
    that very frame (not the one whose AU_PTS is 1.52 s), and one for every answer."""
    # As the demuxer timed it then: the keyframe had no time and got 0.0; the origin was the
    # next one's, so every later access unit came one frame (0.08 s) early, the second at 0.0.
    chunks = [dataclasses.replace(c, au_pts=tuple(max(0.0, t - 0.08) if (c.index, i) != (0, 0)
                                                  else 0.0 for i, t in enumerate(c.au_pts)))
              for c in itertools.islice(iter_chunks(CLIP, 2.0), 4)]
    assert chunks[0].au_pts[:3] == (0.0, 0.0, 0.08)
    parser = StreamParser(Geometry.from_model_dir(tiny_dir), "h264", 12.5, 2.0,
                          policy="codec")
    seen = []
    worker = ThumbnailWorker(lambda sid, thumb, status: seen.append((thumb, status)),
                             min_interval_s=0)
    worker.set_active(True)
    sampled = []
    for chunk in chunks:
        stats = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts).stats
        sampled.append(stats.kept_masks[-1]["time_s"])
        worker.submit_chunk("cam", "h264", chunk)
        worker.submit_record("cam", record_for(chunk, stats))
    worker.stop()
    thumbs = [t for t, _ in seen if t is not None]
    # The server times every frame after the repeated time one frame (0.08 s) after its
    # AU_PTS, i.e. back at the clip's own times; a thumbnail for every answer.
    assert sampled == [1.52, 3.52, 5.52, 7.52] and [t.time_s for t in thumbs] == sampled
    # Each drawn frame is the one the server took: the clip's own frame at the reported
    # time, whose AU_PTS here says 0.08 s earlier (matching AU_PTS would draw the next one).
    decoded = {}
    ctx = av.CodecContext.create("h264", "r")
    for chunk in itertools.islice(iter_chunks(CLIP, 2.0), 5):
        for data, pts in chunk.access_units():
            packet = av.Packet(data)
            packet.pts = round(pts * 90_000)
            decoded.update({round(f.pts / 90_000, 3): f for f in ctx.decode(packet)})
    whole = P.pack_kept_mask(np.ones(thumbs[0].grid, bool), t=0, time_s=0.0, group_px=28)
    for thumb in thumbs:
        expected = render_thumbnail(decoded[round(thumb.time_s, 3)], whole,
                                    [768, 432], 0, 0, 0.0)
        assert thumb.frame_png == expected.frame_png, thumb.time_s


def test_a_sampled_frame_that_never_comes_out_is_named_on_the_card(tiny_dir):
    """Never wait silently: an answer whose sampled time no decoded frame has (here its
    kept mask is moved 40 ms, between two frames) is reported once later frames come out."""
    parser = StreamParser(Geometry.from_model_dir(tiny_dir), "h264", 12.5, 2.0,
                          policy="codec")
    seen = []
    worker = ThumbnailWorker(lambda sid, thumb, status: seen.append((thumb, status)),
                             min_interval_s=0)
    worker.set_active(True)
    for chunk in itertools.islice(iter_chunks(CLIP, 2.0), 3):
        stats = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts).stats
        if chunk.index == 1:
            masks = [dict(m) for m in stats.kept_masks]
            masks[-1]["time_s"] = round(masks[-1]["time_s"] + 0.04, 3)   # 3.56 s: no frame
            stats = dataclasses.replace(stats, kept_masks=masks)
        worker.submit_chunk("cam", "h264", chunk)
        worker.submit_record("cam", record_for(chunk, stats))
    worker.stop()
    statuses = [status for thumb, status in seen if thumb is None]
    assert any("the frame the server sampled at 3.560 s was not decoded here" in s
               for s in statuses), statuses
    assert [t.time_s for t, _ in seen if t is not None] == [1.52, 5.52]


def test_the_card_says_why_it_has_no_frame_while_a_page_is_open():
    """Trial item 8: never "decoded only while a page is open" while one is; a stream that
    sent nothing says so, and one that ended before a frame was drawn says that."""
    board = start_dashboard("127.0.0.1:0")
    try:
        for sid in ("bogus", "short"):
            board.on_stream(sid, "q", clip_settings())
        board.on_event(StreamEvent("short", "ended", "END sent (the source ended)"))

        def statuses():
            cards = json.loads(get(board.url + "api/streams"))["streams"]
            return {c["stream_id"]: (c["thumbnail"]["status"], c["thumbnail"]["frame_url"])
                    for c in cards}

        assert statuses()["bogus"] == (STATUS_OFF, None)   # no page open: true
        with urllib.request.urlopen(board.url + "events", timeout=10) as events:
            events.readline()
            assert board.wants_chunks
            now = statuses()
            assert now == {"bogus": (STATUS_NO_VIDEO, None), "short": (STATUS_ENDED, None)}
            board.on_event(StreamEvent("bogus", "reconnect", "attempt 2 in 0.8 s"))
            assert statuses()["bogus"] == (STATUS_NO_SOURCE, None)
            board.on_event(StreamEvent("bogus", "ended", "gave up on the source"))
            assert statuses()["bogus"] == (STATUS_ENDED, None)
            board.on_event(StreamEvent("bogus", "connected", "too late"))   # ended stays
            assert statuses()["bogus"] == (STATUS_ENDED, None)
        assert get(board.url + "favicon.ico").startswith(b"<svg")   # no 404 in the console
    finally:
        board.close()


# --- in a real browser, with real answers -----------------------------------------------------

def drive(board, client, stream_id: str, question: str, chunks, pause_s: float, records):
    """One stream as the watcher runs it: on_chunk, the request, on_window."""
    stream = StreamClient(client, stream_id, clip_settings(question=question,
                                                           analysis_fps=2.0))
    board.on_stream(stream_id, question, stream.settings)
    for i, chunk in enumerate(chunks):
        captured = utc_now()
        if board.wants_chunks:
            board.on_chunk(stream_id, chunk)
        window = stream.send(chunk, last=i == len(chunks) - 1)
        record = WindowRecord(
            stream_id=stream_id, question=question, window_start_s=chunk.start_s,
            window_end_s=chunk.end_s, captured_at=captured, answered_at=utc_now(),
            answer=window.answer, request_ms=window.latency_s * 1000, bytes_sent=window.bytes_sent,
            dropped_windows=0, reconnects=0, parse=window.parse, llm=window.llm, chunk=chunk)
        records.append(record)
        board.on_window(record)
        time.sleep(pause_s)   # the page must see answers arrive one by one


def highlighted_share(overlay: np.ndarray, frame: np.ndarray, grid, cell: int) -> float:
    """Share of merge-group cells the overlay tints as kept: each cell's mean colour is
    nearer the kept tint of the plain frame than the dropped shade of it."""
    def blend(rgba):
        alpha = rgba[3] / 255
        return frame * (1 - alpha) + np.array(rgba[:3]) * alpha

    kept, dropped = blend(KEPT_RGBA), blend(DROPPED_RGBA)
    grid_h, grid_w = grid
    hits = 0
    for y, x in itertools.product(range(grid_h), range(grid_w)):
        box = np.s_[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell]
        seen = overlay[box].mean(axis=(0, 1))
        hits += (np.abs(seen - kept[box].mean(axis=(0, 1))).sum()
                 < np.abs(seen - dropped[box].mean(axis=(0, 1))).sum())
    return hits / (grid_h * grid_w)


@pytest.mark.server
def test_the_page_shows_real_answers_and_overlays_that_match_their_parse_stats(server):
    playwright = pytest.importorskip("playwright.sync_api")
    chunks = list(itertools.islice(iter_chunks(CLIP, 2.0), 6))   # 12 s, 2 s per answer
    ids = [new_id("page-cam"), new_id("page-xss")]
    board = start_dashboard("127.0.0.1:0")
    records = {sid: [] for sid in ids}
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(board.url)
            wait_until(page, "window.codecsight !== undefined")
            page.evaluate("window.__sameDocument = true")
            # Open page first (thumbnails are decoded only while one is), then the streams.
            deadline = time.monotonic() + 10
            while not board.wants_chunks and time.monotonic() < deadline:
                time.sleep(0.05)
            assert board.wants_chunks
            threads = [threading.Thread(target=drive, args=(
                board, connect(server.grpc_url), sid, q, chunks, 0.2, records[sid]), daemon=True)
                for sid, q in zip(ids, ["is anyone moving?", XSS_QUESTION])]
            for t in threads:
                t.start()
            # A card per stream, and answers arriving without a reload.
            wait_until(page, "document.querySelectorAll('.card').length == 2")
            wait_until(page, "window.codecsight.latencies.length >= 2", timeout_s=60)
            first = page.evaluate("window.codecsight.latencies.length")
            for t in threads:
                t.join(timeout=120)
            wait_until(page, f"window.codecsight.latencies.length >= {2 * len(chunks)}")
            assert page.evaluate("window.__sameDocument") is True
            assert page.evaluate("window.codecsight.latencies.length") > first
            cards = page.locator(".card")
            assert sorted(cards.evaluate_all("cs => cs.map(c => c.dataset.streamId)")) == \
                sorted(ids)
            for sid in ids:
                card = page.locator(f'.card[data-stream-id="{sid}"]')
                # (the tiny demo model may answer nothing; the page says so)
                assert card.locator(".answer").text_content() == (records[sid][-1].answer
                                                                  or "(empty answer)")
                assert f"{len(chunks)} windows" in card.locator(".answer-time").text_content()

            # The <script> question is text: shown verbatim, never run, no element made.
            xss = page.locator(f'.card[data-stream-id="{ids[1]}"]')
            assert xss.locator(".question").text_content() == XSS_QUESTION
            assert page.evaluate("window.__xss") is None
            assert xss.locator("script, b").count() == 0

            # The overlay: present, and its highlighted share is the frame's kept share.
            wait_until(page,
                       "[...document.querySelectorAll('img.overlay')].every(i => !i.hidden && "
                       "i.complete && i.naturalWidth > 0)")
            api = json.loads(page.request.get(board.url + "api/streams").body())
            for card in api["streams"]:
                thumb = card["thumbnail"]
                overlay = np.asarray(Image.open(io.BytesIO(
                    page.request.get(board.url + thumb["overlay_url"].lstrip("/")).body())),
                    dtype=float)
                frame = np.asarray(Image.open(io.BytesIO(
                    page.request.get(board.url + thumb["frame_url"].lstrip("/")).body())),
                    dtype=float)
                # The frame's share from our own copy of its PARSE_STATS, not the page's.
                record = next(r for r in records[card["stream_id"]]
                              if r.window_end_s == pytest.approx(thumb["window_end_s"]))
                entries = record.parse.kept_masks
                index = next(i for i, e in enumerate(entries) if e["t"] == thumb["t"])
                grid_h, grid_w = entries[index]["grid"]
                expected = record.parse.groups_kept_per_frame[index] / (grid_h * grid_w)
                shown = highlighted_share(overlay, frame, thumb["grid"], thumb["cell_px"])
                assert shown == pytest.approx(expected, abs=1e-9), card["stream_id"]
                assert overlay.shape[:2] == (grid_h * thumb["cell_px"],
                                             grid_w * thumb["cell_px"])
            # Not only whole frames: the codec policy prunes the clip's later frames.
            assert any(c["thumbnail"]["stats_kept_share"] < 1 for c in api["streams"])
            latencies = page.evaluate("window.codecsight.latencies.map(l => l.ms)")
            assert all(ms >= 0 for ms in latencies) and max(latencies) < 30_000
            OBSERVER_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OBSERVER_SCREENSHOT), full_page=True)
            browser.close()
    finally:
        board.close()
    assert OBSERVER_SCREENSHOT.stat().st_size > 10_000


# --- the test: a real watcher replaying the clip in real time, with --dashboard -------

def start_watcher(tmp_path, server, questions: dict[str, str]):
    """codecsight-client watch CONFIG --dashboard 127.0.0.1:0 on the bundled clip, replayed
    in real time; returns (process, page URL)."""
    cameras = "".join(f"\n[[cameras]]\nstream_id = {json.dumps(sid)}\nurl = {json.dumps(CLIP)}"
                      f"\nquestion = {json.dumps(q)}\n" for sid, q in questions.items())
    config = tmp_path / "cameras.toml"
    config.write_text(f"server = {json.dumps(server.grpc_url)}\n[defaults]\n"
                      "replay_realtime = true\nfps = 2.0\nwindow_seconds = 4.0\n"
                      f"stride_seconds = 2.0\n{cameras}")
    return launch_with_page(["watch", str(config), "--dashboard", "127.0.0.1:0",
                             "--token-file", str(tmp_path / "secret")])


def launch_with_page(args: list[str]):
    """codecsight-client ARGS (which include --dashboard); waits up to 60 s for the page URL
    it prints on stderr. Returns (process, page URL, stderr lines so far, still growing)."""
    proc = subprocess.Popen([str(CLIENT), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "operator page at " in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(60):
        proc.kill()
        pytest.fail("the client printed no page URL:\n" + "".join(lines[-20:]))
    url = next(l for l in lines if "operator page at " in l).split("operator page at ")[1]
    return proc, url.strip(), lines


@pytest.mark.server
def test_a_real_time_watcher_serves_the_operator_page(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not CLIENT.exists():
        pytest.fail(f"{CLIENT} is missing: pip install -e . first")
    ids = [new_id("gate"), new_id("yard")]
    questions = dict(zip(ids, ["is anyone moving?", XSS_QUESTION]))
    proc, url, lines = start_watcher(tmp_path, server, questions)
    failed = []   # requests the page made that failed (a favicon 404 was one): none may
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("response", lambda r: r.status >= 400 and failed.append(
                f"{r.status} {r.url}"))
            page.on("console", lambda m: m.type == "error" and failed.append(m.text))
            page.goto(url)
            wait_until(page, "window.codecsight !== undefined")
            page.evaluate("window.__sameDocument = true")
            # A card per stream.
            wait_until(page, "document.querySelectorAll('.card').length == 2")
            assert sorted(page.locator(".card").evaluate_all(
                "cs => cs.map(c => c.dataset.streamId)")) == sorted(ids)
            # A card without a frame (yet) shows why in a box, never a broken image or
            # "decoded only while a page is open" (one is).
            for card in page.locator(".card").all():
                overlay = card.locator("img.overlay")
                if not overlay.evaluate("i => i.complete && i.naturalWidth > 0"):
                    assert not overlay.is_visible()
                    text = card.locator(".placeholder").text_content()
                    assert card.locator(".placeholder").is_visible() and \
                        text.startswith("No frame yet"), text
                    assert "only while a page is open" not in text
            # Answers update without a reload: two answers per stream rendered in one document
            # (the page fetches /api/streams once, at load: a second answer came as an event;
            # 2 s strides, a loaded CI machine answers one in ~1-10 s).
            wait_until(page, "Object.values(window.codecsight.latencies.reduce((n, l) => "
                             "(n[l.stream_id] = (n[l.stream_id] || 0) + 1, n), {}))"
                             ".filter(count => count >= 2).length == 2", timeout_s=60)
            assert page.evaluate("window.__sameDocument") is True
            # The overlay (after the page's decoders met a keyframe: every 4.8 s in the
            # clip) and its highlighted share against the frame's PARSE_STATS kept share.
            wait_until(page, "[...document.querySelectorAll('img.overlay')].length == 2 && "
                             "[...document.querySelectorAll('img.overlay')].every(i => "
                             "!i.hidden && i.complete && i.naturalWidth > 0)", timeout_s=60)
            # Not only whole frames: once the clip's cars move the codec policy prunes (and
            # the README's screenshot shows what that looks like).
            deadline = time.monotonic() + 45
            while True:
                api = json.loads(page.request.get(url + "api/streams").body())
                shares = [c["thumbnail"].get("stats_kept_share") for c in api["streams"]]
                if any(s is not None and s < 0.9 for s in shares):
                    break
                assert time.monotonic() < deadline, f"only whole frames drawn: {shares}"
                time.sleep(0.5)
            for card in api["streams"]:
                thumb = card["thumbnail"]
                images = [np.asarray(Image.open(io.BytesIO(page.request.get(
                    url + thumb[key].lstrip("/")).body())), dtype=float)
                    for key in ("overlay_url", "frame_url")]
                shown = highlighted_share(*images, thumb["grid"], thumb["cell_px"])
                assert shown == pytest.approx(thumb["stats_kept_share"], abs=1e-4), \
                    card["stream_id"]
            # The <script> question is text, not markup, and never ran.
            card = page.locator(f'.card[data-stream-id="{ids[1]}"]')
            assert card.locator(".question").text_content() == XSS_QUESTION
            assert page.evaluate("window.__xss") is None
            assert card.locator("script, b").count() == 0
            wait_until(page, "[...document.querySelectorAll('.plot img')].every("
                             "i => !i.hidden && i.complete && i.naturalWidth > 0)")
            # The README's screenshot (docs/img/dashboard.png is copied from it): frames from
            # 16 s of stream time on, where cars drive through and the codec policy keeps part
            # of each frame (~12 s more; a bounded wait, the checks above are done).
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and not all(
                    (c["thumbnail"].get("time_s") or 0) >= 16 for c in
                    json.loads(page.request.get(url + "api/streams").body())["streams"]):
                time.sleep(0.5)
            time.sleep(0.5)   # the page renders the last event
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert page.locator(".placeholder:visible").count() == 0   # both drew a frame
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)   # the watcher ends every stream with END
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines[-20:])
    assert not failed, failed
    assert SCREENSHOT.stat().st_size > 10_000


# --- issue 14's trial: a live RTSP camera (GStreamer's RTSP server) gets frames too ----------

@pytest.mark.server
def test_a_live_rtsp_camera_gets_a_frame_whose_overlay_matches_its_kept_mask(server, tmp_path):
    """`codecsight-client rtsp://... --live --dashboard` with a page open (an open /events
    stream is what makes the watcher hand chunks over): the card gets the frames the server
    sampled, and each overlay highlights exactly its PARSE_STATS kept share. The trial saw
    none in 25 s: the RTSP source's first two access units shared time 0.0."""
    from rtsp_server import RtspServer

    sid = new_id("rtsp-cam")
    with RtspServer({"/cam": CLIP}) as rtsp:
        proc, url, lines = launch_with_page(
            [rtsp.url("/cam"), "--live", "--url", server.grpc_url,
             "--stream-id", sid, "--fps", "2", "--window-seconds", "4",
             "--stride-seconds", "2", "--dashboard", "127.0.0.1:0",
             "--token-file", str(tmp_path / "secret")])
        try:
            page = urllib.request.urlopen(url + "events", timeout=30)   # the page is open
            # Keyframes every 4.8 s, a 2 s stride, answers in ~1-10 s on a loaded 2-core
            # machine: two drawn frames within 60 s, or the card must say why not.
            deadline, drawn, card = time.monotonic() + 60, {}, None
            while len(drawn) < 2:
                cards = json.loads(get(url + "api/streams"))["streams"]
                card = next((c for c in cards if c["stream_id"] == sid), None)
                thumb = card and card["thumbnail"]
                if thumb and thumb["frame_url"] and thumb["time_s"] not in drawn:
                    images = [np.asarray(Image.open(io.BytesIO(get(
                        url + thumb[key].lstrip("/")))), dtype=float)
                        for key in ("overlay_url", "frame_url")]
                    drawn[thumb["time_s"]] = (highlighted_share(
                        *images, thumb["grid"], thumb["cell_px"]), thumb["stats_kept_share"])
                    assert thumb["kept_groups"] == thumb["stats_kept_groups"]
                    assert "was not decoded here" not in thumb["status"], thumb["status"]
                assert time.monotonic() < deadline, \
                    f"no frame drawn: {card and card['thumbnail']}\n" + "".join(lines[-20:])
                time.sleep(0.5)
            page.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    for time_s, (shown, expected) in drawn.items():
        assert shown == pytest.approx(expected, abs=1e-4), time_s
