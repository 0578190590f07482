"""The wire contract between the client, the ensemble and its composing models.

One place names every tensor, policy and metadata column, so the client, the three
model.py files, perf inputs and tests cannot drift apart.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re

import numpy as np

# Ensemble inputs (all sent with every request; the client fills defaults).
CHUNK = "CHUNK"                    # UINT8 [1, L]: Annex-B access units of one stream
CODEC = "CODEC"                    # BYTES [1, 1]: "h264" (others fall back, see codec_parser)
SOURCE_FPS = "SOURCE_FPS"          # FP32 [1, 1]: frame rate of the camera stream
ANALYSIS_FPS = "ANALYSIS_FPS"      # FP32 [1, 1]: frames per second the VLM looks at
POLICY = "POLICY"                  # BYTES [1, 1]: patch policy, see PATCH_POLICIES
REFRESH = "REFRESH"                # BYTES [1, 1]: KV refresh policy; "" keeps the current one
WINDOW_SECONDS = "WINDOW_SECONDS"  # FP32 [1, 1]: length of the sliding window
QUESTION = "QUESTION"              # BYTES [1, 1]: question; empty keeps the stream's last one
AU_BYTES = "AU_BYTES"              # INT64 [1, K]: bytes of each access unit of CHUNK, in order
AU_PTS = "AU_PTS"                  # FP64 [1, K]: presentation time of each access unit, stream s
CHUNK_SEQ = "CHUNK_SEQ"            # INT64 [1, 1]: the chunk's number: START's, then +1 each
STREAM_TOKEN = "STREAM_TOKEN"      # BYTES [1, 1]: the owner's secret, bound at START
ROTATION = "ROTATION"              # INT32 [1, 1]: degrees clockwise that turn frames upright
TIME_JUMP = "TIME_JUMP"            # FP64 [1, 1]: stream seconds the client removed before CHUNK

# Between composing models.
PATCHES = "PATCHES"                # FP32 [1, N, patch_dim]: kept patches, block-major
POSITIONS = "POSITIONS"            # INT64 [1, N, 3]: (t, h, w) per patch, t = sampled frame
FRAME_META = "FRAME_META"          # INT64 [1, F, len(FRAME_META_COLUMNS)]
TOKENS = "TOKENS"                  # FP32 [1, N/4, hidden]: merged visual tokens

# Ensemble outputs.
ANSWER = "ANSWER"                  # BYTES [1, 1]: the window's answer ("" if no question)
PARSE_STATS = "PARSE_STATS"        # BYTES [1, 1]: JSON from codec_parser
LLM_STATS = "LLM_STATS"            # BYTES [1, 1]: JSON from llm_prefill


# One row per sampled frame emitted by codec_parser.
FRAME_META_COLUMNS = (
    "t",            # sampled-frame index within the stream (the M-RoPE temporal position)
    "frame_index",  # display-order index of the decoded frame
    "time_ms",      # presentation time, frame_index / source_fps
    "frame_type",   # FRAME_TYPES code
    "grid_h",       # merge groups per column of the whole frame
    "grid_w",       # merge groups per row of the whole frame
    "kept_groups",  # merge groups of this frame present in PATCHES
    "token_pruning",  # TOKEN_PRUNING code: what llm_prefill does with its tokens after the ViT
)
META = {name: i for i, name in enumerate(FRAME_META_COLUMNS)}
FRAME_TYPES = {"?": 0, "I": 1, "P": 2, "B": 3}
FRAME_TYPE_NAMES = {v: k for k, v in FRAME_TYPES.items()}

# dense, evs and codec choose the patches the ViT sees; vllm_evs sends every patch to the ViT
# and llm_prefill drops tokens after it, as vLLM's video_pruning_rate does (token_pruning.py).
PATCH_POLICIES = ("dense", "evs", "codec", "vllm_evs")
# FRAME_META token_pruning, by code (the index): "none" keeps every token codec_parser sent;
# "vllm_evs" prunes the frame's tokens against the previous frame's (token_pruning.py);
# "vllm_evs_whole" keeps them all (a whole frame: stream start, whole-frame timer) and makes
# the frame the next one's reference.
TOKEN_PRUNING = ("none", "vllm_evs", "vllm_evs_whole")
REFRESH_POLICIES = ("full", "selective")

# Every tensor each model of the repository takes and gives, as its config.pbtxt declares it
# (tests/test_protocol.py holds every config to this). dims are per request, without Triton's
# batch axis; -1 is variable; a name stands for a width set by the checkpoint, which a config
# writes as -1 (the Python-backend configs) or as that checkpoint's number (the TensorRT one).
PATCH_DIM, VISION_HIDDEN = "patch_dim", "vision_hidden"   # checkpoint.Geometry's names


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str      # Triton data type as config.pbtxt spells it: "TYPE_FP32", "TYPE_STRING", ...
    dims: tuple     # ints (-1 variable) or PATCH_DIM / VISION_HIDDEN


def _specs(*rows) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, dtype, tuple(dims)) for name, dtype, dims in rows)



_FRAME_META_DIMS = (-1, len(FRAME_META_COLUMNS))
# What a camera stream's requests carry besides the video: timing, order, ownership, rotation.
_STREAM_INPUTS = ((AU_BYTES, "TYPE_INT64", [-1]), (AU_PTS, "TYPE_FP64", [-1]),
                  (CHUNK_SEQ, "TYPE_INT64", [1]), (STREAM_TOKEN, "TYPE_STRING", [1]),
                  (ROTATION, "TYPE_INT32", [1]), (TIME_JUMP, "TYPE_FP64", [1]))
MODEL_TENSORS: dict[str, dict[str, tuple[TensorSpec, ...]]] = {
    "codec_parser": {
        "input": _specs((CHUNK, "TYPE_UINT8", [-1]), (CODEC, "TYPE_STRING", [1]),
                        (SOURCE_FPS, "TYPE_FP32", [1]), (ANALYSIS_FPS, "TYPE_FP32", [1]),
                        (POLICY, "TYPE_STRING", [1]), (WINDOW_SECONDS, "TYPE_FP32", [1]),
                        *_STREAM_INPUTS),
        "output": _specs((PATCHES, "TYPE_FP32", [-1, PATCH_DIM]),
                         (POSITIONS, "TYPE_INT64", [-1, 3]),
                         (FRAME_META, "TYPE_INT64", _FRAME_META_DIMS),
                         (PARSE_STATS, "TYPE_STRING", [1])),
    },
    "vit_pruned": {
        "input": _specs((PATCHES, "TYPE_FP32", [-1, PATCH_DIM]),
                        (POSITIONS, "TYPE_INT64", [-1, 3])),
        "output": _specs((TOKENS, "TYPE_FP32", [-1, VISION_HIDDEN])),
    },
    "llm_prefill": {
        "input": _specs((TOKENS, "TYPE_FP32", [-1, VISION_HIDDEN]),
                        (POSITIONS, "TYPE_INT64", [-1, 3]),
                        (FRAME_META, "TYPE_INT64", _FRAME_META_DIMS),
                        (QUESTION, "TYPE_STRING", [1]), (REFRESH, "TYPE_STRING", [1]),
                        (WINDOW_SECONDS, "TYPE_FP32", [1]),
                        # the sampling rate: Qwen2.5-VL's temporal ids follow stream time
                        (ANALYSIS_FPS, "TYPE_FP32", [1])),
        "output": _specs((ANSWER, "TYPE_STRING", [1]), (LLM_STATS, "TYPE_STRING", [1])),
    },
    "ensemble": {
        "input": _specs((CHUNK, "TYPE_UINT8", [-1]), (CODEC, "TYPE_STRING", [1]),
                        (SOURCE_FPS, "TYPE_FP32", [1]), (ANALYSIS_FPS, "TYPE_FP32", [1]),
                        (POLICY, "TYPE_STRING", [1]), (REFRESH, "TYPE_STRING", [1]),
                        (WINDOW_SECONDS, "TYPE_FP32", [1]), (QUESTION, "TYPE_STRING", [1]),
                        *_STREAM_INPUTS),
        "output": _specs((ANSWER, "TYPE_STRING", [1]), (PARSE_STATS, "TYPE_STRING", [1]),
                         (LLM_STATS, "TYPE_STRING", [1])),
    },
}

ENSEMBLE_INPUTS = tuple(t.name for t in MODEL_TENSORS["ensemble"]["input"])
ENSEMBLE_OUTPUTS = tuple(t.name for t in MODEL_TENSORS["ensemble"]["output"])

STREAM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class StreamError(ValueError):
    """A request problem to report to the client; the message names the stream.

    `code` names the Triton error code the model answers with (`pb_utils.TritonError.<code>`,
    which reaches a gRPC client as `InferenceServerException.status()`, e.g.
    "StatusCode.NOT_FOUND"), so a program can act on the kind of error without reading text.
    """

    code = "INVALID_ARG"

    def __init__(self, stream_id, problem: str):
        super().__init__(f"stream {stream_id!r}: {problem}")
        self.stream_id = stream_id


class InvalidRequest(StreamError):
    """Bad input: a tensor, a policy name, a size or a setting the request got wrong."""

    code = "INVALID_ARG"


class StreamNotFound(StreamError):
    """The stream has no state here (never started, ended, or evicted): restart it with START."""

    code = "NOT_FOUND"


class StreamAlreadyActive(StreamError):
    """A START for a stream that is still active (another client with the same ID?)."""

    code = "ALREADY_EXISTS"


class StreamNotOwned(StreamError):
    """A request whose STREAM_TOKEN is not the one its stream was started with.

    INVALID_ARG: this Triton build has no PERMISSION_DENIED, and NOT_FOUND would make a
    client restart (and so fight over) a stream that is not its own.
    """

    code = "INVALID_ARG"


class StreamsFull(StreamError):
    """A START beyond the instance's stream cap (codec_parser's max_streams).

    UNAVAILABLE: this Triton build has no RESOURCE_EXHAUSTED; the START may succeed later,
    here or on another server.
    """

    code = "UNAVAILABLE"


def check_choice(stream_id, what: str, value: str, allowed: tuple[str, ...]) -> str:
    """Return value if allowed, else raise InvalidRequest listing the allowed values."""
    if value not in allowed:
        raise InvalidRequest(stream_id,
                             f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def bytes_scalar(value: str) -> np.ndarray:
    """A [1, 1] BYTES tensor holding one UTF-8 string."""
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def read_string(array: np.ndarray) -> str:
    """The single string of a BYTES tensor of any shape with one element."""
    item = np.asarray(array).reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, (bytes, bytearray)) else str(item)


# ---------------------------------------------------------------------------------------------
# The statistics outputs: PARSE_STATS and LLM_STATS, one JSON object each per request.
# Models build these dataclasses; the client, metrics, bench, eval and perf scripts read them
# back with from_json. An unknown or missing key is a TypeError: the schema has one source.


class _WireStats:
    """to_json / from_json for the statistics dataclasses below, and `empty`."""

    _EMPTY: dict = {}   # the required fields' values when nothing happened

    @classmethod
    def empty(cls, **given):
        """The statistics of a request that did nothing (no frame, no token), given fields
        set: for a dropped duplicate chunk, and for tests."""
        return cls(**{**copy.deepcopy(cls._EMPTY), **given})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes):
        """Parse one statistics object; raises TypeError naming an unknown or missing key."""
        return cls(**json.loads(text))


@dataclasses.dataclass
class ParseStats(_WireStats):
    """PARSE_STATS: what codec_parser did with one request's chunk."""

    policy: str                      # patch policy applied (PATCH_POLICIES)
    policy_requested: str            # the one asked for; differs after a fallback
    codec: str                       # the stream's codec ("h264", "hevc", ...)
    chunk_bytes: int                 # compressed bytes received
    frames_decoded: int
    frames_sampled: int              # frames sampled at the analysis fps
    frame_types: str                 # "IPPB..." per decoded frame, display order
    patches_kept: int                # ViT patches sent on (4 per kept merge group)
    patches_total: int               # patches of every sampled frame (what dense sends)
    groups_kept: int                 # merge groups kept
    groups_total: int
    kept_share: float | None         # groups_kept / groups_total; None without sampled frames
    groups_kept_per_frame: list      # int per sampled frame
    groups_flagged_by_codec: int | None  # candidates before the pixel check (codec only)
    whole_frames: dict               # reason (policy.WHOLE_FRAME_REASONS) -> frames kept whole
    intra_share: float | None        # mean share of intra macroblocks (codec signals only)
    moving_share: float | None       # mean share of moving macroblocks (codec signals only)
    decode_errors: int               # damaged packets or frames in this chunk
    decode_ms: float                 # wall time per step of codec_parser, milliseconds
    signals_ms: float
    select_ms: float
    convert_ms: float
    patchify_ms: float
    parser_ms: float                 # all of the above
    policy_fallback: str | None = None  # why policy differs from policy_requested
    decode_error: str | None = None  # the last decoder error, when decode_errors > 0
    note: str | None = None          # why a chunk with video decoded (or kept) no frame
    whole_frame_seconds: float | None = None  # the stream's effective whole-frame timer
    served_size: list | None = None  # [width, height] px the last sampled frame was served
    #                                  at: upright, scaled to max_pixels (before padding)
    rotation: int = 0                # degrees clockwise the frames were turned upright
    stream: str | int | None = None  # set by the model: the stream (sequence) ID
    active_streams: int | None = None  # set by the model: streams this instance holds
    chunk_seq: int | None = None     # set by the model: the request's CHUNK_SEQ
    duplicate_chunk: bool = False    # set by the model: an exact re-send of the last chunk,
    #                                  dropped (nothing decoded, the stream's time unchanged)
    time_jump: float = 0.0           # set by the model: the request's TIME_JUMP (s)
    time_jumps: int = 0              # set by the model: the stream's discontinuities so far
    owner_restart: bool = False      # set by the model: a START by the stream's own token
    #                                  that replaced its still-active stream
    kept_masks: list | None = None   # per FRAME_META row (temporal patch), in order: the
    #                                  merge groups the ViT saw, at the time of the patch's
    #                                  newest frame (pack_kept_mask's dict: t, time_s, grid,
    #                                  group_px, bits); aligned with groups_kept_per_frame

    _EMPTY = dict(policy="", policy_requested="", codec="", chunk_bytes=0, frames_decoded=0,
                  frames_sampled=0, frame_types="", patches_kept=0, patches_total=0,
                  groups_kept=0, groups_total=0, kept_share=None, groups_kept_per_frame=[],
                  groups_flagged_by_codec=None, whole_frames={}, intra_share=None,
                  moving_share=None, decode_errors=0, decode_ms=0.0, signals_ms=0.0,
                  select_ms=0.0, convert_ms=0.0, patchify_ms=0.0, parser_ms=0.0)


@dataclasses.dataclass
class LlmStats(_WireStats):
    """LLM_STATS: what llm_prefill did with one stream's window.

    Fields after kv_bytes describe the answer and are None when no question was due.
    """

    refresh: str                     # KV refresh policy applied (REFRESH_POLICIES)
    frames_added: int                # sampled frames this request brought
    frames_dropped: int              # frames that slid out of the window
    window_frames: int               # frames in the window now
    window_frame_range: list | None  # [first, last] display-order frame index in the window
    window_t_range: list | None      # [first, last] sampled-frame index t in the window
    tokens_prefilled: int            # tokens run through the LLM: new + refreshed + question
    tokens_reused: int               # KV rows kept without recomputation
    tokens_refreshed: int            # KV rows recomputed although cached
    kv_bytes: int                    # bytes the stream's KV cache holds
    tokens_new: int | None = None    # rows not cached before
    anchors_refreshed: int | None = None  # I-frame anchors re-prefilled
    visual_tokens: int | None = None  # visual tokens in the window
    kv_rows: int | None = None
    prefill_ms: float | None = None  # window refresh plus question, to the first logits
    decode_ms: float | None = None
    answer_tokens: int | None = None
    stream: str | int | None = None  # set by the model: the stream (sequence) ID
    active_streams: int | None = None  # set by the model: streams this instance holds
    state_bytes: int | None = None   # set by the model: bytes the stream's state holds
    batch_size: int | None = None    # set by the model: requests in this execution
    visual_tokens_pruned: int = 0    # this request's visual tokens the ViT encoded and
    #                                  llm_prefill dropped (vllm_evs, video_pruning_rate)
    first_logits: list | None = None  # the first answer token's logits [vocab], only when
    #                                   llm_prefill's report_first_logits is on (exactness tests)

    _EMPTY = dict(refresh="", frames_added=0, frames_dropped=0, window_frames=0,
                  window_frame_range=None, window_t_range=None, tokens_prefilled=0,
                  tokens_reused=0, tokens_refreshed=0, kv_bytes=0)

    @property
    def answered(self) -> bool:
        """True when the window was answered (a question was due)."""
        return self.prefill_ms is not None


# ---------------------------------------------------------------------------------------------
# ParseStats.kept_masks: which merge groups of a sampled frame the ViT saw, compact enough to
# ride along every answer (a 768x432 frame's 28 x 16 groups: 56 bytes, 76 base64 characters).


def pack_kept_mask(keep: np.ndarray, *, t: int, time_s: float, group_px: int) -> dict:
    """One sampled frame's kept merge groups as a JSON-ready dict.

    keep: bool [grid_h, grid_w], True for a kept group, over the picture the server served
    (upright, scaled, zero-padded bottom/right to whole groups). t: the sampled frame's
    temporal index; time_s: its presentation time in stream seconds (the chunk's AU_PTS
    basis, so a client can find the same decoded frame; for a temporal patch of two frames,
    the newer one's); group_px: a group's side in served
    pixels (28 for Qwen2-VL). Returns {"t", "time_s" (ms precision), "grid": [grid_h, grid_w],
    "group_px", "bits": base64 of np.packbits(keep, row-major, big-endian bit order)}.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 2:
        raise ValueError(f"a kept mask is [grid_h, grid_w], got shape {keep.shape}")
    return {"t": int(t), "time_s": round(float(time_s), 3), "grid": list(keep.shape),
            "group_px": int(group_px),
            "bits": base64.b64encode(np.packbits(keep.reshape(-1)).tobytes()).decode("ascii")}


def unpack_kept_mask(entry: dict) -> np.ndarray:
    """bool [grid_h, grid_w] from a pack_kept_mask dict; ValueError if bits and grid disagree."""
    grid_h, grid_w = (int(n) for n in entry["grid"])
    raw = np.frombuffer(base64.b64decode(entry["bits"], validate=True), dtype=np.uint8)
    if len(raw) != -(-grid_h * grid_w // 8):
        raise ValueError(f"kept mask of {len(raw)} bytes does not fit a {grid_h}x{grid_w} grid")
    return np.unpackbits(raw, count=grid_h * grid_w).astype(bool).reshape(grid_h, grid_w)
