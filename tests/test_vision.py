"""codecsight.vision: patchify, the pruned ViT encoder, its ONNX export and micro-batch packing."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from codecsight import checkpoint, vision


@pytest.fixture(scope="session")
def model_dir(tiny_dir):
    """The tiny checkpoint (conftest builds it once per session with tmp_path_factory)."""
    return tiny_dir


@pytest.fixture(scope="session")
def geometry(model_dir):
    return checkpoint.Geometry.from_model_dir(model_dir)


@pytest.fixture(scope="session")
def visual(tiny):
    model, _ = tiny
    return model.model.visual


@pytest.fixture(scope="session")
def encoder(visual):
    return vision.PrunedVisionEncoder(visual).eval()


@pytest.fixture(scope="session")
def onnx_encoder(onnx_path):
    # onnx_path: conftest exports the tiny checkpoint's vision tower once per session.
    return vision.OnnxVisionEncoder(onnx_path, intra_op_threads=2)


def random_frames(n, groups_h, groups_w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, groups_h * 28, groups_w * 28, 3), dtype=np.uint8)


def random_keep(n, groups_h, groups_w, share, seed=0):
    keep = np.random.default_rng(seed).random((n, groups_h, groups_w)) < share
    keep[:, 0, 0] = True  # every frame keeps at least one group
    return keep


# --- patchify -------------------------------------------------------------------------------


def test_patchify_equals_transformers_image_processor(geometry):
    # The processor's numpy backend (no torchvision needed); frames already multiples of 28.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    frames = random_frames(2, 2, 3)
    reference = Qwen2VLImageProcessorPil(do_resize=False)(images=list(frames), return_tensors="np")
    patches, _ = vision.patchify(frames, geometry, [0, 1])
    assert reference["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 6]]
    assert patches.dtype == np.float32 and patches.shape == (48, 1176)
    np.testing.assert_array_equal(patches, reference["pixel_values"])


def sliced_patches(geometry, frames, previous):
    """Patches cut one by one: (C, T, P, P) with previous[f] in slot 0 and frames[f] in slot 1."""
    mean, std = np.array(geometry.image_mean), np.array(geometry.image_std)
    expected = []
    for before, frame in zip(previous, frames):
        pixels = [(x / 255.0 - mean) / std for x in (before, frame)]   # [H, W, C] each
        for group_row in range(frame.shape[0] // 28):
            for group_col in range(frame.shape[1] // 28):
                for row in (2 * group_row, 2 * group_row + 1):
                    for col in (2 * group_col, 2 * group_col + 1):
                        slots = [x[row * 14:(row + 1) * 14, col * 14:(col + 1) * 14]
                                 .transpose(2, 0, 1) for x in pixels]   # [C, P, P] each
                        expected.append(np.stack(slots, axis=1).ravel())  # [C, T, P, P]
    return np.array(expected)


def test_patchify_equals_patch_by_patch_slicing(geometry):
    frames = random_frames(2, 2, 2, seed=1)
    patches, _ = vision.patchify(frames, geometry, [0, 1])
    np.testing.assert_allclose(patches, sliced_patches(geometry, frames, frames), atol=1e-5)


def test_patchify_pairs_each_frame_with_its_previous_frame_in_time_order(geometry):
    frames, previous = random_frames(2, 2, 3, seed=11), random_frames(2, 2, 3, seed=12)
    keep = random_keep(2, 2, 3, share=0.5, seed=3)
    patches, positions = vision.patchify(frames, geometry, [5, 6], previous=previous)
    np.testing.assert_allclose(patches, sliced_patches(geometry, frames, previous), atol=1e-5)
    still, _ = vision.patchify(frames, geometry, [5, 6])
    assert not np.allclose(patches, still)
    kept, kept_positions = vision.patchify(frames, geometry, [5, 6], keep, previous)
    rows = np.repeat(keep.ravel(), geometry.patches_per_group)
    np.testing.assert_array_equal(kept, patches[rows])
    np.testing.assert_array_equal(kept_positions, positions[rows])


def test_patchify_rejects_previous_frames_of_another_shape(geometry):
    with pytest.raises(ValueError, match=r"previous frames must match frames: uint8 \[1, 56, 56, 3\]"):
        vision.patchify(random_frames(1, 2, 2), geometry, [0], previous=random_frames(1, 2, 3))


def test_patchify_of_frame_lists_equals_patchify_of_stacked_frames(geometry):
    # codec_parser passes lists (no whole-frame copies); the result must not depend on it
    frames, previous = random_frames(3, 2, 3, seed=13), random_frames(3, 2, 3, seed=14)
    keep = random_keep(3, 2, 3, share=0.4, seed=5)
    keep[1] = False                                   # a frame with nothing kept
    stacked = vision.patchify(frames, geometry, [1, 2, 3], keep, previous)
    listed = vision.patchify(list(frames), geometry, [1, 2, 3], keep, list(previous))
    assert len(stacked[0]) and all(np.array_equal(a, b) for a, b in zip(stacked, listed))
    with pytest.raises(ValueError, match="frames must be uint8 .* got frames of different shapes"):
        vision.patchify([frames[0], random_frames(1, 2, 2)[0]], geometry, [0, 1])
    with pytest.raises(ValueError, match="previous frames must match frames: uint8 "
                                         r"\[1, 56, 84, 3\], got uint8 \[1, 56, 56, 3\]"):
        vision.patchify([frames[0]], geometry, [0], previous=[random_frames(1, 2, 2)[0]])


def test_patchify_positions_are_frame_id_and_patch_grid_in_block_major_order(geometry):
    _, positions = vision.patchify(random_frames(2, 2, 3), geometry, [7, 9])
    assert positions.dtype == np.int64 and positions.shape == (48, 3)
    assert positions[:8].tolist() == [[7, 0, 0], [7, 0, 1], [7, 1, 0], [7, 1, 1],
                                      [7, 0, 2], [7, 0, 3], [7, 1, 2], [7, 1, 3]]
    assert positions[24:28].tolist() == [[9, 0, 0], [9, 0, 1], [9, 1, 0], [9, 1, 1]]
    assert positions[-1].tolist() == [9, 3, 5]


def test_patchify_keep_returns_exactly_the_kept_groups_in_block_major_order(geometry):
    frames = random_frames(3, 3, 4, seed=2)
    keep = random_keep(3, 3, 4, share=0.4, seed=2)
    all_patches, all_positions = vision.patchify(frames, geometry, [0, 1, 2])
    patches, positions = vision.patchify(frames, geometry, [0, 1, 2], keep)
    rows = np.repeat(keep.ravel(), geometry.patches_per_group)
    assert len(patches) == 4 * keep.sum()
    np.testing.assert_array_equal(patches, all_patches[rows])
    np.testing.assert_array_equal(positions, all_positions[rows])


def test_patchify_with_nothing_kept_returns_empty_arrays(geometry):
    keep = np.zeros((1, 2, 2), dtype=bool)
    patches, positions = vision.patchify(random_frames(1, 2, 2), geometry, [0], keep)
    assert patches.shape == (0, 1176) and positions.shape == (0, 3)


def test_patchify_rejects_frames_that_are_not_whole_merge_groups(geometry):
    frames = np.zeros((1, 56, 70, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="not a multiple of the 28-pixel merge group"):
        vision.patchify(frames, geometry, [0])


def test_patchify_rejects_a_keep_mask_of_the_wrong_shape(geometry):
    with pytest.raises(ValueError, match=r"keep must be bool \[F, H/28, W/28\] = \[1, 2, 2\]"):
        vision.patchify(random_frames(1, 2, 2), geometry, [0], np.ones((1, 4, 4), dtype=bool))


# --- PrunedVisionEncoder ---------------------------------------------------------------------


def test_encoder_equals_stock_vit_on_whole_frames(geometry, visual, encoder):
    frames = random_frames(3, 2, 3, seed=3)
    patches, positions = vision.patchify(frames, geometry, [4, 5, 6])
    with torch.no_grad():
        stock = visual(torch.from_numpy(patches),
                       grid_thw=torch.tensor([[1, 4, 6]] * 3)).pooler_output.numpy()
    tokens = encoder.encode(patches, positions)
    assert tokens.shape == stock.shape == (18, 128)
    np.testing.assert_allclose(tokens, stock, rtol=0, atol=1e-5)


def test_frames_in_one_set_do_not_attend_to_each_other(geometry, encoder):
    frames = random_frames(2, 2, 2, seed=4)
    together = encoder.encode(*vision.patchify(frames, geometry, [0, 1]))
    alone = [encoder.encode(*vision.patchify(frames[i:i + 1], geometry, [i])) for i in (0, 1)]
    np.testing.assert_allclose(together, np.concatenate(alone), rtol=0, atol=1e-5)


def test_pruned_set_gives_one_token_per_kept_merge_group(geometry, encoder):
    keep = random_keep(2, 3, 4, share=0.3, seed=5)
    tokens = encoder.encode(*vision.patchify(random_frames(2, 3, 4, seed=5), geometry, [0, 1],
                                             keep))
    assert tokens.shape == (keep.sum(), geometry.vision_hidden)


def test_pruned_encoding_is_deterministic(geometry, encoder):
    keep = random_keep(2, 3, 4, share=0.5, seed=6)
    patch_set = vision.patchify(random_frames(2, 3, 4, seed=6), geometry, [0, 1], keep)
    np.testing.assert_array_equal(encoder.encode(*patch_set), encoder.encode(*patch_set))


def test_pruned_tokens_approximate_the_same_tokens_of_a_full_forward(geometry, encoder):
    # Encoding only the kept groups removes the dropped patches from each frame's attention,
    # so the kept tokens differ from their full-frame values: measure by how much.
    frames = random_frames(2, 8, 8, seed=7)
    full = encoder.encode(*vision.patchify(frames, geometry, [0, 1]))
    errors = {}
    for share in (0.25, 0.5):
        keep = random_keep(2, 8, 8, share, seed=7)
        pruned = encoder.encode(*vision.patchify(frames, geometry, [0, 1], keep))
        reference = full[keep.ravel()]
        errors[share] = float(np.mean(np.linalg.norm(pruned - reference, axis=1)
                                      / np.linalg.norm(reference, axis=1)))
    print(f"mean relative error of pruned tokens vs full forward: "
          f"{', '.join(f'{s:.0%} kept: {e:.2%}' for s, e in errors.items())}")
    assert all(0 < e < 0.5 for e in errors.values())


def test_encoder_accepts_a_batch_of_independent_sets(geometry, encoder):
    frames = random_frames(2, 2, 2, seed=8)
    sets = [vision.patchify(frames[i:i + 1], geometry, [0]) for i in (0, 1)]  # same t
    batched = encoder(torch.from_numpy(np.stack([p for p, _ in sets])),
                      torch.from_numpy(np.stack([q for _, q in sets]))).detach().numpy()
    assert batched.shape == (2, 4, 128)
    for item, patch_set in zip(batched, sets):
        np.testing.assert_allclose(item, encoder.encode(*patch_set), rtol=0, atol=1e-5)


# --- ONNX export and ONNX Runtime ------------------------------------------------------------


def test_onnx_export_is_one_self_contained_file_with_the_serving_names(onnx_path, geometry):
    assert [p.name for p in onnx_path.parent.iterdir()] == ["model.onnx"]
    graph = onnx.load(onnx_path).graph
    def signature(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values]
    assert signature(graph.input) == [
        ("PATCHES", onnx.TensorProto.FLOAT, ["batch", "n_patches", geometry.patch_dim]),
        ("POSITIONS", onnx.TensorProto.INT64, ["batch", "n_patches", 3])]
    assert signature(graph.output) == [
        ("TOKENS", onnx.TensorProto.FLOAT, ["batch", "n_tokens", geometry.vision_hidden])]


def test_onnx_runtime_matches_torch_at_a_patch_count_not_seen_in_export(
        geometry, encoder, onnx_encoder):
    keep = random_keep(3, 5, 7, share=0.6, seed=9)
    patch_set = vision.patchify(random_frames(3, 5, 7, seed=9), geometry, [10, 11, 12], keep)
    got, expected = onnx_encoder(*patch_set), encoder.encode(*patch_set)
    assert got.shape == expected.shape == (keep.sum(), 128)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_onnx_encoder_returns_no_tokens_for_no_patches(onnx_encoder):
    tokens = onnx_encoder(np.zeros((0, 1176), np.float32), np.zeros((0, 3), np.int64))
    assert tokens.shape == (0, 128) and tokens.dtype == np.float32


@pytest.mark.parametrize("patches_shape, positions_shape, message", [
    ((6, 1176), (6, 3), "not a whole number of 4-patch merge groups"),
    ((8, 1000), (8, 3), r"patches must be \[N, 1176\]"),
    ((8, 1176), (8, 2), r"positions must be \[N, 3\] = \[8, 3\]"),
])
def test_onnx_encoder_rejects_malformed_patch_sets(onnx_encoder, patches_shape, positions_shape,
                                                   message):
    with pytest.raises(ValueError, match=message):
        onnx_encoder(np.zeros(patches_shape, np.float32), np.zeros(positions_shape, np.int64))


# --- encoding many sets (the per-frame batching itself: tests/test_vit_frames.py) ----------


def stream_set(geometry, n_frames, groups_h, groups_w, seed, first_t=0):
    """A patch set as one stream produces it: t counts that stream's sampled frames."""
    keep = random_keep(n_frames, groups_h, groups_w, share=0.5, seed=seed)
    return vision.patchify(random_frames(n_frames, groups_h, groups_w, seed=seed), geometry,
                           np.arange(first_t, first_t + n_frames), keep)


def test_encode_patch_sets_equals_encoding_each_set_alone(geometry, onnx_encoder):
    # Streams of unequal length, all counting t from 0; a small budget spreads their frames
    # over several executions, where frames of different sets share one.
    sets = [stream_set(geometry, 2, 2, 2, seed=10),
            stream_set(geometry, 1, 2, 3, seed=11),
            stream_set(geometry, 5, 3, 4, seed=12),
            stream_set(geometry, 2, 4, 3, seed=13)]
    # A padding allowance wide enough that frames of unequal length share batches (the
    # served MAX_PADDING_SHARE is tighter; the equality must hold at any allowance).
    max_patches, max_padding = 64, 0.5
    batches = vision.batch_frames(sets, max_patches, max_padding=max_padding)
    assert sets[0][1][0, 0] == sets[1][1][0, 0] == 0       # both start at t = 0
    assert any(len({s for s, _, _ in b.frames}) > 1 for b in batches)  # sets share executions
    tokens = vision.encode_patch_sets(onnx_encoder, sets, max_patches, max_padding=max_padding)
    assert len(tokens) == len(sets)
    for got, patch_set in zip(tokens, sets):
        expected = onnx_encoder(*patch_set)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_encode_patch_sets_returns_empty_tokens_for_an_empty_set(geometry, onnx_encoder):
    empty = (np.zeros((0, 1176), np.float32), np.zeros((0, 3), np.int64))
    tokens = vision.encode_patch_sets(onnx_encoder, [stream_set(geometry, 1, 2, 2, seed=14),
                                                     empty], max_patches=64)
    assert tokens[1].shape == (0, 128)
    assert len(tokens[0]) > 0
