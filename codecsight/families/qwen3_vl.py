"""Qwen3-VL and Qwen3-VL-MoE: the pruned tower with deepstack, per-frame prompt and positions.

What differs from Qwen2-VL, and how each piece stays exact against the stock transformers
forward (tests/test_family_qwen3.py measures every claim):

Vision tower (16-pixel patches, 2x2 merge, temporal pairs; pixels normalised with mean = std
= 0.5). A learned position embedding, resampled bilinearly from a square table to each
frame's patch grid, is added after the patch embedding. The resampling taps of a patch depend
only on its (h, w) and its frame's patch grid, so the tower takes positions (t, h, w, frame
patch rows, frame patch columns) and computes each kept patch's taps from them in the graph
(`tap_tensors`): the whole frame's taps sliced with the kept patches (`interpolation_taps`
slices them with transformers' own function, for the stock reference). Deepstack: the
outputs of blocks `deepstack_visual_indexes` go through their own mergers, travel behind
each merged token (TOKENS is hidden * (1 + D) wide) and are added to the LLM hidden states
at the visual rows after decoder layers 0, 1, ... (`run_text`); computed on the pruned set they are
exactly the stock features of the kept tokens, because blocks attend within a frame only and
whole merge groups are kept. Every frame's kept patches must be contiguous and in frame order
(the stock tower splits by cu_seqlens; `check_patch_set`).

Prompt (Qwen3VLProcessor's video layout, as Qwen3-VL was trained and as the docstring of
transformers 5.23's get_rope_index describes it): each temporal patch (frame) of the video is
its own block, and the per-frame blocks replace the chat template's
'<|vision_start|><|video_pad|><|vision_end|>' (no outer vision markers),

    <|im_start|>user\\n  <{t:.1f} seconds><|vision_start|> [frame tokens] <|vision_end|>  ...
    QUESTION<|im_end|>\\n<|im_start|>assistant\\n

where t is the mean stream time of the frames in the temporal patch, in seconds (the parser's
time_ms of the window frame). Stream time, not window time, so that a frame reused after a
slide keeps its text and its cache rows.

Positions (Qwen3-VL's get_rope_index, interleaved M-RoPE): text tokens take p, p, p and move
p by one; a frame that starts at sequence position p puts merge-grid cell (h, w) at
(p, p + h, p + w) and moves p by max(grid_h, grid_w). So the temporal id of a frame is its
start position, and time is told by the timestamp text. Both text-after-video rules (the
pre-5 "previous maximum + 1" and transformers 5.23's "start + max(h, w)") give the same
position here, since every block is one temporal patch long.

Slide: when frames leave the window, every reused frame's block (its timestamp text, vision
markers and kept tokens) moves to a smaller start position by the same delta on all three
axes. Turning all rotary dimensions by delta * inv_freq moves a cached key exactly (layer 0
exactly; above it the reused rows still carry what they attended to before: the same
approximation as Qwen2-VL's selective refresh). Deepstack is added inside the decoder layers
of the forward that computes a row, so a reused row already carries it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np
import torch
# RoPE's pairing (dimension i turns with i + d/2), the model's own function.
from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

from codecsight.checkpoint import DOMAIN_WORDS, SPECIAL_TOKENS, Geometry
from codecsight.families.base import (CheckpointSettings, Family, FrameRows, WindowLayout,
                                      continue_text, rope_axes_from_sections)
from codecsight.vision import check_merge_groups, rope_attention

MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
# Qwen3-VL's processors normalise with IMAGENET_STANDARD_MEAN / _STD; a checkpoint's
# preprocessor_config.json wins when present.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

PROMPT_PREFIX = "<|im_start|>user\n"
PROMPT_SUFFIX = "{question}<|im_end|>\n<|im_start|>assistant\n"
VISION_START, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"


def timestamp_text(seconds: float) -> str:
    """The text Qwen3VLProcessor puts before a frame's vision block: '<1.5 seconds>'."""
    return f"<{seconds:.1f} seconds>"


# ---------------------------------------------------------------------------------------------
# Checkpoint: geometry, loading, the tiny test checkpoints


def model_class(model_type: str):
    """The stock transformers class of a Qwen3-VL model type."""
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    classes = {"qwen3_vl": Qwen3VLForConditionalGeneration,
               "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(f"model_type {model_type!r} is not Qwen3-VL; expected one of "
                         f"{sorted(classes)}")
    return classes[model_type]


# The timestamp text needs '<', '>', '.', 'seconds' and digits; digits are split one by one
# (as Qwen's own BPE tokenizer does), so every time has a spelling in a word-level vocabulary.
TIMESTAMP_WORDS = ["<", ">", ".", "seconds"] + [str(d) for d in range(10)]


def tiny_tokenizer():
    """Word-level tokenizer with Qwen3-VL's special tokens and the timestamp words (offline)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(SPECIAL_TOKENS + DOMAIN_WORDS + TIMESTAMP_WORDS))
    words += [f"<|reserved_{i}|>" for i in range((-len(words)) % 64)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                     unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|unk|>", pad_token="<|endoftext|>",
        eos_token="<|im_end|>")


def tiny_config(model_type: str, vocab_size: int, token_ids: dict[str, int]):
    """A few-layer, narrow config of the real Qwen3-VL (or -MoE) classes."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    head_dim = 32
    text = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=8192,
        # Interleaved M-RoPE: sections sum to head_dim / 2.
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                         "mrope_section": [6, 5, 5], "mrope_interleaved": True},
        pad_token_id=token_ids["<|endoftext|>"],
    )
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                  out_hidden_size=128, num_position_embeddings=64,  # an 8x8 learned grid
                  deepstack_visual_indexes=[0, 1])
    ids = dict(image_token_id=token_ids["<|image_pad|>"],
               video_token_id=token_ids["<|video_pad|>"],
               vision_start_token_id=token_ids["<|vision_start|>"],
               vision_end_token_id=token_ids["<|vision_end|>"], tie_word_embeddings=False)
    if model_type == "qwen3_vl":
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    if model_type == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                    decoder_sparse_step=1, tie_word_embeddings=False)
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")


def tiny_preprocessor(config) -> dict:
    """Qwen3-VL's preprocessor_config.json for a config: patch 16, mean = std = 0.5."""
    vision = config.vision_config
    return {"image_processor_type": "Qwen2VLImageProcessor",
            "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size, "image_mean": list(IMAGE_MEAN),
            "image_std": list(IMAGE_STD)}


# ---------------------------------------------------------------------------------------------
# Vision tower over a pruned patch set


def check_patch_set(positions: np.ndarray, merge_size: int) -> None:
    """Raise ValueError unless positions [N, >=3] (t, h, w, ...) is a set the tower encodes
    right: whole merge groups in row-major order (vision.check_merge_groups), and each frame's
    rows contiguous, frames in order (the stock tower encodes frame by frame, cu_seqlens)."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[1] < 3:
        raise ValueError(f"positions must be [N, 3 or 5] (t, h, w, ...), got "
                         f"{list(positions.shape)}")
    check_merge_groups(positions, merge_size)
    t = positions[:, 0]
    starts = np.concatenate([[True], t[1:] != t[:-1]]) if len(t) else np.zeros(0, bool)
    if len(np.unique(t)) != int(starts.sum()) or (np.diff(t[starts]) < 0).any():
        raise ValueError("each frame's patches (positions column 0) must be contiguous and "
                         "frames in order: Qwen3-VL encodes frame by frame")


@functools.lru_cache(maxsize=16)
def _frame_taps(grid_h: int, grid_w: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps of every patch of a grid_h x grid_w patch grid, raster order: [h*w, 4]."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    return get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, grid_h, grid_w]]), num_grid_per_side=side, mode="bilinear",
        align_corners=True, spatial_merge_size=1)


def interpolation_taps(positions: np.ndarray, grid_hw: np.ndarray,
                       side: int) -> tuple[np.ndarray, np.ndarray]:
    """The learned position embedding's taps for a patch set, sliced from whole-frame taps.

    positions: int64 [N, 3] (t, h, w) patch coordinates; grid_hw: int64 [N, 2], the patch grid
    (rows, columns) of each patch's whole frame; side: the learned table's side
    (sqrt(num_position_embeddings)). Returns indices int64 [N, 4] into the table and weights
    float32 [N, 4], exactly the stock tower's taps for these patches.
    """
    positions, grid_hw = np.asarray(positions), np.asarray(grid_hw)
    indices = np.zeros((len(positions), 4), np.int64)
    weights = np.zeros((len(positions), 4), np.float32)
    for gh, gw in np.unique(grid_hw, axis=0) if len(grid_hw) else []:
        rows = np.flatnonzero((grid_hw[:, 0] == gh) & (grid_hw[:, 1] == gw))
        h, w = positions[rows, 1], positions[rows, 2]
        if (h >= gh).any() or (w >= gw).any():
            raise ValueError(f"patch position outside its {gh}x{gw} patch grid")
        idx, wt = _frame_taps(int(gh), int(gw), side)
        raster = torch.from_numpy(h * gw + w)
        indices[rows] = idx[raster].numpy()
        weights[rows] = wt[raster].numpy()
    return indices, weights


def tap_tensors(rows: torch.Tensor, cols: torch.Tensor, grid_rows: torch.Tensor,
                grid_cols: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps of patches into the side x side learned table, in torch.

    rows, cols: int64 [...] patch coordinates; grid_rows, grid_cols: int64 [...] the patch grid
    of each patch's whole frame. Returns indices int64 [..., 4] and weights float32 [..., 4]:
    the arithmetic of transformers' get_vision_interpolation_indices_and_weights, written
    element-wise so the graph has no data-dependent shapes (tests hold it to that function).
    """
    def axis(index, size):
        src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
        floor = torch.floor(src)
        offsets = torch.arange(2, device=index.device)
        taps = (floor.long()[..., None] + offsets).clamp(0, side - 1)
        weights = (1 - (src[..., None] - floor[..., None] - offsets).abs()).clamp(min=0)
        return taps, weights

    h_taps, h_weights = axis(rows, grid_rows)
    w_taps, w_weights = axis(cols, grid_cols)
    index = (h_taps[..., :, None] * side + w_taps[..., None, :]).flatten(-2)
    weight = (h_weights[..., :, None] * w_weights[..., None, :]).flatten(-2)
    return index, weight


class PrunedTower(torch.nn.Module):
    """Qwen3-VL's vision tower over explicit patch sets, deepstack features included.

    Shares the weights of a transformers Qwen3VL(Moe)VisionModel. Positions come in as data:
    (segment, h, w, frame patch rows, frame patch columns) per patch; the learned position
    embedding's taps are computed from them, attention is one SDPA with a per-segment block
    mask (segment = frame), so any whole-group subset of a frame is encoded at its true
    positions and the graph has no data-dependent shapes (exportable with a dynamic N).
    """

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list
        self.deepstack_layers = [int(i) for i in visual.deepstack_visual_indexes]
        self.rotary = visual.rotary_pos_emb
        self.side = int(visual.num_grid_per_side)
        self.merge_size = int(visual.spatial_merge_size)
        self.vision_hidden = visual.merger.linear_fc2.out_features
        self.token_width = self.vision_hidden * (1 + len(self.deepstack_layers))

    def _attention(self, attn, x, cos, sin, mask):
        return rope_attention(attn, x, cos, sin, mask, rotate=rotate_half)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode patch sets into merged tokens with their deepstack features behind them.

        patches float32 [B, N, patch_dim]; positions int64 [B, N, 5] = (segment, h, w, frame
        patch rows, frame patch columns); patches attend only within their segment (a frame).
        Returns float32 [B, N/4, hidden * (1 + D)]: the merged token, then the D deepstack
        features (D = len(deepstack_visual_indexes)), each hidden wide. A set without the
        batch axis ([N, patch_dim], [N, 5]) gives [N/4, hidden * (1 + D)].
        """
        if patches.dim() == 2:
            return self(patches[None], positions[None])[0]
        b, n, patch_dim = patches.shape
        x = self.patch_embed(patches.reshape(b * n, patch_dim)).reshape(b, n, -1)
        index, weight = tap_tensors(positions[..., 1], positions[..., 2], positions[..., 3],
                                    positions[..., 4], self.side)
        x = x + (self.pos_embed(index) * weight[..., None]).sum(-2)
        # The stock axial RoPE: h and w angles side by side, then the whole repeated.
        angles = positions[..., 1:3, None].float() * self.rotary.inv_freq   # [B, N, 2, hd/4]
        angles = torch.cat((angles[..., 0, :], angles[..., 1, :]), dim=-1)
        angles = torch.cat((angles, angles), dim=-1)[:, None]                # [B, 1, N, hd]
        cos = angles.cos() * self.rotary.attention_scaling
        sin = angles.sin() * self.rotary.attention_scaling
        # Additive block mask, built once for all blocks; a patch always sees itself.
        segment = positions[..., 0]
        same = segment[:, None, :, None] == segment[:, None, None, :]        # [B, 1, N, N]
        mask = torch.zeros(same.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~same, float("-inf"))
        features = []
        for layer, block in enumerate(self.blocks):
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))
            if layer in self.deepstack_layers:
                merger = self.deepstack_mergers[self.deepstack_layers.index(layer)]
                features.append(merger(x).reshape(b, -1, self.vision_hidden))
        # Mergers fold every 4 consecutive rows into one token; N is a multiple of 4, so
        # groups never straddle batch items.
        tokens = self.merger(x).reshape(b, -1, self.vision_hidden)
        return torch.cat([tokens, *features], dim=-1)

    @torch.inference_mode()
    def encode(self, patches: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One patch set, numpy in and out, checked: float32 [N, patch_dim], int64 [N, 5]
        -> float32 [N/4, hidden * (1 + D)]."""
        check_patch_set(positions, self.merge_size)
        if len(patches) == 0:
            return np.zeros((0, self.token_width), np.float32)
        return self(torch.from_numpy(np.ascontiguousarray(patches, np.float32)),
                    torch.from_numpy(np.ascontiguousarray(positions, np.int64))).numpy()


def with_grid(positions: np.ndarray, grid_hw: Sequence[int] | np.ndarray) -> np.ndarray:
    """(t, h, w) positions [N, 3] plus each patch's frame patch grid -> [N, 5].

    grid_hw: (rows, columns) of the frame's patch grid, one pair for all or [N, 2].
    """
    positions = np.asarray(positions, np.int64)
    grid = np.broadcast_to(np.asarray(grid_hw, np.int64), (len(positions), 2))
    return np.concatenate([positions[:, :3], grid], axis=1)


def stock_tower_kwargs(positions: np.ndarray, grid_hw: np.ndarray, side: int,
                       prefix: str = "") -> dict[str, torch.Tensor]:
    """The stock tower's precomputed kwargs for a pruned set at its true positions.

    transformers 5.23 pops position_ids (N, 2), cu_seqlens and interp_indices/_weights from
    the tower's kwargs; prefix "video_" passes them through the model-level forward.
    """
    positions = np.asarray(positions)
    t = positions[:, 0]
    bounds = np.flatnonzero(np.concatenate([[True], t[1:] != t[:-1], [True]]))
    index, weight = interpolation_taps(positions, grid_hw, side)
    return {
        prefix + "position_ids": torch.from_numpy(positions[:, 1:].copy()),
        prefix + "cu_seqlens": torch.from_numpy(bounds.astype(np.int32)),
        prefix + "interp_indices": torch.from_numpy(index),
        prefix + "interp_weights": torch.from_numpy(weight),
    }


# ---------------------------------------------------------------------------------------------
# The family


class Qwen3VL(Family):
    """Qwen3-VL: interpolated learned position embedding, deepstack, per-frame timestamps."""

    name = "qwen3_vl"
    title = "Qwen3-VL"
    model_types = ("qwen3_vl",)
    position_columns = 5      # (t, h, w, frame patch rows, frame patch columns)

    def __init__(self, config: dict, preprocessor: dict | None = None,
                 settings: CheckpointSettings | None = None):
        super().__init__(config, preprocessor, settings)
        # Deepstack features travel behind the merged token (Family.token_width).
        self.deepstack_layers = len(self.vision_config.get("deepstack_visual_indexes", ()))

    def _geometry(self) -> Geometry:
        # Qwen3-VL's processors normalise with mean = std = 0.5 unless the checkpoint says.
        geometry = super()._geometry()
        pre = self.preprocessor
        # Qwen3-VL's configs give the smallest picture as size.shortest_edge (pixels), not
        # min_pixels: the same bound for smart_resize.
        min_pixels = geometry.min_pixels
        if min_pixels is None and "shortest_edge" in (pre.get("size") or {}):
            min_pixels = int(pre["size"]["shortest_edge"])
        return dataclasses.replace(geometry, image_mean=tuple(pre.get("image_mean", IMAGE_MEAN)),
                                   image_std=tuple(pre.get("image_std", IMAGE_STD)),
                                   min_pixels=min_pixels)

    def model_class(self):
        return model_class(self.model_types[0])

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int]):
        """A few-layer, narrow config of this family (tests; checkpoint.build_tiny_family)."""
        return tiny_config(cls.model_types[0], vocab_size, token_ids)

    @classmethod
    def tiny_preprocessor(cls, config) -> dict:
        """preprocessor_config.json of a tiny checkpoint: patch 16, mean = std = 0.5."""
        return tiny_preprocessor(config)

    @classmethod
    def tiny_tokenizer(cls):
        """The analytics tokenizer plus what timestamps need (tiny_tokenizer)."""
        return tiny_tokenizer()

    def vision_tower(self, model) -> PrunedTower:
        return PrunedTower(model.model.visual).eval()

    # --- prompt and positions ----------------------------------------------------------------

    def prompt_prefix(self) -> str:
        return PROMPT_PREFIX

    def question_text(self, question: str) -> str:
        return PROMPT_SUFFIX.format(question=question)

    def frame_texts(self, frame) -> tuple[str, str]:
        """'<1.5 seconds><|vision_start|>' before a frame's tokens, '<|vision_end|>' after.

        The time is frame.time_ms: with the processor's layout ("pairs") the parser gives a
        window frame the mean stream time of its temporal patch's sampled frames, rounded to
        ms (Qwen3VLProcessor._calculate_timestamps' value; the text can differ from the
        processor's only where that rounding crosses a 0.05 s boundary).
        """
        return timestamp_text(frame.time_ms / 1000.0) + VISION_START, VISION_END

    def layout(self, frames: Sequence, ids: Callable[[str], list[int]], t0: int,
               seconds_per_t: float) -> WindowLayout:
        """Qwen3-VL's get_rope_index over the window: text takes (p, p, p); a frame block
        starting at p (after its head text) puts cell (h, w) at (p, p + h, p + w).

        Positions depend on the sequence only, not on t0: a frame's temporal id is its start
        position. Text after a block continues at p + max(grid_h, grid_w) under both text
        rules (a block is one temporal patch: its largest position is p + max(grid) - 1).
        """
        prefix = ids(self.prompt_prefix())
        p = len(prefix)
        rows = []
        for frame in frames:
            before_text, after_text = self.frame_texts(frame)
            before, after = ids(before_text), ids(after_text)
            start = p + len(before)
            cells = torch.as_tensor(np.asarray(frame.cells), dtype=torch.int64).reshape(-1, 2)
            resume = continue_text(start, start, [(frame.grid_h, frame.grid_w)],
                                   self.settings.text_positions)
            positions = torch.cat([
                torch.arange(p, start).expand(3, -1),
                torch.stack([torch.full((len(cells),), start), start + cells[:, 0],
                             start + cells[:, 1]]),
                torch.arange(resume, resume + len(after)).expand(3, -1)], dim=1)
            rows.append(FrameRows(before, len(cells), after, positions))
            p = resume + len(after)
        return WindowLayout(prefix, torch.arange(len(prefix)).expand(3, -1), rows, p)

    # --- sliding and the LLM forward ---------------------------------------------------------

    def rope_axes(self, text_model) -> torch.Tensor:
        rotary = text_model.rotary_emb
        # Qwen3VLTextRotaryEmbedding always interleaves its sections.
        return rope_axes_from_sections(list(rotary.mrope_section), interleaved=True)

    def run_text(self, text_model, embeds, positions, mask, cache, visual=None, **attention):
        """As Family.run_text, adding the deepstack features at the visual rows after the
        first decoder layers (the stock Qwen3VLTextModel does the adding). visual holds at
        least one visual row where given (llm.VisualLM.embed_layout gives None otherwise)."""
        if isinstance(mask, dict):
            # Qwen3VLTextModel takes one mask (create_causal_mask passes a 4-D float mask
            # through), not a {layer type: mask} mapping; every layer is full attention.
            mask = mask["full_attention"]
        extra = {}
        if visual is not None:
            rows, deepstack = visual
            extra = {"visual_pos_masks": rows.reshape(1, -1),
                     "deepstack_visual_embeds": list(deepstack.to(embeds.dtype).unbind(0))}
        return text_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                          past_key_values=cache, use_cache=True, **extra,
                          **attention).last_hidden_state


class Qwen3VLMoe(Qwen3VL):
    """Qwen3-VL-MoE: Qwen3-VL's tower and prompt with a mixture-of-experts LLM."""

    name = "qwen3_vl_moe"
    title = "Qwen3-VL-MoE"
    model_types = ("qwen3_vl_moe",)



FAMILIES = [Qwen3VL, Qwen3VLMoe]
