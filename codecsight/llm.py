"""The language side of the VLM: each stream's sliding window of visual tokens, its M-RoPE
positions, its KV cache across windows, prefill and greedy answers, one stream or several
streams at once.

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

Several streams at once (VisualLM.answer_batch, step_streams): each stream plans its own
window (which rows to drop, rotate, recompute; KVWindow.plan), then ONE forward runs every
stream's rows to compute plus its question, packed into one sequence [1, sum n_b, hidden]:
the per-token layers (projections, MLP, norms, deepstack) see the whole pack, and attention
runs per stream (`stream_attention`, registered with transformers as STREAM_ATTENTION) over
that stream's own cache with its own causal mask, so streams never see each other and no
cache is copied into a padded batch. Greedy decoding then runs all due streams together, one
token each per step; a stream that stops leaves the pack. This is the varlen ("packed")
batching of vLLM's and FlashAttention's varlen kernels, with SDPA per stream on CPU.

Device: VisualLM(device=...) keeps the LLM, every KV cache, embeddings, hidden states,
logits, masks and the tokens of answers on that device. Host-side bookkeeping (which row
holds which frame, the position each cached key was computed at, the layout's position ids)
stays on the CPU, where the layout is computed from the frames' merge-grid cells; position
ids and write rows go to the device once per forward (`_device_ints`). Answers' token ids are
read back once, at the end of decoding; each decoding step reads one bool per stream (did it
stop) to know which streams go on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import numpy as np
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from codecsight.families import CheckpointSettings, Family, family_for
from codecsight.families.base import rope_axes_from_sections
from codecsight.families.qwen2_vl import PROMPT_PREFIX, PROMPT_SUFFIX  # noqa: F401 (API)
from codecsight.protocol import FRAME_TYPE_NAMES, META, LlmStats
from codecsight.token_pruning import StreamTokenPruner

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
REFRESH_FULL, REFRESH_SELECTIVE = "full", "selective"
ANCHOR_FRAME_TYPES = ("I",)  # frames the codec coded without reference: re-prefilled on a slide
# The attention implementation a packed forward of several streams runs under.
STREAM_ATTENTION = "codecsight_streams"


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
                 merge_size: int, device: torch.device | str | None = None) -> list[WindowFrame]:
    """Cut a request's merged tokens into WindowFrames.

    tokens [N/4, hidden]; positions [N, 3] patch (t, h, w) in block-major order, so every
    merge_size**2-th row is the first patch of a group; frame_meta [F, len(META)].
    device: where the frames' tokens are kept (the LLM's; None: the CPU). Each frame's rows
    are copied there once, here, at the edge where they arrive as numpy.
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
            tokens=_frame_tokens(tokens[start:start + n], device),
            cells=np.array(cells[start:start + n], copy=True)))
        start += n
    return frames


def _frame_tokens(rows: np.ndarray, device) -> torch.Tensor:
    """A frame's own copy of its token rows, on the device."""
    if device is None or torch.device(device).type == "cpu":
        return torch.from_numpy(np.array(rows, copy=True))
    return torch.from_numpy(np.ascontiguousarray(rows)).to(device)


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

    Set `write_rows` (int64 [Q], on the cache's device) and `write_total` (the cache's row
    count after the write) before a forward of Q tokens: token i's keys and values go to cache
    row write_rows[i] (rows past the end extend the cache). Unset, it appends.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.write_rows: torch.Tensor | None = None
        self.write_total = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.write_rows is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        n_old = layer.get_seq_length()
        n_total = max(n_old, self.write_total)
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
        """Keep only these rows (int64, ascending, on the cache's device), in this order."""
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
        [r, 3]), in every layer (Family.rotate_keys with the family's rope axes); all on the
        cache's device."""
        for layer in self.layers:
            if layer.get_seq_length():
                layer.keys[:, :, rows] = Family.rotate_keys(layer.keys[:, :, rows], delta,
                                                            inv_freq, axes)

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self)


class PackedStreams:
    """Several streams' caches behind one packed forward: the `past_key_values` it is given.

    Token segment b of the packed sequence, bounds[b] = (start, end), belongs to the stream
    whose cache is caches[b]; writes[b] is (write_rows on the device, write_total) for an
    in-place write, None to append; masks[b] its additive float mask [1, 1, n_b, rows_b] or
    None (a first prefill: causal; one decoded token: sees every row). `update` files each
    segment's new keys and values into its own cache and keeps each stream's whole keys and
    values of the layer for `stream_attention`, which runs next in the same layer.
    """

    def __init__(self, caches, bounds, writes, masks):
        self.caches, self.bounds, self.writes, self.masks = caches, bounds, writes, masks
        self.layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.layer_kv = []
        for cache, (start, end), write in zip(self.caches, self.bounds, self.writes):
            keys, values = key_states[:, :, start:end], value_states[:, :, start:end]
            if not cache.layers[layer_idx].get_seq_length():
                # An empty layer keeps what it is given: its own rows, not a view of the pack.
                keys, values = keys.clone(), values.clone()
            cache.write_rows, cache.write_total = write if write else (None, 0)
            try:
                self.layer_kv.append(cache.update(keys, values, layer_idx))
            finally:
                cache.write_rows = None
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0   # positions and masks are given; nothing asks for one length of the pack


def stream_attention(module, query, key, value, attention_mask, *, streams: PackedStreams,
                     **kwargs):
    """Attention of a packed forward, stream by stream (registered as STREAM_ATTENTION).

    query [1, heads, sum n_b, head_dim]; key/value are the pack's own (unused: each stream
    attends to its cache, streams.layer_kv). Each segment runs transformers' SDPA attention
    with its stream's mask, exactly as the stream's forward alone would. Returns
    ([1, sum n_b, heads, head_dim], None) as the attention interface does.
    """
    outputs = []
    for (start, end), (keys, values), mask in zip(streams.bounds, streams.layer_kv,
                                                  streams.masks):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], keys, values, mask,
                                        **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(STREAM_ATTENTION, stream_attention)


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
    prefill_ms: float        # window refresh plus question prefill, to the first logits (in a
    #                          batch: the whole batch's, all streams' rows in one forward)
    decode_ms: float         # greedy decoding (in a batch: all the batch's streams together)
    first_logits: torch.Tensor  # [vocab] logits that chose the first answer token (on the device)
    batch_streams: int = 1   # streams prefilled and decoded together with this one (itself too)


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


@dataclasses.dataclass
class Prefill:
    """Rows one stream's forward computes: embeds [n, hidden] (device), positions int64 [3, n]
    (host), visual (embed_layout's, or None); rows int64 [n] (host, ascending): the cache row
    of each token, or None: crop the cache to `keep` rows and append."""

    embeds: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor | None
    keep: int
    visual: tuple | None = None

    def then(self, embeds: torch.Tensor, positions: torch.Tensor, first_row: int) -> "Prefill":
        """This prefill followed by more text tokens (embeds [q, hidden], positions [3, q])
        written from cache row first_row on, in the same forward."""
        rows = None if self.rows is None else torch.cat(
            [self.rows, torch.arange(first_row, first_row + len(embeds))])
        visual = None
        if self.visual is not None:
            mask, deepstack = self.visual
            visual = (torch.cat([mask, mask.new_zeros(len(embeds))]), deepstack)
        return Prefill(torch.cat([self.embeds, embeds]), torch.cat([self.positions, positions],
                                                                   dim=1),
                       rows, self.keep, visual)


class KVWindow:
    """One stream's KV cache over its window: prefix rows, then each cached frame's rows.

    `frames` are the frames whose rows the cache holds, in row order, `frame_rows` their row
    counts, and `positions` int64 [3, rows] (host) the position every cached key was encoded
    at.
    """

    def __init__(self, vlm: "VisualLM"):
        self.cache = WindowCache(vlm.text_model.config)
        self.frames: list[WindowFrame] = []
        self.frame_rows: list[int] = []
        self.prefix_rows = 0
        self.positions = torch.zeros(3, 0, dtype=torch.int64)
        self.t0: int | None = None
        self.seconds_per_t: float | None = None   # the stream's; None: the VisualLM's

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
        stats, prefill = self.plan(vlm, frames, refresh, anchor_frames)
        if prefill is not None:
            vlm.run([(self.cache, prefill)])
        return stats

    @torch.inference_mode()
    def plan(self, vlm: "VisualLM", frames: list[WindowFrame], refresh: str,
             anchor_frames: int) -> tuple[SyncStats, Prefill | None]:
        """sync up to its forward: drop the rows of frames that left, rotate reused keys, lay
        the window out, and return the rows still to compute (None: nothing to compute).

        After plan the bookkeeping already describes the new window; the cache holds it once
        the Prefill has run (VisualLM.run). ValueError for an unknown policy or frames out of
        sampled-frame order (nothing changed then).
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
            self.cache.keep_rows(vlm.device_ints(keep))
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
                self.cache.move_rows(vlm.device_ints(moved), vlm.device_ints(delta[:, moved].T),
                                     vlm.inv_freq, vlm.rope_axes)

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
            return stats, None
        embeds, _, visual = vlm.embed_layout(self.frames, layout, compute_prefix, set(chosen))
        r0 = int(rows[0])
        if len(rows) == self.rows - r0:
            # A contiguous suffix: crop and prefill it (exact, and the fast causal path).
            return stats, Prefill(embeds, positions[:, rows], None, r0, visual)
        return stats, Prefill(embeds, positions[:, rows], rows, r0, visual)


# Settings of a model built without a checkpoint directory (VisualLM(model, ...) of a model
# not loaded by Family.load): the demo model's, as CodecSight's own checkpoints use them.
DEMO_SETTINGS = CheckpointSettings("overlapping", "transformers5")


@dataclasses.dataclass
class AnswerJob:
    """One stream's window to answer: its KV cache, the window's frames (oldest first), the
    question, the refresh policy and how many anchors a slide re-prefills."""

    kv: KVWindow
    frames: list[WindowFrame]
    question: str
    refresh: str
    anchor_frames: int = 1


class VisualLM:
    """The LLM half of a VLM checkpoint, fed with precomputed visual tokens.

    family: the checkpoint's Family; None takes the one Family.load attached to the model,
    else the model config's family with the demo model's settings (DEMO_SETTINGS).
    seconds_per_t: stream seconds per window-frame step of t (Family.seconds_per_t); only
    families whose temporal ids follow time (Qwen2.5-VL) use it.
    device: where the LLM runs (torch.device or its name); the language model and lm_head
    are moved there. None: where the model's parameters already are.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int, family: Family | None = None,
                 seconds_per_t: float = 0.5, device: torch.device | str | None = None):
        self.family = family or getattr(model, "codecsight_family", None) \
            or family_for(model.config.to_dict(), settings=DEMO_SETTINGS)
        self.seconds_per_t = seconds_per_t
        self.text_model = model.model.language_model
        self.lm_head = model.lm_head
        if device is not None:
            self.text_model.to(device)
            self.lm_head.to(device)
        self.device = self.lm_head.weight.device
        self.embed = self.text_model.get_input_embeddings()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.prefix_ids = self._ids(self.family.prompt_prefix())
        vocab = tokenizer.get_vocab()
        self.stop_ids = {vocab[t] for t in STOP_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self._stop_tensor: tuple[frozenset, torch.Tensor] | None = None
        rotary = self.text_model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().clone()
        self.rope_axes = self.family.rope_axes(self.text_model).to(self.device)
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

    def stop_tensor(self) -> torch.Tensor:
        """stop_ids as int64 on the device (made again only when stop_ids changes)."""
        key = frozenset(self.stop_ids)
        if self._stop_tensor is None or self._stop_tensor[0] != key:
            self._stop_tensor = (key, torch.tensor(sorted(key), dtype=torch.int64,
                                                   device=self.device))
        return self._stop_tensor[1]

    def device_ints(self, values: torch.Tensor) -> torch.Tensor:
        """Host int64 bookkeeping (rows, positions, deltas) on the device: the one place it
        crosses (a no-op on the CPU)."""
        return values.to(self.device, non_blocking=True)

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.embed(torch.tensor(ids, dtype=torch.int64, device=self.device))

    def question_ids(self, question: str) -> list[int]:
        return self._ids(self.family.question_text(question))

    def window_layout(self, frames: list[WindowFrame], t0: int | None = None,
                      seconds_per_t: float | None = None):
        """The family's WindowLayout of frames (t0: the frame t positions count from;
        seconds_per_t: the stream's, None: this VisualLM's default). Positions on the host."""
        if t0 is None:
            t0 = frames[0].t if frames else 0
        return self.family.layout(frames, self._ids, t0, seconds_per_t or self.seconds_per_t)

    def embed_layout(self, frames: list[WindowFrame], layout, prefix: bool = True,
                     only: set[int] | None = None):
        """Embeddings [L, hidden] (device), positions [3, L] (host) and the visual rows of
        frames' sequence.

        only: the t of the frames to include (None: all); prefix False leaves the prefix off.
        visual: None, or (bool [L] visual rows, deepstack [layers, v, hidden]), both on the
        device, for families with deepstack features when the rows hold visual tokens.
        """
        parts, pos, is_visual, deep = [self.embed.weight[:0]], [], [], []
        if prefix:
            parts.append(self._embed_ids(layout.prefix))
            pos.append(layout.prefix_positions)
            is_visual.append((False, len(layout.prefix)))
        for f, rows in zip(frames, layout.frames):
            if only is not None and f.t not in only:
                continue
            tokens, deepstack = self.family.split_tokens(f.tokens)
            for ids, visual in ((rows.before, None), (None, tokens), (rows.after, None)):
                if visual is not None:
                    parts.append(visual.to(parts[0].dtype))
                    is_visual.append((True, len(visual)))
                elif ids:
                    parts.append(self._embed_ids(ids))
                    is_visual.append((False, len(ids)))
            if deepstack is not None:
                deep.append(deepstack)
            pos.append(rows.positions)
        embeds = torch.cat(parts)
        positions = torch.cat(pos, dim=1) if pos else torch.zeros(3, 0, dtype=torch.int64)
        visual = None
        if self.family.deepstack_layers and any(v and n for v, n in is_visual):
            mask = torch.cat([torch.full((n,), v, dtype=torch.bool, device=self.device)
                              for v, n in is_visual])
            visual = (mask, torch.cat(deep, dim=1).to(embeds.dtype))
        return embeds, positions, visual

    def layout(self, frames: list[WindowFrame], question: str | None, t0: int | None = None,
               prefix: bool = True):
        """Embeddings [L, hidden] (device) and M-RoPE positions [3, L] (host) of a window's
        sequence.

        question None leaves the question off (the rows a KV cache keeps); t0 is the frame t
        that temporal positions count from (default: the first frame's); prefix False leaves
        the prefix rows off (they are reused), keeping every other position as it is.
        """
        layout = self.window_layout(frames, t0)
        embeds, positions, _ = self.embed_layout(frames, layout, prefix)
        if question is not None:
            suffix = self.question_ids(question)
            after = layout.text_start
            positions = torch.cat([positions,
                                   torch.arange(after, after + len(suffix)).expand(3, -1)], dim=1)
            embeds = torch.cat([embeds, self._embed_ids(suffix)])
        return embeds, positions

    def text_start(self, frames: list[WindowFrame]) -> int:
        """Position of the first text token after the video (the family's rule)."""
        return self.window_layout(frames).text_start

    def _causal_mask(self, cache: WindowCache, n: int, rows: torch.Tensor | None):
        """(write, mask) of n tokens run into a cache: write (rows on the device, rows after)
        for an in-place write or None to append; mask the additive float mask
        [1, 1, n, rows after] on the device, or None where there is no past (causal)."""
        if rows is None and not cache.rows:
            return None, None
        if rows is None:
            first, n_total = cache.rows, cache.rows + n
            rows_dev = torch.arange(first, n_total, device=self.device)
            write = None
        else:
            n_total = max(cache.rows, int(rows[-1]) + 1)
            rows_dev = self.device_ints(rows)
            write = (rows_dev, n_total)
        dtype = self.embed.weight.dtype
        # Our own mask whenever there is a past: an additive float mask runs SDPA's CPU kernel
        # ~25% faster than the boolean one transformers would build.
        blocked = torch.arange(n_total, device=self.device)[None, :] > rows_dev[:, None]  # [n, K]
        mask = torch.zeros(blocked.shape, dtype=dtype, device=self.device).masked_fill_(
            blocked, float("-inf"))[None, None]
        return write, mask

    def run(self, jobs: Sequence[tuple[WindowCache, Prefill]]) -> torch.Tensor:
        """Run each stream's Prefill into its cache in one forward; the last hidden state of
        each, [len(jobs), hidden].

        A Prefill with rows writes token i at cache row rows[i], attending to every row up to
        its own, as in one causal prefill; without, it crops the cache to `keep` rows and
        appends. One job runs the stock attention; several run packed (PackedStreams,
        stream_attention).
        """
        for cache, prefill in jobs:
            if prefill.rows is None:
                cache.truncate(prefill.keep)
        writes, masks, bounds, start = [], [], [], 0
        for cache, prefill in jobs:
            write, mask = self._causal_mask(cache, len(prefill.embeds), prefill.rows)
            writes.append(write)
            masks.append(mask)
            bounds.append((start, start + len(prefill.embeds)))
            start += len(prefill.embeds)
        embeds = torch.cat([p.embeds for _, p in jobs])
        positions = self.device_ints(torch.cat([p.positions for _, p in jobs], dim=1))
        visuals = [p.visual for _, p in jobs]
        visual = None
        if any(v is not None for v in visuals):
            masks_v = [v[0] if v is not None else
                       torch.zeros(len(p.embeds), dtype=torch.bool, device=self.device)
                       for v, (_, p) in zip(visuals, jobs)]
            visual = (torch.cat(masks_v), torch.cat([v[1] for v in visuals if v is not None],
                                                    dim=1))
        hidden = self._forward([c for c, _ in jobs], bounds, writes, masks, embeds,
                               positions, visual)
        return hidden[0, [end - 1 for _, end in bounds]]

    def _forward(self, caches, bounds, writes, masks, embeds, positions, visual):
        """The text model over the packed tokens embeds [n, hidden] at positions [3, n]
        (device); hidden states [1, n, hidden]."""
        if len(caches) == 1:
            (cache,), (write,), (mask,) = caches, writes, masks
            cache.write_rows, cache.write_total = write if write else (None, 0)
            try:
                return self.family.run_text(
                    self.text_model, embeds[None], positions[:, None, :],
                    None if mask is None else {kind: mask for kind in self.layer_types},
                    cache, visual)
            finally:
                cache.write_rows = None
        streams = PackedStreams(caches, bounds, writes, masks)
        with self._attention(STREAM_ATTENTION):
            return self.family.run_text(self.text_model, embeds[None], positions[:, None, :],
                                        None, streams, visual, streams=streams)

    @contextlib.contextmanager
    def _attention(self, implementation: str):
        """Run the text model's attention layers under another attention implementation."""
        config = self.text_model.config
        before = config._attn_implementation
        config._attn_implementation = implementation
        try:
            yield
        finally:
            config._attn_implementation = before

    def forward(self, cache: WindowCache, embeds: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None, visual=None) -> torch.Tensor:
        """Run embeds [n, hidden] at positions [3, n] into the cache; last hidden [hidden].

        rows None appends after the cache; rows (int64 [n], ascending) writes token i at cache
        row rows[i], attending to every row up to its own, as in one causal prefill.
        visual: embed_layout's, for families with deepstack features.
        """
        prefill = Prefill(embeds, positions, rows, cache.rows, visual)
        return self.run([(cache, prefill)])[0]

    @torch.inference_mode()
    def answer(self, kv: KVWindow, frames: list[WindowFrame], question: str, refresh: str,
               anchor_frames: int = 1) -> Answer:
        """Sync the stream's KV to the window, append the question, decode greedily, crop.

        A batch of one of answer_batch; raises what that stream's job raised.
        """
        (result,) = self.answer_batch([AnswerJob(kv, frames, question, refresh, anchor_frames)])
        if isinstance(result, BaseException):
            raise result
        return result

    @torch.inference_mode()
    def answer_batch(self, jobs: Sequence[AnswerJob]) -> list[Answer | Exception]:
        """Answer several streams' windows together: one forward prefills every stream's rows
        to compute (its window refresh) and its question, then all decode greedily together.

        Returns, per job, its Answer, or the exception its own planning raised (ValueError:
        unknown policy, frames out of order); those streams take no part in the forward. An
        error of the shared forward or decoding is raised: the caches of every job are then
        half updated and must be rebuilt (StreamSession drops them).
        """
        t_start = time.perf_counter()
        results: list[Answer | Exception | None] = [None] * len(jobs)
        planned = []   # (job index, SyncStats, Prefill, question ids, next position)
        for i, job in enumerate(jobs):
            try:
                sync, prefill = job.kv.plan(self, job.frames, job.refresh, job.anchor_frames)
            except Exception as e:  # noqa: BLE001 (this stream's fault only)
                results[i] = e
                continue
            kv = job.kv
            q_ids = self.question_ids(job.question)
            after = self.window_layout(job.frames, None, kv.seconds_per_t).text_start
            q_pos = torch.arange(after, after + len(q_ids)).expand(3, -1)
            q_embeds = self._embed_ids(q_ids)
            if prefill is None:   # nothing of the window to compute: the question appends
                prefill = Prefill(q_embeds, q_pos, None, kv.rows)
            else:
                prefill = prefill.then(q_embeds, q_pos, kv.rows)
            # Decoding continues after the largest position used, as the stock rope deltas do.
            last = int(kv.positions.max()) if kv.positions.numel() else -1
            planned.append((i, sync, prefill, q_ids, max(after + len(q_ids), last + 1)))
        if not planned:
            return results
        hidden = self.run([(jobs[i].kv.cache, prefill) for i, _, prefill, _, _ in planned])
        logits = self.lm_head(hidden)                                      # [B, vocab]
        self._synchronize()
        prefill_ms = (time.perf_counter() - t_start) * 1000.0
        caches = [jobs[i].kv.cache for i, *_ in planned]
        ids, decode_ms = self._greedy_batch(caches, logits, [p[4] for p in planned])
        for (i, sync, _, q_ids, _), first, token_ids in zip(planned, logits, ids):
            kv = jobs[i].kv
            kv.cache.truncate(kv.rows)
            results[i] = Answer(
                text=self.tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
                token_ids=token_ids, tokens_prefilled=sync.computed + len(q_ids),
                tokens_reused=sync.reused, tokens_refreshed=sync.refreshed, tokens_new=sync.new,
                anchors_refreshed=sync.anchors_refreshed,
                visual_tokens=sum(len(f.tokens) for f in jobs[i].frames), kv_bytes=kv.nbytes,
                prefill_ms=prefill_ms, decode_ms=decode_ms, first_logits=first,
                batch_streams=len(planned))
        return results

    def answer_full(self, frames: list[WindowFrame], question: str) -> Answer:
        """Prefill the whole window plus question from scratch (the dense reference); decode."""
        return self.answer(KVWindow(self), frames, question, REFRESH_FULL)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":   # stage times measure work done, not work queued
            torch.cuda.synchronize(self.device)

    def _greedy_batch(self, caches: list[WindowCache], logits: torch.Tensor,
                      next_pos: list[int]) -> tuple[list[list[int]], float]:
        """Greedy answers of several streams decoded together, one token each per step.

        logits [B, vocab]: each stream's first logits; next_pos: the position of each stream's
        first answer token. A stream stops at a stop token or after max_new_tokens and leaves
        the pack. Token ids stay on the device until the end; each step reads only which
        streams stopped. Returns (token ids per stream, decode ms of all).
        """
        t_start = time.perf_counter()
        alive = list(range(len(caches)))
        positions = torch.tensor(next_pos, dtype=torch.int64, device=self.device)
        chosen = []   # per step: (streams alive at it, their tokens [alive] on the device)
        stopped_at, stop_ids = {}, self.stop_tensor()
        for step in range(self.max_new_tokens):
            tokens = torch.argmax(logits, dim=-1)
            stop = torch.isin(tokens, stop_ids)
            stopped = stop.tolist()             # the step's one read: who goes on
            chosen.append((alive, tokens))
            for stream, is_stop in zip(alive, stopped):
                if is_stop:
                    stopped_at[stream] = step
            going = ~stop
            alive = [s for s, is_stop in zip(alive, stopped) if not is_stop]
            if step + 1 == self.max_new_tokens or not alive:
                break
            tokens, positions = tokens[going], positions[going]
            pos = (positions + step).expand(3, -1)[:, None, :]                # [3, 1, B]
            live = [caches[s] for s in alive]
            if len(live) == 1:
                hidden = self.family.run_text(self.text_model, self.embed(tokens[None]), pos,
                                              None, live[0])
            else:
                streams = PackedStreams(live, [(b, b + 1) for b in range(len(live))],
                                        [None] * len(live), [None] * len(live))
                with self._attention(STREAM_ATTENTION):
                    hidden = self.family.run_text(self.text_model, self.embed(tokens[None]),
                                                  pos, None, streams, streams=streams)
            logits = self.lm_head(hidden[0])
        flat = torch.cat([tokens for _, tokens in chosen]).tolist()   # the ids, read once
        ids: list[list[int]] = [[] for _ in caches]
        at = 0
        for step, (streams, _) in enumerate(chosen):
            for stream, token in zip(streams, flat[at:at + len(streams)]):
                if stopped_at.get(stream) != step:
                    ids[stream].append(token)
            at += len(streams)
        self._synchronize()
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
        self.token_pruner = StreamTokenPruner()   # vllm_evs: its new frames' tokens, after the ViT

    @property
    def kv_bytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the window's visual tokens plus the KV cache's storage (and vllm_evs's
        reference frame)."""
        return self.window.nbytes + self.kv_bytes + self.token_pruner.nbytes

    def step(self, vlm: VisualLM, frames: list[WindowFrame], question: str,
             refresh: str = "") -> tuple[Answer | None, LlmStats]:
        """Slide the window over new frames; answer the stream's question if it has one.

        An empty question or refresh keeps the stream's current one; a given one replaces it.
        """
        (result,) = step_streams(vlm, [(self, frames, question, refresh)])
        if isinstance(result, BaseException):
            raise result
        return result

    def advance(self, vlm: VisualLM, frames: list[WindowFrame], question: str,
                refresh: str = "") -> tuple[AnswerJob | None, LlmStats]:
        """step up to its answer: slide the window, take the question and policy; the window's
        AnswerJob if a question is due (else None), and the stats without the answer."""
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
        return AnswerJob(self.kv, current, self.question, self.refresh, self.anchor_frames), stats

    def answered(self, answer: Answer, stats: LlmStats) -> LlmStats:
        """The stats of a window once its answer is in."""
        self.windows_answered += 1
        return dataclasses.replace(
            stats, tokens_prefilled=answer.tokens_prefilled, tokens_reused=answer.tokens_reused,
            tokens_refreshed=answer.tokens_refreshed, tokens_new=answer.tokens_new,
            anchors_refreshed=answer.anchors_refreshed, visual_tokens=answer.visual_tokens,
            kv_bytes=answer.kv_bytes, kv_rows=self.kv.rows,
            prefill_ms=round(answer.prefill_ms, 3), decode_ms=round(answer.decode_ms, 3),
            answer_tokens=len(answer.token_ids))


def step_streams(vlm: VisualLM, steps: Sequence[tuple[StreamSession, list[WindowFrame], str, str]]
                 ) -> list[tuple[Answer | None, LlmStats] | Exception]:
    """StreamSession.step for several streams at once: every due stream's window is prefilled
    in one forward and its answer decoded with the others' (VisualLM.answer_batch).

    steps: (session, new frames, question, refresh) per stream, each session at most once.
    Returns per step (answer or None, stats), or the exception that stream raised: one
    stream's error never fails another. A stream whose planning fails, or a shared forward
    that fails (then every due stream is answered again alone), loses its KV cache, which is
    rebuilt from its window next time.
    """
    sessions = [s for s, *_ in steps]
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("step_streams: a stream may appear once per batch")
    results: list = [None] * len(steps)
    due = []   # (step index, job, stats)
    for i, (session, frames, question, refresh) in enumerate(steps):
        try:
            job, stats = session.advance(vlm, frames, question, refresh)
        except Exception as e:  # noqa: BLE001 (this stream's fault only)
            results[i] = e
            continue
        if job is None:
            results[i] = (None, stats)
        else:
            due.append((i, job, stats))
    if not due:
        return results
    try:
        answers = vlm.answer_batch([job for _, job, _ in due])
    except Exception as e:  # noqa: BLE001 (the shared forward: find whose it is, alone)
        answers = [e] if len(due) == 1 else [_answer_alone(vlm, sessions[i]) for i, _, _ in due]
    for (i, _, stats), answer in zip(due, answers):
        session = sessions[i]
        if isinstance(answer, BaseException):
            session.kv = None   # a half-updated cache no longer matches its frames
            results[i] = answer
        else:
            results[i] = (answer, session.answered(answer, stats))
    return results


def _answer_alone(vlm: VisualLM, session: StreamSession) -> Answer | Exception:
    """A stream's window answered on its own after a shared forward failed: its cache was half
    updated by that forward, so it is rebuilt from the window (the answer, or its error)."""
    session.kv = None
    retry, _ = session.advance(vlm, [], "", "")
    try:
        (answer,) = vlm.answer_batch([retry])
    except Exception as e:  # noqa: BLE001 (this stream's own error)
        return e
    return answer
