"""The language side: window layout, M-RoPE positions, sliding, greedy answers."""
import numpy as np
import pytest
import torch

from codecsight.checkpoint import Geometry
from codecsight.llm import SlidingWindow, StreamSession, VisualLM, WindowFrame, split_frames
from codecsight.protocol import FRAME_TYPES
from codecsight.vision import patchify

GRID_H, GRID_W = 3, 4  # merge groups per frame: an 84x112 frame


@pytest.fixture(scope="module")
def vlm(tiny):
    model, tokenizer = tiny
    return VisualLM(model, tokenizer, max_new_tokens=4)


def frames_rgb(count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, GRID_H * 28, GRID_W * 28, 3), dtype=np.uint8)


def frame_meta(ts, kept):
    rows = [[t, 6 * t, 500 * t, FRAME_TYPES["P"], GRID_H, GRID_W, k] for t, k in zip(ts, kept)]
    return np.array(rows, dtype=np.int64)


def encode(model, tiny_dir, pixels, ts, keep=None):
    """Visual tokens of the stock ViT for whole frames, or the kept groups' rows of them."""
    geometry = Geometry.from_model_dir(tiny_dir)
    patches, positions = patchify(pixels, geometry, frame_ids=ts)
    grid = torch.tensor([[1, GRID_H * 2, GRID_W * 2]] * len(ts))
    with torch.no_grad():
        tokens = model.model.visual(torch.from_numpy(patches), grid_thw=grid).pooler_output
    return tokens.numpy(), positions


def test_window_layout_matches_the_stock_qwen2vl_forward(tiny, tiny_dir, vlm):
    """Our prefill of precomputed visual tokens gives the logits of Qwen2-VL's own forward."""
    model, tokenizer = tiny
    ts = [0, 1, 2]
    pixels = frames_rgb(len(ts))
    tokens, positions = encode(model, tiny_dir, pixels, ts)
    frames = split_frames(tokens, positions, frame_meta(ts, [GRID_H * GRID_W] * 3), 2)
    ours = vlm.answer_full(frames, "is anyone in the loading bay?").first_logits

    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = vlm.prefix_ids + [video_pad] * len(tokens) + vlm.question_ids(
        "is anyone in the loading bay?")
    ids = torch.tensor([ids])
    # Each sampled frame is one temporal patch (the frame repeated), as patchify makes it.
    geometry = Geometry.from_model_dir(tiny_dir)
    video_patches, _ = patchify(pixels, geometry, frame_ids=ts)
    with torch.no_grad():
        stock = model(input_ids=ids, mm_token_type_ids=(ids == video_pad).int() * 2,
                      pixel_values_videos=torch.from_numpy(video_patches),
                      video_grid_thw=torch.tensor([[3, GRID_H * 2, GRID_W * 2]])).logits[0, -1]
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_pruned_tokens_keep_their_positions_and_leave_gaps(tiny, tiny_dir, vlm):
    model, _ = tiny
    tokens, positions = encode(model, tiny_dir, frames_rgb(1), [0])
    full = split_frames(tokens, positions, frame_meta([0], [12]), 2)
    keep = [0, 5, 11]  # merge groups 0, 5 and 11 of 12
    pruned = [WindowFrame(**{**vars(full[0]), "tokens": full[0].tokens[keep],
                             "cells": full[0].cells[keep]})]
    _, pos_full = vlm.layout(full, "how many cars?")
    _, pos_pruned = vlm.layout(pruned, "how many cars?")
    prefix = len(vlm.prefix_ids)
    visual_full = pos_full[:, prefix:prefix + 12]
    assert torch.equal(pos_pruned[:, prefix:prefix + 3], visual_full[:, keep])
    # The question's positions do not move when visual tokens are dropped.
    assert torch.equal(pos_pruned[:, prefix + 3:], pos_full[:, prefix + 12:])


def test_split_frames_cuts_tokens_by_kept_groups():
    tokens = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    # Frame 0 keeps groups (0,0),(0,1); frame 1 keeps (1,0),(0,0),(2,3); 4 patches per group.
    cells = [(0, 0), (0, 1), (1, 0), (0, 0), (2, 3)]
    positions = np.array([[t, 2 * h, 2 * w] for t, (h, w) in zip([0, 0, 1, 1, 1], cells)
                          for _ in range(4)], dtype=np.int64)
    frames = split_frames(tokens, positions, frame_meta([0, 1], [2, 3]), 2)
    assert [len(f.tokens) for f in frames] == [2, 3]
    assert frames[1].cells.tolist() == [[1, 0], [0, 0], [2, 3]]
    assert frames[1].tokens[0].tolist() == [4.0, 5.0]


def test_split_frames_rejects_metadata_that_disagrees_with_tokens():
    with pytest.raises(ValueError, match="counts 3 groups, got 2 tokens"):
        split_frames(np.zeros((2, 4), np.float32), np.zeros((8, 3), np.int64),
                     frame_meta([0], [3]), 2)


def make_frame(t, time_ms):
    return WindowFrame(t=t, frame_index=t, time_ms=time_ms, frame_type="P", grid_h=1,
                       grid_w=1, tokens=torch.zeros(1, 4), cells=np.zeros((1, 2), np.int64))


def test_window_keeps_only_the_last_seconds():
    window = SlidingWindow(seconds=2.0)
    assert window.add([make_frame(t, 500 * t) for t in range(4)]) == []
    dropped = window.add([make_frame(t, 500 * t) for t in range(4, 7)])  # newest: 3000 ms
    assert [f.t for f in dropped] == [0, 1, 2]
    assert [f.t for f in window.frames] == [3, 4, 5, 6]  # (1000, 3000] ms


def test_window_length_in_frames_keeps_the_last_n():
    window = SlidingWindow(frames=3)
    window.add([make_frame(t, 500 * t) for t in range(2)])
    dropped = window.add([make_frame(t, 500 * t) for t in range(2, 5)])
    assert [f.t for f in dropped] == [0, 1] and [f.t for f in window.frames] == [2, 3, 4]
    with pytest.raises(ValueError, match="seconds or in frames"):
        SlidingWindow(seconds=8.0, frames=16)


def test_session_answers_every_window_once_it_has_a_question(tiny, tiny_dir, vlm):
    model, _ = tiny
    tokens, positions = encode(model, tiny_dir, frames_rgb(2), [0, 1])
    frames = split_frames(tokens, positions, frame_meta([0, 1], [12, 12]), 2)
    session = StreamSession(window_seconds=8.0)
    answer, stats = session.step(vlm, frames[:1], "", "full")
    assert answer is None and stats.tokens_prefilled == 0
    answer, stats = session.step(vlm, frames[1:], "is anyone there?", "full")
    assert answer is not None
    assert stats.window_frames == 2 and stats.visual_tokens == 24
    assert stats.tokens_prefilled == 24 + len(vlm.prefix_ids) + len(
        vlm.question_ids("is anyone there?"))
    assert stats.kv_bytes > 0
    again, _ = session.step(vlm, [], "", "full")  # keeps the question, same window
    assert again.token_ids == answer.token_ids


def test_session_reuses_its_cache_when_frames_are_added(tiny, tiny_dir, vlm):
    model, _ = tiny
    tokens, positions = encode(model, tiny_dir, frames_rgb(2), [0, 1])
    frames = split_frames(tokens, positions, frame_meta([0, 1], [12, 12]), 2)
    session = StreamSession(window_seconds=8.0)  # selective unless told otherwise
    session.step(vlm, frames[:1], "is anyone there?")
    _, stats = session.step(vlm, frames[1:], "")
    assert stats.refresh == "selective"
    assert stats.tokens_reused == len(vlm.prefix_ids) + 12 and stats.tokens_new == 12
    assert stats.kv_rows == len(vlm.prefix_ids) + 24
