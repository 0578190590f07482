"""Qwen3-VL and Qwen3-VL-MoE at library level, against the stock transformers forward.

Each family gets a tiny random checkpoint built here (its own config classes, processor
configs and a tokenizer with its special tokens). Checked: the pruned tower (dense and pruned,
deepstack included), the first answer token's logits of a window (dense and pruned), and the
slide correction of cached layer-0 keys. Figures printed with -s: `max |diff|`.
"""
import functools
import types

import numpy as np
import pytest
import torch
from transformers import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from codecsight.checkpoint import build_tiny_family
from codecsight.families import CheckpointSettings, family_for_dir, qwen3_vl
from codecsight.families.base import TEXT_POSITION_RULES
from codecsight.llm import REFRESH_FULL, REFRESH_SELECTIVE, KVWindow, VisualLM, WindowFrame
from codecsight.vision import patchify

from family_reference import stock_first_logits

MODEL_TYPES = qwen3_vl.MODEL_TYPES
GRID_H, GRID_W = 3, 4            # merge groups per frame: a 96x128 frame (32-pixel groups)
SOURCE_FPS, ANALYSIS_FPS = 25.0, 5.0
STEP = int(SOURCE_FPS / ANALYSIS_FPS)   # source frames between sampled frames
QUESTION = "how many cars are in the left lane?"


@pytest.fixture(scope="module", params=MODEL_TYPES)
def checkpoint(request, tmp_path_factory):
    """(family, model, tokenizer, model_dir) of a tiny random checkpoint of each model type."""
    model_dir = build_tiny_family(tmp_path_factory.mktemp(request.param), request.param)
    family = family_for_dir(model_dir)
    model, tokenizer = family.load(model_dir)
    return family, model, tokenizer, model_dir


def sampled_video(pairs, seed=0):
    """Sampled frames uint8 [2 * pairs, H, W, 3] and their source frame indices."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (2 * pairs, GRID_H * 32, GRID_W * 32, 3), dtype=np.uint8)
    return frames, 7 + STEP * np.arange(2 * pairs)


def pair_patches(family, frames, keep=None):
    """The processor's video layout: non-overlapping pairs (2k, 2k+1), one temporal patch each;
    positions [N, 5] with the frame's patch grid."""
    patches, positions = patchify(frames[1::2], family.geometry, np.arange(len(frames) // 2),
                                  keep=keep, previous=frames[0::2])
    return patches, qwen3_vl.with_grid(positions, (2 * GRID_H, 2 * GRID_W))


def window_frames(tokens, frame_indices, keep=None):
    """WindowFrames of the pairs: tokens [n, token_width] cut per pair; as the parser makes
    them, a pair's time_ms is the mean time of its two frames and frame_index its first."""
    pairs = len(frame_indices) // 2
    keep = np.ones((pairs, GRID_H, GRID_W), bool) if keep is None else keep
    frames, start = [], 0
    for k in range(pairs):
        cells = np.argwhere(keep[k]).astype(np.int64)
        first, last = int(frame_indices[2 * k]), int(frame_indices[2 * k + 1])
        frames.append(WindowFrame(
            t=k, frame_index=first, time_ms=round(1000 * (first + last) / 2 / SOURCE_FPS),
            frame_type="P",
            grid_h=GRID_H, grid_w=GRID_W, tokens=torch.from_numpy(tokens[start:start + len(cells)]),
            cells=cells))
        start += len(cells)
    return frames


def visual_lm(family, model, tokenizer):
    return VisualLM(model, tokenizer, max_new_tokens=1, family=family,
                    seconds_per_t=family.seconds_per_t(ANALYSIS_FPS))


def sequence(vlm, frames, question):
    """The window's token ids with visual rows as <|video_pad|>, and positions [3, L]."""
    layout = vlm.window_layout(frames)
    pad = vlm.tokenizer.convert_tokens_to_ids(qwen3_vl.VIDEO_PAD)
    ids = list(layout.prefix)
    for rows in layout.frames:
        ids += rows.before + [pad] * rows.n_visual + rows.after
    question_ids = vlm.question_ids(question)
    positions = torch.cat([layout.prefix_positions, *(r.positions for r in layout.frames),
                           torch.arange(layout.text_start,
                                        layout.text_start + len(question_ids)).expand(3, -1)],
                          dim=1)
    return torch.tensor(ids + question_ids), positions


def processor_prompt(tokenizer, frame_indices, tokens_per_frame, question):
    """The prompt Qwen3VLProcessor writes for this video (its own timestamp and placeholder
    code; the processor itself needs torchvision, absent here), in Qwen3-VL's chat layout: the
    per-frame blocks replace the '<|vision_start|><|video_pad|><|vision_end|>' of the chat
    template, as Qwen's processor did when Qwen3-VL was trained."""
    processor = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
        vision_start_token=qwen3_vl.VISION_START, vision_end_token=qwen3_vl.VISION_END,
        video_token=qwen3_vl.VIDEO_PAD,
        _calculate_timestamps=functools.partial(Qwen3VLProcessor._calculate_timestamps, None))
    pairs = len(frame_indices) // 2
    metadata = VideoMetadata(total_num_frames=int(frame_indices[-1]) + 1, fps=SOURCE_FPS,
                             frames_indices=list(frame_indices))
    # replace_video_token counts tokens per frame from the grid; a uniform count per frame.
    grid = torch.tensor([[pairs, 2, 2 * tokens_per_frame]])
    video = Qwen3VLProcessor.replace_video_token(
        processor, {"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    text = f"<|im_start|>user\n{video}{question}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stock_positions(model, ids, pad, pairs):
    """Stock get_rope_index's positions [3, L] of the token ids [L] (visual rows = pad) of a
    dense video of `pairs` temporal patches, each GRID_H x GRID_W merge groups."""
    positions, _ = model.model.get_rope_index(
        ids[None], (ids[None] == pad).int() * 2,
        video_grid_thw=torch.tensor([[pairs, 2 * GRID_H, 2 * GRID_W]]))
    return positions[:, 0]


# --- checkpoint and geometry ---------------------------------------------------------------------


def test_tiny_checkpoints_are_detected_as_their_family(checkpoint):
    family, model, _, model_dir = checkpoint
    assert type(family).__name__ == {"qwen3_vl": "Qwen3VL", "qwen3_vl_moe": "Qwen3VLMoe"}[
        model.config.model_type]
    assert family.geometry.patch_size == 16 and family.geometry.patch_dim == 1536
    assert family.geometry.image_mean == (0.5, 0.5, 0.5)
    assert family.frame_layout == "pairs"    # stands in for a real checkpoint
    assert family.deepstack_layers == 2 and family.token_width == 3 * 128


def test_patchify_equals_the_image_processor_with_qwen3_geometry(checkpoint):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    family = checkpoint[0]
    frames, _ = sampled_video(1)
    reference = Qwen2VLImageProcessorPil(
        do_resize=False, patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)(
        images=list(frames), return_tensors="np")
    patches, _ = patchify(frames, family.geometry, [0, 1])
    assert reference["image_grid_thw"].tolist() == [[1, 6, 8]] * 2
    np.testing.assert_array_equal(patches, reference["pixel_values"])


# --- the tower ------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(6, 8), (7, 5), (2, 2), (30, 54)])
def test_position_embedding_taps_equal_transformers_interpolation(grid):
    side = 8
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    index, weight = qwen3_vl.tap_tensors(
        torch.from_numpy(rows.ravel()), torch.from_numpy(cols.ravel()),
        torch.full((rows.size,), grid[0]), torch.full((rows.size,), grid[1]), side)
    expected_index, expected_weight = get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, *grid]]), side, mode="bilinear", align_corners=True,
        spatial_merge_size=1)
    assert torch.equal(index, expected_index)
    assert torch.equal(weight, expected_weight)


def stock_tower(model, patches, grid_thw, **kwargs):
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(patches), grid_thw=grid_thw, **kwargs)
    return torch.cat([out.pooler_output, *out.deepstack_features], dim=-1).numpy()


def test_dense_tower_equals_the_stock_tower_with_deepstack(checkpoint):
    family, model, _, _ = checkpoint
    frames, _ = sampled_video(3)
    patches, positions = pair_patches(family, frames)
    ours = family.vision_tower(model).encode(patches, positions)
    stock = stock_tower(model, patches, torch.tensor([[3, 2 * GRID_H, 2 * GRID_W]]))
    assert ours.shape == (3 * GRID_H * GRID_W, family.token_width)
    diff = float(np.abs(ours - stock).max())
    print(f"\n{family.title} dense tower vs stock (tokens + deepstack): max |diff| {diff:.2g}")
    assert diff <= 1e-5


def test_pruned_tower_equals_the_stock_tower_given_only_the_kept_patches(checkpoint):
    family, model, _, _ = checkpoint
    frames, _ = sampled_video(3)
    keep = np.random.default_rng(4).random((3, GRID_H, GRID_W)) < 0.5
    patches, positions = pair_patches(family, frames, keep)
    tower = family.vision_tower(model)
    ours = tower.encode(patches, positions)
    kept_groups = len(patches) // 4
    # Only the kept patches, at their true positions: the stock tower takes precomputed
    # rotary positions, per-frame cu_seqlens and the sliced interpolation taps.
    stock = stock_tower(model, patches, torch.tensor([[1, 2, 2 * kept_groups]]),
                        **qwen3_vl.stock_tower_kwargs(positions[:, :3], positions[:, 3:],
                                                      tower.side))
    diff = float(np.abs(ours - stock).max())
    dense, _ = pair_patches(family, frames)
    against_dense = float(np.abs(ours - tower.encode(dense, pair_patches(family, frames)[1])[
        keep.ravel()]).max())
    print(f"\n{family.title} pruned tower vs stock given the kept patches: max |diff| {diff:.2g}"
          f"; vs the dense tower's rows (what pruning changes): {against_dense:.2g}")
    assert diff <= 1e-5
    # Not vacuous: the kept tokens do see fewer patches than in the dense frame.
    assert against_dense > 1e-4


def test_broken_merge_group_is_an_error_not_a_wrong_merge(checkpoint):
    family, model, _, _ = checkpoint
    frames, _ = sampled_video(1)
    patches, positions = pair_patches(family, frames)
    swapped = positions.copy()
    swapped[[3, 4]] = swapped[[4, 3]]     # 8 patches still, groups 0 and 1 broken
    with pytest.raises(ValueError, match="rows 0-3 are not one whole 2x2 merge group"):
        family.vision_tower(model).encode(patches, swapped)


def test_a_frames_patches_must_be_contiguous(checkpoint):
    family, model, _, _ = checkpoint
    frames, _ = sampled_video(2)
    patches, positions = pair_patches(family, frames)
    per_frame = 4 * GRID_H * GRID_W
    order = np.r_[0:4, per_frame:per_frame + 4, 4:per_frame, per_frame + 4:2 * per_frame]
    with pytest.raises(ValueError, match="contiguous"):
        family.vision_tower(model).encode(patches[order], positions[order])


# --- the LLM --------------------------------------------------------------------------------------


def test_dense_window_gives_the_stock_forwards_first_logits(checkpoint):
    family, model, tokenizer, _ = checkpoint
    frames, indices = sampled_video(3)
    patches, positions = pair_patches(family, frames)
    tokens = family.vision_tower(model).encode(patches, positions)
    window = window_frames(tokens, indices)
    vlm = visual_lm(family, model, tokenizer)
    ours = vlm.answer_full(window, QUESTION).first_logits
    ids, ours_positions = sequence(vlm, window, QUESTION)

    assert ids.tolist() == processor_prompt(tokenizer, indices, GRID_H * GRID_W, QUESTION)
    pad = tokenizer.convert_tokens_to_ids(qwen3_vl.VIDEO_PAD)
    assert torch.equal(ours_positions, stock_positions(model, ids, pad, 3))
    stock = stock_first_logits(model, ids, pad, pixel_values_videos=torch.from_numpy(patches),
                               video_grid_thw=torch.tensor([[3, 2 * GRID_H, 2 * GRID_W]]))
    diff = float((ours - stock).abs().max())
    print(f"\n{family.title} dense window first logits vs stock forward: max |diff| {diff:.2g}"
          f" (logits up to {float(stock.abs().max()):.2g})")
    assert diff <= 1e-4


def test_pruned_window_equals_the_stock_forward_given_only_the_kept_tokens(checkpoint):
    family, model, tokenizer, _ = checkpoint
    frames, indices = sampled_video(3)
    keep = np.random.default_rng(5).random((3, GRID_H, GRID_W)) < 0.5
    keep[1] = False     # a frame with nothing kept still has its timestamp and markers
    patches, positions = pair_patches(family, frames, keep)
    tower = family.vision_tower(model)
    window = window_frames(tower.encode(patches, positions), indices, keep)
    vlm = visual_lm(family, model, tokenizer)
    ours = vlm.answer_full(window, QUESTION).first_logits
    ids, ours_positions = sequence(vlm, window, QUESTION)

    # The true positions: the dense sequence's (get_rope_index), the dropped rows left out.
    dense_ids = torch.tensor(processor_prompt(tokenizer, indices, GRID_H * GRID_W, QUESTION))
    pad = tokenizer.convert_tokens_to_ids(qwen3_vl.VIDEO_PAD)
    dense_positions = stock_positions(model, dense_ids, pad, 3)
    kept_rows = torch.ones(len(dense_ids), dtype=torch.bool)
    kept_rows[dense_ids == pad] = torch.from_numpy(keep.ravel())
    assert torch.equal(ids, dense_ids[kept_rows])
    assert torch.equal(ours_positions, dense_positions[:, kept_rows])
    stock = stock_first_logits(
        model, ids, pad, pixel_values_videos=torch.from_numpy(patches),
        video_grid_thw=torch.tensor([[1, 2, 2 * (len(patches) // 4)]]),
        position_ids=dense_positions[:, None, kept_rows],
        **qwen3_vl.stock_tower_kwargs(positions[:, :3], positions[:, 3:], tower.side,
                                      prefix="video_"))
    diff = float((ours - stock).abs().max())
    print(f"\n{family.title} pruned window first logits vs stock forward of the kept tokens: "
          f"max |diff| {diff:.2g}")
    assert diff <= 1e-4


def test_deepstack_features_reach_the_answer(checkpoint):
    """Not vacuous: dropping the deepstack features changes the logits."""
    family, model, tokenizer, _ = checkpoint
    frames, indices = sampled_video(2)
    tokens = family.vision_tower(model).encode(*pair_patches(family, frames))
    vlm = visual_lm(family, model, tokenizer)
    with_deepstack = vlm.answer_full(window_frames(tokens, indices), QUESTION).first_logits
    tokens[:, family.geometry.vision_hidden:] = 0
    without = vlm.answer_full(window_frames(tokens, indices), QUESTION).first_logits
    assert float((with_deepstack - without).abs().max()) > 1e-3


def test_timestamps_are_stream_time_so_a_reused_frame_keeps_its_text(checkpoint):
    family, model, tokenizer, _ = checkpoint
    frames, indices = sampled_video(4)
    tokens = family.vision_tower(model).encode(*pair_patches(family, frames))
    window = window_frames(tokens, indices)
    vlm = visual_lm(family, model, tokenizer)
    before, after = vlm.window_layout(window[:3]), vlm.window_layout(window[1:])
    # Pair 1 = source frames 17 and 22 at 25 fps: (0.68 + 0.88) / 2 = 0.78 s.
    assert tokenizer.decode(before.frames[1].before) == "< 0 . 8 seconds > <|vision_start|>"
    assert before.frames[1].before == after.frames[0].before
    assert before.frames[2].before == after.frames[1].before


def encoded_window(family, model, pairs, seed=0, share=0.6):
    frames, indices = sampled_video(pairs, seed)
    keep = np.random.default_rng(seed + 1).random((pairs, GRID_H, GRID_W)) < share
    keep[:, 0, 0] = True
    tokens = family.vision_tower(model).encode(*pair_patches(family, frames, keep))
    return window_frames(tokens, indices, keep)


def test_slide_correction_is_exact_for_layer0_keys(checkpoint):
    """Frames cached in window [0, 1, 2], moved into window [1, 2, 3] by a selective refresh
    (rotation only, no anchor re-prefilled): their layer-0 keys and values equal a fresh
    prefill of [1, 2, 3]."""
    family, model, tokenizer, _ = checkpoint
    window = encoded_window(family, model, 4)
    vlm = visual_lm(family, model, tokenizer)
    slid, fresh = KVWindow(vlm), KVWindow(vlm)
    slid.sync(vlm, window[:3], REFRESH_SELECTIVE, anchor_frames=0)
    old_keys = slid.cache.layers[0].keys.clone()
    frame0_rows = slid.frame_rows[0]
    old_positions = slid.positions[:, slid.prefix_rows + frame0_rows:]
    slid.sync(vlm, window[1:], REFRESH_SELECTIVE, anchor_frames=0)
    fresh.sync(vlm, window[1:], REFRESH_FULL, anchor_frames=0)
    assert torch.equal(slid.positions, fresh.positions)
    # Qwen3-VL: every row of a reused block moves by one shift on all three axes.
    delta = fresh.positions[:, slid.prefix_rows:slid.prefix_rows + old_positions.shape[1]] \
        - old_positions
    assert (delta == delta[0, 0]).all() and int(delta[0, 0]) < 0
    # The reused rows: frames 1 and 2 (frame 3's rows were computed fresh in both).
    reused = slice(slid.prefix_rows, slid.prefix_rows + sum(slid.frame_rows[:2]))
    got, want = slid.cache.layers[0].keys[:, :, reused], fresh.cache.layers[0].keys[:, :, reused]
    diff = float((got - want).abs().max())
    start = slid.prefix_rows + frame0_rows
    unmoved = float((old_keys[:, :, start:start + got.shape[2]] - want).abs().max())
    print(f"\n{family.title} slide: reused layer-0 keys max |diff| {diff:.2g} "
          f"(without the rotation {unmoved:.2g})")
    assert diff <= 1e-5 and unmoved > 1e-2
    torch.testing.assert_close(slid.cache.layers[0].values[:, :, reused],
                               fresh.cache.layers[0].values[:, :, reused], atol=1e-6, rtol=0)


def test_selective_refresh_without_a_slide_equals_full_refresh(checkpoint):
    family, model, tokenizer, _ = checkpoint
    window = encoded_window(family, model, 3, seed=2)
    vlm = visual_lm(family, model, tokenizer)
    kv = KVWindow(vlm)
    vlm.answer(kv, window[:2], QUESTION, REFRESH_SELECTIVE)
    selective = vlm.answer(kv, window, QUESTION, REFRESH_SELECTIVE)   # frame 2 appended
    full = vlm.answer_full(window, QUESTION)
    diff = float((selective.first_logits - full.first_logits).abs().max())
    print(f"\n{family.title} selective (no slide) vs full refresh first logits: "
          f"max |diff| {diff:.2g}; rows reused {selective.tokens_reused}")
    assert selective.tokens_reused > 0 and diff <= 1e-4


def test_an_anchor_re_prefilled_after_a_slide_is_exact_in_every_layer(checkpoint):
    """The oldest reused frame, an I-frame anchor, is re-prefilled in place (its deepstack
    rows too): it attends only to the prefix and itself, so every layer's keys and values
    equal a fresh prefill's; the frame after it, reused, is exact in layer 0 only."""
    family, model, tokenizer, _ = checkpoint
    window = encoded_window(family, model, 4, seed=3)
    window[1].frame_type = "I"
    vlm = visual_lm(family, model, tokenizer)
    slid, fresh = KVWindow(vlm), KVWindow(vlm)
    slid.sync(vlm, window[:3], REFRESH_SELECTIVE, anchor_frames=0)
    stats = slid.sync(vlm, window[1:], REFRESH_SELECTIVE, anchor_frames=1)
    fresh.sync(vlm, window[1:], REFRESH_FULL, anchor_frames=0)
    assert stats.anchors_refreshed == 1
    anchor = slice(slid.prefix_rows, slid.prefix_rows + slid.frame_rows[0])
    after = slice(anchor.stop, anchor.stop + slid.frame_rows[1])
    worst = max(float((a.keys[:, :, anchor] - b.keys[:, :, anchor]).abs().max())
                for a, b in zip(slid.cache.layers, fresh.cache.layers))
    print(f"\n{family.title} re-prefilled anchor: all layers' keys max |diff| {worst:.2g}")
    assert worst <= 1e-5
    last = len(slid.cache.layers) - 1
    reused_top = float((slid.cache.layers[last].keys[:, :, after]
                        - fresh.cache.layers[last].keys[:, :, after]).abs().max())
    assert reused_top > 1e-4    # not vacuous: a reused row above layer 0 is approximate


def test_both_text_position_rules_agree_for_qwen3(checkpoint):
    """A Qwen3 block is one temporal patch, so "previous maximum + 1" and transformers 5.23's
    "start + max(h, w)" put the text after it at the same position (here the grid is wider
    than tall and a frame is fully pruned: the rule still counts the whole grid)."""
    family, model, tokenizer, _ = checkpoint
    keep = np.ones((3, GRID_H, GRID_W), bool)
    keep[2] = False
    frames, indices = sampled_video(3)
    tokens = family.vision_tower(model).encode(*pair_patches(family, frames, keep))
    window = window_frames(tokens, indices, keep)
    ids_of = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    layouts = [type(family)(family.config, family.preprocessor, CheckpointSettings("pairs", rule))
               .layout(window, ids_of, 0, family.seconds_per_t(ANALYSIS_FPS))
               for rule in TEXT_POSITION_RULES]
    assert len({lay.text_start for lay in layouts}) == 1
    for a, b in zip(layouts[0].frames, layouts[1].frames):
        assert torch.equal(a.positions, b.positions)


def test_a_real_checkpoints_preprocessor_config_sets_the_geometry():
    """Qwen3-VL's published preprocessor_config.json gives size.shortest_edge, not
    min_pixels; its mean and std are 0.5 (the defaults when the file is absent too)."""
    config = {"model_type": "qwen3_vl", "vision_config": {
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]},
        "text_config": {"hidden_size": 2048}}
    preprocessor = {"size": {"longest_edge": 16777216, "shortest_edge": 65536},
                    "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    family = qwen3_vl.Qwen3VL(config, preprocessor, CheckpointSettings("pairs", "previous_max"))
    assert family.geometry.min_pixels == 65536 and family.geometry.group_pixels == 32
    assert family.token_width == 4 * 2048
    bare = qwen3_vl.Qwen3VL(config, {}, CheckpointSettings("pairs", "previous_max"))
    assert bare.geometry.image_mean == (0.5, 0.5, 0.5) and bare.geometry.min_pixels is None


def test_greedy_answer_equals_the_stock_generate(checkpoint):
    """Decoding continues at the positions the stock rope deltas give (max position + 1)."""
    family, model, tokenizer, _ = checkpoint
    frames, indices = sampled_video(2)
    patches, positions = pair_patches(family, frames)
    window = window_frames(family.vision_tower(model).encode(patches, positions), indices)
    vlm = VisualLM(model, tokenizer, max_new_tokens=6, family=family,
                   seconds_per_t=family.seconds_per_t(ANALYSIS_FPS))
    vlm.stop_ids = set()    # random weights: decode all 6 tokens whatever they are
    ours = vlm.answer_full(window, QUESTION).token_ids
    ids, _ = sequence(vlm, window, QUESTION)
    pad = tokenizer.convert_tokens_to_ids(qwen3_vl.VIDEO_PAD)
    with torch.no_grad():
        stock = model.generate(
            input_ids=ids[None], mm_token_type_ids=(ids[None] == pad).int() * 2,
            pixel_values_videos=torch.from_numpy(patches),
            video_grid_thw=torch.tensor([[2, 2 * GRID_H, 2 * GRID_W]]), max_new_tokens=6,
            min_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert len(ours) == 6 and ours == stock
