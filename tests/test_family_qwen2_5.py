"""Qwen2.5-VL at library level, against the stock transformers model of a tiny random
checkpoint: window attention over pruned sets, time-scaled temporal ids, the text-position
rules and the slide correction. The served checks are in tests/test_families.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from codecsight import checkpoint
from codecsight.families import CheckpointSettings, family_for_dir
from codecsight.llm import KVWindow, VisualLM, split_frames
from codecsight.protocol import FRAME_META_COLUMNS, FRAME_TYPES
from codecsight.serve import DEFAULT_MODEL_DIR
from codecsight.vision import OnnxVisionEncoder, export_onnx, patchify

from family_reference import processor_patches, rope_index_previous_max, stock_tower_kwargs

QUESTION = "is anyone in the loading bay?"
GROUPS_H, GROUPS_W = 6, 5   # merge groups: 12x10 patches, windows of 8x8 patches, partial ones


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops; a second thread mostly waits on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def q25_dir(tmp_path_factory):
    return checkpoint.build_tiny_family(tmp_path_factory.mktemp("qwen2_5"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def family(q25_dir):
    return family_for_dir(q25_dir)


@pytest.fixture(scope="module")
def model_tok(family, q25_dir):
    return family.load(q25_dir)


@pytest.fixture(scope="module")
def tower(family, model_tok):
    return family.vision_tower(model_tok[0])


def sampled_frames(n, groups_h=GROUPS_H, groups_w=GROUPS_W, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, groups_h * 28, groups_w * 28, 3), dtype=np.uint8)


def pairs(frames, geometry, keep=None):
    """Our pair layout: (frame 2k, frame 2k+1) in one temporal patch, t = k."""
    n_pairs = len(frames) // 2
    return patchify(frames[1::2], geometry, np.arange(n_pairs), keep=keep,
                    previous=frames[0::2])


def window_frames(tokens, positions, groups_per_pair, grid=(GROUPS_H, GROUPS_W)):
    rows = [[t, 2 * t, 1000 * t, FRAME_TYPES["P"], grid[0], grid[1], n, 0]   # 0: no token_pruning
            for t, n in enumerate(groups_per_pair)]
    meta = np.array(rows, np.int64).reshape(-1, len(FRAME_META_COLUMNS))
    return split_frames(tokens, positions, meta, 2)


def stock_visual(model, patches, positions, family):
    """The stock tower on a patch set at its true positions (precomputed layout kwargs)."""
    kwargs = stock_tower_kwargs(positions, 2, family.window_patches // 2)
    n_tokens = len(patches) // 4
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(patches),
                                 grid_thw=torch.tensor([[1, 2, 2 * n_tokens]]), **kwargs)
    return out.pooler_output


def test_the_pair_layout_is_the_video_processors(family):
    frames = sampled_frames(4)
    ours, positions = pairs(frames, family.geometry)
    g = family.geometry
    reference, grid = processor_patches(frames, g.image_mean, g.image_std, g.patch_size,
                                        g.merge_size, g.temporal_patch_size)
    assert grid == (2, GROUPS_H * 2, GROUPS_W * 2)
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
    # An odd frame count: the processor repeats the last frame; patchify without `previous`
    # fills both slots with the frame.
    lone, _ = patchify(frames[3:4], g, [0])
    reference, _ = processor_patches(frames[3:4], g.image_mean, g.image_std, g.patch_size,
                                     g.merge_size, g.temporal_patch_size)
    np.testing.assert_allclose(lone, reference, atol=1e-6, rtol=0)


def test_dense_tower_equals_the_stock_tower(family, model_tok, tower):
    model, _ = model_tok
    frames = sampled_frames(4)
    patches, positions = pairs(frames, family.geometry)
    ours = tower.encode(patches, positions)
    with torch.no_grad():
        stock = model.model.visual(torch.from_numpy(patches), grid_thw=torch.tensor(
            [[2, GROUPS_H * 2, GROUPS_W * 2]])).pooler_output
    np.testing.assert_allclose(ours, stock.numpy(), atol=2e-5, rtol=0)


def test_pruned_tower_equals_the_stock_tower_given_the_kept_patches(family, model_tok, tower):
    """Windows built from the kept tokens' (t, h, w), not from their order: a window the set
    keeps only part of is that part of the dense window."""
    model, _ = model_tok
    frames = sampled_frames(4, seed=1)
    keep = np.random.default_rng(2).random((2, GROUPS_H, GROUPS_W)) < 0.4
    keep[:, 0, 0] = True
    patches, positions = pairs(frames, family.geometry, keep)
    ours = tower.encode(patches, positions)
    stock = stock_visual(model, patches, positions, family)
    np.testing.assert_allclose(ours, stock.numpy(), atol=2e-5, rtol=0)


def test_partial_windows_change_what_survivors_see_measured_against_dense(family, tower):
    """Not exact, and not meant to be: the figure goes to README 'Model families'."""
    frames = sampled_frames(4, seed=3)
    dense_p, dense_q = pairs(frames, family.geometry)
    dense = tower.encode(dense_p, dense_q).reshape(2, GROUPS_H * GROUPS_W, -1)
    keep = np.random.default_rng(4).random((2, GROUPS_H, GROUPS_W)) < 0.5
    keep[:, 0, 0] = True
    pruned = tower.encode(*pairs(frames, family.geometry, keep))
    reference = dense[keep.reshape(2, -1)]
    rel = np.linalg.norm(pruned - reference, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"\nQwen2.5-VL pruned (50% of groups) vs dense tokens at the kept cells: mean "
          f"relative error {rel.mean():.3g}, max {rel.max():.3g}")
    assert rel.mean() > 1e-4   # a partial window (and the full-attention block) changes them


def test_onnx_export_matches_torch_with_windows(family, q25_dir, tower, tmp_path):
    path = export_onnx(q25_dir, tmp_path / "q25.onnx")
    frames = sampled_frames(4, seed=5)
    keep = np.random.default_rng(6).random((2, GROUPS_H, GROUPS_W)) < 0.6
    keep[:, 0, 0] = True
    patches, positions = pairs(frames, family.geometry, keep)
    got = OnnxVisionEncoder(path)(patches, positions)
    np.testing.assert_allclose(got, tower.encode(patches, positions), atol=1e-4, rtol=0)


def test_temporal_ids_follow_tokens_per_second(family):
    # tokens_per_second 2, seconds per pair 2 / fps: fps 2 -> 2 ids per pair, fps 3 -> 4/3.
    assert [family.temporal_id(k, family.seconds_per_t(2.0)) for k in range(4)] == [0, 2, 4, 6]
    assert [family.temporal_id(k, family.seconds_per_t(3.0)) for k in range(4)] == [0, 1, 2, 4]


def stock_logits(model, tokenizer, vlm, patches, grid_t, seconds_per_pair, position_ids=None,
                 n_tokens=None, tower_kwargs=None):
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    n_tokens = n_tokens if n_tokens is not None else len(patches) // 4
    ids = torch.tensor([vlm.prefix_ids + [video_pad] * n_tokens + vlm.question_ids(QUESTION)])
    grid = torch.tensor([[grid_t, GROUPS_H * 2, GROUPS_W * 2]]) if tower_kwargs is None \
        else torch.tensor([[1, 2, 2 * n_tokens]])
    extra = {f"video_{k}": v for k, v in (tower_kwargs or {}).items()}
    with torch.no_grad():
        return model(input_ids=ids, mm_token_type_ids=(ids == video_pad).int() * 2,
                     pixel_values_videos=torch.from_numpy(patches), video_grid_thw=grid,
                     second_per_grid_ts=torch.tensor([seconds_per_pair]),
                     position_ids=position_ids, **extra).logits[0, -1]


def test_dense_window_equals_the_stock_forward(family, model_tok, tower):
    model, tokenizer = model_tok
    vlm = VisualLM(model, tokenizer, 4, family=family, seconds_per_t=family.seconds_per_t(2.0))
    frames = sampled_frames(6, seed=7)
    patches, positions = pairs(frames, family.geometry)
    tokens = tower.encode(patches, positions)
    ours = vlm.answer_full(window_frames(tokens, positions, [GROUPS_H * GROUPS_W] * 3),
                           QUESTION).first_logits
    stock = stock_logits(model, tokenizer, vlm, patches, 3, family.seconds_per_t(2.0))
    assert (ours - stock).abs().max() <= 1e-4


def test_pruned_window_equals_the_stock_forward_of_the_kept_tokens(family, model_tok, tower):
    """The stock model given only the kept patches (its tower at their true positions) and
    their visual tokens at their positions in the dense grid (stock get_rope_index, sliced)."""
    model, tokenizer = model_tok
    vlm = VisualLM(model, tokenizer, 4, family=family, seconds_per_t=family.seconds_per_t(2.0))
    frames = sampled_frames(6, seed=8)
    keep = np.random.default_rng(9).random((3, GROUPS_H, GROUPS_W)) < 0.35
    keep[:, 0, 0] = True
    patches, positions = pairs(frames, family.geometry, keep)
    tokens = tower.encode(patches, positions)
    ours = vlm.answer_full(window_frames(tokens, positions, keep.reshape(3, -1).sum(1)),
                           QUESTION).first_logits

    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    n_dense = 3 * GROUPS_H * GROUPS_W
    dense_ids = torch.tensor([vlm.prefix_ids + [video_pad] * n_dense + vlm.question_ids(QUESTION)])
    dense_pos, _ = model.model.get_rope_index(
        dense_ids, (dense_ids == video_pad).int() * 2,
        video_grid_thw=torch.tensor([[3, GROUPS_H * 2, GROUPS_W * 2]]),
        second_per_grid_ts=torch.tensor([family.seconds_per_t(2.0)]))
    prefix = len(vlm.prefix_ids)
    rows = torch.cat([torch.arange(prefix), prefix + torch.from_numpy(np.flatnonzero(keep)),
                      torch.arange(prefix + n_dense, dense_ids.shape[1])])
    stock = stock_logits(model, tokenizer, vlm, patches, None, family.seconds_per_t(2.0),
                         position_ids=dense_pos[:, :, rows], n_tokens=len(tokens),
                         tower_kwargs=stock_tower_kwargs(positions, 2, family.window_patches // 2))
    assert (ours - stock).abs().max() <= 1e-4


def test_text_after_the_video_follows_the_checkpoints_rule(family, model_tok, tower):
    """A temporal extent longer than the grid: transformers 5.23's get_rope_index continues at
    start + max(h, w); Qwen's training code (pre-5) at the previous maximum + 1. Real
    checkpoints default to the latter, CodecSight's own (the demo model) to the former."""
    import dataclasses

    model, tokenizer = model_tok
    frames = sampled_frames(12, groups_h=1, groups_w=2, seed=10)
    patches, positions = pairs(frames, family.geometry)
    tokens = tower.encode(patches, positions)
    window = window_frames(tokens, positions, [2] * 6, grid=(1, 2))
    spt = family.seconds_per_t(2.0)     # 2 temporal ids per pair: 0..10 against a grid of 2
    assert family.settings.text_positions == "previous_max"
    vlm = VisualLM(model, tokenizer, 4, family=family, seconds_per_t=spt)
    _, ours = vlm.layout(window, QUESTION)
    q = len(vlm.question_ids(QUESTION))
    expected = rope_index_previous_max(len(vlm.prefix_ids), [0, 2, 4, 6, 8, 10], (1, 2), q)
    assert torch.equal(ours, expected)

    hf5 = dataclasses.replace(family.settings, text_positions="transformers5")
    family5 = type(family)(family.config, family.preprocessor, hf5)
    _, ours5 = VisualLM(model, tokenizer, 4, family=family5, seconds_per_t=spt).layout(
        window, QUESTION)
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = torch.tensor([vlm.prefix_ids + [video_pad] * 12 + vlm.question_ids(QUESTION)])
    stock, _ = model.model.get_rope_index(ids, (ids == video_pad).int() * 2,
                                          video_grid_thw=torch.tensor([[6, 2, 4]]),
                                          second_per_grid_ts=torch.tensor([spt]))
    assert torch.equal(ours5, stock[:, 0])
    assert not torch.equal(ours5, ours)   # the two rules differ here
    demo = CheckpointSettings.for_model_dir(DEFAULT_MODEL_DIR)
    assert (demo.text_positions, demo.frame_layout) == ("transformers5", "overlapping")


@pytest.mark.parametrize("fps", [2.0, 3.0])   # 3 fps: 4/3 ids per pair, uneven steps
def test_a_slide_moves_layer0_keys_exactly(family, model_tok, fps):
    model, tokenizer = model_tok
    vlm = VisualLM(model, tokenizer, 4, family=family, seconds_per_t=family.seconds_per_t(fps))
    rng = np.random.default_rng(11)
    cells = np.array([[h, w] for h in range(2) for w in range(3)], np.int64)
    frames = [split_frames(rng.standard_normal((6, 128)).astype(np.float32),
                           np.array([[t, 2 * h + i, 2 * w + j] for h, w in cells for i in (0, 1)
                                     for j in (0, 1)], np.int64),
                           np.array([[t, 2 * t, 1000 * t, FRAME_TYPES["P"], 2, 3, 6]], np.int64),
                           2)[0] for t in range(7)]
    kv = KVWindow(vlm)
    kv.sync(vlm, frames[:4], "selective", 0)
    prefix = len(vlm.prefix_ids)
    before = kv.cache.layers[0].keys[:, :, prefix + 12:prefix + 24].clone()  # frames 2, 3
    kv.sync(vlm, frames[2:7], "selective", 0)
    fresh = KVWindow(vlm)
    fresh.sync(vlm, frames[2:7], "full", 0)
    got = kv.cache.layers[0].keys[:, :, prefix:prefix + 12]
    want = fresh.cache.layers[0].keys[:, :, prefix:prefix + 12]
    assert (got - want).abs().max() <= 1e-4
    assert torch.equal(kv.positions, fresh.positions)
    assert (got - before).abs().max() > 1e-2   # the reused keys did move
