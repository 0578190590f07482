"""What codec_parser does for one stream: decode its chunks, sample frames at the analysis
fps, choose the patches to keep under the request's policy, and patchify only those.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from codecsight.checkpoint import Geometry
from codecsight.codec import FrameSampler, StreamDecoder, frame_to_rgb, padded_size
from codecsight.protocol import FRAME_META_COLUMNS, FRAME_TYPES, META, PATCH_POLICIES
from codecsight.vision import patchify


@dataclasses.dataclass
class ParseResult:
    patches: np.ndarray     # [N, patch_dim] float32, block-major per frame
    positions: np.ndarray   # [N, 3] int64 (t, h, w) patch coordinates
    frame_meta: np.ndarray  # [F, len(FRAME_META_COLUMNS)] int64
    stats: dict


class StreamParser:
    """Per-stream decoder, sampler and patch selection."""

    def __init__(self, geometry: Geometry, codec: str, source_fps: float, analysis_fps: float):
        self.geometry = geometry
        self.codec = codec
        self.decoder = StreamDecoder(codec, export_mvs=(codec == "h264"))
        self.sampler = FrameSampler(source_fps, analysis_fps)
        self.source_fps = source_fps
        self.next_t = 0            # t of the next sampled frame
        self.frame_shape = None    # (height, width) of decoded frames, once known

    @property
    def nbytes(self) -> int:
        """Rough bytes held: the decoder's reference frames (16 YUV 4:2:0 frames at most)."""
        if self.frame_shape is None:
            return 1 << 20
        height, width = self.frame_shape
        return int(height * width * 1.5 * 16)

    def parse(self, chunk: bytes, policy: str, final: bool = False) -> ParseResult:
        """Decode a chunk (and drain the decoder when final) and emit the sampled frames."""
        if policy not in PATCH_POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        t_start = time.perf_counter()
        errors_before = self.decoder.errors
        frames = self.decoder.feed(chunk)
        if final:
            frames += self.decoder.flush()
        sampled = [f for f in frames if self.sampler.is_sampled(f.index)]
        group = self.geometry.group_pixels
        rows, pixels = [], []
        for f in sampled:
            self.frame_shape = (f.frame.height, f.frame.width)
            padded_w, padded_h = padded_size(f.frame.width, f.frame.height, group)
            grid_h, grid_w = padded_h // group, padded_w // group
            pixels.append(frame_to_rgb(f.frame, group))
            rows.append([self.next_t, f.index, round(1000.0 * f.index / self.source_fps),
                         FRAME_TYPES.get(f.pict_type, 0), grid_h, grid_w, grid_h * grid_w])
            self.next_t += 1
        meta = np.array(rows, dtype=np.int64).reshape(-1, len(FRAME_META_COLUMNS))
        if pixels:
            patches, positions = patchify(np.stack(pixels), self.geometry,
                                          frame_ids=meta[:, META["t"]])
        else:
            patches = np.zeros((0, self.geometry.patch_dim), np.float32)
            positions = np.zeros((0, 3), np.int64)
        total = int(meta[:, META["grid_h"]].dot(meta[:, META["grid_w"]])) \
            * self.geometry.patches_per_group
        stats = {
            "policy": policy, "codec": self.codec, "chunk_bytes": len(chunk),
            "frames_decoded": len(frames), "frames_sampled": len(sampled),
            "frame_types": "".join(f.pict_type for f in frames),
            "patches_kept": int(len(patches)), "patches_total": total,
            "decode_errors": self.decoder.errors - errors_before,
            "parser_ms": (time.perf_counter() - t_start) * 1000.0,
        }
        if stats["decode_errors"]:
            stats["decode_error"] = self.decoder.last_error
        return ParseResult(patches.astype(np.float32, copy=False), positions, meta, stats)
