"""Qwen2-VL: one video block of all window frames, sectioned M-RoPE (t, h, w), a ViT with
full attention inside each frame. The demo model (models/codecsight-demo) is of this family."""
from __future__ import annotations

from typing import Callable, Sequence

from codecsight.families.base import (Family, FrameRows, WindowLayout, continue_text,
                                      rope_axes_from_sections)

PROMPT_PREFIX = "<|im_start|>user\n<|vision_start|>"
PROMPT_SUFFIX = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"


class Qwen2VL(Family):
    name = "qwen2_vl"
    title = "Qwen2-VL"
    model_types = ("qwen2_vl",)

    def merged_width(self) -> int:
        # Qwen2-VL's vision config names the merged token width hidden_size (the ViT's own
        # width is embed_dim); later families call it out_hidden_size.
        return int(self.vision_config["hidden_size"])

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int]):
        from codecsight.checkpoint import tiny_config

        return tiny_config(vocab_size, token_ids)

    def vision_tower(self, model):
        from codecsight.vision import PrunedVisionEncoder

        return PrunedVisionEncoder(model.model.visual).eval()

    def prompt_prefix(self) -> str:
        return PROMPT_PREFIX

    def question_text(self, question: str) -> str:
        return PROMPT_SUFFIX.format(question=question)

    def temporal_id(self, t_rel: int, seconds_per_t: float) -> int:
        """Temporal position of window frame t_rel (counted from the window's origin),
        relative to the video block's start: one step per temporal patch."""
        return t_rel

    def layout(self, frames: Sequence, ids: Callable[[str], list[int]], t0: int,
               seconds_per_t: float) -> WindowLayout:
        """get_rope_index's video block: L prefix tokens take 0..L-1 on all axes; a visual token
        of window frame t at merge cell (h, w) takes (L + temporal_id(t - t0), L + h, L + w).
        Positions come from the frame grid, not from the kept tokens, so a pruned token leaves a
        gap, never a shift; when the window slides only the temporal axis moves."""
        import torch

        prefix = ids(self.prompt_prefix())
        start = len(prefix)
        rows, last_temporal = [], start
        for f in frames:
            cells = torch.from_numpy(f.cells)
            temporal = start + self.temporal_id(f.t - t0, seconds_per_t)
            last_temporal = max(last_temporal, temporal)
            positions = torch.stack([torch.full((len(cells),), temporal, dtype=torch.int64),
                                     cells[:, 0] + start, cells[:, 1] + start])
            rows.append(FrameRows([], len(cells), [], positions))
        text_start = continue_text(start, last_temporal, [(f.grid_h, f.grid_w) for f in frames],
                                   self.settings.text_positions)
        return WindowLayout(prefix, torch.arange(start).expand(3, -1), rows, text_start)

    def rope_axes(self, text_model):
        return rope_axes_from_sections(text_model.rotary_emb.mrope_section)
