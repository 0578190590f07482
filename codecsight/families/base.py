"""The model-family interface: everything that differs between Qwen2-VL, Qwen2.5-VL, Qwen3-VL
and Qwen3-VL-MoE checkpoints, behind one small class. The rest of the pipeline (parser,
vision, llm, the Triton models) calls only this.

A `Family` instance belongs to one checkpoint directory (its config.json, preprocessor
config and optional codecsight.json) and answers five questions:

1. Geometry: patch size (14 or 16), merge size, temporal patch, normalisation, token width
   (`geometry`, `frame_layout`, `token_width`).
2. The vision tower over a pruned patch set at true positions (`vision_tower`): a torch
   module patches float32 [B, N, patch_dim], positions int64 [B, N, position_columns]
   -> tokens float32 [B, N/4, token_width]. position_columns is 3 (t, h, w) or 5 (t, h, w,
   frame's patch rows, frame's patch columns) for towers whose position embedding depends on
   the whole grid (Qwen3's interpolated learned embedding). Deepstack features travel
   concatenated behind the merged token (token_width = hidden * (1 + deepstack layers)).
3. The LLM's position ids for visual and text tokens (`layout`): the prompt's rows, each
   window frame's rows (text before, visual tokens, text after) and their M-RoPE positions
   [3, rows], and where the text after the video starts.
4. The prompt layout (`prompt_prefix`, `question_text`, `frame_texts`), including Qwen3-VL's
   per-frame timestamp text.
5. How positions move when the window slides: each frame's positions are a function of the
   window (`layout`), and a cached key moves from its old to its new position by a rotation
   per frequency (`rope_axes`, `rotate_keys`): exact for layer-0 keys in every family.

Families register themselves in codecsight.families (`family_for`).
"""
from __future__ import annotations

import abc
import dataclasses
import json
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np

from codecsight.checkpoint import CLIP_MEAN, CLIP_STD, Geometry

# How each temporal patch (one window frame) is filled from the sampled frames.
#   overlapping: (previous sampled frame, this frame): every sampled frame is one window frame
#                and its tokens see the motion since the last one (the demo model, ours).
#   pairs:       non-overlapping pairs (frame 2k, frame 2k+1) as the checkpoint's own video
#                processor lays them out: one window frame per two sampled frames.
FRAME_LAYOUTS = ("overlapping", "pairs")
# Where the text after a video block continues.
#   transformers5: start + max(grid_h, grid_w), transformers 5.23's get_rope_index (ignores
#                  the temporal extent); the demo model was trained with it.
#   previous_max:  previous maximum position + 1, the pre-5 algorithm and Qwen's training
#                  code: what real checkpoints were trained with.
TEXT_POSITION_RULES = ("transformers5", "previous_max")
# Optional per-checkpoint settings file (JSON object with keys of CheckpointSettings).
SETTINGS_FILE = "codecsight.json"
# A checkpoint built or trained by CodecSight carries this file (checkpoint.build_tiny,
# tools/train); its defaults are the demo model's: overlapping pairs, transformers5 text.
CODECSIGHT_MARKER = "CODECSIGHT.md"


class UnsupportedFamily(ValueError):
    """A checkpoint whose family CodecSight cannot serve; the message lists those it can."""


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """How CodecSight lays frames and text out for one checkpoint (codecsight.json)."""

    frame_layout: str
    text_positions: str

    def __post_init__(self):
        if self.frame_layout not in FRAME_LAYOUTS:
            raise ValueError(f"frame_layout {self.frame_layout!r}: use one of {FRAME_LAYOUTS}")
        if self.text_positions not in TEXT_POSITION_RULES:
            raise ValueError(f"text_positions {self.text_positions!r}: use one of "
                             f"{TEXT_POSITION_RULES}")

    @classmethod
    def for_model_dir(cls, model_dir: str | Path) -> "CheckpointSettings":
        model_dir = Path(model_dir)
        ours = (model_dir / CODECSIGHT_MARKER).is_file()
        values = {"frame_layout": "overlapping" if ours else "pairs",
                  "text_positions": "transformers5" if ours else "previous_max"}
        path = model_dir / SETTINGS_FILE
        if path.is_file():
            given = json.loads(path.read_text())
            unknown = set(given) - set(values)
            if unknown:
                raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: "
                                 f"{sorted(values)}")
            values.update(given)
        return cls(**values)


@dataclasses.dataclass
class FrameRows:
    """One window frame's rows in the LLM sequence: text ids before its visual tokens, the
    visual tokens, text ids after them; positions int64 [3, rows] (t, h, w axes)."""

    before: list[int]
    n_visual: int
    after: list[int]
    positions: "torch.Tensor"  # noqa: F821 (int64 [3, len(before) + n_visual + len(after)])

    @property
    def rows(self) -> int:
        return len(self.before) + self.n_visual + len(self.after)


@dataclasses.dataclass
class WindowLayout:
    """A window's sequence without its question: prefix rows, frame rows, where text resumes."""

    prefix: list[int]
    prefix_positions: "torch.Tensor"   # noqa: F821 int64 [3, len(prefix)]
    frames: list[FrameRows]
    text_start: int                    # position of the first token after the video


class Family(abc.ABC):
    """One model family. Subclasses set the class attributes and implement the abstract
    methods; `__init__` reads the checkpoint's config.json (dict), preprocessor config (dict)
    and CodecSight settings."""

    name: ClassVar[str]                      # registry key, e.g. "qwen2_vl"
    title: ClassVar[str]                     # for people, e.g. "Qwen2-VL"
    model_types: ClassVar[tuple[str, ...]]   # config.json "model_type" values it serves
    onnx_exportable: ClassVar[bool] = True   # vit_pruned runs its ONNX export (else torch)
    position_columns: ClassVar[int] = 3      # columns of the tower's positions input
    deepstack_layers: ClassVar[int] = 0      # visual features added to the first LLM layers

    def __init__(self, config: dict, preprocessor: dict | None = None,
                 settings: CheckpointSettings | None = None):
        self.config = config
        self.preprocessor = preprocessor or {}
        self.settings = settings or CheckpointSettings("pairs", "previous_max")
        self.geometry = self._geometry()

    # --- 1. geometry -------------------------------------------------------------------------

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config", self.config)

    @property
    def frame_layout(self) -> str:
        return self.settings.frame_layout

    @property
    def token_width(self) -> int:
        """Width of one TOKENS row: the merged token, then one feature per deepstack layer."""
        return self.geometry.vision_hidden * (1 + self.deepstack_layers)

    def merged_width(self) -> int:
        """Width of a merged visual token (= the LLM's hidden size)."""
        return int(self.vision_config.get("out_hidden_size", self.text_config["hidden_size"]))

    def _geometry(self) -> Geometry:
        vision, pre = self.vision_config, self.preprocessor
        return Geometry(
            patch_size=int(vision.get("patch_size", 14)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            merge_size=int(vision.get("spatial_merge_size", 2)),
            in_channels=int(vision.get("in_channels", 3)),
            vision_hidden=self.merged_width(),
            image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            image_std=tuple(pre.get("image_std", CLIP_STD)),
            min_pixels=int(pre["min_pixels"]) if "min_pixels" in pre else None,
            frame_layout=self.frame_layout,
        )

    def seconds_per_t(self, analysis_fps: float) -> float:
        """Stream seconds one window frame (one step of t) spans."""
        per = self.geometry.temporal_patch_size if self.frame_layout == "pairs" else 1
        return per / analysis_fps

    # --- checkpoint ----------------------------------------------------------------------------

    @abc.abstractmethod
    def model_class(self):
        """The transformers *ForConditionalGeneration class of this family."""

    @classmethod
    def tiny_config(cls, vocab_size: int, token_ids: dict[str, int]):
        """A tiny random transformers config of this family (tests, benchmarks):
        checkpoint.build_tiny_family. token_ids: checkpoint.SPECIAL_TOKENS -> id."""
        raise NotImplementedError(f"{cls.title} has no tiny config")

    @classmethod
    def tiny_tokenizer(cls):
        """The tokenizer of a tiny checkpoint (default: checkpoint.tiny_tokenizer)."""
        from codecsight.checkpoint import tiny_tokenizer

        return tiny_tokenizer()

    @classmethod
    def tiny_preprocessor(cls, config) -> dict:
        """preprocessor_config.json of a tiny checkpoint built from config."""
        vision = config.vision_config
        return {"image_processor_type": "Qwen2VLImageProcessor",
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
                "merge_size": vision.spatial_merge_size}

    def load(self, model_dir: str | Path):
        """(model, tokenizer) from a local checkpoint directory, float32, CPU, eval, offline."""
        import torch
        from transformers import AutoTokenizer

        model = self.model_class().from_pretrained(
            model_dir, dtype=torch.float32, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model.codecsight_family = self   # llm.VisualLM lays the prompt out by it
        return model, tokenizer

    # --- 2. the vision tower -----------------------------------------------------------------

    @abc.abstractmethod
    def vision_tower(self, model) -> "torch.nn.Module":  # noqa: F821
        """The pruned tower sharing model's weights: forward(patches [B, N, patch_dim],
        positions [B, N, position_columns]) -> [B, N/4, token_width]; a set without the batch
        axis gives [N/4, token_width]."""

    def split_tokens(self, tokens: "torch.Tensor"):  # noqa: F821
        """TOKENS rows [n, token_width] -> (merged tokens [n, hidden], deepstack
        [deepstack_layers, n, hidden] or None)."""
        hidden = self.geometry.vision_hidden
        if not self.deepstack_layers:
            return tokens, None
        return tokens[:, :hidden], tokens[:, hidden:].reshape(
            len(tokens), self.deepstack_layers, hidden).transpose(0, 1)

    # --- 3./4. prompt and positions ------------------------------------------------------------

    @abc.abstractmethod
    def prompt_prefix(self) -> str:
        """Chat text before the first frame's rows."""

    @abc.abstractmethod
    def question_text(self, question: str) -> str:
        """Chat text after the last frame's rows: the question and the assistant's turn."""

    def frame_texts(self, frame) -> tuple[str, str]:
        """Text before and after one window frame's visual tokens (Qwen3: timestamp)."""
        return "", ""

    @abc.abstractmethod
    def layout(self, frames: Sequence, ids: Callable[[str], list[int]], t0: int,
               seconds_per_t: float) -> WindowLayout:
        """The window's rows and positions. frames: llm.WindowFrame (t, time_ms, grid_h,
        grid_w, cells [n, 2]); ids: text -> token ids; t0: the window frame t that temporal
        positions count from; seconds_per_t: stream seconds per step of t."""

    # --- 5. sliding: moving cached keys to new positions -------------------------------------

    @abc.abstractmethod
    def rope_axes(self, text_model) -> "torch.Tensor":  # noqa: F821
        """int64 [head_dim / 2]: which position axis (0 t, 1 h, 2 w) turns each RoPE frequency."""

    @staticmethod
    def rotate_keys(keys, delta, inv_freq, axes):
        """Keys [..., rows, head_dim] encoded at positions p, re-encoded at p + delta.

        delta: int64 [rows, 3] per-row position change; inv_freq float [head_dim/2]; axes: the
        rope_axes. A rotation by a then b is a rotation by a + b, so this is exact up to float
        rounding whatever the rest of the position (the pairing: dim i turns with i + d/2).
        """
        import torch
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        angle = delta[:, axes].float() * inv_freq.float()[None, :]      # [rows, hd/2]
        angle = torch.cat((angle, angle), dim=-1)                         # [rows, hd]
        k = keys.float()
        return (k * angle.cos() + rotate_half(k) * angle.sin()).to(keys.dtype)

    # --- the LLM forward -----------------------------------------------------------------------

    def run_text(self, text_model, embeds, positions, mask, cache, visual=None, **attention):
        """text_model over embeds [1, n, hidden] at positions [3, 1, n]; last hidden states.

        visual: None, or (bool [n] which rows are visual tokens, deepstack [layers, v, hidden])
        for families that add deepstack features at the visual rows. attention: keyword
        arguments the attention layers pass to their attention function (llm.stream_attention
        takes `streams`, the packed batch of several streams).
        """
        return text_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                          past_key_values=cache, use_cache=True, **attention).last_hidden_state


def continue_text(start: int, last_temporal: int, grids: Sequence[tuple[int, int]],
                  rule: str) -> int:
    """Position of the first text token after a video block that started at `start`.

    last_temporal: the largest temporal position of the block's frames (absolute, whether or
    not a frame kept tokens); grids: the (grid_h, grid_w) merge grid of its frames.
    transformers5: start + max(grid_h, grid_w); previous_max: the block's largest position
    over its whole (unpruned) grid, + 1. They differ when the temporal extent is the longer.
    """
    spatial = start + max((max(h, w) for h, w in grids), default=0)
    if rule == "transformers5":
        return spatial
    if rule == "previous_max":
        return max(spatial, last_temporal + 1) if grids else start
    raise ValueError(f"unknown text position rule {rule!r}; use one of {TEXT_POSITION_RULES}")


def rope_axes_from_sections(sections: Sequence[int], interleaved: bool = False):
    """rope_axes of an M-RoPE with mrope_section (t, h, w) frequency counts.

    Sectioned (Qwen2/2.5-VL): the first sections[0] frequencies turn with t, then h, then w.
    Interleaved (Qwen3-VL): frequency j turns with h if j % 3 == 1 and j < 3 * sections[1],
    w if j % 3 == 2 and j < 3 * sections[2], else t.
    """
    import torch

    total = int(sum(sections))
    if not interleaved:
        return torch.from_numpy(np.repeat(np.arange(3), sections).astype(np.int64))
    axes = np.zeros(total, np.int64)
    for axis in (1, 2):
        axes[axis:sections[axis] * 3:3] = axis
    return torch.from_numpy(axes)
