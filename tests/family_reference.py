"""Independent references for the family tests: what the stock processors and the stock
towers compute, written from transformers' own code (not from codecsight's).

- processor_patches: Qwen2VLVideoProcessor.patchify (transformers 5.23,
  video_processing_qwen2_vl.py), which needs torchvision to import, transcribed; frames are
  normalised with the image processor's arithmetic (x * 1/255, then (x - mean) / std).
- stock_tower_kwargs: the precomputed layout the stock Qwen2/2.5-VL towers accept
  (transformers.vision_utils: position_ids, cu_seqlens, window_index, cu_window_seqlens) for
  any patch set, built from each patch's (t, h, w) the way get_vision_window_index tiles a
  frame (windows of window_size // merge // patch merged cells from the top-left corner).
- rope_index_previous_max: the pre-5 get_rope_index (transformers 4.x, as Qwen trained):
  text after a vision block continues at the previous maximum position + 1.
- stock_first_logits: the stock model's own forward over a whole prompt, its last logits.
"""
from __future__ import annotations

import numpy as np
import torch


def processor_patches(frames: np.ndarray, mean, std, patch: int, merge: int,
                      temporal: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """frames uint8 [F, H, W, 3] sampled in order -> (float32 [T*gh*gw, C*T*P*P], (T, gh, gw))
    as the video processor lays them out: consecutive non-overlapping groups of `temporal`
    frames, the last frame repeated to fill the last group."""
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)
    videos = torch.from_numpy(x).permute(0, 3, 1, 2)[None]          # [1, F, C, H, W]
    batch, num_frames, channel, height, width = videos.shape
    if pad := -num_frames % temporal:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t, grid_h, grid_w = num_frames // temporal, height // patch, width // patch
    patches = videos.reshape(batch, grid_t, temporal, channel, grid_h // merge, merge, patch,
                             grid_w // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(batch, grid_t * grid_h * grid_w, channel * temporal * patch * patch)
    return flat[0].numpy(), (grid_t, grid_h, grid_w)


def stock_tower_kwargs(positions: np.ndarray, merge: int, window_merged: int | None = None):
    """Precomputed layout kwargs of the stock tower for patches at positions int64 [N, 3]
    (t, h, w; whole merge groups, frames contiguous). window_merged: the stock
    vit_merger_window_size (Qwen2.5-VL), None for Qwen2-VL."""
    positions = torch.as_tensor(positions)
    t = positions[:, 0]
    change = torch.ones(len(t), dtype=torch.bool)
    change[1:] = t[1:] != t[:-1]
    starts = torch.nonzero(change).flatten().tolist() + [len(t)]
    cu_seqlens = torch.tensor(starts, dtype=torch.int32)
    kwargs = {"position_ids": positions[:, 1:].clone(), "cu_seqlens": cu_seqlens}
    if window_merged is not None:
        unit = merge * merge
        first = positions[::unit]
        key = torch.stack([first[:, 0], first[:, 1] // merge // window_merged,
                           first[:, 2] // merge // window_merged], dim=1)
        order = sorted(range(len(first)), key=lambda i: (tuple(key[i].tolist()), i))
        window_index = torch.tensor(order, dtype=torch.int64)
        sizes, bounds = [], [0]
        for i in order:
            if sizes and tuple(key[i].tolist()) == sizes[-1]:
                bounds[-1] += unit
            else:
                sizes.append(tuple(key[i].tolist()))
                bounds.append(bounds[-1] + unit)
        kwargs["window_index"] = window_index
        kwargs["cu_window_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    return kwargs


def rope_index_previous_max(prefix_len: int, temporal_ids, grid_hw: tuple[int, int],
                            text_len: int) -> torch.Tensor:
    """Positions [3, L] of prefix text, one dense video block (temporal ids per temporal patch,
    relative to the block start; merged grid (h, w)) and text_len tokens of text, by the pre-5
    algorithm: the text after the block starts at the block's maximum position + 1."""
    st = prefix_len
    parts = [torch.arange(prefix_len).expand(3, -1)]
    gh, gw = grid_hw
    tt = torch.as_tensor(temporal_ids).view(-1, 1, 1).expand(-1, gh, gw).flatten()
    hh = torch.arange(gh).view(1, -1, 1).expand(len(temporal_ids), -1, gw).flatten()
    ww = torch.arange(gw).view(1, 1, -1).expand(len(temporal_ids), gh, -1).flatten()
    video = torch.stack([tt, hh, ww]) + st
    parts.append(video)
    st = int(video.max()) + 1
    parts.append(torch.arange(text_len).expand(3, -1) + st)
    return torch.cat(parts, dim=1)


def stock_first_logits(model, ids, pad: int, **kwargs) -> torch.Tensor:
    """The stock forward's logits [vocab] at the last position of the token ids [L] (tensor or
    list; the video rows are `pad`, marked as video in mm_token_type_ids); kwargs: the video
    inputs (pixel_values_videos, video_grid_thw, position_ids, ...)."""
    ids = torch.as_tensor(ids)[None]
    with torch.no_grad():
        return model(input_ids=ids, mm_token_type_ids=(ids == pad).int() * 2,
                     **kwargs).logits[0, -1]
