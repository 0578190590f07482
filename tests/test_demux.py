"""Client-side demuxing: probing sources and cutting them into Annex-B chunks."""
import itertools
import types
from pathlib import Path

import av
import numpy as np
import pytest

from codecsight.codec import StreamDecoder
from codecsight_client.demux import iter_chunks, nal_unit_types, probe
from codecsight.tools.synth import encode_h264, moving_boxes

CAR = Path(__file__).resolve().parent.parent / "media" / "car-detection.mp4"
CAR_PACKETS = 377   # video packets in car-detection.mp4 (30.16 s at 12.5 fps)
SPS, PPS, IDR = 7, 8, 5
VPS_HEVC, SPS_HEVC, PPS_HEVC = 32, 33, 34

needs_car = pytest.mark.skipif(not CAR.exists(), reason=f"sample video {CAR} not present")


@pytest.fixture(scope="module")
def car_chunks():
    return list(iter_chunks(str(CAR), 4.0))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A 2 s clip at 10 fps, 160x96, with one moving box: (mp4 path, frames)."""
    frames, _ = moving_boxes(20, 160, 96, seed=0)
    path = tmp_path_factory.mktemp("demux") / "boxes.mp4"
    return encode_h264(frames, 10, gop=10, path=path), frames


@needs_car
def test_probe_reads_codec_rate_size_and_duration():
    info = probe(str(CAR))
    assert (info.codec, info.fps, info.width, info.height) == ("h264", 12.5, 768, 432)
    assert info.duration_s == pytest.approx(30.16)


@needs_car
def test_chunks_cover_every_packet_of_the_stream(car_chunks):
    with av.open(str(CAR)) as container:
        packets = sum(1 for p in container.demux(video=0) if p.size)
    assert packets == CAR_PACKETS
    assert sum(c.packets for c in car_chunks) == CAR_PACKETS
    assert [c.index for c in car_chunks] == list(range(8))


@needs_car
def test_each_access_unit_carries_its_size_and_presentation_time(car_chunks):
    for chunk in car_chunks:
        units = chunk.access_units()
        assert b"".join(au for au, _ in units) == chunk.data
        assert [len(au) for au, _ in units] == list(chunk.au_sizes)
        # Baseline H.264, no B-frames: decode order is display order, 12.5 fps
        assert list(chunk.au_pts) == pytest.approx(
            [chunk.start_s + i / 12.5 for i in range(chunk.packets)])
        assert all(au.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")) for au, _ in units)


@needs_car
def test_chunks_span_the_stride(car_chunks):
    # 4 s at 12.5 fps = 50 frames; the last chunk holds the remaining 2.16 s
    assert [c.packets for c in car_chunks] == [50] * 7 + [27]
    assert [c.start_s for c in car_chunks] == [4.0 * i for i in range(8)]
    assert [c.end_s for c in car_chunks] == [4.0 * (i + 1) for i in range(7)] + [30.16]


@needs_car
def test_first_chunk_is_annexb_with_parameter_sets_before_the_idr(car_chunks):
    first = car_chunks[0]
    assert first.data.startswith(b"\x00\x00\x00\x01")
    assert nal_unit_types(first.data)[:3] == [SPS, PPS, IDR]
    assert first.starts_with_keyframe


@needs_car
def test_every_idr_is_preceded_by_parameter_sets(car_chunks):
    nals = [t for c in car_chunks for t in nal_unit_types(c.data)]
    idr_at = [i for i, t in enumerate(nals) if t == IDR]
    assert len(idr_at) == 7   # keyframes every 60 frames
    assert all(nals[i - 2:i] == [SPS, PPS] for i in idr_at)


@needs_car
def test_chunk_boundaries_fall_on_stride_multiples_without_float_drift():
    chunks = list(iter_chunks(str(CAR), 0.3))
    assert sum(c.packets for c in chunks) == CAR_PACKETS
    # frames every 0.08 s; a chunk starts at the first frame at or after k * 0.3 s
    expected = [round(np.ceil(round(k * 0.3 / 0.08, 6)) * 0.08, 6) for k in range(len(chunks))]
    assert [round(c.start_s, 6) for c in chunks] == expected


@needs_car
def test_iter_chunks_is_lazy():
    chunks = iter_chunks(str(CAR), 1.0)
    assert isinstance(chunks, types.GeneratorType)
    assert next(chunks).packets == 13


def test_loop_replays_the_file_with_increasing_times(generated):
    path, _ = generated
    chunks = list(itertools.islice(iter_chunks(str(path), 1.0, loop=True), 5))
    assert [c.start_s for c in chunks] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [c.packets for c in chunks] == [10] * 5
    assert all(c.starts_with_keyframe for c in chunks)


def test_probe_of_generated_mp4(generated):
    info = probe(str(generated[0]))
    assert (info.codec, info.fps, info.width, info.height) == ("h264", 10.0, 160, 96)
    assert info.duration_s == pytest.approx(2.0)


def test_raw_annexb_file_passes_through_with_the_bitstream_rate(generated, tmp_path):
    # The raw h264 demuxer assumes 25 fps; the rate comes from the stream's VUI instead.
    data = encode_h264(generated[1], 10, gop=10)
    path = tmp_path / "boxes.h264"
    path.write_bytes(data)
    assert probe(str(path)).fps == 10.0
    chunks = list(iter_chunks(str(path), 0.5))
    assert b"".join(c.data for c in chunks) == data
    assert [c.packets for c in chunks] == [5, 5, 5, 5]
    assert [c.start_s for c in chunks] == [0.0, 0.5, 1.0, 1.5]


def test_b_frames_stay_with_the_anchor_that_opens_their_chunk(tmp_path):
    frames, _ = moving_boxes(20, 160, 96, seed=0)
    path = encode_h264(frames, 10, gop=10, bframes=2, path=tmp_path / "b.mp4")
    # decode order I0 P3 B1 B2 | P6 B4 B5 P9 B7 B8 | I10 ...: P6 (0.6 s) opens chunk 1
    chunks = list(iter_chunks(str(path), 0.5))
    assert [c.packets for c in chunks] == [4, 6, 4, 6]
    assert [(c.start_s, c.end_s) for c in chunks] == [(0.0, 0.4), (0.4, 1.0), (1.0, 1.4),
                                                      (1.4, 2.0)]


def test_hevc_mp4_is_probed_and_chunked_as_annexb(tmp_path):
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx265 encoder to make an HEVC test clip")
    frames, _ = moving_boxes(12, 160, 96, seed=0)
    path = encode_h264(frames, 12, gop=6, codec="libx265", path=tmp_path / "boxes.mp4")
    assert probe(str(path)).codec == "hevc"
    chunks = list(iter_chunks(str(path), 0.5))
    assert [c.packets for c in chunks] == [6, 6]
    for chunk in chunks:   # each chunk opens with an IRAP preceded by VPS, SPS, PPS
        assert chunk.data.startswith(b"\x00\x00\x00\x01")
        assert nal_unit_types(chunk.data, "hevc")[:3] == [VPS_HEVC, SPS_HEVC, PPS_HEVC]
    decoder = StreamDecoder("hevc")
    decoded = [f for c in chunks for f in decoder.feed(c.data)] + decoder.flush()
    assert len(decoded) == 12 and decoder.errors == 0
    # FFmpeg's HEVC decoder exports no motion vectors: the codec path must fall back
    assert all(f.motion_vectors is None for f in decoded)


def test_source_without_video_is_rejected(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    # the message lists what the file does hold, so the user sees why nothing was chosen
    with pytest.raises(ValueError, match=r"no video stream found \(streams: #0 audio pcm_s16le"):
        probe(str(path))
    with pytest.raises(ValueError, match="no video stream"):
        next(iter_chunks(str(path), 1.0))


def test_stride_must_be_positive(generated):
    with pytest.raises(ValueError, match="stride_seconds"):
        next(iter_chunks(str(generated[0]), 0))


def test_last_keyframe_offset_finds_where_a_fresh_decoder_can_start():
    from codecsight_client.demux import last_keyframe_offset, nal_unit_types

    chunks = list(iter_chunks(str(CAR), 2.0))[:4]
    with_key, without_key = chunks[2], chunks[1]  # keyframes every 60 frames (4.8 s)
    offset = last_keyframe_offset(with_key.data)
    assert offset > 0 and with_key.data[offset:offset + 4] == b"\x00\x00\x00\x01"
    assert nal_unit_types(with_key.data[offset:])[:3] == [7, 8, 5]  # SPS, PPS, IDR
    assert last_keyframe_offset(without_key.data) == -1
    assert last_keyframe_offset(with_key.data, codec="mpeg4") == -1
