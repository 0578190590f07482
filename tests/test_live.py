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
    units = demux.nal_units(data)
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
    assert kinds == ["reconnect", "reconnect", "ended", "ended"], kinds
    assert "gave up" in seen.events[2].message and dead in seen.events[2].message
    # waits 0.2-0.3 s, then 0.4-0.5 s, then three failed opens
    assert 0.6 <= time.monotonic() - t0 < 20
    assert all(e.stream_id == "cam-dead" for e in seen.events)
