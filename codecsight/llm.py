"""The language side of the VLM: each stream's sliding window of visual tokens, its M-RoPE
positions, prefill and greedy answers.

Layout of one window's sequence (Qwen2-VL chat layout, video in the user turn):

    <|im_start|>user\\n<|vision_start|> [frame tokens ...] <|vision_end|>QUESTION<|im_end|>\\n
    <|im_start|>assistant\\n  -> answer tokens

Positions follow Qwen2-VL's get_rope_index: L prefix tokens take 0..L-1 on all three axes; a
visual token of window frame t_rel at merge-grid cell (h, w) takes (L + t_rel, L + h, L + w);
text after the video continues from L + max(grid_h, grid_w), as transformers 5.23 computes it
(tests/test_llm.py holds us to the stock forward). Positions come from the frame grid, not
from the kept tokens, so a pruned token leaves a gap, never a shift.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from codecsight.protocol import FRAME_TYPE_NAMES, META

PROMPT_PREFIX = "<|im_start|>user\n<|vision_start|>"
PROMPT_SUFFIX = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass
class WindowFrame:
    """One sampled frame's kept visual tokens inside a stream's window."""

    t: int                  # sampled-frame index within the stream
    frame_index: int        # display-order index of the decoded frame
    time_ms: int
    frame_type: str         # "I", "P", "B"
    grid_h: int             # merge groups per column of the whole frame
    grid_w: int
    tokens: torch.Tensor    # [n, hidden] kept merged tokens
    cells: np.ndarray       # [n, 2] int64 (h, w) merge-grid cell of each kept token

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size() + self.cells.nbytes


def split_frames(tokens: np.ndarray, positions: np.ndarray, frame_meta: np.ndarray,
                 merge_size: int) -> list[WindowFrame]:
    """Cut a request's merged tokens into WindowFrames.

    tokens [N/4, hidden]; positions [N, 3] patch (t, h, w) in block-major order, so every
    merge_size**2-th row is the first patch of a group; frame_meta [F, len(META)].
    """
    per_group = merge_size ** 2
    cells = positions[::per_group, 1:] // merge_size
    if len(cells) != len(tokens):
        raise ValueError(f"{len(tokens)} visual tokens for {len(positions)} patches")
    kept = frame_meta[:, META["kept_groups"]].astype(np.int64)
    if kept.sum() != len(tokens):
        raise ValueError(f"frame metadata counts {kept.sum()} groups, got {len(tokens)} tokens")
    frames, start = [], 0
    for row, n in zip(frame_meta, kept):
        frames.append(WindowFrame(
            t=int(row[META["t"]]), frame_index=int(row[META["frame_index"]]),
            time_ms=int(row[META["time_ms"]]),
            frame_type=FRAME_TYPE_NAMES.get(int(row[META["frame_type"]]), "?"),
            grid_h=int(row[META["grid_h"]]), grid_w=int(row[META["grid_w"]]),
            tokens=torch.from_numpy(np.ascontiguousarray(tokens[start:start + n])),
            cells=np.ascontiguousarray(cells[start:start + n])))
        start += n
    return frames


class Window:
    """The frames of the last `seconds` of a stream: (newest - seconds, newest]."""

    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError(f"window length must be positive, got {seconds}")
        self.seconds = seconds
        self.frames: list[WindowFrame] = []

    def add(self, frames: list[WindowFrame]) -> list[WindowFrame]:
        """Append new frames and return the frames that slid out."""
        self.frames.extend(frames)
        if not self.frames:
            return []
        horizon = self.frames[-1].time_ms - self.seconds * 1000.0
        dropped = [f for f in self.frames if f.time_ms <= horizon]
        self.frames = [f for f in self.frames if f.time_ms > horizon]
        return dropped

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames)


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers Cache's key and value tensors."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@dataclasses.dataclass
class Answer:
    text: str
    token_ids: list[int]
    tokens_prefilled: int
    tokens_reused: int
    tokens_refreshed: int
    visual_tokens: int
    kv_bytes: int
    prefill_ms: float
    decode_ms: float
    first_logits: torch.Tensor  # [vocab] logits that chose the first answer token


class VisualLM:
    """The LLM half of a Qwen2-VL checkpoint, fed with precomputed visual tokens."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        self.text_model = model.model.language_model
        self.lm_head = model.lm_head
        self.embed = self.text_model.get_input_embeddings()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.prefix_ids = self._ids(PROMPT_PREFIX)
        vocab = tokenizer.get_vocab()
        self.stop_ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def question_ids(self, question: str) -> list[int]:
        return self._ids(PROMPT_SUFFIX.format(question=question))

    def layout(self, frames: list[WindowFrame], question: str):
        """Embeddings [L, hidden] and M-RoPE positions [3, L] of a whole window's sequence."""
        prefix = torch.tensor(self.prefix_ids)
        suffix = torch.tensor(self.question_ids(question))
        start = len(prefix)
        pos = [torch.arange(start).expand(3, -1)]
        parts = [self.embed(prefix)]
        span = 0
        t0 = frames[0].t if frames else 0
        for f in frames:
            t_rel = f.t - t0
            cells = torch.from_numpy(f.cells)
            pos.append(torch.stack([torch.full((len(cells),), t_rel), cells[:, 0], cells[:, 1]])
                       + start)
            parts.append(f.tokens.to(parts[0].dtype))
            span = max(span, f.grid_h, f.grid_w)
        after = start + span
        pos.append(torch.arange(after, after + len(suffix)).expand(3, -1))
        parts.append(self.embed(suffix))
        return torch.cat(parts), torch.cat(pos, dim=1)

    @torch.inference_mode()
    def answer_full(self, frames: list[WindowFrame], question: str) -> Answer:
        """Prefill the whole window plus question (the dense reference) and decode greedily."""
        from transformers import DynamicCache

        embeds, positions = self.layout(frames, question)
        cache = DynamicCache(config=self.text_model.config)
        t_start = time.perf_counter()
        out = self.text_model(inputs_embeds=embeds[None], position_ids=positions[:, None, :],
                              past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state[0, -1])
        prefill_ms = (time.perf_counter() - t_start) * 1000.0
        kv_bytes = cache_nbytes(cache)
        ids, decode_ms = self._greedy(cache, logits, int(positions.max()) + 1)
        return Answer(
            text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=ids,
            tokens_prefilled=len(embeds), tokens_reused=0, tokens_refreshed=0,
            visual_tokens=sum(len(f.tokens) for f in frames), kv_bytes=kv_bytes,
            prefill_ms=prefill_ms, decode_ms=decode_ms, first_logits=logits)

    def _greedy(self, cache, logits: torch.Tensor, next_pos: int) -> tuple[list[int], float]:
        t_start = time.perf_counter()
        ids: list[int] = []
        for step in range(self.max_new_tokens):
            token = int(torch.argmax(logits))
            if token in self.stop_ids:
                break
            ids.append(token)
            if step + 1 == self.max_new_tokens:
                break
            pos = torch.full((3, 1, 1), next_pos + step)
            out = self.text_model(inputs_embeds=self.embed(torch.tensor([[token]])),
                                  position_ids=pos, past_key_values=cache, use_cache=True)
            logits = self.lm_head(out.last_hidden_state[0, -1])
        return ids, (time.perf_counter() - t_start) * 1000.0


class StreamSession:
    """One stream's LLM state: its window, question and settings."""

    def __init__(self, window_seconds: float):
        self.window = Window(window_seconds)
        self.question = ""
        self.windows_answered = 0

    @property
    def nbytes(self) -> int:
        return self.window.nbytes

    def step(self, vlm: VisualLM, frames: list[WindowFrame], question: str,
             refresh: str) -> tuple[Answer | None, dict]:
        """Slide the window over new frames; answer the stream's question if it has one."""
        if question:
            self.question = question
        dropped = self.window.add(frames)
        current = self.window.frames
        stats = {
            "refresh": refresh, "frames_added": len(frames), "frames_dropped": len(dropped),
            "window_frames": len(current),
            "window_frame_range": [current[0].frame_index, current[-1].frame_index]
            if current else None,
            "window_t_range": [current[0].t, current[-1].t] if current else None,
        }
        if not self.question or not current:
            return None, dict(stats, tokens_prefilled=0, tokens_reused=0, tokens_refreshed=0,
                              kv_bytes=0)
        answer = vlm.answer_full(current, self.question)
        self.windows_answered += 1
        stats.update(
            tokens_prefilled=answer.tokens_prefilled, tokens_reused=answer.tokens_reused,
            tokens_refreshed=answer.tokens_refreshed, visual_tokens=answer.visual_tokens,
            kv_bytes=answer.kv_bytes, prefill_ms=round(answer.prefill_ms, 3),
            decode_ms=round(answer.decode_ms, 3), answer_tokens=len(answer.token_ids))
        return answer, stats
