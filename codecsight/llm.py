"""The language side of the VLM: each stream's sliding window of visual tokens, its M-RoPE
positions, its KV cache across windows, prefill and greedy answers.

Layout of one window's sequence (Qwen2-VL chat layout, video in the user turn):

    <|im_start|>user\\n<|vision_start|> [frame tokens ...] <|vision_end|>QUESTION<|im_end|>\\n
    <|im_start|>assistant\\n  -> answer tokens

Positions follow Qwen2-VL's get_rope_index: L prefix tokens take 0..L-1 on all three axes; a
visual token of window frame t_rel at merge-grid cell (h, w) takes (L + t_rel, L + h, L + w);
text after the video continues from L + max(grid_h, grid_w), as transformers 5.23 computes it
(tests/test_llm.py holds us to the stock forward). Positions come from the frame grid, not
from the kept tokens, so a pruned token leaves a gap, never a shift. t_rel counts from the
window's first frame, so when the window slides only the temporal positions of the visual
tokens move; the question's positions do not.

KV cache (KVWindow): one row per prefix token, then one per kept visual token of each window
frame, in frame order. It lives across windows; a question is appended, answered and cropped
off again. When the window slides, one code path serves both refresh policies:

    full       re-prefill every row (the dense reference; exact by construction);
    selective  drop the rows of frames that left, rotate the temporal RoPE phase of the reused
               keys to the new window origin, re-prefill in place the oldest `anchor_frames`
               I-frame anchors still in the window, prefill the new frames' kept tokens.

The rotation is exact for every layer's keys as far as position goes, so layer-0 keys and
values equal a fresh prefill's. Above layer 0 a reused row still carries what it attended to
when it was computed (frames that have since left): that approximation is measured
(perf/bench_kv.py), not assumed away.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from transformers import DynamicCache
# RoPE's pairing (dimension i turns with i + d/2), the model's own function.
from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

from codecsight.protocol import FRAME_TYPE_NAMES, META, LlmStats

PROMPT_PREFIX = "<|im_start|>user\n<|vision_start|>"
PROMPT_SUFFIX = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
REFRESH_FULL, REFRESH_SELECTIVE = "full", "selective"
ANCHOR_FRAME_TYPES = ("I",)  # frames the codec coded without reference: re-prefilled on a slide


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
    def anchor(self) -> bool:
        """An I-frame: its tokens are re-prefilled when the window slides (selective)."""
        return self.frame_type in ANCHOR_FRAME_TYPES

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
            # Copies: a frame outlives the request whose tensors it came from, and holds
            # only its own rows (the byte cap counts what is really held).
            tokens=torch.from_numpy(np.array(tokens[start:start + n], copy=True)),
            cells=np.array(cells[start:start + n], copy=True)))
        start += n
    return frames


class SlidingWindow:
    """The frames of the last `seconds` of a stream, (newest - seconds, newest], or of its
    last `frames` sampled frames."""

    def __init__(self, seconds: float | None = None, frames: int | None = None):
        if (seconds is None) == (frames is None):
            raise ValueError("give the window length in seconds or in frames, not both")
        if not (seconds if seconds is not None else frames) > 0:
            raise ValueError(f"window length must be positive, got {seconds or frames}")
        self.seconds, self.length_frames = seconds, frames
        self.frames: list[WindowFrame] = []

    def add(self, frames: list[WindowFrame]) -> list[WindowFrame]:
        """Append new frames and return the frames that slid out."""
        self.frames.extend(frames)
        if not self.frames:
            return []
        if self.length_frames is not None:
            cut = max(0, len(self.frames) - self.length_frames)
        else:
            horizon = self.frames[-1].time_ms - self.seconds * 1000.0
            cut = sum(f.time_ms <= horizon for f in self.frames)
        dropped, self.frames = self.frames[:cut], self.frames[cut:]
        return dropped

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames)


def tensor_bytes(tensors) -> int:
    """Bytes of the storages behind tensors, each storage counted once (views share one)."""
    seen, total = set(), 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def cache_nbytes(cache) -> int:
    """Bytes the key and value tensors of a transformers Cache really hold (their storages)."""
    if cache is None:
        return 0
    return tensor_bytes(t for layer in cache.layers for t in (getattr(layer, "keys", None),
                                                              getattr(layer, "values", None)))


def rotate_temporal(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor,
                    mrope_section: list[int]) -> torch.Tensor:
    """Keys encoded at temporal position t, re-encoded at t + delta: [..., head_dim] -> same.

    Qwen2-VL's M-RoPE splits the head_dim/2 frequencies into mrope_section = (t, h, w) parts
    and duplicates them (cat(freq, freq)); only the first part turns with t. A rotation by
    a then b is a rotation by a + b, so turning those dims by delta * inv_freq moves the key
    from t to t + delta exactly (up to float rounding), whatever the rest of the position.
    """
    angle = torch.zeros_like(inv_freq, dtype=torch.float32)
    n_t = mrope_section[0]
    angle[:n_t] = delta * inv_freq[:n_t].float()
    angle = torch.cat((angle, angle))
    k = keys.float()
    return (k * angle.cos() + rotate_half(k) * angle.sin()).to(keys.dtype)


class WindowCache(DynamicCache):
    """A DynamicCache whose rows can be dropped, re-phased, or rewritten in place.

    Set `write_rows` (int64 [Q]) before a forward of Q tokens: token i's keys and values go to
    cache row write_rows[i] (rows past the end extend the cache). Unset, it appends.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.write_rows: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.write_rows is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        n_old = layer.get_seq_length()
        n_total = max(n_old, int(self.write_rows.max()) + 1)
        merged = []
        for old, new in ((layer.keys, key_states), (layer.values, value_states)):
            out = new.new_empty(new.shape[:2] + (n_total, new.shape[-1]))
            if n_old:
                out[:, :, :n_old] = old
            out.index_copy_(2, self.write_rows, new)
            merged.append(out)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.keys, layer.values = merged
        return layer.keys, layer.values

    @property
    def rows(self) -> int:
        return self.get_seq_length()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (int64, ascending), in this order."""
        for layer in self.layers:
            if layer.get_seq_length():
                layer.keys = layer.keys.index_select(2, rows)
                layer.values = layer.values.index_select(2, rows)

    def truncate(self, rows: int) -> None:
        """Crop to the first `rows` rows into fresh storage, so the cut rows' memory is freed."""
        for layer in self.layers:
            if layer.get_seq_length() > rows:
                layer.keys = layer.keys[:, :, :rows].clone()
                layer.values = layer.values[:, :, :rows].clone()

    def shift_temporal(self, start: int, stop: int, delta: int, inv_freq: torch.Tensor,
                       mrope_section: list[int]) -> None:
        """Move the keys of rows [start, stop) by delta temporal positions, in every layer."""
        for layer in self.layers:
            if layer.get_seq_length():
                layer.keys[:, :, start:stop] = rotate_temporal(
                    layer.keys[:, :, start:stop], delta, inv_freq, mrope_section)

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self)


@dataclasses.dataclass
class Answer:
    text: str
    token_ids: list[int]
    tokens_prefilled: int    # tokens run through the LLM this window: refreshed + new + question
    tokens_reused: int       # cache rows kept without recomputation
    tokens_refreshed: int    # cache rows recomputed although already cached (anchors; all in full)
    tokens_new: int          # rows not cached before (new frames' kept tokens; the prefix once)
    anchors_refreshed: int   # anchor frames re-prefilled
    visual_tokens: int
    kv_bytes: int            # bytes the stream's KV cache holds after the question is cropped
    prefill_ms: float        # window refresh plus question prefill, to the first logits
    decode_ms: float
    first_logits: torch.Tensor  # [vocab] logits that chose the first answer token


@dataclasses.dataclass
class SyncStats:
    """What one KVWindow.sync did, in cache rows."""

    new: int = 0
    refreshed: int = 0
    reused: int = 0
    dropped: int = 0
    anchors_refreshed: int = 0

    @property
    def computed(self) -> int:
        return self.new + self.refreshed


def _count(frames: list[WindowFrame]) -> int:
    return sum(len(f.tokens) for f in frames)


class KVWindow:
    """One stream's KV cache over its window: prefix rows, then each cached frame's tokens.

    `frames` are the frames whose rows the cache holds, in row order; their keys encode
    temporal positions counted from frame t0 (the window origin at the last sync).
    """

    def __init__(self, vlm: "VisualLM"):
        self.cache = WindowCache(vlm.text_model.config)
        self.frames: list[WindowFrame] = []
        self.t0: int | None = None
        self.prefix_rows = 0

    @property
    def rows(self) -> int:
        return self.prefix_rows + _count(self.frames)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def token_table(self) -> dict[str, np.ndarray]:
        """Per visual row: t, h, w (stream t, merge-grid cell), frame_index, frame_type, anchor."""
        counts = [len(f.tokens) for f in self.frames]
        cells = np.concatenate([f.cells for f in self.frames]) if self.frames \
            else np.zeros((0, 2), np.int64)
        return {
            "t": np.repeat([f.t for f in self.frames], counts).astype(np.int64),
            "h": cells[:, 0], "w": cells[:, 1],
            "frame_index": np.repeat([f.frame_index for f in self.frames], counts).astype(np.int64),
            "frame_type": np.repeat([f.frame_type for f in self.frames], counts).astype(str),
            "anchor": np.repeat([f.anchor for f in self.frames], counts).astype(bool),
        }

    @torch.inference_mode()
    def sync(self, vlm: "VisualLM", frames: list[WindowFrame], refresh: str,
             anchor_frames: int) -> SyncStats:
        """Bring the cache to exactly `frames` (the window, oldest first) under a policy.

        anchor_frames: how many of the reused I-frame anchors to re-prefill after a slide,
        oldest first (the oldest reused rows lost the most of their context).
        """
        if refresh not in (REFRESH_FULL, REFRESH_SELECTIVE):
            raise ValueError(f"unknown refresh policy {refresh!r}")
        t0 = frames[0].t
        in_window = {f.t for f in frames}
        cached = {f.t for f in self.frames}
        kept = [f for f in self.frames if f.t in in_window]
        new = [f for f in frames if f.t not in cached]
        if kept and new and new[0].t < kept[-1].t:
            raise ValueError("frames must arrive in sampled-frame order")
        stats = SyncStats(dropped=self.rows - self.prefix_rows - _count(kept))

        if stats.dropped:
            keep, start = [torch.arange(self.prefix_rows)], self.prefix_rows
            for f in self.frames:
                if f.t in in_window:
                    keep.append(torch.arange(start, start + len(f.tokens)))
                start += len(f.tokens)
            self.cache.keep_rows(torch.cat(keep))
        slid = self.t0 is not None and t0 != self.t0
        if refresh == REFRESH_SELECTIVE and slid and kept:
            self.cache.shift_temporal(self.prefix_rows, self.prefix_rows + _count(kept),
                                      self.t0 - t0, vlm.inv_freq, vlm.mrope_section)

        # What to recompute among the kept rows: all (full) or the oldest anchors (selective).
        had_prefix = self.prefix_rows > 0
        if refresh == REFRESH_FULL:
            redo, redo_prefix = kept, had_prefix
        else:
            anchors = [f for f in kept if f.anchor and len(f.tokens)]  # pruned ones may be empty
            redo = anchors[:anchor_frames] if slid else []
            redo_prefix = False
            stats.anchors_refreshed = len(redo)
        self.frames, self.t0, self.prefix_rows = kept + new, t0, len(vlm.prefix_ids)
        stats.refreshed = redo_prefix * self.prefix_rows + _count(redo)
        stats.new = (not had_prefix) * self.prefix_rows + _count(new)
        stats.reused = self.rows - stats.refreshed - stats.new

        # Rows of the new layout to compute: whole segments (prefix, frames), ascending.
        redo_t = {f.t for f in redo}
        compute_prefix = redo_prefix or not had_prefix
        rows = [torch.arange(self.prefix_rows)] if compute_prefix else []
        start = self.prefix_rows
        for f in self.frames:
            if f.t in redo_t or f.t not in cached:
                rows.append(torch.arange(start, start + len(f.tokens)))
            start += len(f.tokens)
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        if not len(rows):
            return stats
        compute = [f for f in self.frames if f.t in redo_t or f.t not in cached]
        embeds, positions = vlm.layout(compute, question=None, t0=t0, prefix=compute_prefix)
        r0 = int(rows[0])
        if len(rows) == self.rows - r0:
            # A contiguous suffix: crop and prefill it (exact, and the fast causal path).
            self.cache.truncate(r0)
            vlm.forward(self.cache, embeds, positions)
        else:
            vlm.forward(self.cache, embeds, positions, rows=rows)
        return stats


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
        rotary = self.text_model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().clone()
        self.mrope_section = list(rotary.mrope_section)
        self.layer_types = sorted(set(self.text_model.config.layer_types))
        if self.layer_types != ["full_attention"]:
            # An in-place refresh passes its own causal mask; a sliding-window layer would
            # need another one.
            raise ValueError(f"only full-attention LLM layers are supported, got "
                             f"{self.layer_types}")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def question_ids(self, question: str) -> list[int]:
        return self._ids(PROMPT_SUFFIX.format(question=question))

    def layout(self, frames: list[WindowFrame], question: str | None, t0: int | None = None,
               prefix: bool = True):
        """Embeddings [L, hidden] and M-RoPE positions [3, L] of a window's sequence.

        question None leaves the question off (the rows a KV cache keeps); t0 is the frame t
        that temporal positions count from (default: the first frame's); prefix False leaves
        the prefix rows off (they are reused), keeping every other position as it is.
        """
        start = len(self.prefix_ids)
        pos, parts = [torch.zeros(3, 0, dtype=torch.int64)], [self.embed.weight[:0]]
        if prefix:
            pos.append(torch.arange(start).expand(3, -1))
            parts.append(self.embed(torch.tensor(self.prefix_ids)))
        if t0 is None:
            t0 = frames[0].t if frames else 0
        for f in frames:
            cells = torch.from_numpy(f.cells)
            pos.append(torch.stack([torch.full((len(cells),), f.t - t0), cells[:, 0], cells[:, 1]])
                       + start)
            parts.append(f.tokens.to(parts[0].dtype))
        if question is not None:
            suffix = torch.tensor(self.question_ids(question))
            after = self.text_start(frames)
            pos.append(torch.arange(after, after + len(suffix)).expand(3, -1))
            parts.append(self.embed(suffix))
        return torch.cat(parts), torch.cat(pos, dim=1)

    def text_start(self, frames: list[WindowFrame]) -> int:
        """Position of the first text token after the video: L + max(grid_h, grid_w)."""
        return len(self.prefix_ids) + max((max(f.grid_h, f.grid_w) for f in frames), default=0)

    def forward(self, cache: WindowCache, embeds: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run embeds [n, hidden] at positions [3, n] into the cache; last hidden [hidden].

        rows None appends after the cache; rows (int64 [n], ascending) writes token i at cache
        row rows[i], attending to every row up to its own, as in one causal prefill.
        """
        mask = None
        if rows is not None or cache.rows:
            # Our own mask whenever there is a past: an additive float mask runs SDPA's CPU
            # kernel ~25% faster than the boolean one transformers would build.
            if rows is None:
                rows = torch.arange(cache.rows, cache.rows + len(embeds))
            else:
                cache.write_rows = rows
            n_total = max(cache.rows, int(rows[-1]) + 1)
            blocked = torch.arange(n_total)[None, :] > rows[:, None]             # [n, K]
            causal = torch.where(blocked, torch.tensor(float("-inf"), dtype=embeds.dtype),
                                 torch.tensor(0.0, dtype=embeds.dtype))[None, None]
            mask = {kind: causal for kind in self.layer_types}
        try:
            out = self.text_model(inputs_embeds=embeds[None], position_ids=positions[:, None, :],
                                  attention_mask=mask, past_key_values=cache, use_cache=True)
        finally:
            cache.write_rows = None
        return out.last_hidden_state[0, -1]

    @torch.inference_mode()
    def answer(self, kv: KVWindow, frames: list[WindowFrame], question: str, refresh: str,
               anchor_frames: int = 1) -> Answer:
        """Sync the stream's KV to the window, append the question, decode greedily, crop."""
        t_start = time.perf_counter()
        sync = kv.sync(self, frames, refresh, anchor_frames)
        q_ids = torch.tensor(self.question_ids(question))
        after = self.text_start(frames)
        q_pos = torch.arange(after, after + len(q_ids)).expand(3, -1)
        logits = self.lm_head(self.forward(kv.cache, self.embed(q_ids), q_pos))
        prefill_ms = (time.perf_counter() - t_start) * 1000.0
        # Decoding continues after the largest position used, as Qwen2-VL's rope deltas do.
        last_visual = len(self.prefix_ids) + frames[-1].t - frames[0].t
        ids, decode_ms = self._greedy(kv.cache, logits, max(after + len(q_ids), last_visual + 1))
        kv.cache.truncate(kv.rows)
        return Answer(
            text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), token_ids=ids,
            tokens_prefilled=sync.computed + len(q_ids), tokens_reused=sync.reused,
            tokens_refreshed=sync.refreshed, tokens_new=sync.new,
            anchors_refreshed=sync.anchors_refreshed,
            visual_tokens=sum(len(f.tokens) for f in frames), kv_bytes=kv.nbytes,
            prefill_ms=prefill_ms, decode_ms=decode_ms, first_logits=logits)

    def answer_full(self, frames: list[WindowFrame], question: str) -> Answer:
        """Prefill the whole window plus question from scratch (the dense reference); decode."""
        return self.answer(KVWindow(self), frames, question, REFRESH_FULL)

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
    """One stream's LLM state: its window, KV cache, question and settings."""

    def __init__(self, window_seconds: float | None = None, *, window_frames: int | None = None,
                 refresh: str = REFRESH_SELECTIVE, anchor_frames: int = 1):
        self.window = SlidingWindow(seconds=window_seconds, frames=window_frames)
        self.kv: KVWindow | None = None
        self.question = ""
        self.refresh = refresh
        self.anchor_frames = anchor_frames
        self.windows_answered = 0

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the window's visual tokens plus the KV cache's storage."""
        return self.window.nbytes + self.kv_bytes

    def step(self, vlm: VisualLM, frames: list[WindowFrame], question: str,
             refresh: str = "") -> tuple[Answer | None, LlmStats]:
        """Slide the window over new frames; answer the stream's question if it has one.

        An empty question or refresh keeps the stream's current one; a given one replaces it.
        """
        if question:
            self.question = question
        if refresh:
            self.refresh = refresh
        dropped = self.window.add(frames)
        current = self.window.frames
        stats = LlmStats(
            refresh=self.refresh, frames_added=len(frames), frames_dropped=len(dropped),
            window_frames=len(current),
            window_frame_range=[current[0].frame_index, current[-1].frame_index]
            if current else None,
            window_t_range=[current[0].t, current[-1].t] if current else None,
            tokens_prefilled=0, tokens_reused=0, tokens_refreshed=0, kv_bytes=self.kv_bytes)
        if not self.question or not current:
            # Nothing is due: the KV cache catches up when a question is.
            return None, stats
        if self.kv is None:
            self.kv = KVWindow(vlm)
        try:
            answer = vlm.answer(self.kv, current, self.question, self.refresh,
                                self.anchor_frames)
        except BaseException:
            # A half-updated cache no longer matches its frames: rebuild it next time.
            self.kv = None
            raise
        self.windows_answered += 1
        stats = dataclasses.replace(
            stats, tokens_prefilled=answer.tokens_prefilled, tokens_reused=answer.tokens_reused,
            tokens_refreshed=answer.tokens_refreshed, tokens_new=answer.tokens_new,
            anchors_refreshed=answer.anchors_refreshed, visual_tokens=answer.visual_tokens,
            kv_bytes=answer.kv_bytes, kv_rows=self.kv.rows,
            prefill_ms=round(answer.prefill_ms, 3), decode_ms=round(answer.decode_ms, 3),
            answer_tokens=len(answer.token_ids))
        return answer, stats
