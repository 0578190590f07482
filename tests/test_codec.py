"""Server-side decoding: StreamDecoder, FrameSampler and pixel conversion."""
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from codecsight.codec import FrameSampler, StreamDecoder, frame_to_rgb, padded_size
from codecsight_client.demux import iter_chunks
from codecsight.tools.synth import Box, encode_h264, moving_boxes

CAR = Path(__file__).resolve().parent.parent / "media" / "car-detection.mp4"
CAR_FRAMES = 377   # 30.16 s at 12.5 fps (the brief's "375" is 30 s; the file runs 30.16 s)
needs_car = pytest.mark.skipif(not CAR.exists(), reason=f"sample video {CAR} not present")

BOX = Box(x=32, y=32, width=48, height=48, vx=4, vy=2)


def decode_all(chunks, **options):
    decoder = StreamDecoder(**options)
    frames = [f for chunk in chunks for f in decoder.feed(chunk)]
    return decoder, frames + decoder.flush()


def luma(decoded):
    return decoded.frame.to_ndarray(format="gray")


@pytest.fixture(scope="module")
def car_chunks():
    return [c.data for c in iter_chunks(str(CAR), 4.0)]


@pytest.fixture(scope="module")
def car_decoded(car_chunks):
    return decode_all(car_chunks)


@pytest.fixture(scope="module")
def car_reference():
    """Frames of car-detection.mp4 decoded straight from the file by PyAV."""
    with av.open(str(CAR)) as container:
        return list(container.decode(video=0))


@pytest.fixture(scope="module")
def box_clip():
    frames, truth = moving_boxes(20, 192, 128, boxes=[BOX], seed=0)
    return frames, truth


# --- StreamDecoder ------------------------------------------------------------------------

@needs_car
def test_chunked_decoding_yields_every_frame_of_the_file(car_decoded, car_reference):
    decoder, frames = car_decoded
    assert len(car_reference) == CAR_FRAMES
    assert len(frames) == decoder.frames_decoded == CAR_FRAMES
    assert [f.index for f in frames] == list(range(CAR_FRAMES))
    assert decoder.errors == 0
    for i in (0, 1, 59, 60, 200, 376):
        assert np.array_equal(luma(frames[i]), car_reference[i].to_ndarray(format="gray"))


@needs_car
def test_frame_types_follow_the_gop(car_decoded):
    _, frames = car_decoded
    assert [f.index for f in frames if f.pict_type == "I"] == list(range(0, CAR_FRAMES, 60))
    assert [f.index for f in frames if f.keyframe] == list(range(0, CAR_FRAMES, 60))
    assert {f.pict_type for f in frames} == {"I", "P"}   # Baseline: no B-frames


@needs_car
def test_chunk_boundaries_do_not_change_the_frames(car_decoded):
    _, coarse = car_decoded
    _, fine = decode_all([c.data for c in iter_chunks(str(CAR), 0.3)])
    assert len(fine) == len(coarse)
    assert [f.pict_type for f in fine] == [f.pict_type for f in coarse]
    assert [0 if f.motion_vectors is None else len(f.motion_vectors) for f in fine] == \
        [0 if f.motion_vectors is None else len(f.motion_vectors) for f in coarse]
    for i in (0, 3, 4, 150, 376):   # 3|4 straddle the first 0.3 s boundary
        assert np.array_equal(luma(fine[i]), luma(coarse[i]))


@needs_car
def test_feeds_cut_inside_access_units_are_buffered_by_the_parser(car_chunks, car_decoded):
    _, whole = car_decoded
    stream = b"".join(car_chunks[:2])
    cuts = np.random.default_rng(0).integers(0, len(stream), 40)
    pieces = np.split(np.frombuffer(stream, np.uint8), np.sort(cuts))
    decoder = StreamDecoder()
    frames = [f for p in pieces for f in decoder.feed(p.tobytes(), complete=False)]
    frames += decoder.flush()
    assert len(frames) == 100 and decoder.errors == 0
    for i in (0, 49, 50, 99):
        assert np.array_equal(luma(frames[i]), luma(whole[i]))


@needs_car
def test_a_complete_chunk_decodes_without_waiting_for_the_next(car_chunks):
    decoder = StreamDecoder()
    assert [len(decoder.feed(c)) for c in car_chunks] == [50] * 7 + [27]
    assert decoder.flush() == []


def test_b_frames_come_out_after_the_reorder_delay(box_clip):
    data = encode_h264(box_clip[0], 10, gop=10, bframes=2)
    decoder = StreamDecoder()
    first = decoder.feed(data)
    rest = decoder.flush()
    # x264 signals a reorder depth of 2 (B-pyramid): 2 frames wait for more input
    assert (len(first), len(rest)) == (18, 2)
    frames = first + rest
    assert "".join(f.pict_type for f in frames) == "IBBPBBPBBP" * 2
    assert [f.index for f in frames] == list(range(20))
    # Reordered B-frames keep their own motion vectors, which point both ways.
    assert all(f.motion_vectors is not None for f in frames if f.pict_type != "I")
    assert any((f.motion_vectors["source"] > 0).any() for f in frames if f.pict_type == "B")


def test_motion_vectors_on_p_frames_and_not_on_i_frames(box_clip):
    frames, truth = box_clip
    decoder = StreamDecoder()
    decoded = decoder.feed(encode_h264(frames, 10, gop=10)) + decoder.flush()
    assert [f.index for f in decoded if f.pict_type == "I"] == [0, 10]
    assert all(f.motion_vectors is None for f in decoded if f.pict_type == "I")
    assert all(f.motion_vectors is not None and len(f.motion_vectors) > 0
               for f in decoded if f.pict_type == "P")
    # motion_x/y point from the block to its source in the past reference (source -1):
    # a box moving (+4, +2) px/frame has motion (-4, -2) inside it
    mv = decoded[5].motion_vectors
    assert set(mv["source"]) == {-1}
    x0, y0, x1, y1 = truth.boxes[5, 0]
    inside = ((mv["dst_x"] > x0 + 8) & (mv["dst_x"] < x1 - 8)
              & (mv["dst_y"] > y0 + 8) & (mv["dst_y"] < y1 - 8))
    scale = mv["motion_scale"][inside]
    assert inside.sum() >= 4
    assert np.median(mv["motion_x"][inside] / scale) == -4.0
    assert np.median(mv["motion_y"][inside] / scale) == -2.0


def test_b_frames_are_typed_b_and_carry_motion_vectors(box_clip):
    decoder = StreamDecoder()
    decoded = decoder.feed(encode_h264(box_clip[0], 10, gop=10, bframes=2)) + decoder.flush()
    b_frames = [f for f in decoded if f.pict_type == "B"]
    assert len(b_frames) == 12
    assert all(f.motion_vectors is not None for f in b_frames)


def test_motion_vectors_are_not_exported_when_off(box_clip):
    decoder = StreamDecoder(export_mvs=False)
    decoded = decoder.feed(encode_h264(box_clip[0], 10, gop=10)) + decoder.flush()
    assert len(decoded) == 20
    assert all(f.motion_vectors is None for f in decoded)


@needs_car
def test_flipped_bytes_in_a_chunk_do_not_raise_and_are_counted(car_chunks, car_reference):
    decoder = StreamDecoder()
    assert len(decoder.feed(car_chunks[0])) == 50
    damaged = bytearray(car_chunks[1])
    middle = len(damaged) // 2
    damaged[middle:middle + 2000] = bytes(255 - b for b in damaged[middle:middle + 2000])
    decoder.feed(bytes(damaged))
    assert decoder.errors >= 1 and decoder.last_error
    errors = decoder.errors
    # chunk 6 starts at the IDR of frame 300: decoding is whole again
    recovered = decoder.feed(car_chunks[6])
    assert len(recovered) == 50 and decoder.errors == errors
    assert recovered[0].pict_type == "I"
    assert np.array_equal(luma(recovered[0]), car_reference[300].to_ndarray(format="gray"))
    assert np.array_equal(luma(recovered[49]), car_reference[349].to_ndarray(format="gray"))


@needs_car
def test_random_bytes_do_not_raise_and_are_counted(car_chunks, car_reference):
    decoder = StreamDecoder()
    garbage = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    assert decoder.feed(garbage) == []
    assert decoder.errors >= 1
    assert "Invalid data" in decoder.last_error
    recovered = decoder.feed(car_chunks[6]) + decoder.flush()
    assert len(recovered) == 50
    assert np.array_equal(luma(recovered[10]), car_reference[310].to_ndarray(format="gray"))


@needs_car
def test_feed_takes_a_uint8_tensor_as_triton_delivers_it(car_chunks, car_decoded):
    decoder = StreamDecoder()
    tensor = np.frombuffer(car_chunks[0], np.uint8).reshape(1, -1)   # [batch, bytes]
    frames = decoder.feed(tensor)
    assert len(frames) == 50
    assert np.array_equal(luma(frames[30]), luma(car_decoded[1][30]))


def test_feeding_after_flush_is_refused():
    decoder = StreamDecoder()
    decoder.flush()
    with pytest.raises(RuntimeError, match="flushed"):
        decoder.feed(b"\x00\x00\x00\x01")


@needs_car
def test_skipping_the_loop_filter_keeps_every_frame_type_and_motion_vector(car_chunks):
    """skip_loop_filter changes pixels only: the codec metadata the codec policy reads stays
    exactly the same on every frame. (What it saves in decode time: perf/bench_decode.py.)"""
    def decode(**options):
        # Frames are dropped as they come, as the server drops unsampled ones; only one
        # frame's pixels are kept, to show the setting took effect.
        decoder, types, vectors, luma_100 = StreamDecoder(**options), [], [], None
        for chunk in car_chunks + [None]:
            for f in decoder.feed(chunk) if chunk is not None else decoder.flush():
                types.append(f.pict_type)
                vectors.append(f.motion_vectors)
                if f.index == 100:
                    luma_100 = luma(f)
        return types, vectors, luma_100

    def same(a, b):
        # field by field: the records' alignment padding is uninitialised memory
        return (a is None and b is None) or (a is not None and b is not None and all(
            np.array_equal(a[name], b[name]) for name in a.dtype.names))

    types, vectors, pixels = decode(export_mvs=True)
    types_skip, vectors_skip, pixels_skip = decode(export_mvs=True, skip_loop_filter=True)
    assert len(types_skip) == len(types) == CAR_FRAMES
    assert types_skip == types
    assert sum(v is not None for v in vectors) == CAR_FRAMES - 7     # every P-frame has some
    assert all(same(a, b) for a, b in zip(vectors, vectors_skip))
    assert not np.array_equal(pixels_skip, pixels)   # deblocking was skipped: pixels differ


# --- FrameSampler -------------------------------------------------------------------------

def sampled(source_fps, analysis_fps, num_frames):
    sampler = FrameSampler(source_fps, analysis_fps)
    return [i for i in range(num_frames) if sampler.is_sampled(i)]


def test_sampler_12_5_to_2_fps_takes_the_first_frame_at_or_after_each_half_second():
    # frame i is shown at i * 0.08 s; k * 0.5 s falls at frame 6.25 k -> ceil
    assert sampled(12.5, 2, 101) == [0, 7, 13, 19, 25, 32, 38, 44, 50, 57, 63, 69, 75, 82,
                                     88, 94, 100]


def test_sampler_25_to_2_fps():
    assert sampled(25, 2, 101) == [0, 13, 25, 38, 50, 63, 75, 88, 100]


def test_sampler_30_to_1_fps():
    assert sampled(30, 1, 121) == [0, 30, 60, 90, 120]


def test_sampler_ntsc_rate_is_exact():
    # 29.97 fps: second 34 starts at frame 1018.98, so frame 1019 (not 1020) is taken
    expected = [0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 330, 360, 390, 420, 450,
                480, 510, 540, 570, 600, 630, 660, 690, 720, 750, 780, 810, 840, 870, 900, 930,
                960, 990, 1019]
    assert sampled(Fraction(30000, 1001), 1, 1020) == expected
    assert sampled(30000 / 1001, 1, 1020) == expected


def test_sampler_keeps_the_analysis_rate_over_an_hour():
    assert len(sampled(12.5, 2, 45_000)) == 7200   # 3600 s x 2 fps


@pytest.mark.parametrize("analysis_fps", [12.5, 30])
def test_sampler_takes_every_frame_when_analysis_rate_reaches_the_source(analysis_fps):
    assert sampled(12.5, analysis_fps, 50) == list(range(50))


@pytest.mark.parametrize("bad", [0, -2, float("nan"), float("inf"), "fast", None])
def test_sampler_rejects_rates_that_are_not_positive_and_finite(bad):
    with pytest.raises(ValueError, match="analysis_fps"):
        FrameSampler(12.5, bad)
    with pytest.raises(ValueError, match="source_fps"):
        FrameSampler(bad, 2)


def test_sampler_rejects_negative_frame_index():
    with pytest.raises(ValueError, match="frame index"):
        FrameSampler(25, 2).is_sampled(-1)


# --- pixels -------------------------------------------------------------------------------

def test_padded_size_rounds_up_to_whole_merge_groups():
    assert padded_size(768, 432, 28) == (784, 448)
    assert padded_size(56, 28, 28) == (56, 28)
    assert padded_size(1, 1, 28) == (28, 28)


@needs_car
def test_frame_to_rgb_pads_bottom_and_right_with_zeros(car_decoded):
    frame = car_decoded[1][0].frame
    rgb = frame_to_rgb(frame, 28)
    assert rgb.shape == (448, 784, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[:432, :768], frame.to_ndarray(format="rgb24"))
    assert not rgb[432:].any() and not rgb[:, 768:].any()
    assert rgb[:432, :768].mean() > 20   # real picture content, not a blank frame


def test_sampler_by_time_takes_one_frame_per_slot_and_the_first_after_a_gap():
    sampler = FrameSampler(10, 2)
    times = [0.0, 0.1, 0.5, 0.55, 0.9, 1.0, 30.2, 30.3, 30.6]
    assert [sampler.sample(t) for t in times] == [0, None, 1, None, None, 2, 60, None, 61]


def test_sampler_by_time_does_not_lose_an_exact_multiple_to_rounding():
    # 1/3 s is not a whole number of microseconds: the slot boundary must still hold
    sampler = FrameSampler(30, 3)
    assert sampler.slot(1 / 3) == 1 and sampler.slot(2 / 3) == 2 and sampler.slot(0.33) == 0


def test_decoded_frames_carry_their_access_unit_times_through_reordering(tmp_path):
    from codecsight_client.demux import iter_chunks

    frames, _ = moving_boxes(12, 96, 64, boxes=[BOX], seed=0)
    path = encode_h264(frames, 10, gop=12, bframes=2, path=tmp_path / "b.mp4")
    chunk = next(iter(iter_chunks(str(path), 100.0)))
    assert list(chunk.au_pts) != sorted(chunk.au_pts)          # decode order differs
    decoder = StreamDecoder()
    decoded = decoder.feed(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts)
    decoded += decoder.flush()
    assert [round(f.pts, 3) for f in decoded] == [k / 10 for k in range(12)]
    assert "B" in {f.pict_type for f in decoded}


def test_motion_vectors_array_equals_pyav_to_ndarray():
    """The cached-dtype view of the MOTION_VECTORS side data holds exactly PyAV's records."""
    from codecsight.codec import motion_vectors_array
    from codecsight_client.demux import iter_chunks
    from streams import CLIP

    decoder = StreamDecoder(export_mvs=True)
    compared = 0
    for chunk in list(iter_chunks(str(CLIP), 2.0))[:2]:
        for frame in decoder.feed(chunk.data, au_bytes=list(chunk.au_sizes),
                                  au_pts=list(chunk.au_pts)):
            side_data = frame.frame.side_data.get("MOTION_VECTORS")
            if side_data is None:
                continue
            reference = side_data.to_ndarray()
            view = motion_vectors_array(side_data)
            assert view.dtype == reference.dtype and len(view) == len(reference) > 0
            assert (view == reference).all()
            compared += 1
    assert compared >= 20


# --- the I-frame scene-cut test's macroblocks --------------------------------------------------

def test_changed_macroblocks_are_the_mean_of_each_macroblocks_4x4_sample():
    """codec.changed_macroblocks against each macroblock's mean |dY| over every 4th pixel of
    every 4th row inside the frame, on a 200x120 picture (13 x 8 macroblocks, the last
    column and row partial) whose right half changes from one frame to the next."""
    from codecsight.codec import changed_macroblocks

    rng = np.random.default_rng(3)
    first = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    second = first.copy()
    second[:, 100:] = 255 - second[:, 100:]
    decoded = decode_all([encode_h264(np.stack([first, second, second]), 12.5, gop=1)])[1]
    a, b = (f.frame.to_ndarray(format="gray").astype(float)[::4, ::4] for f in decoded[:2])
    expected = np.array([[abs(a[4 * r:4 * r + 4, 4 * c:4 * c + 4]
                              - b[4 * r:4 * r + 4, 4 * c:4 * c + 4]).mean() > 20.0
                          for c in range(13)] for r in range(8)])
    changed = changed_macroblocks(decoded[1].frame, decoded[0].frame, 20.0)
    assert changed.shape == (8, 13)
    assert np.array_equal(changed, expected)
    assert expected[:, 7:].all() and not expected[:, :6].any()    # the inverted half only
    assert not changed_macroblocks(decoded[2].frame, decoded[1].frame, 20.0).any()


def test_changed_macroblocks_refuses_frames_of_different_sizes(box_clip):
    from codecsight.codec import changed_macroblocks

    small = decode_all([encode_h264(box_clip[0][:1], 12.5, gop=1)])[1][0]
    large = decode_all([encode_h264(np.zeros((1, 64, 96, 3), np.uint8), 12.5, gop=1)])[1][0]
    with pytest.raises(ValueError, match="different sizes"):
        changed_macroblocks(small.frame, large.frame, 20.0)


def test_the_served_decoder_deblocks_the_b_frames_the_vit_may_see():
    """codec_parser's skip_loop_filter leaves every picture as the encoder meant it, B-frames
    included: skipping deblocking on non-reference frames ("noref") changes B-frames that
    the sampler may pick (so it cannot be the served setting: one decoder option covers
    sampled and unsampled frames alike)."""
    from codecsight.params import served_parameters

    frames, _ = moving_boxes(36, 192, 128, boxes=[BOX], noise_sigma=2.0, seed=4)
    data = encode_h264(frames, 12.5, gop=36, bframes=2)
    served = served_parameters("codec_parser")["skip_loop_filter"]
    _, deblocked = decode_all([data])
    _, as_served = decode_all([data], skip_loop_filter=served)
    _, noref = decode_all([data], skip_loop_filter="noref")
    assert [f.pict_type for f in as_served] == [f.pict_type for f in deblocked]
    assert all(np.array_equal(luma(a), luma(b)) for a, b in zip(as_served, deblocked))
    changed = [f.pict_type for a, f in zip(noref, deblocked) if not np.array_equal(luma(a), luma(f))]
    assert changed and set(changed) == {"B"}
