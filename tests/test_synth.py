"""Synthetic clips: deterministic scenes with exact truth, encoded with an exact GOP."""
import av
import numpy as np
import pytest

from codecsight.synth import MACROBLOCK, Box, encode_h264, moving_boxes

BOX = Box(x=32, y=16, width=48, height=32, vx=4, vy=2)


def decoded_types(data: bytes) -> str:
    ctx = av.CodecContext.create("h264", "r")
    frames = []
    for packet in ctx.parse(data) + ctx.parse(None):
        frames += ctx.decode(packet)
    frames += ctx.decode(None)
    return "".join("?IPB"[int(f.pict_type)] for f in frames)


@pytest.fixture(scope="module")
def clip():
    return moving_boxes(24, 192, 128, boxes=[BOX], seed=3)


def test_same_seed_gives_identical_frames_and_truth(clip):
    frames, truth = moving_boxes(24, 192, 128, boxes=[BOX], seed=3)
    assert np.array_equal(frames, clip[0])
    assert np.array_equal(truth.boxes, clip[1].boxes)
    assert np.array_equal(truth.moving, clip[1].moving)


def test_different_seed_gives_a_different_background(clip):
    frames, _ = moving_boxes(24, 192, 128, boxes=[BOX], seed=4)
    assert frames.shape == clip[0].shape == (24, 128, 192, 3)
    assert np.mean(frames[0] != clip[0][0]) > 0.5


def test_truth_boxes_move_by_the_stated_velocity(clip):
    _, truth = clip
    assert truth.boxes.shape == (24, 1, 4)
    assert tuple(truth.boxes[0, 0]) == (32, 16, 80, 48)
    steps = np.diff(truth.boxes[:, 0], axis=0)
    assert (steps == [4, 2, 4, 2]).all()


def test_box_pixels_are_carried_along_with_the_box(clip):
    frames, truth = clip
    x0, y0, x1, y1 = truth.boxes[0, 0]
    u0, v0, u1, v1 = truth.boxes[5, 0]
    assert np.array_equal(frames[5, v0:v1, u0:u1], frames[0, y0:y1, x0:x1])


def test_background_outside_the_box_is_static_without_noise(clip):
    frames, truth = clip
    untouched = np.ones(frames.shape[1:3], bool)
    for x0, y0, x1, y1 in truth.boxes[:, 0]:
        untouched[y0:y1, x0:x1] = False
    assert np.array_equal(frames[-1][untouched], frames[0][untouched])


def test_moving_mask_covers_old_and_new_box_macroblocks_only(clip):
    _, truth = clip
    assert truth.moving.shape == (24, 128 // MACROBLOCK, 192 // MACROBLOCK)
    assert not truth.moving[0].any()
    # frame 1: box moved from (32,16)-(80,48) to (36,18)-(84,50): MB rows 1..3, cols 2..5
    expected = np.zeros((8, 12), bool)
    expected[1:4, 2:6] = True
    assert np.array_equal(truth.moving[1], expected)


def test_static_box_is_not_moving():
    _, truth = moving_boxes(6, 128, 96, boxes=[Box(x=16, y=16, width=32, height=32)], seed=0)
    assert not truth.moving.any()


def test_box_following_the_pan_moves_relative_to_the_scene():
    follower = Box(x=48, y=32, width=32, height=32, vx=0, vy=0)
    frames, truth = moving_boxes(6, 128, 96, boxes=[follower], seed=0, pan_px_per_frame=3)
    assert truth.moving[1:].any() and not truth.moving[0].any()
    # the background slides left by the pan on screen
    assert np.array_equal(frames[1][:, :20], frames[0][:, 3:23])


def test_sensor_noise_has_the_requested_sigma():
    clean, _ = moving_boxes(4, 128, 96, boxes=[], seed=1)
    noisy, _ = moving_boxes(4, 128, 96, boxes=[], seed=1, noise_sigma=5.0)
    diff = noisy.astype(np.float32) - clean
    assert abs(diff.std() - 5.0) < 0.3
    assert abs(diff.mean()) < 0.3


def test_encoding_is_deterministic_with_b_frames(clip):
    # x264's mbtree made B-frame encodes differ from run to run; it is turned off.
    assert encode_h264(clip[0], 12.5, gop=8, bframes=2) == encode_h264(clip[0], 12.5, gop=8,
                                                                       bframes=2)


def test_gop_length_is_exact(clip):
    types = decoded_types(encode_h264(clip[0], 12.5, gop=8))
    assert len(types) == 24
    assert [i for i, t in enumerate(types) if t == "I"] == [0, 8, 16]
    assert "B" not in types


def test_b_frames_appear_when_asked(clip):
    types = decoded_types(encode_h264(clip[0], 12.5, gop=12, bframes=2))
    assert types == "IBBPBBPBBPBP" * 2


def test_raw_output_is_annexb_with_parameter_sets(clip):
    data = encode_h264(clip[0][:4], 12.5)
    assert data.startswith(b"\x00\x00\x00\x01\x67")  # start code + SPS


def test_mp4_output_is_written_and_decodes(clip, tmp_path):
    path = encode_h264(clip[0], 12.5, gop=8, path=tmp_path / "clip.mp4")
    assert path == tmp_path / "clip.mp4"
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 24


def test_odd_frame_size_is_rejected():
    with pytest.raises(ValueError, match="even width and height"):
        encode_h264(np.zeros((2, 31, 32, 3), np.uint8), 10)
