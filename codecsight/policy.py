"""Which merge groups of a sampled frame the ViT sees: the one policy switch.

Policies, chosen per request (protocol.PATCH_POLICIES), plus a reference for benchmarks:

  dense   every group of every sampled frame (ordinary VLM serving).
  codec   the groups the codec flags as changed since the previous sampled frame. Per decoded
          frame a macroblock is flagged when a partition's motion, after subtracting the
          frame's global (median) motion per reference direction, reaches
          motion_threshold_px, or when it is intra; a flag counts only with enough flagged
          neighbours (encoder intra refresh and noise vectors on flat areas are isolated,
          moving objects are not). I-frames carry the flags of their neighbouring P/B-frames
          (an I-frame is a coding decision, not a scene change). Flags accumulate over the
          frames that are not sampled and map to merge groups by overlap: any flagged
          macroblock keeps the whole group; while the camera moves (global motion of at least
          motion_threshold_px) every group is a candidate, since the content under every
          fixed position shifts. With pixel_check the candidate groups, and only
          they, are then confirmed by their luma against the version the ViT saw last or
          the previous sampled frame (mean |dY| > pixel_threshold, or an edge of pixels with
          |dY| > pixel_peak_threshold), so pixel work stays bounded by what the codec flags.
  evs     online Efficient Video Sampling on pixels, before the ViT (the EVS paper's way, not
          vLLM's): drop the share evs_pruning_rate of groups most similar (cosine of
          normalised pixels) to the same group of the previous sampled frame. Converts every
          sampled frame to pixels.
  vllm_evs  EVS as vLLM runs it (its video_pruning_rate): every group goes to the ViT, and
          llm_prefill drops the tokens most similar to the previous frame's tokens
          (codecsight.token_pruning); here it keeps every group and marks whole frames.
  oracle  (benchmarks only) groups whose mean |dY| against the previous sampled frame exceeds
          pixel_threshold: what a perfect change signal would keep; decodes every pixel.

Pruning policies keep a whole frame where a whole view is due (WHOLE_FRAME_REASONS): the
stream's first sampled frame and at least one every whole_frame_seconds (the timer, which
runs at most as long as the stream's LLM window: `PruningConfig.for_window`), so that each
window holds one complete view of the scene; codec also at scene cuts (a P/B-frame
that is mostly intra, or an I-frame whose macroblocks changed wholesale against the frame
before) and after frames decoded with errors. evs and the oracle, pixel methods, keep whole
frames only at the start and on the timer, and so does vllm_evs, whose whole frames
llm_prefill keeps unpruned. (An I-frame is a coding decision, not a reason.)

`StreamMasks` keeps this state per stream and is advanced on every decoded frame whatever
the request's policy, so a stream may switch policy from one request to the next.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import av
import numpy as np

from codecsight.checkpoint import Geometry
import codecsight.codec as _codec
from codecsight.codec import (MACROBLOCK, Axis, DecodedFrame, Picture, changed_macroblocks,
                              macroblock_grid, macroblock_signals, picture_for, valid_pixels)
from codecsight.protocol import PATCH_POLICIES

POLICIES = PATCH_POLICIES + ("oracle",)  # what StreamMasks.select accepts
# P/B-frames read together by macroblock_signals: numpy's per-call cost is spread over the
# frames of a whole chunk (64 measured ~20% faster per frame than 16 on the bundled clip,
# perf/bench_decode.py; ~80k vectors, a few MB of temporaries).
_SIGNAL_BATCH = 64
# Why a sampled frame is kept whole. "timer": whole_frame_seconds passed since the last one.
WHOLE_FRAME_REASONS = ("start", "scene_cut", "decode_error", "timer")
# I-frames in a row after which a stream counts as all-intra (keyint=1, I-only encoders): an
# inter-coded stream never codes two in a row, and without P/B-frames there is no motion.
ALL_INTRA_RUN = 2
ALL_INTRA_FALLBACK = ("no P/B-frames for {run} frames (an all-intra stream): codec has no "
                      "motion evidence, so it checks the pixels of every group until inter "
                      "frames return")


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """Settings of the pruning policies: codec_parser's config.pbtxt parameters of the same
    name, their one source (no defaults here). `PruningConfig.served()` reads them."""

    motion_threshold_px: float   # a macroblock moves if |motion - global motion| >= this
    motion_support: int          # flagged macroblocks (moving or intra) needed in a moving
                                 # macroblock's 3x3 neighbourhood, itself included
    intra_support: int           # the same for an intra macroblock (1: every intra counts)
    scene_cut_share: float       # share of macroblocks that are intra (P/B-frame) or
                                 # changed by > scene_cut_luma (I-frame): a scene cut
    scene_cut_luma: float        # mean |dY| of a macroblock across an I-frame, 8-bit levels
    whole_frame_seconds: float   # whole frame at least this often; 0: only start and cuts
    temporal_support: bool       # a flag counts only if its neighbourhood was flagged in
                                 # the frame before too (noise vectors do not persist)
    pixel_check: bool            # confirm codec candidates by their pixels (below)
    pixel_threshold: float       # mean |dY| over a group that counts as a change, levels
    pixel_peak_threshold: float  # |dY| of a pixel on a moving edge: a group with a
                                 # group-width (28) of such pixels changed (pixel check)
    evs_pruning_rate: float      # share of groups evs drops per sampled frame

    def __post_init__(self):
        checks = {
            "motion_threshold_px": self.motion_threshold_px >= 0,
            "motion_support": 1 <= self.motion_support <= 9,
            "intra_support": 1 <= self.intra_support <= 10,
            "scene_cut_share": 0 < self.scene_cut_share <= 1,
            "scene_cut_luma": self.scene_cut_luma >= 0,
            "whole_frame_seconds": self.whole_frame_seconds >= 0,
            "pixel_threshold": self.pixel_threshold >= 0,
            "pixel_peak_threshold": self.pixel_peak_threshold >= 0,
            "evs_pruning_rate": 0 <= self.evs_pruning_rate < 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid pruning settings: "
                             f"{', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} (motion_support "
                             "1-9, intra_support 1-10 (10: intra never counts), shares in (0, 1], "
                             "evs_pruning_rate in [0, 1), others >= 0)")

    @classmethod
    def from_params(cls, params: dict) -> "PruningConfig":
        """The config from a model's typed parameters (`params.read`), which hold other keys
        too; KeyError if one of the fields is missing."""
        return cls(**{f.name: params[f.name] for f in dataclasses.fields(cls)})

    @classmethod
    def served(cls, repository=None, **overrides) -> "PruningConfig":
        """codec_parser's served settings (its config.pbtxt in `repository`, None: the
        project's model_repository), with the fields named in `overrides` replaced."""
        from codecsight.params import served_parameters  # params declares this class's fields

        return dataclasses.replace(cls.from_params(served_parameters("codec_parser", repository)),
                                   **overrides)

    def for_window(self, window_seconds: float | None) -> "PruningConfig":
        """The settings for a stream whose LLM window is window_seconds long: the whole-frame
        timer runs at most that long, so every window holds one whole view of the scene.

        A timer of 0 (whole frames only at the start and at cuts) stays 0; None: no window.
        """
        if window_seconds is None or self.whole_frame_seconds == 0 \
                or self.whole_frame_seconds <= window_seconds:
            return self
        return dataclasses.replace(self, whole_frame_seconds=window_seconds)


# ---------------------------------------------------------------------------------------------
# Masks as plain functions


def neighbourhood_count(mask: np.ndarray) -> np.ndarray:
    """Flagged cells in each cell's 3x3 neighbourhood, itself included: uint8 [..., H, W]."""
    *lead, height, width = mask.shape
    padded = np.zeros((*lead, height + 2, width + 2), np.uint8)
    padded[..., 1:-1, 1:-1] = mask
    # separable: sum three columns, then three rows
    columns = padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]
    return columns[..., :-2, :] + columns[..., 1:-1, :] + columns[..., 2:, :]


def dynamic_macroblocks(moving: np.ndarray, intra: np.ndarray,
                        config: PruningConfig) -> np.ndarray:
    """Macroblocks of P/B-frames that changed: bool [..., mb_h, mb_w].

    moving, intra: MacroblockSignals fields, bool of one shape. A moving or intra macroblock
    counts only if its 3x3 neighbourhood holds motion_support (intra_support) flagged
    macroblocks. Runs the compiled kernel (codec._codec_kernels; numpy's padding and
    shifted sums cost more than the work), _dynamic_macroblocks_numpy where it is not built.
    """
    kernels = _codec._codec_kernels
    if kernels is None or moving.dtype != bool or intra.dtype != bool \
            or moving.shape != intra.shape:
        return _dynamic_macroblocks_numpy(moving, intra, config)
    *lead, mb_h, mb_w = moving.shape
    out = np.empty(moving.shape, bool)
    kernels.dynamic_macroblocks(np.ascontiguousarray(moving), np.ascontiguousarray(intra),
                                math.prod(lead), mb_h, mb_w, config.motion_support,
                                config.intra_support, out)
    return out


def _dynamic_macroblocks_numpy(moving: np.ndarray, intra: np.ndarray,
                               config: PruningConfig) -> np.ndarray:
    """dynamic_macroblocks in numpy (the reference)."""
    support = neighbourhood_count(moving | intra)
    return (moving & (support >= config.motion_support)) | (
        intra & (support >= config.intra_support))


def overlap_matrix(cells: int, cell_pixels: int, groups: int, group_pixels: int,
                   source_pixels: int | None = None, scaled_pixels: int | None = None,
                   offset: int = 0) -> np.ndarray:
    """float32 [cells, groups]: 1 where cell i (of cell_pixels) overlaps group j along one axis.

    Cell i covers source pixels [offset + i * cell_pixels, + cell_pixels), clipped to the
    source_pixels of the frame (None: not clipped); the picture scales the axis from
    source_pixels to scaled_pixels (None: unscaled), so a cell covers cell_pixels * scale
    picture pixels. Exact integer arithmetic.
    """
    start = offset + np.arange(cells, dtype=np.int64) * cell_pixels
    end = start + cell_pixels
    start = np.maximum(start, 0)
    if source_pixels is not None:
        end = np.minimum(end, source_pixels)
    num, den = (1, 1) if scaled_pixels is None else (scaled_pixels, source_pixels)
    first = start * num // (den * group_pixels)
    last = np.minimum((end * num - 1) // (den * group_pixels), groups - 1)
    j = np.arange(groups)
    inside = (end > start)[:, None]
    return (inside & (j >= first[:, None]) & (j <= last[:, None])).astype(np.float32)


def axis_overlap(axis: Axis, groups: int, group_pixels: int) -> np.ndarray:
    """overlap_matrix of one axis of a Picture's upright macroblock grid: [macroblocks, groups]."""
    return overlap_matrix(axis.macroblocks, MACROBLOCK, groups, group_pixels,
                          axis.source_pixels, axis.scaled_pixels, axis.offset)


def groups_from_macroblocks(macroblocks: np.ndarray, rows: np.ndarray,
                            cols: np.ndarray) -> np.ndarray:
    """Merge groups overlapped by any flagged macroblock: bool [grid_h, grid_w].

    macroblocks: bool [mb_h, mb_w]; rows [mb_h, grid_h], cols [mb_w, grid_w]: overlap_matrix.
    """
    return (rows.T @ macroblocks.astype(np.float32) @ cols) > 0


def changed_groups(a: np.ndarray, b: np.ndarray, group: int, valid: np.ndarray,
                   mean_threshold: float, peak_threshold: float | None = None,
                   where: np.ndarray | None = None) -> np.ndarray:
    """Groups whose pixels changed between two luma images: bool [grid_h, grid_w].

    a, b: uint8 [Hp, Wp] luma padded to whole groups; valid: pixels of each group inside the
    unpadded frame, float32 [grid_h, grid_w]. A group changed if its mean |a - b| over valid
    pixels exceeds mean_threshold or, with peak_threshold, if at least `group` pixels (one
    row's worth: an object edge) differ by more than peak_threshold. where: bool
    [grid_h, grid_w] groups to test (the others are False), so the cost follows the groups
    asked about.
    """
    grid_h, grid_w = a.shape[0] // group, a.shape[1] // group
    out = np.zeros((grid_h, grid_w), bool)
    rows, cols = np.nonzero(np.ones((grid_h, grid_w), bool) if where is None else where)
    if not len(rows):
        return out
    view_a = a.reshape(grid_h, group, grid_w, group).transpose(0, 2, 1, 3)
    view_b = b.reshape(grid_h, group, grid_w, group).transpose(0, 2, 1, 3)
    diff = np.abs(view_a[rows, cols].astype(np.int16) - view_b[rows, cols])  # [K, G, G]
    changed = diff.sum(axis=(1, 2)) > mean_threshold * np.maximum(valid[rows, cols], 1)
    if peak_threshold is not None:
        changed |= (diff > peak_threshold).sum(axis=(1, 2)) >= group
    out[rows, cols] = changed
    return out


def oracle_keep(previous_luma: np.ndarray, luma: np.ndarray, group: int, valid: np.ndarray,
                threshold: float) -> np.ndarray:
    """Groups whose mean |dY| between two sampled frames exceeds threshold: bool [gh, gw]."""
    return changed_groups(luma, previous_luma, group, valid, threshold)


def evs_keep(previous_rgb: np.ndarray, rgb: np.ndarray, geometry: Geometry,
             pruning_rate: float) -> np.ndarray:
    """EVS on pixels, before the ViT (the `evs` policy; vLLM's own EVS is `vllm_evs`, after
    the ViT: codecsight.token_pruning), on one pair of sampled frames: keep the least similar
    groups, bool [gh, gw].

    previous_rgb, rgb: uint8 [Hp, Wp, 3] padded to whole groups. Dissimilarity is 1 - cosine
    similarity of a group's normalised pixels (the ViT's input) with the same group of the
    previous frame; the int(groups * (1 - pruning_rate)) most dissimilar are kept (vLLM's
    compute_retention_mask does this over whole videos on ViT outputs; online and before
    the ViT it can only look one frame back and only at pixels).
    """
    group = geometry.group_pixels
    grid_h, grid_w = rgb.shape[0] // group, rgb.shape[1] // group
    a, b = _group_vectors(previous_rgb, geometry), _group_vectors(rgb, geometry)
    cosine = np.einsum("gd,gd->g", a, b) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-6)
    order = np.argsort(-(1.0 - cosine), kind="stable")
    keep = np.zeros(grid_h * grid_w, bool)
    keep[order[:int(grid_h * grid_w * (1.0 - pruning_rate))]] = True
    return keep.reshape(grid_h, grid_w)


def _group_vectors(rgb: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Normalised pixels of every group, float32 [groups, group * group * 3]."""
    group = geometry.group_pixels
    grid_h, grid_w = rgb.shape[0] // group, rgb.shape[1] // group
    mean = np.asarray(geometry.image_mean, np.float32)
    std = np.asarray(geometry.image_std, np.float32)
    values = (rgb.astype(np.float32) * np.float32(1 / 255) - mean) / std
    return values.reshape(grid_h, group, grid_w, group, 3).transpose(0, 2, 1, 3, 4).reshape(
        grid_h * grid_w, -1)


# ---------------------------------------------------------------------------------------------
# Per-stream state


@dataclasses.dataclass
class FrameSignal:
    """Codec evidence of one decoded frame, on its macroblock grid."""

    flags: np.ndarray | None  # bool [mb_h, mb_w] changed macroblocks; None without codec signals
    scene_cut: bool
    camera_moved: bool        # global motion >= motion_threshold_px: every position shifted
    intra_share: float | None  # P/B-frames with codec signals, else None
    moving_share: float | None


class SampledFrame:
    """A sampled frame and its RGB pixels, converted at most once, when someone needs them."""

    def __init__(self, frame: av.VideoFrame, picture: Picture, rgb: np.ndarray | None = None):
        self.frame, self.picture, self._rgb = frame, picture, rgb

    def rgb(self) -> np.ndarray:
        """uint8 [Hp, Wp, 3] upright, scaled and padded to whole merge groups (`Picture.rgb`)."""
        if self._rgb is None:
            self._rgb = self.picture.rgb(self.frame)
        return self._rgb

    @property
    def nbytes(self) -> int:
        """The decoded frame it pins (YUV 4:2:0) plus its RGB if converted."""
        return int(self.frame.width * self.frame.height * 1.5) + (
            0 if self._rgb is None else self._rgb.nbytes)


@dataclasses.dataclass
class Selection:
    """What one policy keeps of one sampled frame."""

    keep: np.ndarray          # bool [grid_h, grid_w] merge groups sent to the ViT
    whole_frame: str | None   # why the whole frame is kept (WHOLE_FRAME_REASONS), else None
    candidates: int           # groups flagged before the pixel check (codec), else kept groups
    frame: SampledFrame       # this frame (its RGB converted already if the policy needed it)
    previous: SampledFrame | None   # the stream's previous sampled frame; None at the first
    fallback: str | None = None     # why codec judged this frame without codec evidence


class StreamMasks:
    """One stream's pruning state: codec evidence since the last sampled frame, and what
    the ViT last saw. Advance it with every decoded frame, in display order.

    rotation, max_pixels, min_pixels: how frames become the picture the ViT sees
    (`codec.picture_for`): groups and pixel checks are those of the upright, scaled picture,
    and the codec's macroblock flags are turned and scaled onto it.
    """

    def __init__(self, config: PruningConfig, geometry: Geometry, codec_signals: bool,
                 rotation: int = 0, max_pixels: int | None = None,
                 min_pixels: int | None = None):
        self.config = config
        self.geometry = geometry
        self.codec_signals = codec_signals   # False: no motion vectors (not H.264)
        self.rotation, self.max_pixels, self.min_pixels = rotation, max_pixels, min_pixels
        self.picture: Picture | None = None   # for frames of the current size
        self.intra_run = 0   # I-frames decoded in a row (ALL_INTRA_RUN: an all-intra stream)
        self.pending: np.ndarray | None = None   # bool [mb_h, mb_w] flagged since last sample
        self.pending_whole_frame: str | None = "start"
        self.last_full_s: float | None = None    # time of the last whole frame the ViT saw
        self.reference: np.ndarray | None = None  # uint8 [Hp, Wp] luma of each group as the
                                                  # ViT last saw it
        self.previous_luma: np.ndarray | None = None  # previous sampled frame (oracle)
        self.previous_sampled: SampledFrame | None = None
        self.previous_decoded: av.VideoFrame | None = None  # for the I-frame cut test
        self.previous_flags: np.ndarray | None = None   # last frame's flags (I-frame carry)
        self._previous_raw: np.ndarray | None = None   # last P/B-frame's spatial flags
        self._camera_moving = False   # the last P/B-frame's global motion reached the threshold
        self.pending_camera = False   # the camera moved since the last sampled frame
        self._shape: tuple[int, int] | None = None   # (width, height) the caches below are for
        self._rows = self._cols = self._valid = None
        self._candidates = 0   # groups the codec flagged for the last sampled frame

    @property
    def nbytes(self) -> int:
        arrays = (self.pending, self.reference, self.previous_luma)
        pinned = 0 if self.previous_decoded is None else \
            int(self.previous_decoded.width * self.previous_decoded.height * 1.5)
        if self.previous_sampled is not None:
            pinned += self.previous_sampled.nbytes
        return sum(a.nbytes for a in arrays if a is not None) + pinned

    def picture_for(self, width: int, height: int) -> Picture:
        """The picture frames of this size become (codec.picture_for); PictureTooLarge."""
        return picture_for(width, height, self.geometry.group_pixels, self.rotation,
                           self.max_pixels, self.min_pixels)

    def _geometry_for(self, width: int, height: int) -> None:
        if self._shape == (width, height):
            return
        group = self.geometry.group_pixels
        picture = self.picture_for(width, height)
        grid_h, grid_w = picture.grid
        rows, cols = picture.axes()
        self._rows = axis_overlap(rows, grid_h, group)
        self._cols = axis_overlap(cols, grid_w, group)
        self._valid = valid_pixels(picture.width, picture.height, group)
        self.picture = picture
        if self._shape is not None:
            # A new frame size: nothing seen before lines up any more.
            self.pending, self.reference, self.previous_flags = None, None, None
            self.previous_luma = None
            self.pending_whole_frame = self.pending_whole_frame or "scene_cut"
        self._shape = (width, height)

    # --- every decoded frame ---------------------------------------------------------------

    def observe(self, frames: Sequence[DecodedFrame]) -> list[FrameSignal]:
        """Codec evidence of each frame (display order); I-frames borrow their neighbours'.

        The motion across an I-frame is unknown (it has no vectors), but objects that move in
        the P/B-frames on either side of it moved across it too.
        """
        signals: list[FrameSignal] = []
        start = 0
        while start < len(frames):   # runs of one frame size (a stream may change size)
            size = (frames[start].width, frames[start].height)
            stop = start + 1
            while stop < len(frames) and (frames[stop].width, frames[stop].height) == size:
                stop += 1
            signals += self._observe_run(frames[start:stop])
            start = stop
        for k, (frame, signal) in enumerate(zip(frames, signals)):
            if frame.pict_type == "I" and signal.flags is not None and k + 1 < len(frames) \
                    and signals[k + 1].intra_share is not None \
                    and signals[k + 1].flags.shape == signal.flags.shape:
                signal.flags = signal.flags | signals[k + 1].flags
                signal.camera_moved |= signals[k + 1].camera_moved
        return signals

    def _observe_run(self, frames: Sequence[DecodedFrame]) -> list[FrameSignal]:
        """observe() for frames of one size; P/B-frames are read all at once."""
        config = self.config
        width, height = frames[0].width, frames[0].height
        self._geometry_for(width, height)
        coded = [k for k, f in enumerate(frames) if f.pict_type != "I"] \
            if self.codec_signals else []
        flags, intra_share, moving_share, camera = [], [], [], []
        for first in range(0, len(coded), _SIGNAL_BATCH):
            batch = coded[first:first + _SIGNAL_BATCH]
            mb = macroblock_signals([frames[k].motion_vectors for k in batch], width, height,
                                    config.motion_threshold_px,
                                    [frames[k].pict_type == "B" for k in batch])
            dynamic = dynamic_macroblocks(mb.moving, mb.intra, config)     # [P, mb_h, mb_w]
            if config.temporal_support:
                dynamic = self._temporally_supported(dynamic)
            flags += list(dynamic)
            intra_share += mb.intra_share.tolist()
            moving_share += mb.moving_share.tolist()
            camera += (np.hypot(mb.global_motion_px[:, 0], mb.global_motion_px[:, 1])
                       >= config.motion_threshold_px).tolist()
        out, j = [], 0
        for frame in frames:
            is_cut = frame.pict_type == "I" and self._changed_wholesale(frame.frame)
            self.previous_decoded = frame.frame
            if not self.codec_signals:
                out.append(FrameSignal(None, is_cut, False, None, None))
                continue
            if frame.pict_type == "I":
                shape = macroblock_grid(width, height)
                carried = self.previous_flags if self.previous_flags is not None \
                    and self.previous_flags.shape == shape else np.zeros(shape, bool)
                signal = FrameSignal(carried, is_cut, self._camera_moving, None, None)
            else:
                signal = FrameSignal(flags[j], intra_share[j] >= config.scene_cut_share,
                                     camera[j], intra_share[j], moving_share[j])
                self._camera_moving = signal.camera_moved
                j += 1
            self.previous_flags = signal.flags
            out.append(signal)
        return out

    def _temporally_supported(self, flags: np.ndarray) -> np.ndarray:
        """Flags [P, mb_h, mb_w] whose neighbourhood was flagged in the P/B-frame before."""
        before = np.zeros_like(flags)
        before[1:] = flags[:-1]
        if self._previous_raw is not None and self._previous_raw.shape == flags.shape[1:]:
            before[0] = self._previous_raw
        else:
            before[0] = True   # nothing to compare the stream's first P/B-frame with
        self._previous_raw = flags[-1].copy()
        return flags & (neighbourhood_count(before) > 0)

    def _changed_wholesale(self, frame: av.VideoFrame) -> bool:
        """I-frame scene-cut test: most macroblocks' mean |dY| against the frame before.

        On every 4th pixel of every 4th row (a macroblock's 4x4 sample), straight from the
        two Y planes (`codec.changed_macroblocks`): a cut changes whole macroblocks, and the
        full planes would cost ~1 ms per I-frame.
        """
        previous = self.previous_decoded
        if previous is None or (previous.width, previous.height) != (frame.width, frame.height):
            return False
        changed = changed_macroblocks(frame, previous, self.config.scene_cut_luma)
        return float(changed.mean()) >= self.config.scene_cut_share

    def add(self, frame: DecodedFrame, signal: FrameSignal) -> None:
        """Accumulate a frame's evidence into what the next sampled frame will be judged on."""
        self.intra_run = self.intra_run + 1 if frame.pict_type == "I" else 0
        if signal.flags is not None:
            if self.pending is None or self.pending.shape != signal.flags.shape:
                self.pending = signal.flags.copy()
            else:
                self.pending |= signal.flags
        self.pending_camera |= signal.camera_moved
        if frame.corrupt:
            self.pending_whole_frame = self.pending_whole_frame or "decode_error"
        if signal.scene_cut:
            self.pending_whole_frame = self.pending_whole_frame or "scene_cut"

    # --- sampled frames --------------------------------------------------------------------

    def select(self, policy: str, frame: DecodedFrame, time_s: float) -> Selection:
        """The groups `policy` keeps of a sampled frame (after `add` of that frame)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        config, group = self.config, self.geometry.group_pixels
        self._geometry_for(frame.width, frame.height)
        luma = self.picture.luma(frame.frame)
        grid = (luma.shape[0] // group, luma.shape[1] // group)
        # Scene cuts and decode errors are codec evidence: the pixel policies (evs as vLLM
        # runs it, and the oracle) keep whole frames only where the LLM window needs one.
        whole = self.pending_whole_frame \
            if policy == "codec" or self.pending_whole_frame == "start" else None
        if whole is None and config.whole_frame_seconds > 0 and (
                self.last_full_s is None
                or time_s - self.last_full_s >= config.whole_frame_seconds - 1e-6):
            whole = "timer"
        sampled, previous = SampledFrame(frame.frame, self.picture), self.previous_sampled
        fallback = None
        if policy == "dense":
            keep, whole = np.ones(grid, bool), None
        elif whole is not None or self.reference is None:
            keep, whole = np.ones(grid, bool), whole or "start"
            if policy == "evs":
                sampled.rgb()    # evs compares the next frame with this one's pixels
        elif policy == "codec":
            all_intra = self.codec_signals and self.intra_run >= ALL_INTRA_RUN
            keep = self._codec_keep(luma, grid, all_intra)
            if all_intra:
                fallback = ALL_INTRA_FALLBACK.format(run=self.intra_run)
        elif policy == "evs":
            keep = evs_keep(previous.rgb(), sampled.rgb(), self.geometry,
                            config.evs_pruning_rate)
        elif policy == "vllm_evs":   # pruned after the ViT, in llm_prefill
            keep = np.ones(grid, bool)
        else:  # oracle
            keep = oracle_keep(self.previous_luma, luma, group, self._valid,
                               config.pixel_threshold)
        candidates = self._candidates if policy == "codec" and whole is None \
            else int(keep.sum())
        last_full_s = self.last_full_s
        self._remember(sampled, luma, keep, time_s)
        if policy == "vllm_evs" and whole is None:
            # The ViT saw every group but the LLM gets a pruned frame: no whole view yet.
            self.last_full_s = last_full_s
        return Selection(keep, whole, candidates, sampled, previous, fallback)

    def _codec_keep(self, luma: np.ndarray, grid: tuple[int, int],
                    all_intra: bool = False) -> np.ndarray:
        """all_intra: no inter frame for a while, so no motion evidence: every group is a
        candidate and the pixel check decides (whatever pixel_check says)."""
        if self.pending_camera or all_intra:
            # The codec's flags are motion relative to the scene (global motion removed), but
            # a panning or shaking camera moves the content under every fixed (h, w) position
            # the LLM knows: every group is a candidate, the pixel check keeps what shifted.
            candidates = np.ones(grid, bool)
        elif self.pending is None:  # no codec evidence yet (no P/B-frame since the sample)
            candidates = np.zeros(grid, bool)
        else:
            candidates = groups_from_macroblocks(self.picture.upright_macroblocks(self.pending),
                                                 self._rows, self._cols)
        self._candidates = int(candidates.sum())
        if not (self.config.pixel_check or all_intra) or not candidates.any():
            return candidates
        config, group = self.config, self.geometry.group_pixels
        # Changed since the ViT's version of the group (slow drift adds up), or since the
        # previous sampled frame (a change that returns close to the ViT's version, e.g.
        # exposure hunting, is still a change the LLM should see).
        changed = changed_groups(luma, self.reference, group, self._valid, config.pixel_threshold,
                                 config.pixel_peak_threshold, where=candidates)
        recheck = candidates & ~changed
        if recheck.any():
            changed |= changed_groups(luma, self.previous_luma, group, self._valid,
                                      config.pixel_threshold, config.pixel_peak_threshold,
                                      where=recheck)
        return changed

    def _remember(self, sampled: SampledFrame, luma: np.ndarray, keep: np.ndarray,
                  time_s: float) -> None:
        group = self.geometry.group_pixels
        if self.reference is None or self.reference.shape != luma.shape or keep.all():
            self.reference = luma.copy()
        else:
            grid_h, grid_w = keep.shape
            np.copyto(self.reference.reshape(grid_h, group, grid_w, group),
                      luma.reshape(grid_h, group, grid_w, group),
                      where=keep[:, None, :, None])
        if keep.all():
            self.last_full_s = time_s
        self.previous_luma = luma
        self.previous_sampled = sampled
        self.pending = None
        self.pending_whole_frame = None
        self.pending_camera = False
