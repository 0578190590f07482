"""The language side of the VLM: each stream's sliding window of visual tokens, its M-RoPE
positions, its KV cache across windows, prefill and greedy answers.

What differs per model family (prompt, positions, deepstack) comes from the checkpoint's
`codecsight.families.Family`; the rest is shared. Qwen2-VL's layout, for example (video in
the user turn):

    <|im_start|>user\\n<|vision_start|> [frame tokens ...] <|vision_end|>QUESTION<|im_end|>\\n
    <|im_start|>assistant\\n  -> answer tokens

Positions follow Qwen2-VL's get_rope_index: L prefix tokens take 0..L-1 on all three axes; a
visual token of window frame t_rel at merge-grid cell (h, w) takes (L + t_rel, L + h, L + w);
text after the video continues from L + max(grid_h, grid_w), as transformers 5.23 computes it
(tests/test_llm.py holds us to the stock forward). Positions come from the frame grid, not
from the kept tokens, so a pruned token leaves a gap, never a shift. t_rel counts from the
window's first frame, so when the window slides only the temporal positions of the visual
tokens move; the question's positions do not.

KV cache (KVWindow): one row per prefix token, then each window frame's rows (its text before,
its kept visual tokens, its text after: Qwen2-VL has no per-frame text), in frame order. It lives across windows; a question is appended, answered and cropped
off again. When the window slides, one code path serves both refresh policies:

    full       re-prefill every row (the dense reference; exact by construction);
    selective  drop the rows of frames that left, rotate the RoPE phase of every reused key
               from the position it was computed at to its position in the new window (the
               family's layout says where each row now sits; Qwen2/2.5-VL: the temporal axis
               moves, Qwen3-VL: all three), re-prefill in place the oldest `anchor_frames`
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

from codecsight.families import CheckpointSettings, Family, family_for
from codecsight.families.base import rope_axes_from_sections
from codecsight.families.qwen2_vl import PROMPT_PREFIX, PROMPT_SUFFIX  # noqa: F401 (API)
from codecsight.protocol import FRAME_TYPE_NAMES, META, LlmStats

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
    # Family.rotate_keys with one position change (delta, 0, 0) for every row.
    return Family.rotate_keys(keys, torch.tensor([[delta, 0, 0]]), inv_freq,
                              rope_axes_from_sections(mrope_section))


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

    def move_rows(self, rows: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor,
                  axes: torch.Tensor) -> None:
        """Re-encode the keys of cache rows (int64 [r]) at their position + delta (int64
        [r, 3]), in every layer (Family.rotate_keys with the family's rope axes)."""
        for layer in self.layers:
            if layer.get_seq_length():
                layer.keys[:, :, rows] = Family.rotate_keys(layer.keys[:, :, rows], delta,
                                                            inv_freq, axes)

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


class KVWindow:
    """One stream's KV cache over its window: prefix rows, then each cached frame's rows.

    `frames` are the frames whose rows the cache holds, in row order, `frame_rows` their row
    counts, and `positions` int64 [3, rows] the position every cached key was encoded at.
    """

    def __init__(self, vlm: "VisualLM"):
        self.cache = WindowCache(vlm.text_model.config)
        self.frames: list[WindowFrame] = []
        self.frame_rows: list[int] = []
        self.positions = torch.zeros(3, 0, dtype=torch.int64)
        self.t0: int | None = None
        self.prefix_rows = 0
        # Stream seconds per step of t (the stream's sampling rate; None: the VisualLM's).
        self.seconds_per_t: float | None = None

    @property
    def rows(self) -> int:
        return self.prefix_rows + sum(self.frame_rows)

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
        kept_rows = [n for f, n in zip(self.frames, self.frame_rows) if f.t in in_window]
        stats = SyncStats(dropped=self.rows - self.prefix_rows - sum(kept_rows))

        if stats.dropped:
            keep, start = [torch.arange(self.prefix_rows)], self.prefix_rows
            for f, n in zip(self.frames, self.frame_rows):
                if f.t in in_window:
                    keep.append(torch.arange(start, start + n))
                start += n
            keep = torch.cat(keep)
            self.cache.keep_rows(keep)
            self.positions = self.positions[:, keep]
        # Where every row of the new window sits: kept rows come first, in their order.
        layout = vlm.window_layout(frames, t0, self.seconds_per_t)
        positions = torch.cat([layout.prefix_positions, *(r.positions for r in layout.frames)],
                              dim=1)
        slid = self.t0 is not None and t0 != self.t0
        n_kept = self.prefix_rows + sum(kept_rows)
        if refresh == REFRESH_SELECTIVE and slid and kept:
            delta = positions[:, :n_kept] - self.positions[:, :n_kept]
            moved = torch.nonzero(delta.any(0)).flatten()
            if len(moved):
                self.cache.move_rows(moved, delta[:, moved].T, vlm.inv_freq, vlm.rope_axes)

        # What to recompute among the kept rows: all (full) or the oldest anchors (selective).
        had_prefix = self.prefix_rows > 0
        if refresh == REFRESH_FULL:
            redo, redo_prefix = kept, had_prefix
        else:
            anchors = [f for f in kept if f.anchor and len(f.tokens)]  # pruned ones may be empty
            redo = anchors[:anchor_frames] if slid else []
            redo_prefix = False
            stats.anchors_refreshed = len(redo)
        self.frames, self.t0, self.prefix_rows = kept + new, t0, len(layout.prefix)
        self.frame_rows = [r.rows for r in layout.frames]
        self.positions = positions
        rows_of = dict(zip((f.t for f in self.frames), self.frame_rows))
        stats.refreshed = redo_prefix * self.prefix_rows + sum(rows_of[f.t] for f in redo)
        stats.new = (not had_prefix) * self.prefix_rows + sum(rows_of[f.t] for f in new)
        stats.reused = self.rows - stats.refreshed - stats.new

        # Rows of the new layout to compute: whole segments (prefix, frames), ascending.
        redo_t = {f.t for f in redo}
        compute_prefix = redo_prefix or not had_prefix
        rows = [torch.arange(self.prefix_rows)] if compute_prefix else []
        chosen = []
        start = self.prefix_rows
        for f, n in zip(self.frames, self.frame_rows):
            if f.t in redo_t or f.t not in cached:
                rows.append(torch.arange(start, start + n))
                chosen.append(f.t)
            start += n
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        if not len(rows):
            return stats
        embeds, _, visual = vlm.embed_layout(self.frames, layout, compute_prefix, set(chosen))
        r0 = int(rows[0])
        if len(rows) == self.rows - r0:
            # A contiguous suffix: crop and prefill it (exact, and the fast causal path).
            self.cache.truncate(r0)
            vlm.forward(self.cache, embeds, positions[:, rows], visual=visual)
        else:
            vlm.forward(self.cache, embeds, positions[:, rows], rows=rows, visual=visual)
        return stats


# Settings of a model built without a checkpoint directory (VisualLM(model, ...) of a model
# not loaded by Family.load): the demo model's, as CodecSight's own checkpoints use them.
DEMO_SETTINGS = CheckpointSettings("overlapping", "transformers5")


class VisualLM:
    """The LLM half of a VLM checkpoint, fed with precomputed visual tokens.

    family: the checkpoint's Family; None takes the one Family.load attached to the model,
    else the model config's family with the demo model's settings (DEMO_SETTINGS).
    seconds_per_t: stream seconds per window-frame step of t (Family.seconds_per_t); only
    families whose temporal ids follow time (Qwen2.5-VL) use it.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, family: Family | None = None,
                 seconds_per_t: float = 0.5):
        self.family = family or getattr(model, "codecsight_family", None) \
            or family_for(model.config.to_dict(), settings=DEMO_SETTINGS)
        self.seconds_per_t = seconds_per_t
        self.text_model = model.model.language_model
        self.lm_head = model.lm_head
        self.embed = self.text_model.get_input_embeddings()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.prefix_ids = self._ids(self.family.prompt_prefix())
        vocab = tokenizer.get_vocab()
        self.stop_ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        rotary = self.text_model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().clone()
        self.rope_axes = self.family.rope_axes(self.text_model)
        # Configs without layer_types (Qwen3-VL's) are all full attention.
        self.layer_types = sorted(set(getattr(self.text_model.config, "layer_types", None)
                                      or ["full_attention"]))
        if self.layer_types != ["full_attention"]:
            # An in-place refresh passes its own causal mask; a sliding-window layer would
            # need another one.
            raise ValueError(f"only full-attention LLM layers are supported, got "
                             f"{self.layer_types}")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def question_ids(self, question: str) -> list[int]:
        return self._ids(self.family.question_text(question))

    def window_layout(self, frames: list[WindowFrame], t0: int | None = None,
                      seconds_per_t: float | None = None):
        """The family's WindowLayout of frames (t0: the frame t positions count from;
        seconds_per_t: the stream's, None: this VisualLM's default)."""
        if t0 is None:
            t0 = frames[0].t if frames else 0
        return self.family.layout(frames, self._ids, t0, seconds_per_t or self.seconds_per_t)

    def embed_layout(self, frames: list[WindowFrame], layout, prefix: bool = True,
                     only: set[int] | None = None):
        """Embeddings [L, hidden], positions [3, L] and the visual rows of frames' sequence.

        only: the t of the frames to include (None: all); prefix False leaves the prefix off.
        visual: None, or (bool [L] visual rows, deepstack [layers, v, hidden]) for families
        with deepstack features.
        """
        parts, pos, is_visual, deep = [self.embed.weight[:0]], [], [], []
        if prefix:
            parts.append(self.embed(torch.tensor(layout.prefix, dtype=torch.int64)))
            pos.append(layout.prefix_positions)
            is_visual.append(torch.zeros(len(layout.prefix), dtype=torch.bool))
        for f, rows in zip(frames, layout.frames):
            if only is not None and f.t not in only:
                continue
            tokens, deepstack = self.family.split_tokens(f.tokens)
            for ids, visual in ((rows.before, None), (None, tokens), (rows.after, None)):
                if visual is not None:
                    parts.append(visual.to(parts[0].dtype))
                    is_visual.append(torch.ones(len(visual), dtype=torch.bool))
                elif ids:
                    parts.append(self.embed(torch.tensor(ids, dtype=torch.int64)))
                    is_visual.append(torch.zeros(len(ids), dtype=torch.bool))
            if deepstack is not None:
                deep.append(deepstack)
            pos.append(rows.positions)
        embeds = torch.cat(parts)
        positions = torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.int64)
        visual = None
        if self.family.deepstack_layers:
            mask = torch.cat(is_visual) if is_visual else torch.zeros(0, dtype=torch.bool)
            deepstack = torch.cat(deep, dim=1) if deep else \
                torch.zeros(self.family.deepstack_layers, 0, embeds.shape[-1])
            visual = (mask, deepstack.to(embeds.dtype))
        return embeds, positions, visual

    def layout(self, frames: list[WindowFrame], question: str | None, t0: int | None = None,
               prefix: bool = True):
        """Embeddings [L, hidden] and M-RoPE positions [3, L] of a window's sequence.

        question None leaves the question off (the rows a KV cache keeps); t0 is the frame t
        that temporal positions count from (default: the first frame's); prefix False leaves
        the prefix rows off (they are reused), keeping every other position as it is.
        """
        layout = self.window_layout(frames, t0)
        embeds, positions, _ = self.embed_layout(frames, layout, prefix)
        if question is not None:
            suffix = torch.tensor(self.question_ids(question), dtype=torch.int64)
            after = layout.text_start
            positions = torch.cat([positions,
                                   torch.arange(after, after + len(suffix)).expand(3, -1)], dim=1)
            embeds = torch.cat([embeds, self.embed(suffix)])
        return embeds, positions

    def text_start(self, frames: list[WindowFrame]) -> int:
        """Position of the first text token after the video (the family's rule)."""
        return self.window_layout(frames).text_start

    def forward(self, cache: WindowCache, embeds: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None, visual=None) -> torch.Tensor:
        """Run embeds [n, hidden] at positions [3, n] into the cache; last hidden [hidden].

        rows None appends after the cache; rows (int64 [n], ascending) writes token i at cache
        row rows[i], attending to every row up to its own, as in one causal prefill.
        visual: embed_layout's, for families with deepstack features.
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
            hidden = self.family.run_text(self.text_model, embeds[None], positions[:, None, :],
                                          mask, cache, visual)
        finally:
            cache.write_rows = None
        return hidden[0, -1]

    @torch.inference_mode()
    def answer(self, kv: KVWindow, frames: list[WindowFrame], question: str, refresh: str,
               anchor_frames: int = 1) -> Answer:
        """Sync the stream's KV to the window, append the question, decode greedily, crop."""
        t_start = time.perf_counter()
        sync = kv.sync(self, frames, refresh, anchor_frames)
        q_ids = torch.tensor(self.question_ids(question), dtype=torch.int64)
        after = self.window_layout(frames, None, kv.seconds_per_t).text_start
        q_pos = torch.arange(after, after + len(q_ids)).expand(3, -1)
        logits = self.lm_head(self.forward(kv.cache, self.embed(q_ids), q_pos))
        prefill_ms = (time.perf_counter() - t_start) * 1000.0
        # Decoding continues after the largest position used, as the stock rope deltas do.
        last = int(kv.positions.max()) if kv.positions.numel() else -1
        ids, decode_ms = self._greedy(kv.cache, logits, max(after + len(q_ids), last + 1))
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
            hidden = self.family.run_text(self.text_model, self.embed(torch.tensor([[token]])),
                                          pos, None, cache)
            logits = self.lm_head(hidden[0, -1])
        return ids, (time.perf_counter() - t_start) * 1000.0


class StreamSession:
    """One stream's LLM state: its window, KV cache, question and settings."""

    def __init__(self, window_seconds: float | None = None, *, window_frames: int | None = None,
                 refresh: str = REFRESH_SELECTIVE, anchor_frames: int = 1,
                 seconds_per_t: float | None = None):
        """seconds_per_t: stream seconds per window-frame step of t (Family.seconds_per_t of
        the stream's analysis rate); None: the VisualLM's default."""
        self.window = SlidingWindow(seconds=window_seconds, frames=window_frames)
        self.seconds_per_t = seconds_per_t
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
            self.kv.seconds_per_t = self.seconds_per_t
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
