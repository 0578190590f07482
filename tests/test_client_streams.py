"""The client on real camera streams: true timestamps, discontinuities, tracks, rotation,
owner tokens and chunk numbers. Each test builds its input with PyAV/libx264."""
import dataclasses
import json
import signal
import stat
import subprocess
import sys
import time
import uuid
from fractions import Fraction

import av
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from codecsight import protocol as P
from streams import CLIP as CAR
from codecsight.tools.synth import encode_h264, moving_boxes
from codecsight_client.demux import (display_rotation, iter_chunks, nal_units, probe,
                                     select_video_stream)
from codecsight_client.stream import (StreamClient, StreamRefused, StreamSettings,
                                      client_secret, stream_token)


def mux_timed(path, times_s, size=(96, 64), offset_s=0.0, gop=10, rotation=None,
              thumbnail=None):
    """Encode frames shown at times_s (s) into path with exact millisecond timestamps.

    offset_s shifts every timestamp; rotation calls set_display_rotation (FFmpeg: degrees
    counterclockwise); thumbnail=(w, h) adds a one-frame video track before the camera's.
    """
    w, h = size
    frames, _ = moving_boxes(len(times_s), w, h, seed=0)
    ms = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        thumb = None
        if thumbnail:
            thumb = out.add_stream("libx264", rate=1)
            thumb.width, thumb.height, thumb.pix_fmt = *thumbnail, "yuv420p"
        cam = out.add_stream("libx264", rate=None)
        cam.width, cam.height, cam.pix_fmt, cam.time_base = w, h, "yuv420p", ms
        cam.codec_context.time_base = ms
        cam.options = {"g": str(gop), "bf": "0", "sc_threshold": "0"}
        if rotation is not None:
            cam.set_display_rotation(rotation)
        if thumb is not None:
            small = av.VideoFrame.from_ndarray(
                np.zeros((thumbnail[1], thumbnail[0], 3), np.uint8), format="rgb24")
            small.pts = 0
            out.mux(thumb.encode(small) + thumb.encode())
        for frame, t in zip(frames, times_s):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = round((t + offset_s) * 1000), ms
            out.mux(cam.encode(vf))
        out.mux(cam.encode())
    return path


def every_pts(chunks):
    return [t for c in chunks for t in c.au_pts]


# -- timestamps ---------------------------------------------------------------------------

def test_a_gap_with_no_frames_keeps_its_length(tmp_path):
    # 10 fps for 4 s, no frame for 20 s, 10 fps for 4 s
    times = [i / 10 for i in range(40)] + [24 + i / 10 for i in range(40)]
    chunks = list(iter_chunks(str(mux_timed(tmp_path / "gap.mp4", times)), 2.0))
    assert every_pts(chunks) == pytest.approx(times)
    assert all(c.time_jump_s == 0 for c in chunks)   # MP4: a real gap, not a discontinuity
    assert [c.start_s for c in chunks] == pytest.approx([0, 2, 24, 26])


def test_a_frame_rate_change_is_timed_frame_by_frame(tmp_path):
    # 2 fps for 10 s, then 10 fps for 6 s
    times = [i / 2 for i in range(20)] + [10 + i / 10 for i in range(60)]
    chunks = list(iter_chunks(str(mux_timed(tmp_path / "vfr.mkv", times)), 2.0))
    assert every_pts(chunks) == pytest.approx(times)
    # cut by time: 4 frames per 2 s, then 20
    assert [c.packets for c in chunks] == [4] * 5 + [20] * 3


def test_a_raw_stream_joined_mid_gop_is_timed_by_its_sps(tmp_path):
    frames, _ = moving_boxes(40, 96, 64, seed=0)
    data = encode_h264(frames, 10, gop=20)
    slices = [off for off, t in nal_units(data) if t in (1, 5)]
    path = tmp_path / "joined.h264"
    path.write_bytes(data[slices[5]:])   # from the 6th frame: no SPS until the next IDR
    pts = every_pts(iter_chunks(str(path), 1.0))
    # FFmpeg's raw demuxer times packets before the SPS at 25 fps (0.04 s)
    assert np.diff(pts) == pytest.approx([0.1] * (len(pts) - 1))


# -- discontinuities ----------------------------------------------------------------------

def spliced_ts(tmp_path, second_offset_s):
    """Two 6 s MPEG-TS recordings at 10 fps, the second's clock starting second_offset_s
    later than the first's (0: it restarts, as a rebooted camera's does)."""
    times = [i / 10 for i in range(60)]
    one = mux_timed(tmp_path / "one.ts", times).read_bytes()
    two = mux_timed(tmp_path / "two.ts", times, offset_s=second_offset_s).read_bytes()
    path = tmp_path / "spliced.ts"
    path.write_bytes(one + two)
    return path


@pytest.mark.parametrize("offset_s, jump_s", [(0.0, -6.0), (40.0, 34.0)])
def test_a_timestamp_jump_is_removed_and_reported(tmp_path, capsys, offset_s, jump_s):
    chunks = list(iter_chunks(str(spliced_ts(tmp_path, offset_s)), 1.0))
    pts = every_pts(chunks)
    # stream time keeps increasing, one frame duration across the splice
    assert np.diff(pts) == pytest.approx([0.1] * 119)
    # every chunk holds about one stride: none waits for the clock to catch up
    assert [c.packets for c in chunks] == [10] * 12
    assert [c.time_jump_s for c in chunks] == [0.0] * 6 + [pytest.approx(jump_s)] + [0.0] * 5
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "spliced.ts" in lines[0] and f"{abs(jump_s):.3f} s" in lines[0]


def test_the_jump_notice_goes_to_the_given_callback(tmp_path):
    told = []
    list(iter_chunks(str(spliced_ts(tmp_path, 0.0)), 1.0, notice=told.append))
    assert len(told) == 1 and "jumped back 6.000 s" in told[0]


def test_a_live_source_keeps_a_gap_it_waited_for_and_removes_one_it_did_not(monkeypatch):
    from codecsight_client import demux

    clock = [100.0]
    monkeypatch.setattr(demux.time, "monotonic", lambda: clock[0])
    told = []
    timeline = demux._Timeline("rtsp://cam/1", None, 3.0, told.append, 0.0)
    tenth = Fraction(1, 10)
    assert timeline.place(Fraction(0), tenth) == (0.0, 0.1, 0.0)
    clock[0] += 20   # the camera sent nothing for 20 s: a real gap, kept
    assert timeline.place(Fraction(20), tenth) == (20.0, 20.1, 0.0)
    clock[0] += 0.1  # its clock leapt 60 s in a tenth of a second: a discontinuity
    assert timeline.place(Fraction(80), tenth) == (20.1, 20.2, pytest.approx(59.9))
    assert len(told) == 1 and "rtsp://cam/1" in told[0] and "ahead 59.900 s" in told[0]


# -- tracks -------------------------------------------------------------------------------

def test_the_camera_track_is_chosen_over_a_thumbnail_track(tmp_path):
    path = mux_timed(tmp_path / "thumb.mkv", [i / 10 for i in range(20)], size=(160, 96),
                     thumbnail=(32, 32))
    told = []
    info = probe(str(path), notice=told.append)
    assert (info.track, info.width, info.height) == (1, 160, 96)
    assert len(told) == 1 and "--video-track" in told[0] and "#0 video h264 32x32" in told[0]
    assert sum(c.packets for c in iter_chunks(str(path), 1.0, video_track=info.track)) == 20


def test_video_track_chooses_another_stream(tmp_path):
    path = mux_timed(tmp_path / "thumb.mkv", [i / 10 for i in range(20)], thumbnail=(32, 32))
    info = probe(str(path), video_track=0)
    assert (info.track, info.width, info.height) == (0, 32, 32)
    assert sum(c.packets for c in iter_chunks(str(path), 1.0, video_track=0)) == 1
    with pytest.raises(ValueError, match=r"stream #5 does not exist.*#1 video h264"):
        probe(str(path), video_track=5)


def test_an_attached_picture_is_never_the_video(tmp_path):
    path = mux_timed(tmp_path / "cover.mkv", [i / 10 for i in range(10)], thumbnail=(32, 32))
    with av.open(str(path)) as container:
        container.streams[0].disposition = av.stream.Disposition.attached_pic
        container.streams[1].disposition = av.stream.Disposition(0)
        assert select_video_stream(container, "cover.mkv").index == 1
        container.streams[1].disposition = av.stream.Disposition.attached_pic
        with pytest.raises(ValueError, match="other than attached pictures or thumbnails"):
            select_video_stream(container, "cover.mkv")


# -- rotation -----------------------------------------------------------------------------

@pytest.mark.parametrize("counterclockwise, clockwise", [(90, 270), (-90, 90), (180, 180),
                                                          (0, 0)])
def test_the_display_matrix_becomes_a_clockwise_rotation(tmp_path, counterclockwise, clockwise):
    path = mux_timed(tmp_path / "rot.mp4", [i / 10 for i in range(5)],
                     rotation=counterclockwise)
    assert probe(str(path)).rotation == clockwise


def test_a_file_without_a_display_matrix_is_upright(tmp_path):
    path = mux_timed(tmp_path / "plain.mp4", [i / 10 for i in range(5)])
    assert probe(str(path)).rotation == 0


def test_a_rotation_off_the_quarter_turns_is_refused(tmp_path):
    path = mux_timed(tmp_path / "tilt.mp4", [i / 10 for i in range(5)], rotation=30)
    with pytest.raises(ValueError, match=r"tilt.mp4: .*330.0 degrees, not a multiple of 90"):
        probe(str(path))


def test_a_mirroring_display_matrix_is_reported(tmp_path):
    path = tmp_path / "mirror.mp4"
    frames, _ = moving_boxes(5, 96, 64, seed=0)
    with av.open(str(path), "w") as out:
        cam = out.add_stream("libx264", rate=10)
        cam.width, cam.height, cam.pix_fmt = 96, 64, "yuv420p"
        cam.set_display_rotation(0, hflip=True)
        for f in frames:
            out.mux(cam.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(cam.encode())
    told = []
    assert display_rotation(str(path), 0, told.append) == 0
    assert len(told) == 1 and "mirrors" in told[0]


# -- owner token --------------------------------------------------------------------------

def test_the_token_is_stable_per_stream_and_secret_file(tmp_path):
    secret = tmp_path / "conf" / "client-secret"
    one = stream_token("cam-1", secret)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32
    assert stream_token("cam-1", secret) == one            # a restarted client: same token
    assert stream_token("cam-2", secret) != one
    assert stream_token("cam-1", tmp_path / "other") != one  # another client
    assert secret.read_bytes().hex() not in one


def test_the_default_secret_lives_in_the_config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    stream_token("cam-1")
    assert (tmp_path / "codecsight" / "client-secret").exists()


def test_a_secret_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "client-secret"
    client_secret(secret)
    secret.chmod(0o644)
    with pytest.raises(ValueError, match="readable by other users: chmod 600"):
        client_secret(secret)


# -- chunk numbers and refusals (a recording stand-in for tritonclient) ------------------

def _zero_stats(cls) -> str:
    """JSON of a stats dataclass with every required field 0 (the recorder decodes nothing)."""
    return json.dumps({f.name: 0 for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING})


class Answer:
    def as_numpy(self, name):
        text = {P.ANSWER: "ok", P.PARSE_STATS: _zero_stats(P.ParseStats),
                P.LLM_STATS: _zero_stats(P.LlmStats)}[name]
        return np.array([[text.encode()]], dtype=np.object_)


class Recorder:
    """Answers every request, except those listed in fail: {call number: (status, text)}."""

    def __init__(self, fail=None, live=True):
        self.fail, self.live, self.sent = dict(fail or {}), live, []

    def infer(self, model, inputs, sequence_start=False, sequence_end=False, **_):
        arrays = {i.name(): i for i in inputs}
        self.sent.append((sequence_start, sequence_end, _seq(arrays), _chunk(arrays)))
        if len(self.sent) - 1 in self.fail:
            status, text = self.fail[len(self.sent) - 1]
            raise InferenceServerException(text, status=status)
        return Answer()

    def is_server_live(self):
        return self.live

    def is_model_ready(self, name):
        return self.live


def _seq(inputs):
    return int(np.frombuffer(inputs["CHUNK_SEQ"]._raw_content, np.int64)[0])


def _chunk(inputs):
    return bytes(inputs["CHUNK"]._raw_content or b"")


@pytest.fixture(scope="module")
def clip_chunks(tmp_path_factory):
    path = mux_timed(tmp_path_factory.mktemp("seq") / "c.mp4", [i / 10 for i in range(40)])
    return list(iter_chunks(str(path), 1.0))


def test_a_resend_after_unavailable_keeps_its_number(clip_chunks):
    client = Recorder({1: ("StatusCode.UNAVAILABLE", "Socket closed")})
    stream = StreamClient(client, "cam-1", StreamSettings(), notice=lambda m: None)
    for chunk in clip_chunks[:3]:
        stream.send(chunk)
    assert [s[2] for s in client.sent] == [0, 1, 1, 2]
    assert client.sent[1][3] == client.sent[2][3]        # the same bytes under 1


def test_a_resume_takes_a_new_number_for_its_new_bytes(clip_chunks):
    client = Recorder({2: ("StatusCode.NOT_FOUND", "stream 'cam-1' not found")})
    stream = StreamClient(client, "cam-1", StreamSettings(), notice=lambda m: None)
    for chunk in clip_chunks[:4]:
        stream.send(chunk)
    numbers = [s[2] for s in client.sent]
    assert numbers == [0, 1, 2, 3, 4] and client.sent[3][0]   # resumed with START as 3
    by_number = {}
    for _, _, seq, data in client.sent:
        assert by_number.setdefault(seq, data) == data     # never two byte strings per number


def test_a_start_refused_by_a_live_server_stops_at_once_and_frees_the_slot(clip_chunks):
    client = Recorder({0: ("StatusCode.UNAVAILABLE", "max_streams=2 streams already open")})
    stream = StreamClient(client, "cam-9", StreamSettings(), reconnect_s=60)
    with pytest.raises(StreamRefused, match=r"'cam-9'.*refused.*max_streams=2"):
        stream.send(clip_chunks[0])
    assert len(client.sent) == 2
    start, end = client.sent
    assert start[:2] == (True, False) and end[:2] == (False, True) and end[3] == b""


def test_an_unreachable_server_is_retried_not_refused(clip_chunks):
    client = Recorder({0: ("StatusCode.UNAVAILABLE", "failed to connect to all addresses")},
                      live=False)
    stream = StreamClient(client, "cam-1", StreamSettings(), notice=lambda m: None)
    stream.send(clip_chunks[0])
    assert [s[:3] for s in client.sent] == [(True, False, 0), (True, False, 0)]


# -- against a real server ----------------------------------------------------------------

def test_the_client_answers_every_window_across_a_camera_restart(server, tmp_path, capsys):
    from codecsight_client.cli import main

    source = spliced_ts(tmp_path, 0.0)   # PTS goes back 6 s half way
    out = tmp_path / "windows.json"
    code = main([str(source), "--url", server.grpc_url, "--stream-id", "cam-splice",
                 "--window-seconds", "2", "--stride-seconds", "1", "--policy", "dense",
                 "--token-file", str(tmp_path / "secret"), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    windows = json.loads(out.read_text())
    assert len(windows) == 12 and all(w["answer"] for w in windows)
    # one notice, naming the stream and the jump; the owner token never shown
    jumps = [line for line in captured.err.splitlines() if "jumped" in line]
    assert len(jumps) == 1 and "'cam-splice'" in jumps[0] and "6.000 s" in jumps[0]
    token = stream_token("cam-splice", tmp_path / "secret")
    assert token not in captured.out + captured.err


def small_stream(grpc, stream_id, token, **kw):
    settings = StreamSettings(source_fps=10.0, window_seconds=2.0, policy="dense")
    return StreamClient(grpc, stream_id, settings, token=token, notice=lambda m: None, **kw)


def test_a_restarted_owner_takes_its_stream_back_and_others_cannot(grpc, clip_chunks,
                                                                   tmp_path):
    owner = stream_token("cam-own", tmp_path / "secret")   # what a restart derives again
    other = stream_token("cam-own", tmp_path / "another client's secret")
    crashed = small_stream(grpc, "cam-own", owner)
    crashed.send(clip_chunks[0])                      # no END: the client died
    restarted = small_stream(grpc, "cam-own", owner)
    first = restarted.send(clip_chunks[0])            # START again, same token: accepted
    assert first.parse.owner_restart and first.parse.chunk_seq == 0
    intruder = small_stream(grpc, "cam-own", other, reconnect_s=0)
    with pytest.raises(InferenceServerException, match="already active"):
        intruder.send(clip_chunks[1])
    after = restarted.send(clip_chunks[1])            # the owner's stream is untouched
    assert (after.parse.chunk_seq, after.parse.frames_decoded, restarted.resumes) == (1, 10, 0)


def test_an_end_without_the_token_is_refused_and_the_owner_carries_on(grpc, clip_chunks,
                                                                      tmp_path):
    owner = small_stream(grpc, "cam-end", stream_token("cam-end", tmp_path / "secret"))
    owner.send(clip_chunks[0])
    intruder = small_stream(grpc, "cam-end", "not-the-owner", reconnect_s=0)
    intruder.started = True
    with pytest.raises(InferenceServerException, match="'cam-end'.*STREAM_TOKEN"):
        intruder.send_once(b"", last=True)
    # codec_parser keeps the owner's state, but Triton's sequence batcher ends a sequence on
    # any END, refused or not: the owner's next continuation is then refused by the batcher
    # ("must specify the START flag") and the client resumes from its last keyframe itself.
    after = owner.send(clip_chunks[1], last=True)
    assert after.answer and after.parse.frames_decoded >= 10 and owner.resumes <= 1


@pytest.fixture(scope="module")
def capped_grpc(capped_server):
    """A real tritonserver whose codec_parser admits two streams (conftest's capped_server)."""
    from codecsight_client.stream import connect

    return connect(capped_server.grpc_url)


def test_a_start_over_the_cap_is_a_clear_error_at_once(capped_grpc, clip_chunks, tmp_path):
    first = small_stream(capped_grpc, "cap-a", "token-a")
    first.send(clip_chunks[0])
    full = small_stream(capped_grpc, "cap-full", "token-full")   # the cap is two streams
    full.send(clip_chunks[0])
    told = []
    second = small_stream(capped_grpc, "cap-b", "token-b", reconnect_s=60)
    second.notice = told.append
    t0 = time.monotonic()
    with pytest.raises(StreamRefused, match=r"'cap-b'.*refused.*max_streams=2"):
        second.send(clip_chunks[0])
    assert time.monotonic() - t0 < 10 and told == []   # no reconnect loop
    first.send(clip_chunks[1], last=True)              # a slot frees: cap-b now gets in
    again = small_stream(capped_grpc, "cap-b", "token-b")
    assert again.send(clip_chunks[0], last=True).answer
    full.send(clip_chunks[1], last=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_every_stream_with_end_and_keeps_the_answers(server, tmp_path,
                                                                             signum):
    """The first interrupt sends the chunk in hand with END, writes what was answered and
    exits 0; the server holds nothing for the stream afterwards."""
    sid = f"cam-sig-{signum}-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "windows.json"
    client = subprocess.Popen(
        [sys.executable, "-m", "codecsight_client.cli", str(CAR), "--url", server.grpc_url,
         "--stream-id", sid, "--stride-seconds", "2", "--policy", "dense",
         "--token-file", str(tmp_path / "secret"), "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A suite started in the background (`cmd &` without job control) inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt handler: the client would
        # be started as a user's terminal starts it, with SIGINT at its default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in client.stdout:        # the first answered window
        if line.startswith(f"[{sid}] window"):
            break
    client.send_signal(signum)
    stdout, stderr = client.communicate(timeout=120)
    assert client.returncode == 0, stderr
    assert "ending every stream with END" in stderr
    windows = json.loads(out.read_text())
    assert 1 <= len(windows) < 15               # the 30 s clip has 16 two-second chunks
    # Ended: another owner may START the same ID at once (it would be ALREADY_EXISTS).
    from codecsight_client.stream import connect

    other = StreamClient(connect(server.grpc_url), sid, StreamSettings(source_fps=12.5),
                         token="another owner")
    assert other.send(next(iter_chunks(str(CAR), 2.0)), last=True).parse.frames_decoded > 0
