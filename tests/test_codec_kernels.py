"""The compiled kernel of codec.macroblock_signals against its numpy reference, bit for bit.

codec.macroblock_signals runs codecsight/_codec_kernels.c; codec._macroblock_signals_numpy is
the readable version it replaced (and the fallback where the extension is not built). Both
must give identical moving / intra flags and identical float32 global motion, on real H.264
and on records built to reach the corners (thinned medians, even counts, frames with only
future references, a different motion_scale per frame, partitions outside the frame).
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from codecsight import codec
from codecsight.codec import StreamDecoder, macroblock_signals
from codecsight.tools.synth import Box, encode_h264, moving_boxes

from streams import CLIP, MOTION_VECTOR_DTYPE, decoded_clip

CAR = Path(CLIP)
DTYPE = MOTION_VECTOR_DTYPE   # packed: the kernel must take the layout from the dtype


def assert_same(vectors, width, height, threshold_px, bidirectional, what):
    got = macroblock_signals(vectors, width, height, threshold_px, bidirectional)
    want = codec._macroblock_signals_numpy(vectors, width, height, threshold_px, bidirectional)
    assert got.moving.dtype == want.moving.dtype == bool, what
    assert got.global_motion_px.dtype == want.global_motion_px.dtype == np.float32, what
    assert np.array_equal(got.moving, want.moving), what
    assert np.array_equal(got.intra, want.intra), what
    # bit for bit, signed zeros included
    assert got.global_motion_px.tobytes() == want.global_motion_px.tobytes(), what
    # the kernel's running counts of intra / moving macroblocks equal counting the flags
    assert want.counts is None and got.counts is not None, what
    assert np.array_equal(got.intra_share, codec._share(want.intra)), what
    assert np.array_equal(got.moving_share, codec._share(want.moving)), what
    return got


def test_the_extension_is_built():
    # setup.sh builds it (pip install -e .); a silent numpy fallback would hide a broken build
    assert codec._codec_kernels is not None
    assert Path(codec._codec_kernels.__file__).parent == Path(codec.__file__).parent


def decoded(data):
    decoder = StreamDecoder()
    return decoder.feed(data) + decoder.flush()


@pytest.fixture(scope="module")
def streams():
    """Real H.264: the bundled clip (a shaking camera, P-frames), and generated 640x360 clips
    with B-frames (~900 macroblocks: medians thinned to 256 samples), one panning, one
    still, one at a size that is not a multiple of 16 with three B-frames."""
    out = {}
    if CAR.exists():
        out["car"] = decoded_clip(str(CAR))
    box = Box(x=40, y=120, width=64, height=48, vx=5.0, vy=1.0)
    pan, _ = moving_boxes(40, 640, 360, boxes=[box], seed=2, pan_px_per_frame=-4,
                          noise_sigma=2.0)
    out["pan"] = decoded(encode_h264(pan, 25.0, gop=20, bframes=2))
    still, _ = moving_boxes(40, 640, 360, boxes=[box], seed=3, noise_sigma=2.0)
    out["still"] = decoded(encode_h264(still, 25.0, gop=20, bframes=2))
    odd, _ = moving_boxes(40, 328, 248, boxes=[box], seed=4, pan_px_per_frame=3,
                          noise_sigma=3.0)
    out["odd size"] = decoded(encode_h264(odd, 25.0, gop=40, bframes=3))
    return out


@pytest.mark.parametrize("threshold_px", [0.25, 1.0, 2.5])
def test_kernel_equals_numpy_on_real_h264(streams, threshold_px):
    for name, frames in streams.items():
        width, height = frames[0].width, frames[0].height
        vectors = [f.motion_vectors for f in frames]            # I-frames: None
        types = [f.pict_type == "B" for f in frames]
        for first in range(0, len(frames), 64):                 # codec_parser's batches
            part = slice(first, first + 64)
            got = assert_same(vectors[part], width, height, threshold_px, types[part], name)
            assert_same(vectors[part], width, height, threshold_px, None, f"{name}, no types")
        if name != "still":
            assert got.global_motion_px.any(), f"{name}: no frame exercises the median"
        assert any(f.pict_type == "B" for f in frames) == (name != "car")


def random_frame(rng, width, height):
    """Records that reach the kernel's branches: counts around the 256-sample thinning (odd and
    even), past / future / only-future references, pans or mostly still, per-frame scales,
    partition centres a little outside the frame."""
    n = int(rng.choice([1, 2, 3, 255, 256, 257, 512, 513, 1000, int(rng.integers(1, 1200))]))
    out = np.zeros(n, DTYPE)
    out["source"] = rng.choice([-1, 1], n, p=[1 - (f := rng.choice([0, 0.3, 0.7, 1])), f])
    scale = int(rng.choice([2, 4, 8]))
    out["motion_scale"] = scale
    kind = rng.choice(["still", "pan", "noise"])
    for axis in ("motion_x", "motion_y"):
        if kind == "still":
            values = np.where(rng.random(n) < 0.8, 0, rng.integers(-40, 40, n))
        elif kind == "pan":
            values = int(rng.integers(-64, 64)) + rng.integers(-3, 4, n)
            values = np.where(out["source"] > 0, -values, values)
        else:
            values = rng.integers(-200, 200, n)
        out[axis] = values
    out["dst_x"] = rng.integers(-8, width + 24, n)
    out["dst_y"] = rng.integers(-8, height + 24, n)
    return out


def test_kernel_equals_numpy_on_records_built_for_the_corners():
    rng = np.random.default_rng(0)
    for case in range(150):
        width, height = int(rng.integers(16, 700)), int(rng.integers(16, 400))
        count = int(rng.integers(1, 9))
        frames = [None if rng.random() < 0.15 else
                  DTYPE_EMPTY if rng.random() < 0.05 else random_frame(rng, width, height)
                  for _ in range(count)]
        bidirectional = None if rng.random() < 0.3 else list(rng.random(count) < 0.5)
        assert_same(frames, width, height, float(rng.choice([0.5, 1.0, 3.0])), bidirectional,
                    f"case {case}")


DTYPE_EMPTY = np.zeros(0, DTYPE)


def test_only_future_references_give_the_scene_motion_towards_the_future():
    # every vector references the future frame and says the scene moved +2 px towards it
    records = np.zeros(300, DTYPE)
    records["source"], records["motion_scale"] = 1, 4
    records["motion_x"], records["motion_y"] = 8, -4
    records["dst_x"], records["dst_y"] = np.arange(300) % 64, np.arange(300) // 64 * 16
    got = assert_same([records], 64, 96, 1.0, [True], "only future")
    assert got.global_motion_px[0].tolist() == [2.0, -1.0]
    assert not got.moving.any()


def test_views_and_strided_records_are_read_correctly():
    rng = np.random.default_rng(1)
    records = random_frame(rng, 320, 240)
    assert_same([records[::2], records[1:]], 320, 240, 1.0, [True, False], "strided")


def test_no_frames_and_no_records():
    empty = macroblock_signals([], 64, 32, 1.0)
    assert empty.moving.shape == (0, 2, 4)
    got = assert_same([None, DTYPE_EMPTY], 64, 32, 1.0, None, "no records")
    assert got.intra.all() and not got.moving.any()


def test_bad_arguments_raise_clear_errors():
    records = np.zeros(4, DTYPE)
    with pytest.raises(ValueError, match="bidirectional has 1 flags for 2 frames"):
        macroblock_signals([records, records], 64, 32, 1.0, [True])
    wrong = np.zeros(4, np.dtype([("source", "<i4"), ("motion_x", "<f4")]))
    with pytest.raises(ValueError, match="field 'dst_x'"):
        macroblock_signals([wrong], 64, 32, 1.0)
    retyped = records.astype(DTYPE.descr[:8] + [("motion_x", "<i2"), ("motion_y", "<i4"),
                                                ("motion_scale", "<u2")])
    with pytest.raises(ValueError, match="'motion_x' of type <i4"):
        macroblock_signals([retyped], 64, 32, 1.0)

    def kernel(frames, layout=codec._kernel_layout(DTYPE), moving=None, intra=None,
               motion=None, counts=None):
        """The extension called directly, with outputs sized for [len(frames), 2, 4]."""
        f = len(frames)
        codec._codec_kernels.macroblock_signals(
            frames, None, layout, 2, 4, 1.0,
            np.zeros((f, 2, 4), bool) if moving is None else moving,
            np.zeros((f, 2, 4), bool) if intra is None else intra,
            np.zeros((f, 2), np.float32) if motion is None else motion,
            np.zeros((f, 2), np.int64) if counts is None else counts)

    kernel([records])   # well formed: no error
    with pytest.raises(ValueError, match="moving holds 8 bytes, expected 16"):
        kernel([records, records], moving=np.zeros((1, 2, 4), bool))
    with pytest.raises(ValueError, match="counts holds 8 bytes, expected 16"):
        kernel([records], counts=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="field offset lies outside the record"):
        kernel([records], layout=(8, 0, 0, 0, 0, 0, 40))
    with pytest.raises(TypeError):
        kernel((records,))
    read_only = np.zeros((1, 2, 4), bool)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):   # numpy refuses a writable view
        kernel([records], intra=read_only)


def test_without_the_extension_numpy_answers(monkeypatch):
    records = random_frame(np.random.default_rng(2), 320, 240)
    want = macroblock_signals([records], 320, 240, 1.0)
    monkeypatch.setattr(codec, "_codec_kernels", None)
    got = macroblock_signals([records], 320, 240, 1.0)
    assert np.array_equal(got.moving, want.moving) and np.array_equal(got.intra, want.intra)


def test_a_missing_extension_is_reported_once_at_import():
    # a fresh interpreter in which the extension cannot be found
    script = textwrap.dedent("""
        import sys, warnings
        class NotBuilt:
            def find_spec(self, name, path=None, target=None):
                if name == "codecsight._codec_kernels":
                    raise ImportError("simulated: not built")
        sys.meta_path.insert(0, NotBuilt())
        warnings.simplefilter("always")
        from codecsight import codec
        print("kernel:", codec._codec_kernels)
        print(codec.macroblock_signals([None], 32, 16, 1.0).intra.all())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["kernel:", "None", "True"]
    assert run.stderr.count("falls back to numpy") == 1, run.stderr
    assert "Run scripts/setup.sh" in run.stderr


def test_dynamic_macroblocks_kernel_equals_numpy():
    from codecsight.policy import PruningConfig, _dynamic_macroblocks_numpy, dynamic_macroblocks

    rng = np.random.default_rng(5)
    for case in range(60):
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 30)), int(rng.integers(1, 50)))
        if case % 7 == 0:
            shape = shape[1:]                       # one frame, [mb_h, mb_w]
        moving = rng.random(shape) < rng.choice([0.02, 0.2, 0.6])
        intra = rng.random(shape) < rng.choice([0.0, 0.05, 0.5])
        config = PruningConfig.served(motion_support=int(rng.integers(1, 10)),
                                      intra_support=int(rng.integers(1, 11)))
        got = dynamic_macroblocks(moving, intra, config)
        want = _dynamic_macroblocks_numpy(moving, intra, config)
        assert got.dtype == want.dtype == bool and got.shape == want.shape
        assert np.array_equal(got, want), f"case {case}"
    with pytest.raises(ValueError, match="moving / intra hold 8 / 8 bytes, expected 16"):
        codec._codec_kernels.dynamic_macroblocks(bytes(8), bytes(8), 2, 2,
                                                 4, 1, 1, np.zeros(16, bool))


def test_changed_macroblocks_kernel_equals_numpy(streams):
    for name, frames in streams.items():
        pairs = list(zip(frames[1:], frames[:-1]))[::3]
        for threshold in (0.5, 3.0, 12.0, 40.0):
            flagged = 0
            for frame, previous in pairs:
                got = codec.changed_macroblocks(frame.frame, previous.frame, threshold)
                want = codec._changed_macroblocks_numpy(frame.frame, previous.frame, threshold)
                assert got.dtype == bool and np.array_equal(got, want), (name, threshold)
                flagged += int(got.sum())
            if threshold == 0.5:
                assert flagged, f"{name}: no macroblock changed"
    plane = np.zeros((4, 20), np.uint8)
    with pytest.raises(ValueError, match="luma planes hold 80 / 80 bytes, need 116 / 116"):
        codec._codec_kernels.changed_macroblocks(plane, 20, plane, 20, 16, 6, 4, 1.0,
                                                 np.zeros(1, bool))
    with pytest.raises(ValueError, match="a step dividing 16"):
        codec._codec_kernels.changed_macroblocks(plane, 20, plane, 20, 16, 4, 3, 1.0,
                                                 np.zeros(1, bool))
