"""PARSE_STATS.kept_masks: each sampled frame's kept merge groups, bit-packed, as the policy
chose them; the operator page overlays them on the frame the server sampled."""
import dataclasses
import itertools
import json

import numpy as np
import pytest

from codecsight import protocol as P
from codecsight.checkpoint import Geometry
from codecsight.parser import StreamParser
from codecsight.policy import PruningConfig
from codecsight_client.demux import iter_chunks
from codecsight_client.stream import StreamClient
from tests.streams import CLIP, clip_settings, new_id


@pytest.mark.parametrize("shape", [(1, 1), (9, 12), (16, 28), (7, 13)])
def test_a_mask_survives_packing_for_any_grid(shape):
    keep = np.random.default_rng(sum(shape)).random(shape) < 0.3
    entry = P.pack_kept_mask(keep, t=3, time_s=1.23456, group_px=28)
    assert entry["grid"] == list(shape) and entry["t"] == 3 and entry["time_s"] == 1.235
    assert np.array_equal(P.unpack_kept_mask(json.loads(json.dumps(entry))), keep)


def test_a_mask_whose_bits_do_not_fit_its_grid_is_refused():
    entry = P.pack_kept_mask(np.ones((4, 4), bool), t=0, time_s=0.0, group_px=28)
    with pytest.raises(ValueError, match="does not fit a 5x4 grid"):
        P.unpack_kept_mask({**entry, "grid": [5, 4]})


def test_the_bundled_clip_costs_a_few_dozen_bytes_per_sampled_frame():
    # 768x432 pads to 784x448: 16 x 28 groups = 448 bits = 56 bytes = 76 base64 characters.
    entry = P.pack_kept_mask(np.ones((16, 28), bool), t=12345, time_s=1234.567, group_px=28)
    assert len(entry["bits"]) == 76
    assert len(json.dumps(entry)) < 160   # keys and numbers included


def test_the_parser_reports_exactly_the_groups_its_policy_kept(tiny_dir):
    geometry = Geometry.from_model_dir(tiny_dir)
    parser = StreamParser(geometry, "h264", 12.5, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=4.0))
    shares = []
    for chunk in itertools.islice(iter_chunks(CLIP, 2.0), 4):
        result = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts)
        masks = result.stats.kept_masks
        assert len(masks) == result.stats.frames_sampled == len(result.keep)
        for entry, keep, row in zip(masks, result.keep, result.frame_meta):
            assert np.array_equal(P.unpack_kept_mask(entry), keep)
            assert entry["t"] == row[P.META["t"]]
            assert entry["time_s"] * 1000 == pytest.approx(row[P.META["time_ms"]], abs=1)
            assert entry["grid"] == [16, 28] and entry["group_px"] == 28
            assert chunk.start_s - 1e-3 <= entry["time_s"] < chunk.end_s
        shares += [float(keep.mean()) for keep in result.keep]
    # 8 s at 2 fps; the start is kept whole, then the codec policy prunes
    assert len(shares) == 16 and shares[0] == 1.0 and min(shares) < 0.5


def test_a_pair_of_frames_reports_the_groups_either_kept_at_its_newer_frames_time(tiny_dir):
    # Real checkpoints' layout: sampled frames 2k and 2k+1 fill one temporal patch.
    geometry = dataclasses.replace(Geometry.from_model_dir(tiny_dir), frame_layout="pairs")
    parser = StreamParser(geometry, "h264", 12.5, 2.0, policy="codec",
                          config=PruningConfig.served(whole_frame_seconds=4.0))
    pairs = 0
    for chunk in itertools.islice(iter_chunks(CLIP, 2.0), 4):
        result = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts)
        masks, stats = result.stats.kept_masks, result.stats
        assert len(masks) == len(result.frame_meta) == len(stats.groups_kept_per_frame) == 2
        for i, (entry, row) in enumerate(zip(masks, result.frame_meta)):
            first, second = result.keep[2 * i], result.keep[2 * i + 1]
            assert np.array_equal(P.unpack_kept_mask(entry), first | second)
            assert int((first | second).sum()) == stats.groups_kept_per_frame[i]
            assert entry["t"] == row[P.META["t"]]
            assert entry["time_s"] * 1000 > row[P.META["time_ms"]]   # newer than the mean
            pairs += bool((first != second).any())
    assert pairs > 0   # the union differs from each frame's own selection somewhere


@pytest.mark.server
def test_the_server_sends_each_sampled_frames_mask_with_its_answer(grpc):
    stream = StreamClient(grpc, new_id("kept-mask"), clip_settings(policy="codec",
                                                                   analysis_fps=2.0))
    chunks = list(itertools.islice(iter_chunks(CLIP, 2.0), 4))
    windows = [stream.send(c, last=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    for w in windows:
        masks = [P.unpack_kept_mask(e) for e in w.parse.kept_masks]
        assert len(masks) == w.parse.frames_sampled == len(w.parse.groups_kept_per_frame)
        assert [int(m.sum()) for m in masks] == w.parse.groups_kept_per_frame
        assert sum(m.size for m in masks) == w.parse.groups_total
    shares = [float(m.mean()) for w in windows for m in map(P.unpack_kept_mask,
                                                           w.parse.kept_masks)]
    assert shares[0] == 1.0 and min(shares) < 0.5   # the start is whole, then pruned
