"""The wire contract between the client, the ensemble and its composing models.

One place names every tensor, policy and metadata column, so the client, the three
model.py files, perf inputs and tests cannot drift apart.
"""
from __future__ import annotations

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

# Between composing models.
PATCHES = "PATCHES"                # FP32 [1, N, patch_dim]: kept patches, block-major
POSITIONS = "POSITIONS"            # INT64 [1, N, 3]: (t, h, w) per patch, t = sampled frame
FRAME_META = "FRAME_META"          # INT64 [1, F, len(FRAME_META_COLUMNS)]
TOKENS = "TOKENS"                  # FP32 [1, N/4, hidden]: merged visual tokens

# Ensemble outputs.
ANSWER = "ANSWER"                  # BYTES [1, 1]: the window's answer ("" if no question)
PARSE_STATS = "PARSE_STATS"        # BYTES [1, 1]: JSON from codec_parser
LLM_STATS = "LLM_STATS"            # BYTES [1, 1]: JSON from llm_prefill

ENSEMBLE_INPUTS = (CHUNK, CODEC, SOURCE_FPS, ANALYSIS_FPS, POLICY, REFRESH, WINDOW_SECONDS,
                   QUESTION)
ENSEMBLE_OUTPUTS = (ANSWER, PARSE_STATS, LLM_STATS)

# One row per sampled frame emitted by codec_parser.
FRAME_META_COLUMNS = (
    "t",            # sampled-frame index within the stream (the M-RoPE temporal position)
    "frame_index",  # display-order index of the decoded frame
    "time_ms",      # presentation time, frame_index / source_fps
    "frame_type",   # FRAME_TYPES code
    "grid_h",       # merge groups per column of the whole frame
    "grid_w",       # merge groups per row of the whole frame
    "kept_groups",  # merge groups of this frame present in PATCHES
)
META = {name: i for i, name in enumerate(FRAME_META_COLUMNS)}
FRAME_TYPES = {"?": 0, "I": 1, "P": 2, "B": 3}
FRAME_TYPE_NAMES = {v: k for k, v in FRAME_TYPES.items()}

PATCH_POLICIES = ("dense", "evs", "codec")
REFRESH_POLICIES = ("full", "selective")

STREAM_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class StreamError(ValueError):
    """A request problem to report to the client; the message names the stream."""

    def __init__(self, stream_id, problem: str):
        super().__init__(f"stream {stream_id!r}: {problem}")
        self.stream_id = stream_id


def check_choice(stream_id, what: str, value: str, allowed: tuple[str, ...]) -> str:
    """Return value if allowed, else raise a StreamError that lists the allowed values."""
    if value not in allowed:
        raise StreamError(stream_id, f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def bytes_scalar(value: str) -> np.ndarray:
    """A [1, 1] BYTES tensor holding one UTF-8 string."""
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def read_string(array: np.ndarray) -> str:
    """The single string of a BYTES tensor of any shape with one element."""
    item = np.asarray(array).reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, (bytes, bytearray)) else str(item)
