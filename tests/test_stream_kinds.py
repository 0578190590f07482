"""Kinds of camera stream codec_parser must serve (issue 12): HD frames, variable frame rate
and gaps, rotation, all-intra streams, and streams joined mid-GOP. Each test builds its own
small input with PyAV/libx264 and runs the server's library (parser.StreamParser); one
HD stream also goes through a real tritonserver."""
from fractions import Fraction

import av
import numpy as np
import pytest

from codecsight.checkpoint import Geometry
from codecsight.codec import (MACROBLOCK, WAITING_FOR_PARAMETER_SETS, PictureTooLarge,
                              picture_for)
from codecsight.llm import SlidingWindow, WindowFrame
from codecsight.params import served_parameters
from codecsight.parser import StreamParser
from codecsight.policy import ALL_INTRA_RUN, PruningConfig
from codecsight.protocol import META, InvalidRequest
from codecsight.tools.synth import Box, encode_h264, moving_boxes

GEOMETRY = Geometry(patch_size=14, temporal_patch_size=2, merge_size=2, in_channels=3,
                    vision_hidden=128, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
GROUP = GEOMETRY.group_pixels
SERVED = served_parameters("codec_parser")
MAX_PIXELS = SERVED["max_pixels"]
CONFIG = PruningConfig.served()


def parser(fps=10.0, analysis_fps=2.0, policy="codec", **options) -> StreamParser:
    return StreamParser(GEOMETRY, "h264", fps, analysis_fps, policy=policy, config=CONFIG,
                        max_pixels=options.pop("max_pixels", MAX_PIXELS), **options)


def access_units(frames: np.ndarray, times_s, *, gop: int = 250, bframes: int = 0):
    """Encode RGB frames shown at times_s (s) to raw H.264: [(Annex-B bytes, pts s)], in
    decode order, one per access unit, as the client sends them (AU_BYTES / AU_PTS)."""
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    ctx.time_base = Fraction(1, 1000)
    ctx.framerate = 10
    ctx.gop_size = gop
    ctx.max_b_frames = bframes
    ctx.options = {"preset": "veryfast", "tune": "zerolatency" if not bframes else "film",
                   "x264-params": f"scenecut=0:keyint={gop}:bframes={bframes}:b-adapt=0:"
                                  "threads=1:repeat-headers=1"}
    packets = []
    for rgb, t in zip(frames, times_s):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = round(t * 1000)
        packets += ctx.encode(frame)
    packets += ctx.encode(None)
    return [(bytes(p), p.pts / 1000) for p in packets]


def send(stream: StreamParser, units, per_chunk: int, policy=None, last: bool = True):
    """Feed access units in chunks of per_chunk (the last one final if `last`); returns the
    results."""
    results = []
    for start in range(0, len(units), per_chunk):
        part = units[start:start + per_chunk]
        results.append(stream.parse(b"".join(d for d, _ in part), policy,
                                    final=last and start + per_chunk >= len(units),
                                    au_bytes=[len(d) for d, _ in part],
                                    au_pts=[t for _, t in part]))
    return results


def meta_of(results) -> np.ndarray:
    return np.concatenate([r.frame_meta for r in results])


def group_box(rect, scale_x=1.0, scale_y=1.0):
    """Merge groups (row slice, column slice) a (x0, y0, x1, y1) box covers at a scale."""
    x0, y0, x1, y1 = rect
    return (slice(int(y0 * scale_y) // GROUP, -(-int(np.ceil(y1 * scale_y)) // GROUP)),
            slice(int(x0 * scale_x) // GROUP, -(-int(np.ceil(x1 * scale_x)) // GROUP)))


# --- 1. HD frames: Qwen's resolution rule ----------------------------------------------------

def test_max_pixels_is_what_one_vit_execution_holds():
    vit = served_parameters("vit_pruned", config_name="cpu")["max_patches"]
    assert MAX_PIXELS == vit * GEOMETRY.patch_size ** 2
    for width, height in ((1280, 720), (1920, 1080), (3840, 2160), (720, 1280), (2000, 300)):
        grid_h, grid_w = picture_for(width, height, GROUP, max_pixels=MAX_PIXELS).grid
        assert grid_h * grid_w * GEOMETRY.patches_per_group <= vit


def test_frames_within_the_budget_keep_their_size():
    for width, height in ((768, 432), (640, 360), (192, 128), (1000, 700)):
        picture = picture_for(width, height, GROUP, max_pixels=MAX_PIXELS)
        assert (picture.width, picture.height, picture.scaled) == (width, height, False)


def test_hd_frames_scale_to_smart_resize():
    assert picture_for(1280, 720, GROUP, max_pixels=MAX_PIXELS).grid == (24, 42)   # 1176x672
    assert picture_for(1920, 1080, GROUP, max_pixels=MAX_PIXELS).grid == (24, 42)
    # the checkpoint's min_pixels only matters below the budget's reach
    assert picture_for(1920, 1080, GROUP, max_pixels=MAX_PIXELS, min_pixels=3136).grid == (24, 42)


@pytest.mark.parametrize("width, height", [(1280, 720), (1920, 1080)])
def test_hd_streams_serve_within_max_patches(width, height):
    frames, _ = moving_boxes(4, width, height, boxes=[Box(100, 100, 96, 96, vx=8)], seed=1)
    stream = parser(policy="dense")
    result = stream.parse(encode_h264(frames, 10.0), final=True)
    meta = result.frame_meta
    assert result.stats.frames_decoded == 4 and len(meta) == 1
    assert (meta[0, META["grid_h"]], meta[0, META["grid_w"]]) == (24, 42)
    assert result.stats.served_size == [1176, 672] and result.stats.rotation == 0
    assert len(result.patches) == 24 * 42 * 4 <= MAX_PIXELS // 196
    assert result.positions[:, 1].max() == 47 and result.positions[:, 2].max() == 83


def test_motion_lands_in_the_scaled_groups_of_an_hd_frame():
    # A box near the bottom-right corner: mapped with the unscaled geometry its groups would
    # lie 3 columns and 2 rows further right/down than where the ViT sees it.
    box = Box(x=1040, y=560, width=96, height=96, vx=6, vy=2)
    frames, truth = moving_boxes(11, 1280, 720, boxes=[box], seed=2)
    stream = parser(policy="codec")
    results = [stream.parse(encode_h264(frames, 10.0, gop=30), final=True)]
    meta = meta_of(results)
    assert meta[:, META["frame_index"]].tolist() == [0, 5, 10]
    keep = results[0].keep
    sx, sy = 1176 / 1280, 672 / 720
    for k, index in ((1, 5), (2, 10)):
        # the box's region, from where it was 5 frames ago to where it is now, dilated by
        # one macroblock (the codec flags whole macroblocks)
        x0, y0 = truth.boxes[index - 5, 0, :2] - MACROBLOCK
        x1, y1 = truth.boxes[index, 0, 2:] + MACROBLOCK
        rows, cols = group_box((x0, y0, x1, y1), sx, sy)
        allowed = np.zeros_like(keep[k])
        allowed[rows, cols] = True
        assert keep[k].any() and not (keep[k] & ~allowed).any()
        now_rows, now_cols = group_box(truth.boxes[index, 0], sx, sy)
        assert keep[k][now_rows, now_cols].mean() > 0.5   # the box where it is now


def test_a_frame_no_picture_fits_is_refused_once_at_start():
    frames, _ = moving_boxes(6, 640, 16, boxes=[Box(0, 0, 16, 16, vx=4)], seed=3)
    data = encode_h264(frames, 10.0)
    stream = parser(policy="dense", max_pixels=4 * GROUP * GROUP, stream_id="cam-thin")
    with pytest.raises(InvalidRequest, match="cam-thin.*640x16.*max_pixels=3136"):
        stream.parse(data[:len(data) // 2])
    later = stream.parse(data[len(data) // 2:], final=True)   # not refused again
    assert later.stats.frames_sampled == 0 and "640x16" in later.stats.note
    with pytest.raises(PictureTooLarge, match="aspect ratio"):
        picture_for(40_000, 28, GROUP, max_pixels=MAX_PIXELS)


# --- 2. Time: variable frame rate and gaps -------------------------------------------------------

def vfr_clip(segments, width=64, height=64):
    """Frames of a box clip shown at the times of segments [(start s, fps, seconds)]."""
    times = [start + i / fps for start, fps, seconds in segments
             for i in range(round(seconds * fps))]
    frames, _ = moving_boxes(len(times), width, height, boxes=[Box(4, 4, 16, 16, vx=1)])
    return frames, times


def test_a_gap_in_the_video_is_a_gap_in_time_and_t():
    frames, times = vfr_clip([(0.0, 10, 4), (24.0, 10, 4)])   # 4 s, 20 s of nothing, 4 s
    stream = parser(fps=10.0, analysis_fps=2.0, policy="dense")
    meta = meta_of(send(stream, access_units(frames, times, gop=20), per_chunk=20))
    want = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5] + [24.0 + k / 2 for k in range(8)]
    assert meta[:, META["time_ms"]].tolist() == [round(1000 * t) for t in want]
    assert meta[:, META["t"]].tolist() == list(range(8)) + list(range(48, 56))
    window = SlidingWindow(seconds=4.0)
    window.add([WindowFrame(t=int(r[0]), frame_index=int(r[1]), time_ms=int(r[2]),
                            frame_type="P", grid_h=1, grid_w=1, tokens=None, cells=None)
                for r in meta])
    assert [f.time_ms for f in window.frames] == [round(1000 * t) for t in want[8:]]


def test_sampling_runs_at_the_analysis_rate_when_the_source_rate_changes():
    frames, times = vfr_clip([(0.0, 2, 10), (10.0, 10, 6)])   # 2 fps for 10 s, then 10 fps
    # SOURCE_FPS as a client would guess it from the container's average: 80 frames / 16 s
    stream = parser(fps=5.0, analysis_fps=2.0, policy="dense")
    meta = meta_of(send(stream, access_units(frames, times, gop=10), per_chunk=10))
    seconds = meta[:, META["time_ms"]] / 1000.0
    assert np.array_equal(seconds, np.arange(0, 16, 0.5))          # 2 per second throughout
    assert meta[:, META["t"]].tolist() == list(range(32))
    one_fps = parser(fps=5.0, analysis_fps=1.0, policy="dense")
    meta = meta_of(send(one_fps, access_units(frames, times, gop=10), per_chunk=10))
    assert meta[:, META["time_ms"]].tolist() == [1000 * s for s in range(16)]


def test_b_frames_keep_their_presentation_times_through_reordering():
    frames, times = vfr_clip([(0.0, 10, 3)])
    times = [t * 1.5 for t in times]   # 6.67 fps, sent as 10
    stream = parser(fps=10.0, analysis_fps=2.0, policy="dense")
    results = send(stream, access_units(frames, times, gop=10, bframes=2), per_chunk=7)
    meta = meta_of(results)
    assert "B" in "".join(r.stats.frame_types for r in results)
    assert meta[:, META["time_ms"]].tolist() == [0, 600, 1050, 1500, 2100, 2550, 3000, 3600,
                                                 4050]
    assert meta[:, META["t"]].tolist() == list(range(9))


def test_a_blob_without_access_unit_times_advances_by_the_source_rate():
    frames, times = vfr_clip([(0.0, 10, 2)])
    units = access_units(frames, times, gop=20)
    stream = parser(fps=10.0, analysis_fps=2.0, policy="dense")
    first = send(stream, units[:5], per_chunk=5, last=False)[0]   # 0.0-0.4 s, timed
    blob = b"".join(d for d, _ in units[5:])              # one "unit" timed after the last
    rest = stream.parse(blob, final=True, au_bytes=[len(blob)], au_pts=[0.5])
    assert first.frame_meta[:, META["time_ms"]].tolist() == [0]
    assert rest.frame_meta[:, META["time_ms"]].tolist() == [500, 1000, 1500]


# --- 3. Rotation ---------------------------------------------------------------------------------

def test_rotated_frames_are_turned_upright_pixels_and_motion():
    box = Box(x=60, y=8, width=24, height=24, vx=0, vy=3)   # near the right edge, moving down
    frames, truth = moving_boxes(11, 96, 64, boxes=[box], seed=4)
    data = encode_h264(frames, 10.0, gop=30)
    stream = parser(policy="codec", rotation=90)
    result = stream.parse(data, final=True)
    picture = stream.masks.picture
    assert (picture.width, picture.height) == (64, 96)       # 64 wide, 96 tall upright
    assert result.stats.served_size == [64, 96] and result.stats.rotation == 90
    assert result.keep[0].shape == (4, 3)                    # 112x84 padded: 4 rows, 3 cols
    # the codec's flags land where the box is in the upright picture: a box at source
    # (x 60-84, y 8-62) is at upright rows 60-84 (source x), columns 64-1-y
    for k, index in ((1, 5), (2, 10)):
        x0, y0, x1, y1 = truth.boxes[index, 0]
        up = (64 - y1, x0, 64 - y0, x1)                        # (x0, y0, x1, y1) upright
        rows, cols = group_box(up)
        assert result.keep[k][rows, cols].any()
        assert not result.keep[k][0].any()                    # rows 0-27: the box never went


def test_rotation_pixels_equal_numpy_rot90():
    frames, _ = moving_boxes(2, 96, 64, seed=5)
    for rotation, k in ((90, -1), (180, 2), (270, 1)):
        stream = parser(policy="dense", rotation=rotation)
        stream.parse(encode_h264(frames, 10.0), final=True)
        decoded = stream.masks.previous_sampled
        want = np.rot90(decoded.frame.to_ndarray(format="rgb24"), k)
        rgb = decoded.rgb()
        assert np.array_equal(rgb[:want.shape[0], :want.shape[1]], want)
        assert not rgb[want.shape[0]:].any() and not rgb[:, want.shape[1]:].any()


def test_a_partial_macroblock_lands_on_the_reversed_side():
    picture = picture_for(1920, 1080, GROUP, rotation=90, max_pixels=None)
    rows, cols = picture.axes()
    assert (rows.macroblocks, rows.offset) == (120, 0)
    assert (cols.macroblocks, cols.offset) == (68, 1080 - 68 * 16)


def test_a_rotation_other_than_quarter_turns_is_refused():
    with pytest.raises(ValueError, match="rotation must be one of 0, 90, 180, 270"):
        parser(rotation=45)


# --- 4. All-intra streams ------------------------------------------------------------------------

TWO_BOXES = [Box(x=8, y=8, width=32, height=32, vx=4), Box(x=150, y=90, width=32, height=32,
                                                            vx=-3, vy=1)]


def test_an_all_intra_stream_keeps_the_moving_boxes_under_codec():
    frames, truth = moving_boxes(21, 224, 168, boxes=TWO_BOXES, seed=6)
    stream = parser(policy="codec")
    result = stream.parse(encode_h264(frames, 10.0, gop=1), final=True)
    assert set(result.stats.frame_types) == {"I"}
    assert result.stats.policy_fallback.startswith("no P/B-frames for")
    for k, index in ((1, 5), (2, 10), (3, 15), (4, 20)):
        keep = result.keep[k]
        assert result.whole_frame[k] is None and 0 < keep.mean() < 0.5
        for b in range(2):
            rows, cols = group_box(truth.boxes[index, b])
            assert keep[rows, cols].any(), (k, b)


def test_codec_evidence_returns_with_inter_frames():
    frames, _ = moving_boxes(40, 224, 168, boxes=TWO_BOXES, seed=7)
    times = [i / 10 for i in range(40)]
    stream = parser(policy="codec")
    # the encoder switches from keyint=1 to a 20-frame GOP (a new IDR at frame 20)
    intra = send(stream, access_units(frames[:20], times[:20], gop=1), 20, last=False)
    inter = send(stream, access_units(frames[20:], times[20:], gop=20), 10)
    assert intra[0].stats.policy_fallback is not None
    # frame 20, sampled, is still the 21st I-frame in a row; the P-frames after it are not
    assert inter[0].stats.policy_fallback is not None and stream.masks.intra_run == 0
    assert inter[1].stats.policy_fallback is None and set(inter[1].stats.frame_types) == {"P"}
    assert ALL_INTRA_RUN >= 2   # a GOP's lone I-frame never counts as all-intra


# --- 5. Streams that decode nothing yet ----------------------------------------------------------

def test_a_raw_stream_joined_mid_gop_says_it_waits_for_parameter_sets():
    frames, _ = moving_boxes(30, 96, 64, seed=8)
    units = access_units(frames, [i / 10 for i in range(30)], gop=15)
    stream = parser(policy="dense")
    waiting = send(stream, units[3:10], per_chunk=7, last=False)[0].stats  # P: no SPS yet
    assert waiting.frames_decoded == 0 and waiting.note == WAITING_FOR_PARAMETER_SETS
    assert waiting.decode_errors == 0 and waiting.decode_error is None
    decoding = send(stream, units[15:], per_chunk=15)[0].stats   # from the next IDR
    assert decoding.frames_decoded == 15 and decoding.note is None


def test_the_kv_window_keeps_a_gap_in_t_and_stays_exact_across_a_slide(tiny):
    import torch

    from codecsight.llm import KVWindow, VisualLM

    model, tokenizer = tiny
    vlm = VisualLM(model, tokenizer, max_new_tokens=2)
    cells = np.array([[h, w] for h in range(2) for w in range(3)], np.int64)
    gen = torch.Generator().manual_seed(0)
    frames = [WindowFrame(t=t, frame_index=t, time_ms=500 * t,
                          frame_type="I" if t % 4 == 0 else "P", grid_h=2, grid_w=3,
                          tokens=torch.randn(len(cells), 128, generator=gen), cells=cells)
              for t in (0, 1, 2, 3, 48, 49, 50, 51)]          # 20 s without video after t=3
    _, positions = vlm.layout(frames, None)
    prefix = len(vlm.prefix_ids)
    assert sorted(set(positions[0, prefix:].tolist())) == [prefix + t for t in
                                                           (0, 1, 2, 3, 48, 49, 50, 51)]
    kv = KVWindow(vlm)
    kv.sync(vlm, frames[:6], "selective", 0)
    kv.sync(vlm, frames[2:], "selective", 0)                  # slides by t0 0 -> 2
    ref = KVWindow(vlm)
    ref.sync(vlm, frames[2:], "full", 0)
    torch.testing.assert_close(kv.cache.layers[0].keys, ref.cache.layers[0].keys,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.server
def test_a_720p_camera_is_served_through_the_real_server(grpc, tmp_path):
    from codecsight_client.demux import iter_chunks, probe
    from codecsight_client.stream import StreamClient, StreamSettings

    frames, _ = moving_boxes(10, 1280, 720, boxes=[Box(200, 200, 96, 96, vx=8)], seed=9)
    path = encode_h264(frames, 10.0, gop=10, path=tmp_path / "720p.mp4")
    info = probe(str(path))
    stream = StreamClient(grpc, "hd-720p", StreamSettings(
        question="is anyone moving?", codec=info.codec, source_fps=info.fps,
        analysis_fps=2.0, window_seconds=4.0, policy="dense"))
    chunks = list(iter_chunks(str(path), 2.0))
    results = [stream.send(c, last=k == len(chunks) - 1) for k, c in enumerate(chunks)]
    parse = results[0].parse
    assert parse.frames_decoded == 10 and parse.frames_sampled == 2
    assert parse.groups_total == 2 * 24 * 42 and parse.patches_kept == 2 * 24 * 42 * 4
    assert results[-1].answer


def test_a_time_that_does_not_advance_is_replaced_by_the_source_rate():
    frames, times = vfr_clip([(0.0, 10, 2)])
    units = access_units(frames, times, gop=20)
    # a sender's clock stalls at 0.3 s for four frames, then runs on
    units = [(d, min(t, 0.3) if 0.3 <= t < 0.7 else t) for d, t in units]
    stream = parser(fps=10.0, analysis_fps=10.0, policy="dense")
    meta = meta_of(send(stream, units, per_chunk=20))
    assert meta[:, META["time_ms"]].tolist() == [100 * k for k in range(20)]
