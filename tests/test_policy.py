"""Codec signals, pruning masks and the policy switch, without a server."""
from pathlib import Path

import numpy as np
import pytest
import torch

from codecsight.checkpoint import Geometry
from codecsight.codec import (FrameSampler, MacroblockSignals, StreamDecoder, frame_to_rgb,
                              macroblock_signals)
from codecsight.llm import VisualLM, split_frames
from codecsight.parser import StreamParser
from codecsight.policy import (POLICIES, PruningConfig, changed_groups,
                               dynamic_macroblocks, evs_keep, groups_from_macroblocks,
                               oracle_keep, overlap_matrix, valid_pixels)
from codecsight.protocol import META, PATCH_POLICIES
from codecsight.tools.synth import Box, encode_h264, moving_boxes
from codecsight.vision import PrunedVisionEncoder, patchify

from streams import MOTION_VECTOR_DTYPE, decoded_clip

FPS = 12.5
BOX = Box(x=40, y=48, width=48, height=32, vx=4.0, vy=0.0)
W, H = 320, 240            # 20 x 15 macroblocks; pads to 336 x 252 = 12 x 9 merge groups
GROUPS = 9 * 12


@pytest.fixture(scope="module")
def geometry(tiny_dir):
    return Geometry.from_model_dir(tiny_dir)


def decode(data):
    decoder = StreamDecoder()
    return decoder.feed(data) + decoder.flush()


def mv_records(rows):
    """AVMotionVector records from (source, w, h, dst_x, dst_y, motion_x, motion_y) rows."""
    out = np.zeros(len(rows), MOTION_VECTOR_DTYPE)
    for i, (source, w, h, x, y, mx, my) in enumerate(rows):
        out[i] = (source, w, h, x, y, x, y, 0, mx, my, 4)
    return out


def signals_of(motion_vectors, width, height, threshold_px=1.0):
    """macroblock_signals of one frame, as [mb_h, mb_w] arrays."""
    batch = macroblock_signals([motion_vectors], width, height, threshold_px)
    return batch.moving[0], batch.intra[0], tuple(batch.global_motion_px[0].tolist())


def parse_all(parser, data_chunks, policy=None):
    results = [parser.parse(c, policy, final=i == len(data_chunks) - 1)
               for i, c in enumerate(data_chunks)]
    return results, [k for r in results for k in r.keep]


def chunks_of(frames, gop, bframes=0, pieces=1):
    """Annex-B chunks cut at keyframes (each piece whole GOPs)."""
    per = len(frames) // pieces
    return [encode_h264(frames[i * per:(i + 1) * per], FPS, gop=gop, bframes=bframes)
            for i in range(pieces)]


# --- macroblock signals ---------------------------------------------------------------------

def test_macroblocks_without_a_motion_vector_are_intra():
    # Macroblock (0, 0) has one 16x16 vector, (0, 1) two 8x16 halves, (1, 0) none.
    mv = mv_records([(-1, 16, 16, 8, 8, 0, 0), (-1, 8, 16, 20, 8, 0, 0),
                     (-1, 8, 16, 28, 8, 0, 0), (-1, 16, 16, 8, 24 + 16, 0, 0),
                     (-1, 16, 16, 24, 24, 0, 0), (-1, 16, 16, 24, 40, 0, 0)])
    moving, intra, _ = signals_of(mv, 32, 48)
    assert intra.tolist() == [[False, False], [True, False], [False, False]]
    assert not moving.any()


def test_a_split_macroblock_moves_if_any_partition_moves():
    # An object edge: the right 8x16 half of macroblock (0, 1) moved 2 px, the left did not.
    rows = [(-1, 16, 16, 8 + 16 * c, 8 + 16 * r, 0, 0) for r in range(3) for c in range(3)
            if (r, c) != (0, 1)]
    rows += [(-1, 8, 16, 20, 8, 0, 0), (-1, 8, 16, 28, 8, -8, 0)]
    moving, _, _ = signals_of(mv_records(rows), 48, 48)
    assert np.argwhere(moving).tolist() == [[0, 1]]


def test_motion_below_the_threshold_does_not_count():
    rows = [(-1, 16, 16, 8 + 16 * c, 8, 0, 0) for c in range(4)]
    rows[1] = (-1, 16, 16, 24, 8, -3, 0)     # 0.75 px
    rows[2] = (-1, 16, 16, 40, 8, 0, -4)     # 1 px
    moving, _, _ = signals_of(mv_records(rows), 64, 16)
    assert moving.tolist() == [[False, False, True, False]]


def test_all_intra_p_frame_has_no_vectors():
    batch = macroblock_signals([None], 64, 32, 1.0)
    assert batch.intra.all() and not batch.moving.any() and batch.intra_share.tolist() == [1.0]


def test_global_motion_is_subtracted_per_reference_direction():
    # A B-frame in a pan: past-referencing blocks moved -2 px, future-referencing +4 px
    # (the other way, twice as far); one block moves against the scene.
    rows = [(-1, 16, 16, 8 + 16 * c, 8, -8, 0) for c in range(6)]
    rows += [(1, 16, 16, 8 + 16 * c, 24, 16, 0) for c in range(6)]
    rows[2] = (-1, 16, 16, 40, 8, 8, 0)
    moving, _, global_motion = signals_of(mv_records(rows), 96, 32)
    assert np.argwhere(moving).tolist() == [[0, 2]]
    assert global_motion == (2.0, 0.0)   # the scene moved 2 px right


def test_a_moving_box_flags_its_macroblocks_in_a_real_p_frame():
    frames, truth = moving_boxes(12, W, H, boxes=[BOX], seed=1)
    decoded = decode(encode_h264(frames, FPS, gop=12))
    f = decoded[6]
    moving, intra, _ = signals_of(f.motion_vectors, f.width, f.height)
    flags = dynamic_macroblocks(moving, intra, PruningConfig.served())
    hit = (flags & truth.moving[6]).sum()
    assert hit / truth.moving[6].sum() >= 0.85
    assert flags.sum() <= 1.5 * truth.moving[6].sum()


def test_b_frames_in_a_pan_flag_only_the_object():
    frames, truth = moving_boxes(24, W, H, boxes=[BOX], seed=1, pan_px_per_frame=3)
    decoded = decode(encode_h264(frames, FPS, gop=24, bframes=2))
    b_frames = [f for f in decoded if f.pict_type == "B"]
    assert b_frames
    for f in b_frames:
        moving, intra, global_motion = signals_of(f.motion_vectors, f.width, f.height)
        flags = dynamic_macroblocks(moving, intra, PruningConfig.served())
        assert flags.mean() < 3 * truth.moving[f.index].mean()
        # panning right moves the scene left on screen, 3 px per frame of distance
        assert global_motion[0] in (-3.0, -6.0)


# --- the batched signals against the obvious per-frame reading -------------------------------

CAR = Path(__file__).resolve().parent.parent / "media" / "car-detection.mp4"


def reference_signals(motion_vectors, width, height, threshold_px, bidirectional):
    """macroblock_signals the obvious way: one frame at a time, one vector at a time.

    Per frame: the median motion of each reference direction (np.median of every
    (n // 256)-th vector when n > 256; taken as 0 without a median where most of a frame's
    vectors are 0 on that axis and it has no future references), subtracted; a vector
    moves if what is left reaches threshold_px; a macroblock with no vector is intra.
    """
    mb_h, mb_w = -(-height // 16), -(-width // 16)
    moving = np.zeros((len(motion_vectors), mb_h, mb_w), bool)
    intra = np.ones_like(moving)
    global_motion = np.zeros((len(motion_vectors), 2))

    def median(values):
        return float(np.median(values[::len(values) // 256] if len(values) > 256 else values))

    for k, (mv, may_be_b) in enumerate(zip(motion_vectors, bidirectional)):
        if mv is None or not len(mv):
            continue
        x, y = mv["motion_x"].astype(float), mv["motion_y"].astype(float)
        future = mv["source"] > 0 if may_be_b else np.zeros(len(mv), bool)
        if future.any():
            past = ~future
            px, py = (median(x[past]), median(y[past])) if past.any() else (0.0, 0.0)
            fx, fy = median(x[future]), median(y[future])
            offset_x, offset_y = np.where(future, fx, px), np.where(future, fy, py)
            # the scene moved -(past motion), or +(future motion) with no past reference
            gx, gy = (-px, -py) if past.any() else (fx, fy)
        else:
            px = 0.0 if (x == 0).sum() * 2 > len(x) else median(x)
            py = 0.0 if (y == 0).sum() * 2 > len(y) else median(y)
            offset_x, offset_y = np.full(len(mv), px), np.full(len(mv), py)
            gx, gy = -px, -py
        scale = float(mv["motion_scale"][0])
        global_motion[k] = gx / scale, gy / scale
        for i in range(len(mv)):
            row = min(int(mv["dst_y"][i]) // 16, mb_h - 1)
            col = min(int(mv["dst_x"][i]) // 16, mb_w - 1)
            intra[k, row, col] = False
            if (x[i] - offset_x[i]) ** 2 + (y[i] - offset_y[i]) ** 2 >= (threshold_px * scale) ** 2:
                moving[k, row, col] = True
    return moving, intra, global_motion


@pytest.fixture(scope="module")
def real_streams():
    """Real H.264 decoded as codec_parser decodes it: the bundled clip (P-frames, a
    shaking camera: most frames have a global motion) and a generated pan with B-frames."""
    streams = {}
    if CAR.exists():
        streams["car"] = decoded_clip(str(CAR))
    frames, _ = moving_boxes(60, W, H, boxes=[BOX], seed=1, pan_px_per_frame=3, noise_sigma=2.0)
    streams["pan with B-frames"] = decode(encode_h264(frames, FPS, gop=30, bframes=2))
    # a still camera: every B-frame median is 0 (found without sorting)
    frames, _ = moving_boxes(60, W, H, boxes=[BOX], seed=1, noise_sigma=2.0)
    streams["still camera with B-frames"] = decode(encode_h264(frames, FPS, gop=30, bframes=2))
    return streams


def test_batched_signals_equal_the_per_frame_per_vector_reading_on_real_h264(real_streams):
    for name, frames in real_streams.items():
        coded = [f for f in frames if f.pict_type != "I"]
        width, height = frames[0].width, frames[0].height
        moved = 0
        for first in range(0, len(coded), 64):     # codec_parser's batches
            batch = coded[first:first + 64]
            vectors = [f.motion_vectors for f in batch]
            types = [f.pict_type == "B" for f in batch]
            got = macroblock_signals(vectors, width, height, 1.0, types)
            moving, intra, global_motion = reference_signals(vectors, width, height, 1.0, types)
            assert np.array_equal(got.moving, moving), name
            assert np.array_equal(got.intra, intra), name
            assert np.array_equal(got.global_motion_px, global_motion.astype(np.float32)), name
            moved += int((global_motion != 0).any(axis=1).sum())
        if name != "still camera with B-frames":
            assert moved >= len(coded) // 4, f"{name}: too few frames exercise the median"


def reference_changed_wholesale(masks, frame):
    """The I-frame scene-cut test the obvious way: each macroblock's mean |dY| over its 4x4
    sample of pixels inside the frame, macroblock by macroblock."""
    previous = masks.previous_decoded
    if previous is None or (previous.width, previous.height) != (frame.width, frame.height):
        return False
    a = frame.to_ndarray(format="gray").astype(float)[::4, ::4]
    b = previous.to_ndarray(format="gray").astype(float)[::4, ::4]
    rows, cols = -(-frame.height // 16), -(-frame.width // 16)
    changed = [abs(a[4 * r:4 * r + 4, 4 * c:4 * c + 4] - b[4 * r:4 * r + 4, 4 * c:4 * c + 4]
                   ).mean() > masks.config.scene_cut_luma
               for r in range(rows) for c in range(cols)]
    return float(np.mean(changed)) >= masks.config.scene_cut_share


def test_codec_keeps_equal_those_of_the_obvious_reading_on_real_h264(geometry, real_streams,
                                                                    monkeypatch):
    """The kept merge groups and whole-frame reasons of every sampled frame, from the
    batched signals and scene-cut test, equal those of reference_signals and
    reference_changed_wholesale (each frame alone), on the bundled clip and a clip with
    B-frames, fed as codec_parser gets them."""
    from codecsight import policy
    from codecsight.tools.synth import encode_h264 as encode

    def reference_batch(vectors, width, height, threshold_px, bidirectional):
        moving, intra, global_motion = reference_signals(vectors, width, height, threshold_px,
                                                        bidirectional)
        return MacroblockSignals(moving, intra, global_motion.astype(np.float32))

    # a still camera (a pan keeps every group: nothing to compare) with B-frames
    frames, _ = moving_boxes(60, W, H, boxes=[BOX], seed=1, noise_sigma=2.0)
    clips = {"B-frames": [encode(frames[i:i + 30], FPS, gop=30, bframes=2) for i in (0, 30)]}
    if CAR.exists():
        from codecsight_client.demux import iter_chunks

        clips["car"] = list(iter_chunks(str(CAR), 4.0))

    def run(chunks):
        parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec")
        out = []
        for i, c in enumerate(chunks):
            final = i == len(chunks) - 1
            result = parser.parse(c, final=final) if isinstance(c, bytes) else parser.parse(
                c.data, final=final, au_bytes=list(c.au_sizes), au_pts=list(c.au_pts))
            out += [(k.tolist(), why) for k, why in zip(result.keep, result.whole_frame)]
        return out

    batched = {name: run(chunks) for name, chunks in clips.items()}
    monkeypatch.setattr(policy, "macroblock_signals", reference_batch)
    monkeypatch.setattr(policy.StreamMasks, "_changed_wholesale", reference_changed_wholesale)
    for name, chunks in clips.items():
        reference = run(chunks)
        assert len(reference) >= 10 and batched[name] == reference, name
        kept = sum(np.sum(k) for k, _ in reference)
        assert 0 < kept < sum(np.size(k) for k, _ in reference), name   # pruned, not empty


# --- masks ------------------------------------------------------------------------------------

def test_isolated_intra_macroblocks_are_refresh_noise():
    intra = np.zeros((6, 7), bool)
    intra[0, 0] = intra[5, 1] = intra[5, 6] = True    # scattered encoder refresh
    intra[1:4, 3:6] = True                            # a 3x3 blob: a real change
    flags = dynamic_macroblocks(np.zeros_like(intra), intra, PruningConfig.served(intra_support=5))
    # the blob's centre (9 flagged around it) and edge macroblocks (6) count, its corners
    # (4) and the isolated ones (1) do not
    expected = np.zeros_like(intra)
    expected[1:4, 4] = expected[2, 3:6] = True
    assert np.array_equal(flags, expected)


def test_a_chunk_of_frames_reads_as_each_frame_alone():
    frames, _ = moving_boxes(20, W, H, boxes=[BOX], seed=1, pan_px_per_frame=2)
    decoded = [f for f in decode(encode_h264(frames, FPS, gop=20, bframes=2))
               if f.pict_type != "I"]
    batch = macroblock_signals([f.motion_vectors for f in decoded], W, H, 1.0)
    for k, f in enumerate(decoded):
        moving, intra, global_motion = signals_of(f.motion_vectors, W, H)
        assert np.array_equal(batch.moving[k], moving) and np.array_equal(batch.intra[k], intra)
        assert tuple(batch.global_motion_px[k].tolist()) == global_motion


def test_moving_macroblocks_need_flagged_neighbours():
    moving = np.zeros((5, 5), bool)
    moving[0, 4] = True                               # a lone noisy vector
    moving[2:4, 1:3] = True                           # a 2x2 moving object
    flags = dynamic_macroblocks(moving, np.zeros_like(moving),
                                PruningConfig.served(motion_support=3))
    assert np.array_equal(flags, np.pad(np.ones((2, 2), bool), ((2, 1), (1, 2))))


def test_macroblocks_map_to_every_merge_group_they_overlap():
    rows = overlap_matrix(4, 16, 3, 28)       # macroblock rows 0-63 px, groups 0-83 px
    assert rows.astype(int).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1]]
    mb = np.zeros((4, 4), bool)
    mb[1, 3] = True                           # pixels 16-31 x 48-63
    groups = groups_from_macroblocks(mb, rows, overlap_matrix(4, 16, 3, 28))
    assert np.argwhere(groups).tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]


def test_changed_groups_use_the_mean_or_an_edge_of_strong_changes():
    a = np.zeros((56, 84), np.uint8)
    b = a.copy()
    b[:28, :28] = 7                           # group (0, 0): mean 7 > 6
    b[:28, 28:56] = 5                         # group (0, 1): mean 5, no strong pixels
    b[28:, 56:] = np.where(np.arange(28)[:, None] < 2, 40, 0)  # (1, 2): a 2-row edge
    valid = valid_pixels(84, 56, 28)
    assert np.argwhere(changed_groups(a, b, 28, valid, 6.0)).tolist() == [[0, 0]]
    assert np.argwhere(changed_groups(a, b, 28, valid, 6.0, 16.0)).tolist() == [[0, 0], [1, 2]]
    only = np.zeros((2, 3), bool)
    only[1, 2] = True
    assert np.argwhere(changed_groups(a, b, 28, valid, 6.0, 16.0, where=only)).tolist() == [[1, 2]]


def test_padding_does_not_dilute_an_edge_groups_mean():
    # A 40x40 frame pads to 56x56: group (1, 1) holds 12x12 real pixels.
    valid = valid_pixels(40, 40, 28)
    assert valid.tolist() == [[784, 336], [336, 144]]
    a, b = np.zeros((56, 56), np.uint8), np.zeros((56, 56), np.uint8)
    b[28:40, 28:40] = 8
    assert oracle_keep(a, b, 28, valid, 6.0).tolist() == [[False, False], [False, True]]


def test_evs_keeps_the_fixed_share_most_unlike_the_previous_frame(geometry):
    rng = np.random.default_rng(0)
    previous = rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)     # 3 x 4 groups
    current = previous.copy()
    current[:28, 28:56] = 255 - current[:28, 28:56]                  # group (0, 1)
    current[56:, 84:] = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)  # group (2, 3)
    keep = evs_keep(previous, current, geometry, pruning_rate=0.75)
    assert keep.sum() == 3                     # int(12 * 0.25)
    assert keep[0, 1] and keep[2, 3]


def test_pruning_config_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match=r"evs_pruning_rate=1\.0"):
        PruningConfig.served(evs_pruning_rate=1.0)
    with pytest.raises(ValueError, match=r"motion_support=0"):
        PruningConfig.served(motion_support=0)


def test_codec_parser_config_declares_exactly_the_declared_parameters():
    from codecsight import params

    raw = params.served_parameters("codec_parser")   # a missing or unknown key raises
    assert set(raw) == set(params.declared("codec_parser"))
    assert set(PruningConfig.__dataclass_fields__) <= set(raw)
    assert PruningConfig.served() == PruningConfig.from_params(raw)


def test_policies_are_the_protocol_ones_plus_the_oracle():
    assert PATCH_POLICIES == ("dense", "evs", "codec", "vllm_evs")
    assert POLICIES == PATCH_POLICIES + ("oracle",)


# --- the stream's masks -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def box_stream():
    """10 s of one box crossing a static scene at 2 px/frame, keyframe every 2 s."""
    box = Box(x=20, y=48, width=48, height=32, vx=2.0, vy=0.0)
    frames, _ = moving_boxes(125, W, H, boxes=[box], noise_sigma=2.0, seed=2)
    return chunks_of(frames, gop=25)


def test_first_frame_is_whole_then_codec_keeps_only_what_moved(geometry, box_stream):
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=0))
    (result,), keeps = parse_all(parser, box_stream)
    kept = result.frame_meta[:, META["kept_groups"]]
    assert kept[0] == GROUPS and result.stats.whole_frames == {"start": 1}
    # the box (48x32, 12 px further each sampled frame) touches 2-3 x 3-4 groups
    assert all(3 <= k <= 12 for k in kept[1:])
    assert result.stats.kept_share < 0.2


def test_i_frames_are_not_reasons_to_keep_a_whole_frame(geometry, box_stream):
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=0))
    (result,), keeps = parse_all(parser, box_stream)
    types = result.frame_meta[:, META["frame_type"]]
    i_frames = [k for k, t in zip(result.frame_meta[1:, META["kept_groups"]], types[1:])
                if t == 1]
    assert len(i_frames) == 4          # frames 25, 50, 75 and 100 are sampled I-frames
    assert all(k < GROUPS // 4 for k in i_frames)


def test_a_timer_keeps_a_whole_frame_every_whole_frame_seconds(geometry, box_stream):
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=4.0))
    (result,), keeps = parse_all(parser, box_stream)
    whole = [int(m[META["time_ms"]]) for m in result.frame_meta
             if m[META["kept_groups"]] == GROUPS]
    assert whole == [0, 4000, 8000]
    assert result.stats.whole_frames == {"start": 1, "timer": 2}


def test_a_scene_cut_keeps_the_whole_frame(geometry):
    first, _ = moving_boxes(40, W, H, boxes=[BOX], seed=3)
    second, _ = moving_boxes(40, W, H, boxes=[BOX], seed=4)   # another background
    # one GOP across the cut: the cut lands on a P-frame that is almost all intra
    data = encode_h264(np.concatenate([first, second]), FPS, gop=80)
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=0))
    result = parser.parse(data, final=True)
    assert result.stats.whole_frames == {"start": 1, "scene_cut": 1}
    cut = [int(m[META["frame_index"]]) for m in result.frame_meta[1:]
           if m[META["kept_groups"]] == GROUPS]
    assert cut == [44]                          # first sampled frame after frame 40


def test_a_scene_cut_on_an_i_frame_is_found_by_its_pixels(geometry):
    first, _ = moving_boxes(40, W, H, boxes=[BOX], seed=3)
    second, _ = moving_boxes(40, W, H, boxes=[BOX], seed=4)
    # GOP 20: frames 20 and 60 are I-frames inside a shot, frame 40 an I-frame at the cut
    data = encode_h264(np.concatenate([first, second]), FPS, gop=20)
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=0))
    result = parser.parse(data, final=True)
    assert result.stats.whole_frames == {"start": 1, "scene_cut": 1}
    whole = [int(m[META["frame_index"]]) for m in result.frame_meta
             if m[META["kept_groups"]] == GROUPS]
    assert whole == [0, 44]


def test_state_advances_under_every_policy_so_a_stream_can_switch(geometry, box_stream):
    frames, _ = moving_boxes(100, W, H, boxes=[BOX], noise_sigma=2.0, seed=2)
    chunks = chunks_of(frames, gop=25, pieces=4)
    config = PruningConfig.served(whole_frame_seconds=0)
    switching = StreamParser(geometry, "h264", FPS, 2.0, config=config)
    always = StreamParser(geometry, "h264", FPS, 2.0, config=config)
    for i, (chunk, policy) in enumerate(zip(chunks, ["dense", "codec", "evs", "codec"])):
        got = switching.parse(chunk, policy, final=i == 3)
        reference = always.parse(chunk, "codec", final=i == 3)
        assert got.stats.policy == policy
        if i == 1:   # the first codec request after dense: no new start, prunes at once
            assert got.stats.whole_frames == {}
            assert got.stats.kept_share < 0.3
            assert got.stats.groups_flagged_by_codec == \
                reference.stats.groups_flagged_by_codec


def test_patches_are_the_kept_groups_of_whole_frame_patchify(geometry, box_stream):
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec")
    result = parser.parse(box_stream[0], final=True)
    dense = StreamParser(geometry, "h264", FPS, 2.0).parse(box_stream[0], final=True)
    assert result.frame_meta[:, :META["kept_groups"]].tolist() == \
        dense.frame_meta[:, :META["kept_groups"]].tolist()
    # rows of the dense set whose (t, h, w) the codec set kept, in the same order
    index = {tuple(p): i for i, p in enumerate(dense.positions)}
    rows = [index[tuple(p)] for p in result.positions]
    assert np.array_equal(result.patches, dense.patches[rows])
    assert len(result.patches) == 4 * result.frame_meta[:, META["kept_groups"]].sum()


def test_every_patch_pairs_its_frame_with_the_previous_sampled_frame(geometry):
    # The box stops for a while, so codec keeps nothing in some sampled frames and must
    # convert such a frame only when the next one keeps something; two chunks, so the
    # pairing carries across a chunk boundary.
    box = Box(x=40, y=48, width=48, height=32, vx=2.0, vy=0.0)
    frames, _ = moving_boxes(100, W, H, boxes=[box], noise_sigma=0.0, seed=4)
    frames[30:70] = frames[30]
    chunks = chunks_of(frames, gop=25, pieces=2)
    decoder, sampler = StreamDecoder(), FrameSampler(FPS, 2.0)
    rgb = np.stack([frame_to_rgb(f.frame, 28) for c in chunks
                    for f in decoder.feed(c) + (decoder.flush() if c is chunks[-1] else [])
                    if sampler.is_sampled(f.index)])
    previous = np.concatenate([rgb[:1], rgb[:-1]])
    expected, expected_positions = patchify(rgb, geometry, np.arange(len(rgb)),
                                            previous=previous)
    dense, _ = parse_all(StreamParser(geometry, "h264", FPS, 2.0), chunks)
    np.testing.assert_array_equal(np.concatenate([r.patches for r in dense]), expected)
    np.testing.assert_array_equal(np.concatenate([r.positions for r in dense]),
                                  expected_positions)
    no_timer = PruningConfig.served(whole_frame_seconds=0)
    codec, keeps = parse_all(StreamParser(geometry, "h264", FPS, 2.0, policy="codec",
                                          config=no_timer), chunks)
    kept = [int(k.sum()) for k in keeps]
    assert 0 in kept and kept[-1] > 0, kept      # a frame that kept nothing, then motion
    rows = np.repeat(np.stack(keeps).ravel(), geometry.patches_per_group)
    np.testing.assert_array_equal(np.concatenate([r.patches for r in codec]), expected[rows])


def test_frames_that_keep_nothing_are_not_converted(geometry):
    frames, _ = moving_boxes(40, W, H, boxes=(), seed=5)
    parser = StreamParser(geometry, "h264", FPS, 2.0, policy="codec")
    result = parser.parse(encode_h264(frames, FPS, gop=20), final=True)
    assert result.frame_meta[:, META["kept_groups"]].tolist() == [GROUPS] + [0] * 6
    assert set(result.positions[:, 0].tolist()) == {0}


def test_hevc_streams_fall_back_to_evs_and_say_so(geometry):
    frames, _ = moving_boxes(30, W, H, boxes=[BOX], seed=2)
    data = encode_h264(frames, FPS, gop=15, codec="libx265")
    parser = StreamParser(geometry, "hevc", FPS, 2.0, policy="codec")
    result = parser.parse(data, final=True)
    assert result.stats.policy == "evs" and result.stats.policy_requested == "codec"
    assert "hevc" in result.stats.policy_fallback
    assert result.stats.intra_share is None        # no motion vectors were read
    assert result.frame_meta[1:, META["kept_groups"]].tolist() == [int(GROUPS * 0.4)] * 4


def test_unknown_policy_names_the_choices(geometry):
    parser = StreamParser(geometry, "h264", FPS, 2.0)
    with pytest.raises(ValueError, match="unknown policy 'fast'.*dense, evs, codec, vllm_evs, oracle"):
        parser.parse(b"", "fast")


# --- end to end: a codec-pruned window reaches the LLM with fewer tokens, same positions -------

def test_codec_pruned_window_reaches_the_llm_at_the_dense_positions(tiny, tiny_dir, geometry):
    model, tokenizer = tiny
    frames, _ = moving_boxes(50, 224, 168, boxes=[Box(x=20, y=40, width=40, height=28,
                                                       vx=4.0)], noise_sigma=2.0, seed=7)
    data = encode_h264(frames, FPS, gop=25)
    encoder = PrunedVisionEncoder(model.model.visual).eval()
    vlm = VisualLM(model, tokenizer, max_new_tokens=2)
    windows = {}
    for policy in ("dense", "codec"):
        result = StreamParser(geometry, "h264", FPS, 2.0, policy=policy).parse(data, final=True)
        tokens = encoder.encode(result.patches, result.positions)
        window = split_frames(tokens, result.positions, result.frame_meta, geometry.merge_size)
        embeds, positions = vlm.layout(window, "is anyone moving?")
        windows[policy] = (window, embeds, positions)
    dense, codec = windows["dense"], windows["codec"]
    n_dense = sum(len(f.tokens) for f in dense[0])
    n_codec = sum(len(f.tokens) for f in codec[0])
    assert n_codec < 0.5 * n_dense
    prefix = len(vlm.prefix_ids)
    # every kept token sits at the M-RoPE (t, h, w) its cell has in the dense window
    dense_at = {}
    for k, (frame, cells) in enumerate((f, c) for f in dense[0] for c in f.cells):
        dense_at[(frame.t, *cells)] = k
    rows = [dense_at[(f.t, *c)] for f in codec[0] for c in f.cells]
    assert torch.equal(codec[2][:, prefix:prefix + n_codec],
                       dense[2][:, prefix:prefix + n_dense][:, rows])
    # ... and the question after the video keeps its positions: gaps, not shifts
    assert torch.equal(codec[2][:, prefix + n_codec:], dense[2][:, prefix + n_dense:])
    # the whole first frame goes through unchanged, token for token
    assert torch.allclose(codec[0][0].tokens, dense[0][0].tokens, atol=1e-5)


def test_a_scaled_frame_maps_macroblocks_onto_the_scaled_groups():
    # 1280 px scaled to 1176: macroblock 79 (px 1264-1279) lands at 1161-1176, group 41
    cols = overlap_matrix(80, 16, 42, 28, source_pixels=1280, scaled_pixels=1176)
    assert np.flatnonzero(cols[79]).tolist() == [41]
    assert np.flatnonzero(cols[70]).tolist() == [36, 37]      # 1120-1136 -> 1029-1044
    assert np.flatnonzero(cols[0]).tolist() == [0]            # 0-16 -> 0-14.7
    assert (cols.sum(axis=0) > 0).all()                        # every group is reachable
    # unscaled and clipped to the frame, the matrix is the plain one
    assert np.array_equal(overlap_matrix(27, 16, 16, 28, source_pixels=432),
                          overlap_matrix(27, 16, 16, 28))


def test_a_reversed_axis_starts_with_the_partial_macroblock():
    # 1080 rows, 68 macroblocks (1088 px): turned upside down, macroblock 0 holds 8 rows
    rows = overlap_matrix(68, 16, 39, 28, source_pixels=1080, offset=1080 - 68 * 16)
    assert np.flatnonzero(rows[0]).tolist() == [0]             # px -8..7: group 0 only
    assert np.flatnonzero(rows[2]).tolist() == [0, 1]          # px 24..39
    assert np.flatnonzero(rows[67]).tolist() == [38]           # px 1064..1079
