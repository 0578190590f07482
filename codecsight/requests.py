"""What one request to each model asks for, and the rules it must meet.

A model.py reads its Triton tensors into one of these objects and calls `validate()`, which
raises `protocol.InvalidRequest` (Triton code INVALID_ARG) naming the stream and what to do;
only then does the library act on it. The rules live here, not in the adapters, so every
model applies them the same way and tests check them without a server.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from codecsight.protocol import (AU_BYTES, AU_PTS, CHUNK, FRAME_META, META, MODEL_TENSORS,
                                 PATCH_POLICIES, PATCHES, POSITIONS, REFRESH_POLICIES,
                                 STREAM_ID_PATTERN, TOKEN_PRUNING, TOKENS, InvalidRequest,
                                 check_choice)

# numpy dtype of each Triton data type a model reads as an array.
_NUMPY = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
          "TYPE_INT32": np.int32, "TYPE_INT64": np.int64}


def check_tensor(stream_id, model: str, name: str, value: np.ndarray) -> np.ndarray:
    """Check an input (batch axis removed) against protocol.MODEL_TENSORS: dtype, rank and
    fixed dims. Triton checks these already for requests it routes; this keeps the model
    safe from any other caller. Raises InvalidRequest."""
    spec = next(t for t in MODEL_TENSORS[model]["input"] if t.name == name)
    dtype = np.dtype(_NUMPY[spec.dtype])
    fixed = [d if isinstance(d, int) and d >= 0 else None for d in spec.dims]
    if value.dtype != dtype or value.ndim != len(fixed) or any(
            want is not None and got != want for got, want in zip(value.shape, fixed)):
        shape = ", ".join("N" if d is None else str(d) for d in fixed)
        raise InvalidRequest(stream_id, f"{name} must be a {dtype.name} tensor [{shape}] per "
                             f"request, got {value.dtype.name} {list(value.shape)}")
    return value


def _check_window(stream_id, window_seconds: float) -> None:
    if not (math.isfinite(window_seconds) and window_seconds > 0):
        raise InvalidRequest(stream_id, f"WINDOW_SECONDS must be positive, got {window_seconds}")


@dataclasses.dataclass(frozen=True)
class Sequence:
    """Which stream a request belongs to, and its START/END flags.

    stream_id: the Triton correlation ID (str, or int when the client sent a number);
    0 or "" is Triton's warmup, which bypasses the sequence batcher: a stateless dry run.
    """

    stream_id: str | int
    start: bool = False
    end: bool = False

    @property
    def dry_run(self) -> bool:
        return self.stream_id in (0, "")

    def validate(self) -> "Sequence":
        if not self.dry_run and not STREAM_ID_PATTERN.match(str(self.stream_id)):
            raise InvalidRequest(str(self.stream_id)[:64], "invalid stream ID: use 1-128 "
                                 "letters, digits or ._:- starting with a letter or digit")
        return self


@dataclasses.dataclass
class ParseRequest:
    """codec_parser: one chunk of a stream's compressed video.

    codec, source_fps, analysis_fps and window_seconds are read at START (and in warmup)
    and kept for the stream; later requests carry them too, but they are not used.
    """

    seq: Sequence
    chunk: np.ndarray        # uint8 [L]: Annex-B access units; empty only with END
    policy: str              # protocol.PATCH_POLICIES, or "" to keep the stream's
    codec: str               # FFmpeg decoder name, e.g. "h264"
    source_fps: float        # frames per second of the camera stream
    analysis_fps: float      # frames per second the VLM looks at
    window_seconds: float    # the stream's LLM window: bounds the whole-frame timer
    au_bytes: np.ndarray     # int64 [K]: bytes of each access unit of chunk, decode order
    au_pts: np.ndarray       # float64 [K]: presentation time of each access unit, stream s
    chunk_seq: int           # the chunk's number in the stream (START's, then +1 each)
    stream_token: str        # the owner's secret for the stream
    rotation: int            # degrees clockwise that turn frames upright (read at START)
    time_jump: float         # stream seconds the client removed just before this chunk

    def validate(self, max_chunk_bytes: int) -> "ParseRequest":
        """Raises InvalidRequest for a bad stream ID, a chunk that is not 1-D UINT8, over
        max_chunk_bytes or empty without END, access-unit sizes and times that do not
        describe the chunk, an unknown policy or a bad window."""
        sid = self.seq.validate().stream_id
        check_tensor(sid, "codec_parser", CHUNK, self.chunk)
        check_tensor(sid, "codec_parser", AU_BYTES, self.au_bytes)
        check_tensor(sid, "codec_parser", AU_PTS, self.au_pts)
        if len(self.au_pts) != len(self.au_bytes) or int(self.au_bytes.sum()) != len(
                self.chunk) or (self.au_bytes <= 0).any():
            raise InvalidRequest(sid, f"AU_BYTES ({len(self.au_bytes)} access units, "
                                 f"{int(self.au_bytes.sum())} bytes) and AU_PTS "
                                 f"({len(self.au_pts)} times) must describe the "
                                 f"{len(self.chunk)}-byte CHUNK: one positive size and one "
                                 "time per access unit, sizes summing to the chunk")
        if not np.isfinite(self.au_pts).all():
            raise InvalidRequest(sid, "AU_PTS must be finite stream seconds")
        if len(self.chunk) > max_chunk_bytes:
            raise InvalidRequest(sid, f"chunk of {len(self.chunk)} bytes is over the "
                                 f"{max_chunk_bytes}-byte cap; send smaller chunks")
        if self.policy:
            check_choice(sid, "policy", self.policy, PATCH_POLICIES)
        if len(self.chunk) == 0 and not self.seq.end:
            raise InvalidRequest(sid, "empty CHUNK: send at least one access unit (an empty "
                                 "chunk is only valid with END)")
        if self.seq.start or self.seq.dry_run:
            _check_window(sid, self.window_seconds)
        return self


@dataclasses.dataclass
class PrefillRequest:
    """llm_prefill: one stream's new visual tokens, and its question."""

    seq: Sequence
    tokens: np.ndarray       # float32 [N/4, hidden]: merged visual tokens of the new frames
    positions: np.ndarray    # int64 [N, 3]: (t, h, w) per patch
    frame_meta: np.ndarray   # int64 [F, len(protocol.FRAME_META_COLUMNS)]
    question: str            # "" keeps the stream's question
    refresh: str             # protocol.REFRESH_POLICIES, or "" to keep the stream's
    window_seconds: float    # read at START (and in warmup) and kept for the stream

    def validate(self, max_question_tokens: int,
                 question_tokens: int | Callable[[str], int]) -> "PrefillRequest":
        """Raises InvalidRequest for a bad stream ID or tensor, an unknown refresh policy or
        FRAME_META token_pruning code, a question over max_question_tokens, or a bad window.

        question_tokens: the question's length in tokens, or a function of the question
        that counts them.
        """
        sid = self.seq.validate().stream_id
        for name, value in ((TOKENS, self.tokens), (POSITIONS, self.positions),
                            (FRAME_META, self.frame_meta)):
            check_tensor(sid, "llm_prefill", name, value)
        if self.refresh:
            check_choice(sid, "refresh policy", self.refresh, REFRESH_POLICIES)
        codes = self.frame_meta[:, META["token_pruning"]]
        if ((codes < 0) | (codes >= len(TOKEN_PRUNING))).any():
            raise InvalidRequest(sid, f"FRAME_META token_pruning codes "
                                 f"{sorted(set(codes.tolist()))} must index {TOKEN_PRUNING}")
        count = question_tokens(self.question) if callable(question_tokens) else question_tokens
        if count > max_question_tokens:
            raise InvalidRequest(sid, f"question is {count} tokens, over the limit of "
                                 f"{max_question_tokens}; shorten it")
        if self.seq.start or self.seq.dry_run:
            _check_window(sid, self.window_seconds)
        return self


@dataclasses.dataclass
class EncodeRequest:
    """vit_pruned: one stream's kept patches (stateless; the stream ID only names errors)."""

    stream_id: str | int
    patches: np.ndarray      # float32 [N, patch_dim], block-major per frame
    positions: np.ndarray    # int64 [N, 3]: (t, h, w); t separates the frames' attention

    def validate(self, patch_dim: int, patches_per_group: int,
                 max_patches: int) -> "EncodeRequest":
        """Raises InvalidRequest for tensors of the wrong dtype or shape, a patch count that
        is not whole merge groups, or a frame over max_patches (one execution's limit)."""
        sid = self.stream_id
        check_tensor(sid, "vit_pruned", PATCHES, self.patches)
        check_tensor(sid, "vit_pruned", POSITIONS, self.positions)
        n = len(self.patches)
        if self.patches.shape[1] != patch_dim:
            raise InvalidRequest(sid, f"PATCHES rows must be {patch_dim} values (this model's "
                                 f"patch), got {self.patches.shape[1]}")
        if len(self.positions) != n:
            raise InvalidRequest(sid, f"POSITIONS has {len(self.positions)} rows for {n} "
                                 "patches: one (t, h, w) per patch")
        if n % patches_per_group:
            raise InvalidRequest(sid, f"{n} patches is not a whole number of "
                                 f"{patches_per_group}-patch merge groups")
        if n:
            largest = int(np.unique(self.positions[:, 0], return_counts=True)[1].max())
            if largest > max_patches:
                raise InvalidRequest(sid, f"a frame of {largest} patches is over vit_pruned's "
                                     f"max_patches={max_patches}: lower the stream's "
                                     "resolution or raise max_patches")
        return self
