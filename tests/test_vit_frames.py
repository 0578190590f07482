"""Per-frame ViT batching (vision.batch_frames, encode_patch_sets): every frame its own batch
item, padded with dummy merge groups no real patch sees, tokens equal to each frame encoded
alone in every family; vit_pruned's `device`; perf/bench_vit_frames.py on a tiny input."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import triton_stub
from codecsight import checkpoint, params, vision
from codecsight.families import family_for_dir
from codecsight.serve import REPO_ROOT


def uniform_set(frame_rows, first_t=0, columns=3):
    """A set whose frame i has frame_rows[i] patches (whole merge groups), t from first_t;
    patch values say where they came from: set rows count up from 1."""
    rows = sum(frame_rows)
    patches = np.arange(1, rows + 1, dtype=np.float32)[:, None].repeat(4, axis=1)
    positions = np.zeros((rows, columns), np.int64)
    positions[:, 0] = np.repeat(np.arange(first_t, first_t + len(frame_rows)), frame_rows)
    within = np.concatenate([np.arange(n) for n in frame_rows]) % 4
    group = np.concatenate([np.arange(n) for n in frame_rows]) // 4
    positions[:, 1] = within // 2
    positions[:, 2] = group * 2 + within % 2
    if columns == 5:
        positions[:, 3:] = [2, 64]
    return patches, positions


def random_set(geometry, n_frames, groups_h, groups_w, share, seed, first_t=0):
    rng = np.random.default_rng(seed)
    pixel = geometry.group_pixels
    frames = rng.integers(0, 256, (n_frames, groups_h * pixel, groups_w * pixel, 3), np.uint8)
    keep = rng.random((n_frames, groups_h, groups_w)) < share
    keep[:, 0, 0] = True
    return vision.patchify(frames, geometry, np.arange(first_t, first_t + n_frames), keep)


def each_frame_alone(encode, patches, positions):
    return np.concatenate([encode(patches[a:b], positions[a:b])
                           for a, b in vision.frame_spans(positions)])


# --- batch_frames: the execution plan --------------------------------------------------------


def test_every_frame_is_one_batch_item_in_segment_zero():
    sets = [uniform_set([8, 8], first_t=5), uniform_set([8], first_t=5)]
    (batch,) = vision.batch_frames(sets, max_patches=100)
    assert batch.patches.shape == (3, 8, 4) and batch.positions.shape == (3, 8, 3)
    assert batch.frames == [(0, 0, 8), (0, 8, 8), (1, 0, 8)]
    assert (batch.positions[:, :, 0] == 0).all()
    np.testing.assert_array_equal(batch.patches[1], sets[0][0][8:16])
    np.testing.assert_array_equal(batch.positions[2, :, 1:], sets[1][1][:, 1:])
    assert sets[0][1][0, 0] == 5          # the caller's positions are left alone


def test_frames_of_equal_length_share_executions_up_to_max_patches():
    # Dense frames of one picture size: 5 frames of 48, at most 2 per execution of 100.
    batches = vision.batch_frames([uniform_set([48, 48, 48]), uniform_set([48, 48])], 100)
    assert [b.patches.shape[:2] for b in batches] == [(2, 48), (2, 48), (1, 48)]
    assert [b.frames for b in batches] == [[(0, 0, 48), (0, 48, 48)],
                                           [(0, 96, 48), (1, 0, 48)], [(1, 48, 48)]]


def test_frames_sorted_longest_first_join_a_batch_only_within_the_padding_share():
    # L = 40: 32 pads 8 (0.2 of L) and joins, 28 would pad 12 (0.3) and starts the next.
    sets = [uniform_set([28, 40]), uniform_set([32, 4, 4])]
    batches = vision.batch_frames(sets, max_patches=1000, max_padding=0.25)
    assert [(b.patches.shape[:2], b.frames) for b in batches] == [
        ((2, 40), [(0, 28, 40), (1, 0, 32)]),
        ((1, 28), [(0, 0, 28)]),
        ((2, 4), [(1, 32, 4), (1, 36, 4)])]
    assert [b.patches.shape[0] for b in vision.batch_frames(sets, 1000, max_padding=0.0)] \
        == [1, 1, 1, 2]


def test_padding_is_whole_dummy_merge_groups_in_a_segment_of_their_own():
    sets = [uniform_set([16], columns=5), uniform_set([8], first_t=3, columns=5)]
    (batch,) = vision.batch_frames(sets, max_patches=64, max_padding=0.5)
    item = batch.positions[1]
    assert (item[:8, 0] == 0).all() and (item[8:, 0] == 1).all()
    assert item[8:, 1:3].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] * 2
    assert (item[8:, 3:] == [2, 64]).all()          # the frame's grid columns, still valid
    vision.check_merge_groups(item, merge_size=2)   # whole groups: the merger folds them right
    assert (batch.patches[1, 8:] == 0).all()


def test_a_frame_larger_than_max_patches_is_refused_naming_set_and_frame():
    with pytest.raises(ValueError, match=r"patch set 1: frame t=3 has 64 patches, "
                                         r"more than max_patches=48"):
        vision.batch_frames([uniform_set([32]), uniform_set([16, 64], first_t=2)], 48)


def test_a_set_whose_frames_are_interleaved_is_refused():
    patches, positions = uniform_set([8, 8])
    positions[:, 0] = np.tile([0, 1], 8)
    with pytest.raises(ValueError, match="patch set 0: the patches of a frame"):
        vision.batch_frames([(patches, positions)], max_patches=100)


def test_a_frame_of_broken_merge_groups_is_refused():
    patches, positions = uniform_set([8, 6])
    with pytest.raises(ValueError, match="patch set 0: frame t=1 has 6 patches, not a whole "
                                         "number of 4-patch merge groups"):
        vision.batch_frames([(patches, positions)], max_patches=100)


# --- tokens equal each frame encoded alone ---------------------------------------------------


@pytest.fixture(scope="module")
def geometry(tiny_dir):
    return checkpoint.Geometry.from_model_dir(tiny_dir)


@pytest.fixture(scope="module")
def onnx_encoder(onnx_path):
    return vision.OnnxVisionEncoder(onnx_path, intra_op_threads=1)


def streams(geometry, seed=0):
    """Four streams' sets of unequal frames, all counting t from 0 (so t values collide)."""
    return [random_set(geometry, 2, 3, 4, 0.5, seed), random_set(geometry, 1, 2, 3, 0.9, seed + 1),
            random_set(geometry, 3, 4, 4, 0.3, seed + 2), random_set(geometry, 2, 2, 2, 1.0, seed + 3)]


def test_onnx_tokens_equal_each_frame_encoded_alone(geometry, onnx_encoder):
    sets = streams(geometry)
    batches = vision.batch_frames(sets, max_patches=96, max_padding=0.5)
    assert any(b.patches.shape[0] > 1 for b in batches)                  # frames shared
    assert any(n < b.patches.shape[1] for b in batches for _, _, n in b.frames)  # and padded
    tokens = vision.encode_patch_sets(onnx_encoder, sets, max_patches=96, max_padding=0.5)
    for got, (patches, positions) in zip(tokens, sets):
        expected = each_frame_alone(onnx_encoder, patches, positions)
        assert got.shape == (len(patches) // 4, 128)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_torch_tokens_equal_the_whole_set_encoded_in_one_masked_sequence(geometry, tiny):
    encoder = vision.PrunedVisionEncoder(tiny[0].model.visual).eval()
    sets = streams(geometry, seed=4)
    tokens = vision.encode_patch_sets(encoder.encode, sets, max_patches=64, max_padding=0.5)
    for got, patch_set in zip(tokens, sets):
        np.testing.assert_allclose(got, encoder.encode(*patch_set), rtol=0, atol=1e-5)


def test_only_empty_sets_give_empty_tokens_of_the_encoders_width(geometry, onnx_encoder):
    empty = (np.zeros((0, geometry.patch_dim), np.float32), np.zeros((0, 3), np.int64))
    tokens = vision.encode_patch_sets(onnx_encoder, [empty, empty], max_patches=64)
    assert [t.shape for t in tokens] == [(0, 128), (0, 128)]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_other_families_tokens_equal_each_frame_encoded_alone(name, tmp_path):
    """Qwen2.5-VL: window masks from positions (partial windows at the frame's edge);
    Qwen3-VL: the torch tower with each frame's grid in positions columns 3-4."""
    model_dir = checkpoint.build_tiny_family(tmp_path, name)
    family = family_for_dir(model_dir)
    encoder = vision.TorchVisionEncoder(family, model_dir)
    geometry = family.geometry
    sets = [random_set(geometry, 2, 6, 5, 0.5, 1), random_set(geometry, 2, 3, 4, 0.7, 2)]
    if family.position_columns == 5:
        sets = [(p, np.concatenate([q, np.broadcast_to(
            [h * geometry.merge_size, w * geometry.merge_size], (len(q), 2))], 1))
            for (p, q), (h, w) in zip(sets, [(6, 5), (3, 4)])]
    tokens = vision.encode_patch_sets(encoder, sets, max_patches=400, max_padding=0.5)
    assert any(b.patches.shape[0] > 1 for b in vision.batch_frames(sets, 400, max_padding=0.5))
    for got, (patches, positions) in zip(tokens, sets):
        expected = each_frame_alone(encoder, patches, positions)
        assert got.shape == (len(patches) // 4, family.token_width)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# --- vit_pruned's device ---------------------------------------------------------------------


def test_device_is_declared_for_vit_pruned_with_the_devices_the_encoder_knows():
    assert params.declared("vit_pruned")["device"] == vision.DEVICES == ("cpu", "cuda")
    assert params.served_parameters("vit_pruned", config_name="cpu")["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_fails_vit_pruneds_load_naming_the_model_and_parameter(
        onnx_path, tiny_dir):
    model = triton_stub.load_model("vit_pruned", triton_stub.pb_utils()).TritonPythonModel()
    args = triton_stub.model_args("vit_pruned", config_name="cpu", model_dir=tiny_dir,
                                  device="cuda")
    args.update(model_repository=str(onnx_path.parent.parent),
                model_version=onnx_path.parent.name)
    with pytest.raises(ValueError, match=r"model 'vit_pruned': parameter device is 'cuda' but "
                                         r"torch finds no CUDA device"):
        model.initialize(args)


def test_an_unknown_device_is_refused_naming_the_parameter(tiny_dir, onnx_path):
    family = family_for_dir(tiny_dir)
    with pytest.raises(ValueError, match=r"model 'vit_pruned': parameter device 'tpu' is not "
                                         r"one of cpu, cuda"):
        vision.served_encoder(family, tiny_dir, onnx_path, device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_torch_tower_on_cuda_gives_the_cpu_tokens(geometry, tiny_dir, onnx_path):
    family = family_for_dir(tiny_dir)
    gpu = vision.served_encoder(family, tiny_dir, onnx_path, device="cuda")
    assert isinstance(gpu, vision.TorchVisionEncoder)
    assert next(gpu.tower.parameters()).device.type == "cuda"
    sets = streams(geometry, seed=8)
    cpu = vision.served_encoder(family, tiny_dir, onnx_path, device="cpu")
    for got, expected in zip(vision.encode_patch_sets(gpu, sets, 96),
                             vision.encode_patch_sets(cpu, sets, 96)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# --- the benchmark's code path ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    try:
        import bench_vit_frames
        yield bench_vit_frames
    finally:
        sys.path.remove(str(REPO_ROOT / "perf"))


def test_the_benchmark_times_before_after_and_alone_on_the_same_frames(bench, onnx_path,
                                                                       tiny_dir, tmp_path):
    """perf/bench_vit_frames.py on 2 s of the clip at a small picture: every row holds every
    variant, ratios against `alone` of the same run, and the markdown says met or MISSED."""
    code = bench.main(["--seconds", "2", "--streams", "1", "2", "--calls", "1", "--repeats",
                       "1", "--no-sweep", "--max-pixels", "50176", "--threads", "1",
                       "--onnx", str(onnx_path), "--model-dir", str(tiny_dir),
                       "--out", str(tmp_path)])
    report = json.loads((tmp_path / "vit_frames.json").read_text())
    assert code == (0 if all(r["target_met"] for r in report["rows"]) else 1)
    assert [(r["policy"], r["streams"]) for r in report["rows"]] == [
        ("dense", 1), ("dense", 2), ("codec", 1), ("codec", 2)]
    dense = report["rows"][1]
    assert dense["frames"] == 8 and dense["vs_alone"]["alone"] == 1.0
    assert {"alone", "before", "per-stream", "pad-0", "pad-0.25"} <= set(dense["ms_per_frame"])
    assert all(v > 0 for v in dense["ms_per_frame"].values())
    assert dense["executions"]["alone"] == 8 and dense["executions"]["pad-0"] < 8
    # Dense frames have one length: every padding share runs the same plan, timed once.
    assert len({dense["ms_per_frame"][f"pad-{p:g}"] for p in bench.PADDINGS}) == 1
    markdown = (tmp_path / "vit_frames.md").read_text()
    assert markdown.count("| dense |") == 2 and markdown.count("| codec |") == 2
    assert ("met (" in markdown) or ("MISSED (" in markdown)


def test_the_sweep_reports_ms_per_frame_against_n(bench, onnx_encoder, geometry):
    frame = random_set(geometry, 1, 4, 4, 1.0, 9)
    rows = bench.sweep(frame, onnx_encoder, bench.load_base_vision(bench.BASE), 32,
                       repeats=1, sizes=(8, 16, 64))
    assert [(r["n"], r["frames"], r["before_execution_n"]) for r in rows] == [
        (8, 4, 32), (16, 2, 32)]          # 64 patches is over max_patches: left out
    assert all(r["ms_per_frame"]["alone"] > 0 for r in rows)
