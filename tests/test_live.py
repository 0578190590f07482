"""The watcher on real live sources: a GStreamer RTSP server (tests/rtsp_server.py), a real
tritonserver (conftest's `server`), real H.264 from libx264.

Unit tests first (merging, the queue, live-source demuxing), then one recorded run of
`codecsight-client watch` over two RTSP cameras and a dead one, whose source is restarted
and which SIGTERM stops; the tests after it read that run. Overload last.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from codecsight.tools.synth import encode_h264, moving_boxes
from codecsight_client import demux
from codecsight_client.demux import iter_chunks, nal_unit_types, picture_size
from codecsight_client.live import (Backoff, Camera, ChunkQueue, Pending, Watcher,
                                    merge_chunks)
from codecsight_client.observe import Observer, Observers
from codecsight_client.stream import StreamSettings
from rtsp_server import RtspServer, free_port


def make_clip(path: Path, seconds: float, size=(192, 112), fps: int = 10, gop: int = 10,
              seed: int = 0) -> Path:
    """An MP4 of moving boxes, an IDR every gop frames (1 s: quick restarts)."""
    frames, _ = moving_boxes(int(seconds * fps), *size, seed=seed)
    return encode_h264(frames, fps, gop=gop, path=path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "boxes.mp4", 6.0)


def decode(data: bytes) -> list:
    """Frames a fresh decoder gets from Annex-B data: (pict_type, width, height)."""
    ctx = av.CodecContext.create("h264", "r")
    frames = []
    for packet in ctx.parse(data) + ctx.parse(None):
        frames += ctx.decode(packet)
    frames += ctx.decode(None)
    return [("?IPB"[int(f.pict_type)], f.width, f.height) for f in frames]


# -- merging stale chunks -----------------------------------------------------------------

def test_a_merged_chunk_decodes_to_both_chunks_frames_at_their_own_times(clip):
    first, second = list(iter_chunks(str(clip), 0.5))[1:3]   # 1.0 s: mid-GOP
    merged = merge_chunks(first, second)
    assert merged.au_pts == first.au_pts + second.au_pts      # AU_PTS per access unit
    assert (merged.start_s, merged.end_s) == (first.start_s, second.end_s)
    assert merged.index == first.index and not merged.starts_with_keyframe
    assert merged.data == first.data + second.data            # every byte still sent
    # after the chunk before them, a decoder gets every frame of the two (1 s at 10 fps)
    assert len(decode(list(iter_chunks(str(clip), 0.5))[0].data + merged.data)) == 15


def test_a_merged_chunk_longer_than_the_window_starts_at_a_keyframe(clip):
    chunks = list(iter_chunks(str(clip), 0.5))[:9]            # 0.0-4.5 s, IDR every 1 s
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merge_chunks(merged, chunk, keep_s=2.0)
    # Frames before 2.5 s would leave a 2 s window at once: cut at the last IDR before, 2 s.
    assert merged.start_s == pytest.approx(2.0) and merged.end_s == pytest.approx(4.5)
    assert merged.starts_with_keyframe and nal_unit_types(merged.data)[0] == 7
    frames = decode(merged.data)                              # a fresh decoder starts there
    assert len(frames) == 25 and frames[0][0] == "I"


def pending(chunk, session=1, restart=None, captured=None):
    return Pending(chunk, captured or dt.datetime.now(dt.timezone.utc), session,
                   StreamSettings(), restart=restart)


def test_the_queue_merges_its_oldest_chunks_and_counts_each_merge_as_a_drop(clip):
    chunks = list(iter_chunks(str(clip), 0.5))[:5]
    queue = ChunkQueue(2, merge=True)
    stamps = [dt.datetime(2026, 1, 1, 0, 0, i, tzinfo=dt.timezone.utc) for i in range(5)]
    dropped = [queue.put(pending(c, captured=t)) for c, t in zip(chunks, stamps)]
    assert dropped == [0, 0, 1, 1, 1] and len(queue) == 2
    oldest, newest = queue.get(), queue.get()
    # chunks 0-3 in one request, answered once, as fresh as its newest video
    assert oldest.merged == 3 and oldest.chunk.au_pts == sum((c.au_pts for c in chunks[:4]), ())
    assert oldest.captured_at == stamps[3]
    assert newest.chunk == chunks[4] and newest.merged == 0


def test_the_queue_never_merges_video_across_a_restart(clip):
    chunks = list(iter_chunks(str(clip), 0.5))[:3]
    queue = ChunkQueue(1, merge=True)
    queue.put(pending(chunks[0], session=1))
    assert queue.put(pending(chunks[2], session=2, restart="connected")) == 1
    only = queue.get()
    # the old connection's unsent video is dropped, not glued to the new sequence's START
    assert only.session == 2 and only.chunk == chunks[2] and only.merged == 1


def test_an_unpaced_file_waits_for_room_instead_of_dropping(clip):
    chunks = list(iter_chunks(str(clip), 0.5))[:3]
    queue = ChunkQueue(1, merge=False)
    queue.put(pending(chunks[0]))
    done = threading.Event()
    threading.Thread(target=lambda: (queue.put(pending(chunks[1])), done.set())).start()
    assert not done.wait(0.3)                 # full: the reader waits
    assert queue.get().chunk == chunks[0]
    assert done.wait(5) and queue.get().chunk == chunks[1]


# -- live-source demuxing -----------------------------------------------------------------

def annexb(seconds: float, size, fps=10, gop=10, seed=0) -> bytes:
    frames, _ = moving_boxes(int(seconds * fps), *size, seed=seed)
    return encode_h264(frames, fps, gop=gop)


def test_a_stream_joined_mid_gop_starts_at_its_first_keyframe(tmp_path):
    data = annexb(2.0, (96, 64))
    units = list(demux.nal_units(data))
    slices = [offset for offset, kind in units if kind in (1, 5)]
    path = tmp_path / "joined.h264"
    path.write_bytes(data[slices[3]:])          # a camera joined at its 4th frame
    told = []
    chunks = list(iter_chunks(str(path), 0.5, from_keyframe=True, notice=told.append))
    assert chunks[0].starts_with_keyframe and nal_unit_types(chunks[0].data)[:2] == [7, 8]
    assert sum(c.packets for c in chunks) == 10            # the second GOP, whole
    assert len(told) == 1 and "dropped the 7 packet(s) before the first keyframe" in told[0]
    assert decode(b"".join(c.data for c in chunks))[0][0] == "I"


def test_a_picture_size_change_starts_a_new_chunk_at_its_keyframe(tmp_path):
    path = tmp_path / "resized.h264"
    path.write_bytes(annexb(1.5, (96, 64)) + annexb(1.0, (128, 80), seed=1))
    chunks = list(iter_chunks(str(path), 1.0))
    changed = [c for c in chunks if c.resolution_change]
    assert len(changed) == 1 and changed[0].picture_size == (128, 80)
    assert changed[0].starts_with_keyframe and changed[0].start_s == pytest.approx(1.5)
    assert chunks[0].picture_size == (96, 64) and not chunks[0].resolution_change
    assert picture_size(changed[0].data) == (128, 80)


def test_picture_size_reads_the_sps_cropping_included():
    assert picture_size(annexb(0.1, (100, 58), gop=1)) == (100, 58)   # coded 112x64
    assert picture_size(b"\x00\x00\x00\x01\x41\x9a") is None          # a P slice, no SPS


def test_a_keyframe_is_found_behind_repeated_parameter_sets_and_sei():
    """As GStreamer's h264parse sends it over RTSP: SPS PPS SEI SPS PPS IDR."""
    data = annexb(0.3, (96, 64), gop=10)
    units = list(demux.nal_units(data))
    offsets = [o for o, _ in units] + [len(data)]
    kinds = [k for _, k in units]
    idr_au = data[:offsets[kinds.index(5) + 1]]
    p_au = data[offsets[kinds.index(1)]:offsets[kinds.index(1) + 1]]
    sets = data[:offsets[2]]                                   # SPS PPS
    assert demux.is_keyframe_unit(sets + idr_au)
    assert not demux.is_keyframe_unit(p_au) and not demux.is_keyframe_unit(sets)


def test_timestamps_that_wrap_their_33_bit_clock_keep_increasing(tmp_path):
    """MPEG-TS pts start 1 s before 2**33 ticks of 90 kHz and wrap to 0 mid-stream."""
    frames, _ = moving_boxes(30, 96, 64, seed=0)
    path = tmp_path / "wrap.ts"
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.time_base = Fraction(1, 90000)
        stream.options = {"g": "10", "bf": "0"}
        start = 2 ** 33 - 90000
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = start + i * 9000, Fraction(1, 90000)  # 33-bit on disk
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    told = []
    pts = [t for c in iter_chunks(str(path), 0.5, notice=told.append) for t in c.au_pts]
    assert pts == pytest.approx([i / 10 for i in range(30)]) and told == []


def test_a_wrap_the_demuxer_left_in_is_undone_exactly():
    tick = Fraction(1, 90000)
    timeline = demux._Timeline("rtsp://cam/1", None, 1.5, pytest.fail, 0.0,
                               (Fraction(2 ** 32) * tick,))
    last = Fraction(2 ** 32 - 9000) * tick             # 0.1 s before the 32-bit RTP wrap
    timeline.place(last - Fraction(1, 10), Fraction(1, 10))
    before = timeline.place(last, Fraction(1, 10))
    after = timeline.place(Fraction(0), Fraction(1, 10))
    assert after[0] - before[0] == pytest.approx(0.1) and after[2] == 0.0


def test_a_live_source_first_packets_without_pts_are_timed_on_from_zero(clip):
    with RtspServer({"/cam": clip}) as rtsp:   # its first packet has pts=None (RUNBOOK)
        chunks = list(iter_chunks(rtsp.url("/cam"), 1.0, from_keyframe=True, timeout=10))
    pts = [t for c in chunks for t in c.au_pts]
    assert len(pts) == 60 and pts == pytest.approx([i / 10 for i in range(60)], abs=0.02)
    assert chunks[0].starts_with_keyframe and chunks[0].picture_size == (192, 112)


def test_an_rtsp_sources_untimed_first_keyframe_does_not_share_time_0_with_the_next():
    """The bundled clip over RTSP: its first packet has no pts and the stream's start_time
    is the second packet's, which made both 0.0 s: 26 access units in the first 2 s and a
    fifth frame sampled in the plain client's first window (trial item 14)."""
    from streams import CLIP

    with RtspServer({"/cam": Path(CLIP)}) as rtsp:
        first = next(iter_chunks(rtsp.url("/cam"), 2.0, timeout=10))
    # 12.5 fps: 25 access units 0.08 s apart, from 0.0 s
    assert first.au_pts == pytest.approx([i * 0.08 for i in range(25)], abs=0.005)


# -- the reader alone (no server): pacing and restarts ------------------------------------

def read_only(camera: Camera, **options) -> tuple:
    """A camera's reader thread alone: (its queue, its events), the sender never started."""
    from codecsight_client.live import CameraWatcher

    seen = Recorder()
    watcher = CameraWatcher(camera, None, seen, token="t", stop=threading.Event(), **options)
    watcher._threads[0].start()
    return watcher.queue, seen


def test_replay_realtime_paces_a_file_like_a_camera(clip):
    queue, _ = read_only(Camera("paced", str(clip), stride_seconds=1.0, replay_realtime=True))
    arrived = []
    while (item := queue.get()) is not None:
        arrived.append((time.monotonic(), item.chunk))
    # each chunk once its last frame's time has passed: 1 s apart, the 6 s clip in ~6 s
    gaps = np.diff([t for t, _ in arrived])
    assert len(arrived) == 6 and np.median(gaps) == pytest.approx(1.0, abs=0.25)
    assert arrived[-1][0] - arrived[0][0] == pytest.approx(5.0, abs=1.0)


def test_a_new_picture_size_restarts_the_stream_at_its_keyframe(tmp_path):
    path = tmp_path / "resized.h264"
    path.write_bytes(annexb(2.0, (96, 64)) + annexb(2.0, (128, 80), seed=1))
    queue, seen = read_only(Camera("resized", str(path), stride_seconds=1.0))
    items = []
    while (item := queue.get()) is not None:
        items.append(item)
    assert [i.restart for i in items] == ["connected", None, "resolution_change", None]
    assert items[2].chunk.picture_size == (128, 80) and items[2].chunk.starts_with_keyframe
    changes = [e for e in seen.events if e.kind == "resolution_change"]
    assert len(changes) == 1 and "128x80" in changes[0].message


def test_a_stalled_camera_is_lost_after_its_read_timeout_and_reopened(tmp_path):
    """The RTSP server paused (SIGSTOP): its connection stays open but no packet comes."""
    clip = make_clip(tmp_path / "long.mp4", 30.0)
    with RtspServer({"/c": clip}) as rtsp:
        queue, seen = read_only(Camera("stalled", rtsp.url("/c"), stride_seconds=1.0),
                                source_timeout_s=(2.0, 1.0))
        sessions = []
        threading.Thread(target=lambda: [sessions.append(i.session) for i in iter(
            queue.get, None)], daemon=True).start()
        deadline = time.monotonic() + 20
        while not sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        rtsp.process.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        time.sleep(4.0)
        lost = [e for e in seen.events if e.kind == "source_lost"]
        rtsp.process.send_signal(signal.SIGCONT)
        while max(sessions) == 1 and time.monotonic() < paused + 30:
            time.sleep(0.1)
    # nothing hangs: lost within the timeouts (open 2 s, read 1 s), then reopened
    assert len(lost) == 1 and "stalled" == lost[0].stream_id
    assert max(sessions) > 1, [e.line() for e in seen.events]   # a later connection's video
    assert [e.kind for e in seen.events].count("connected") >= 2


# -- a bad camera -------------------------------------------------------------------------

class Recorder(Observer):
    def __init__(self):
        self.events, self.windows = [], []

    def on_event(self, event):
        self.events.append(event)

    def on_window(self, record):
        self.windows.append(record)


def test_an_unreachable_camera_retries_with_backoff_and_gives_up_when_told():
    dead = f"rtsp://127.0.0.1:{free_port()}/nothing"
    seen = Recorder()
    watcher = Watcher(None, [Camera("cam-dead", dead, max_attempts=3)], Observers([seen]),
                      tokens={"cam-dead": "t"}, backoff=Backoff(0.2, 1.0, 0.1))
    t0 = time.monotonic()
    assert watcher.start().wait(30)
    kinds = [e.kind for e in seen.events]
    assert kinds == ["reconnect", "reconnect", "ended"], kinds     # one `ended` per camera
    assert "gave up" in seen.events[2].message and dead in seen.events[2].message
    # attempts are told apart from reconnects that worked
    assert "0 successful reconnect(s) in 2 reconnect attempt(s)" in seen.events[2].message
    # waits 0.2-0.3 s, then 0.4-0.5 s, then three failed opens
    assert 0.6 <= time.monotonic() - t0 < 20
    assert all(e.stream_id == "cam-dead" for e in seen.events)


def test_a_cameras_password_is_never_printed(capsys):
    from codecsight_client.live import EventPrinter

    dead = f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/nothing"
    seen = Recorder()
    watcher = Watcher(None, [Camera("cam-secret", dead, max_attempts=2)],
                      Observers([seen, EventPrinter()]), tokens={"cam-secret": "t"},
                      backoff=Backoff(0.1, 0.2, 0.0))
    assert watcher.start().wait(30)
    printed = capsys.readouterr().err
    assert [e.kind for e in seen.events] == ["reconnect", "ended"]
    assert "hunter2" not in printed and "admin" not in printed
    assert printed.count(f"rtsp://***@127.0.0.1:") >= 2     # the URL named, masked
    assert all("hunter2" not in e.message for e in seen.events)


def test_a_file_that_is_not_video_ends_its_camera_at_once(tmp_path):
    from codecsight_client.live import CameraWatcher

    bogus = tmp_path / "cams.toml"
    bogus.write_text("not video\n" * 100)
    seen = Recorder()
    watcher = CameraWatcher(Camera("bogus", str(bogus), replay_realtime=True), None, seen,
                            token="t", stop=threading.Event())
    reader = watcher._threads[0]
    reader.start()
    reader.join(20)   # retried (the old behaviour), it would never end
    assert not reader.is_alive() and watcher.queue.get() is None
    # a file does not come back: no reconnect; the reason is kept for the one `ended` event
    assert [e.kind for e in seen.events] == []
    assert "a file is not reopened" in watcher.gave_up and str(bogus) in watcher.gave_up


def test_watch_ends_a_bad_file_camera_and_goes_on_with_the_others(server, clip, tmp_path):
    (tmp_path / "notes.mp4").write_text("not video\n" * 100)
    config = tmp_path / "cams.toml"
    config.write_text(f'[defaults]\nwindow_seconds = 4\nstride_seconds = 2\n'
                      f'[[cameras]]\nstream_id = "good"\nurl = "{clip}"\n'
                      f'[[cameras]]\nstream_id = "bad"\nurl = "notes.mp4"\n')
    run = subprocess.run([sys.executable, "-m", "codecsight_client.cli", "watch", str(config),
                          "--jsonl", "--url", server.grpc_url,
                          "--token-file", str(tmp_path / "secret")],
                         capture_output=True, text=True, timeout=120)
    windows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [w["stream_id"] for w in windows] == ["good"] * 3, run.stderr   # the 6 s clip
    bad = [line for line in run.stderr.splitlines() if " bad " in line]
    assert len(bad) == 1 and " bad ended: " in bad[0] and "not reopened" in bad[0], bad
    assert run.returncode == 1 and "gave up on camera(s) bad" in run.stderr


def test_an_unreachable_server_is_named_in_its_event(clip):
    from codecsight_client.stream import connect

    address = f"127.0.0.1:{free_port()}"
    seen = Recorder()
    watcher = Watcher(connect(address), [Camera("cam-far", str(clip), stride_seconds=3.0)],
                      Observers([seen]), tokens={"cam-far": "t"}, request_timeout_s=1.0,
                      server=address).start()
    assert watcher.wait(60)
    errors = [e.message for e in seen.events if e.kind == "server_error"]
    assert errors and f"server {address} unreachable" in errors[0], errors


def test_a_live_url_without_live_is_followed_as_a_camera(tmp_path):
    """codecsight-client rtsp://... (no --live) reconnects and reports, never a silent exit."""
    dead = f"rtsp://127.0.0.1:{free_port()}/cam"
    proc = subprocess.Popen([sys.executable, "-m", "codecsight_client.cli", dead,
                             "--url", f"127.0.0.1:{free_port()}",
                             "--token-file", str(tmp_path / "secret")],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:        # the watcher's events: it retries the camera
        lines.append(line)
        if " reconnect: attempt 3 " in line:
            break
    proc.send_signal(signal.SIGTERM)
    lines += proc.stderr.readlines()
    assert proc.wait(60) == 0, lines
    assert any(" reconnect: attempt 2 " in line for line in lines), lines
    assert any(" ended: " in line and "stopped" in line for line in lines), lines


def test_jsonl_or_dashboard_on_a_file_without_real_time_pacing_is_refused(clip):
    for flag in (["--jsonl"], ["--dashboard", "127.0.0.1:0"]):
        run = subprocess.run([sys.executable, "-m", "codecsight_client.cli", str(clip), *flag],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and run.stdout == ""
        assert "add --replay-realtime" in run.stderr, run.stderr


# -- a recorded run: codecsight-client watch over live RTSP cameras -----------------------

STRIDE_S = 1.0     # the cameras' stride: answers are due about one second apart
DOWN_S = 3.0       # how long camera A's RTSP server is down


def active_streams(server) -> int:
    """codecsight_active_streams of llm_prefill (it holds a stream until its END)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    match = re.search(r'^codecsight_active_streams\{model="llm_prefill"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


class WatchRun:
    """codecsight-client watch as a subprocess; its stdout lines and stderr lines as they
    come, each with the monotonic time it was read."""

    def __init__(self, args):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "codecsight_client.cli", "watch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout, self.stderr = [], []
        self._threads = [threading.Thread(target=self._pump, args=(f, lines), daemon=True)
                         for f, lines in ((self.process.stdout, self.stdout),
                                          (self.process.stderr, self.stderr))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(pipe, lines):
        for line in pipe:
            lines.append((time.monotonic(), line.rstrip("\n")))

    def windows(self, stream_id=None) -> list[dict]:
        records = [json.loads(line) for _, line in self.stdout]
        return [r for r in records if stream_id in (None, r["stream_id"])]

    def events(self, stream_id, kind=None) -> list[str]:
        pattern = re.compile(rf"^codecsight-client: \S+ {re.escape(stream_id)} (\w+): ")
        return [line for _, line in self.stderr
                if (m := pattern.match(line)) and kind in (None, m.group(1))]

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}; stderr:\n" +
                                     "\n".join(line for _, line in self.stderr[-30:]))
            time.sleep(0.1)

    def stop(self, signum) -> float:
        self.process.send_signal(signum)
        self.process.wait(120)
        for t in self._threads:
            t.join(10)
        return time.monotonic()


@dataclasses.dataclass
class Recorded:
    run: WatchRun
    returncode: int
    active_before: int
    active_during: int
    active_after: int
    restarted_at: float       # monotonic: camera A's RTSP server listening again


@pytest.fixture(scope="module")
def recorded(server, tmp_path_factory):
    """Two live cameras (each on its own RTSP server process) and one that never answers,
    watched from one config; camera A's server is killed for DOWN_S seconds and restarted
    mid-run; then SIGTERM. ~30 s."""
    tmp = tmp_path_factory.mktemp("watch")
    clip_a = make_clip(tmp / "a.mp4", 40.0, seed=1)
    clip_b = make_clip(tmp / "b.mp4", 40.0, seed=2)
    with RtspServer({"/a": clip_a}) as rtsp_a, RtspServer({"/b": clip_b}) as rtsp_b:
        config = tmp / "cams.toml"
        config.write_text(textwrap_config(rtsp_a.url("/a"), rtsp_b.url("/b"),
                                          f"rtsp://127.0.0.1:{free_port()}/none"))
        before = active_streams(server)
        run = WatchRun([str(config), "--jsonl", "--url", server.grpc_url,
                        "--token-file", str(tmp / "secret")])
        run.wait_for(lambda: len(run.windows("cam-a")) >= 3 and len(run.windows("cam-b")) >= 3,
                     90, "three windows from each camera")
        during = active_streams(server)
        rtsp_a.stop()
        time.sleep(DOWN_S)
        rtsp_a.start()
        restarted = time.monotonic()
        run.wait_for(lambda: sum(w["reconnects"] == 1 for w in run.windows("cam-a")) >= 3,
                     90, "three windows from camera A after its reconnect")
        run.stop(signal.SIGTERM)
        after = active_streams(server)
    return Recorded(run, run.process.returncode, before, during, after, restarted)


def textwrap_config(url_a: str, url_b: str, url_dead: str) -> str:
    return f"""
[defaults]
question = "how many objects are moving?"
fps = 2
window_seconds = 4
stride_seconds = {STRIDE_S}

[[cameras]]
stream_id = "cam-a"
url = "{url_a}"

[[cameras]]
stream_id = "cam-b"
url = "{url_b}"
policy = "dense"

[[cameras]]
stream_id = "cam-dead"
url = "{url_dead}"
"""


def stamp(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def test_two_live_cameras_each_answer_every_window_about_a_stride_after_capture(recorded):
    for sid in ("cam-a", "cam-b"):
        windows = recorded.run.windows(sid)
        first_session = [w for w in windows if w["reconnects"] == 0]
        # every stride of video answered, in order, none merged away
        starts = [w["window_start_s"] for w in first_session]
        assert starts == pytest.approx([i * STRIDE_S for i in range(len(starts))]), sid
        assert all(w["answer"] and w["dropped_windows"] == 0 for w in windows), sid
        # Real-time pace: the source delivers a stride per stride of wall time, and the
        # answers follow it; bounds are generous for a loaded 2-core CI machine.
        captured = np.diff([stamp(w["captured_at"]) for w in first_session])
        answered = np.diff([stamp(w["answered_at"]) for w in first_session])
        assert 0.8 * STRIDE_S < np.median(captured) < 1.2 * STRIDE_S, (sid, captured)
        assert 0.5 * STRIDE_S < np.median(answered) < 1.5 * STRIDE_S, (sid, answered)
        latency = [w["latency_ms"] for w in windows]
        # Capture to answer: the request itself, plus at most the queue's depth of requests
        # ahead of it (settings.QUEUE_DEPTH = 2) and the one in flight.
        slowest = max(w["request_ms"] for w in windows)
        assert max(latency) <= 3 * slowest + 500, (sid, latency)


def test_json_lines_carry_every_documented_key_and_stdout_nothing_else(recorded):
    keys = {"stream_id", "window_start_s", "window_end_s", "captured_at", "answered_at",
            "answer", "latency_ms", "patches_kept_share", "tokens_prefilled",
            "dropped_windows", "reconnects"}
    windows = recorded.run.windows()       # every stdout line parsed as JSON
    assert windows and all(keys <= set(w) for w in windows)
    w = windows[0]
    assert w["window_end_s"] > w["window_start_s"] and 0 < w["patches_kept_share"] <= 1
    assert stamp(w["answered_at"]) - stamp(w["captured_at"]) == pytest.approx(
        w["latency_ms"] / 1000, abs=0.002)


def test_a_restarted_source_reconnects_and_its_stream_restarts_from_a_keyframe(recorded):
    run = recorded.run
    kinds = [re.match(r"^\S+ \S+ \S+ (\w+)", line).group(1) for line in run.events("cam-a")]
    # lost, retried with backoff while down, connected again, restarted with START
    assert kinds[0] == "connected" and "source_lost" in kinds and "reconnect" in kinds
    after_loss = kinds[kinds.index("source_lost"):]
    assert after_loss.index("connected") < after_loss.index("keyframe_restart")
    assert any("first keyframe at stream time" in line for line in run.events("cam-a", "connected"))
    windows = run.windows("cam-a")
    resumed = [w for w in windows if w["reconnects"] == 1]
    before = [w for w in windows if w["reconnects"] == 0]
    # stream time keeps increasing across the restart; answers go on
    assert resumed[0]["window_start_s"] >= before[-1]["window_end_s"] - 1e-3
    assert all(w["answer"] for w in resumed)
    # the first answer after the source came back: within the backoff's cap (10 s), the
    # open (~1 s) and one stride; 20 s on a loaded machine
    first = min(t for t, line in run.stdout if '"cam-a"' in line and '"reconnects": 1' in line)
    assert first - recorded.restarted_at < 20


def test_the_other_cameras_are_unaffected_by_a_lost_or_dead_one(recorded):
    run = recorded.run
    b = run.windows("cam-b")
    assert all(w["reconnects"] == 0 for w in b)
    # camera B's video is answered without a gap across camera A's outage
    starts = [w["window_start_s"] for w in b]
    assert starts == pytest.approx([i * STRIDE_S for i in range(len(starts))])
    assert run.events("cam-b")[0] == run.events("cam-b", "connected")[0]
    assert not run.events("cam-b", "source_lost") and not run.events("cam-b", "server_error")
    # the dead camera retries for ever, with growing waits, naming itself and the cause
    dead = run.events("cam-dead", "reconnect")
    assert len(dead) >= 3 and "Connection refused" in dead[0]
    waits = [float(re.search(r" in ([\d.]+) s", line).group(1)) for line in dead]
    assert waits[2] > waits[0] and max(waits) <= 10.0 + 1e-9
    assert not run.windows("cam-dead")


def test_sigterm_ends_every_stream_with_end_and_exits_0(recorded):
    run = recorded.run
    assert recorded.returncode == 0, "\n".join(line for _, line in run.stderr[-20:])
    assert any("ending every stream with END" in line for _, line in run.stderr)
    for sid in ("cam-a", "cam-b", "cam-dead"):
        ended = run.events(sid, "ended")
        assert len(ended) == 1 and "stopped" in ended[0], sid
    # The server held both live streams while watched, and none of them once the client
    # exited: END frees their state at once (no TTL wait).
    assert recorded.active_during == recorded.active_before + 2
    assert recorded.active_after == recorded.active_before


def test_one_file_replayed_in_real_time_answers_each_stride_and_exits_0(server, clip,
                                                                        tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "codecsight_client.cli", str(clip), "--replay-realtime",
         "--jsonl", "--url", server.grpc_url, "--stream-id", "replayed", "--stride-seconds",
         "2", "--window-seconds", "4", "--token-file", str(tmp_path / "secret")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    windows = [json.loads(line) for line in run.stdout.splitlines()]   # JSON lines only
    assert [(w["window_start_s"], w["window_end_s"]) for w in windows] == [
        (0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    # paced at the clip's own rate: its 6 s of video captured over ~4 s of wall time (the
    # first chunk is complete 2 s after the start)
    captured = [stamp(w["captured_at"]) for w in windows]
    assert captured[2] - captured[0] == pytest.approx(4.0, abs=0.8)
    assert "replayed ended: END sent (the source ended)" in run.stderr


def test_the_server_answers_a_merged_request_as_the_strides_it_replaces(grpc, clip):
    """Two strides merged into one request sample the same frames and leave the window
    where the two requests would have; one answer instead of two."""
    from codecsight_client.stream import StreamClient
    from streams import clip_settings, new_id

    chunks = list(iter_chunks(str(clip), 0.5))[:4]
    settings = clip_settings(str(clip), analysis_fps=4.0, window_seconds=2.0, policy="dense")
    apart = StreamClient(grpc, new_id("apart"), settings)
    merged = StreamClient(grpc, new_id("merged"), settings)
    answers = [apart.send(c) for c in chunks[:3]] + [apart.send(chunks[3], last=True)]
    first = merged.send(chunks[0])
    both = merged.send(merge_chunks(chunks[1], chunks[2], keep_s=2.0))
    last = merged.send(chunks[3], last=True)
    assert both.parse.frames_sampled == sum(a.parse.frames_sampled for a in answers[1:3]) == 4
    assert both.llm.window_frame_range == answers[2].llm.window_frame_range
    assert last.llm.window_frame_range == answers[3].llm.window_frame_range
    assert first.answer and both.answer and last.answer


# -- overload -----------------------------------------------------------------------------

def test_an_overloaded_server_gets_merged_windows_counted_and_bounded_latency(
        server, tmp_path):
    """Three cameras asking for ten requests a second each, every frame analysed by the
    dense policy and the whole window re-prefilled (refresh full): more than a CPU server
    answers in real time, so windows must be dropped, not queued. ~25 s."""
    from codecsight_client import settings as defaults
    from codecsight_client.stream import connect

    clip = make_clip(tmp_path / "busy.mp4", 20.0)      # an IDR every 1 s
    window_s, stride_s, gop_s = 2.0, 0.1, 1.0
    seen = Recorder()
    with RtspServer({f"/c{i}": clip for i in range(3)}) as rtsp:
        cameras = [Camera(f"over-{i}", rtsp.url(f"/c{i}"), policy="dense", refresh="full",
                          analysis_fps=10, window_seconds=window_s, stride_seconds=stride_s)
                   for i in range(3)]
        watcher = Watcher(connect(server.grpc_url), cameras, Observers([seen]),
                          tokens={c.stream_id: "t" for c in cameras}).start()
        time.sleep(10)
        watcher.stop()
        assert watcher.wait(180)
    drops = [e for e in seen.events if e.kind == "drop"]
    assert drops and all(e.stream_id.startswith("over-") for e in drops)
    for camera in cameras:
        windows = [w for w in seen.windows if w.stream_id == camera.stream_id]
        assert windows, camera.stream_id
        counts = [w.dropped_windows for w in windows]
        assert counts == sorted(counts)                     # running counts
        told = {int(re.search(r"; (\d+) dropped so far", e.message).group(1))
                for e in drops if e.stream_id == camera.stream_id}
        for w, before in zip(windows, [0] + counts):
            if w.dropped_windows > before:
                # a merged request: its drop was reported, and it carries the dropped
                # strides' video, but never much more than a window (cut at a keyframe)
                assert w.dropped_windows in told
                assert 1.5 * stride_s < w.window_end_s - w.window_start_s \
                    <= window_s + gop_s + stride_s + 1e-6
        # Latency stays bounded: a chunk waits at most for the queue ahead of it and the
        # request in flight, then its own request; 1 s for threads on a loaded machine.
        slowest = max(w.request_ms for w in windows)
        assert max(w.latency_ms for w in windows) <= \
            (defaults.QUEUE_DEPTH + 1) * slowest + 1000, camera.stream_id
