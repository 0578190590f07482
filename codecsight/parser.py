"""What codec_parser does for one stream: decode its chunks, sample frames at the analysis
fps, choose the patches to keep under the request's policy, and patchify only those.

Every decoded frame advances the stream's pruning state (codec.macroblock_signals ->
policy.StreamMasks), whatever the policy of the request, so policies can switch per request.
Only sampled frames that keep at least one merge group are converted to pixels, whole-frame
(swscale converts a 768x432 frame in ~0.15 ms; numpy YUV->RGB of only the kept groups costs
more at every share measured, 0.25 ms at 12% kept: perf/README.md), and only the kept groups
are normalised (`patchify(keep=...)`).

Frames are sampled by presentation time (the access units' AU_PTS, carried through the
decoder's reordering; a frame without one is shown 1/source_fps after the frame before), and
a sampled frame's temporal index t is its slot, floor(time * analysis_fps): a gap in the video
is a gap in t and in FRAME_META's time_ms, never compressed away. Frames are turned upright
(ROTATION) and scaled to codec_parser's max_pixels budget before anything looks at them
(`codec.picture_for`).

How sampled frames fill the two temporal slots of a patch is the checkpoint's frame layout
(Geometry.frame_layout, codecsight.families). "overlapping" (the demo model's): each patch pairs
a sampled frame with the stream's previous sampled frame (`patchify(previous=...)`), so a token
carries the motion of its patch; the previous frame is converted only when the next sampled
frame keeps something, and at the first sampled frame of a stream (or after a resolution
change) a frame is paired with itself. "pairs" (real checkpoints, as their video processor
lays frames out): sampled frames 2k and 2k+1 fill one patch, FRAME_META's t = k, and a merge
group is kept if it changed in either frame of the pair or since the previous pair
(`_emit_pair`); the first frame of a pair waits in the parser for the second.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from fractions import Fraction

import numpy as np

from codecsight.checkpoint import Geometry
from codecsight.codec import PTS_UNITS, FrameSampler, PictureTooLarge, StreamDecoder
from codecsight.policy import POLICIES, PruningConfig, StreamMasks
from codecsight.protocol import (FRAME_META_COLUMNS, FRAME_TYPES, META, TOKEN_PRUNING,
                                 InvalidRequest, ParseStats, pack_kept_mask)
from codecsight.vision import patchify

# Codecs whose motion vectors FFmpeg exports; other streams cannot use the codec policy.
CODEC_SIGNAL_CODECS = ("h264",)
FALLBACK_POLICY = "evs"


@dataclasses.dataclass
class ParseResult:
    patches: np.ndarray     # [N, patch_dim] float32, block-major per frame
    positions: np.ndarray   # [N, 3] int64 (t, h, w) patch coordinates
    frame_meta: np.ndarray  # [F, len(FRAME_META_COLUMNS)] int64
    stats: ParseStats
    keep: list = dataclasses.field(default_factory=list)     # bool [grid_h, grid_w] per frame
    whole_frame: list = dataclasses.field(default_factory=list)  # per frame: why kept whole, or None


@dataclasses.dataclass
class _Sampled:
    """A sampled frame on its way into a temporal patch."""

    slot: int                 # sampled-frame index (the sampler's slot)
    index: int                # display-order index of the decoded frame
    time_s: Fraction
    pict_type: str
    keep: np.ndarray          # bool [grid_h, grid_w] the policy kept
    selection: object         # policy.Selection (its frame and previous frame convert to RGB)
    token_pruning: int = 0    # FRAME_META token_pruning code (protocol.TOKEN_PRUNING)


def _emit_overlapping(s: _Sampled, rows, pixels, previous, keeps) -> None:
    """The demo model's layout: one temporal patch per sampled frame, filled with (previous
    sampled frame, this frame); t = the slot."""
    grid_h, grid_w = s.keep.shape
    rows.append([s.slot, s.index, round(1000 * s.time_s), FRAME_TYPES.get(s.pict_type, 0),
                 grid_h, grid_w, int(s.keep.sum()), s.token_pruning])
    if s.keep.any():
        # Both converted at most once (policy.SampledFrame): the previous frame only now, if
        # its own selection kept nothing.
        rgb = s.selection.frame.rgb()
        before = rgb if s.selection.previous is None else s.selection.previous.rgb()
        pixels.append(rgb)
        previous.append(before if before.shape == rgb.shape else rgb)
        keeps.append(s.keep)


def _emit_pair(first: _Sampled, second: _Sampled | None, rows, pixels, previous,
               keeps) -> None:
    """A real checkpoint's layout (its video processor's): sampled frames 2k and 2k+1 fill one
    temporal patch, t = k. A lone frame (a gap in the samples, or the stream's end) fills
    both slots, as the processor repeats the last frame.

    A merge group is kept if either frame's selection kept it: the first frame's compares with
    the sampled frame before it (the previous pair's second), so a group is kept if it changed
    since the previous pair or inside this one. time_ms is the mean of the two frames' times
    (the processor's per-patch timestamp); frame_index the first frame's; the patch is an
    I-frame (an anchor) if either frame is.
    """
    last = second or first
    keep = first.keep | second.keep if second is not None else first.keep
    times = [first.time_s] + ([second.time_s] if second is not None else [])
    kind = "I" if "I" in (first.pict_type, last.pict_type) else last.pict_type
    grid_h, grid_w = keep.shape
    rows.append([first.slot // 2, first.index, round(1000 * sum(times) / len(times)),
                 FRAME_TYPES.get(kind, 0), grid_h, grid_w, int(keep.sum()),
                 # a pair is whole (vllm_evs_whole) if either frame is
                 max(first.token_pruning, last.token_pruning)])
    if keep.any():
        rgb = last.selection.frame.rgb()
        pixels.append(rgb)
        previous.append(first.selection.frame.rgb())
        keeps.append(keep)


def _kept_mask(row: list, first: _Sampled, second: _Sampled | None,
               geometry: Geometry) -> dict:
    """PARSE_STATS.kept_masks entry of the temporal patch `row` (a FRAME_META row) just
    emitted: the groups the ViT saw (a pair's: either frame's), at the time of its newest
    frame, the picture an operator page shows under them."""
    keep = first.keep | second.keep if second is not None else first.keep
    return pack_kept_mask(keep, t=row[META["t"]], time_s=(second or first).time_s,
                          group_px=geometry.group_pixels)


def _token_pruning(policy: str, whole_frame: str | None) -> int:
    """FRAME_META token_pruning of a sampled frame: vllm_evs frames are pruned after the ViT
    unless kept whole (protocol.TOKEN_PRUNING)."""
    if policy != "vllm_evs":
        return TOKEN_PRUNING.index("none")
    return TOKEN_PRUNING.index("vllm_evs_whole" if whole_frame else "vllm_evs")


class StreamParser:
    """Per-stream decoder, sampler and patch selection."""

    def __init__(self, geometry: Geometry, codec: str, source_fps: float, analysis_fps: float,
                 policy: str = "dense", config: PruningConfig | None = None,
                 skip_loop_filter: bool | str = False, window_seconds: float | None = None,
                 rotation: int = 0, max_pixels: int | None = None,
                 min_pixels: int | None = None, stream_id: str | int | None = None):
        """policy: the stream's policy for requests that name none ("" or None).

        config: None reads codec_parser's served settings (`PruningConfig.served`).
        window_seconds: the stream's LLM window; the whole-frame timer runs at most that long
        (`PruningConfig.for_window`), so every window holds one whole view. None: no window.
        rotation: degrees clockwise that turn the frames upright (codec.ROTATIONS).
        max_pixels: the pixel budget of a picture (codec_parser's max_pixels; None: none),
        min_pixels: the checkpoint's (None: smart_resize's default); `codec.picture_for`.
        stream_id: names the stream in errors (protocol.InvalidRequest).
        Raises ValueError for a bad rate, policy or rotation, UnknownCodec.
        """
        self.stream_id = stream_id
        self.geometry = geometry
        self.codec = codec
        self.config = (config or PruningConfig.served()).for_window(window_seconds)
        self.codec_signals = codec in CODEC_SIGNAL_CODECS
        self.decoder = StreamDecoder(codec, export_mvs=self.codec_signals,
                                     skip_loop_filter=skip_loop_filter)
        self.sampler = FrameSampler(source_fps, analysis_fps)
        self.policy = self._checked(policy)
        self.masks = StreamMasks(self.config, geometry, self.codec_signals, rotation,
                                 max_pixels, min_pixels)
        self.masks.picture_for(64, 64)   # a bad rotation is refused now, not at the first frame
        self.last_time: Fraction | None = None   # presentation time of the last decoded frame
        self.frame_shape = None    # (height, width) of decoded frames, once known
        self.refused_shapes: set[tuple[int, int]] = set()   # sizes no picture fits: skipped
        self._half: _Sampled | None = None   # frame 2k of a pair whose frame 2k+1 is due
        self._fitting_shapes: set[tuple[int, int]] = set()  # sizes checked and fitting

    @property
    def nbytes(self) -> int:
        """Rough bytes held: the decoder's reference frames (16 YUV 4:2:0 frames at most)
        plus the pruning state (luma and, once converted, RGB of the last sampled frame)."""
        if self.frame_shape is None:
            return 1 << 20
        height, width = self.frame_shape
        return int(height * width * 1.5 * 16) + self.masks.nbytes

    @staticmethod
    def _checked(policy: str) -> str:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        return policy

    def resolve_policy(self, requested: str | None) -> tuple[str, str | None]:
        """(policy applied, why it differs from the one requested or None)."""
        requested = self._checked(requested or self.policy)
        if requested == "codec" and not self.codec_signals:
            return FALLBACK_POLICY, (
                f"codec-guided pruning reads H.264 motion vectors, which FFmpeg does not export "
                f"for {self.codec}; this stream uses {FALLBACK_POLICY} instead (send H.264 to "
                "use codec)")
        return requested, None

    def frame_time(self, pts: float | None) -> Fraction:
        """A decoded frame's presentation time, s: its access unit's, or, if it had none or
        it is not after the previous frame's, that one + 1/source_fps (the first frame: 0)."""
        if pts is not None:
            time_s = Fraction(round(pts * PTS_UNITS), PTS_UNITS)
            if self.last_time is None or time_s > self.last_time:
                self.last_time = time_s
                return time_s
        self.last_time = Fraction(0) if self.last_time is None \
            else self.last_time + 1 / self.sampler.source_fps
        return self.last_time

    def _check_sizes(self, frames) -> list:
        """Frames whose size a picture fits; PictureTooLarge the first time a size does not
        (at START, for a stream's first frames), after which that size is skipped."""
        for f in frames:
            shape = (f.width, f.height)
            if shape in self.refused_shapes or shape in self._fitting_shapes:
                continue
            try:
                self.masks.picture_for(*shape)
                self._fitting_shapes.add(shape)
            except PictureTooLarge as e:
                self.refused_shapes.add(shape)
                raise InvalidRequest(self.stream_id, f"{e}; this stream is refused (a "
                                     "later frame of this size would be skipped): send a "
                                     "less elongated picture, or a smaller one, or raise "
                                     "codec_parser's max_pixels and vit_pruned's "
                                     "max_patches together if the picture is merely large"
                                     ) from e
        if not self.refused_shapes:
            return frames
        return [f for f in frames if (f.width, f.height) not in self.refused_shapes]

    def _pairs(self, s: _Sampled) -> list[tuple[_Sampled, _Sampled | None]]:
        """Temporal patches completed by sampled frame s (frame_layout "pairs"): the held
        first frame with s, or frames left alone by a gap or a size change."""
        out, half = [], self._half
        if half is not None and (half.slot // 2 != s.slot // 2
                                 or half.keep.shape != s.keep.shape):
            out.append((half, None))
            half = None
        if half is not None:
            out.append((half, s))
            half = None
        elif s.slot % 2 == 0:
            half = s
        else:                       # the pair's first frame was never sampled
            out.append((s, None))
        self._half = half
        return out

    def duplicate(self, chunk_bytes: int) -> ParseResult:
        """The answer to an exact re-send of the chunk processed last: no frame, no patch
        (patches float32 [0, patch_dim], positions int64 [0, 3], frame_meta int64 [0, 8]),
        stats with duplicate_chunk set, so llm_prefill answers its unchanged window."""
        policy, _ = self.resolve_policy(None)
        stats = ParseStats.empty(policy=policy, policy_requested=self.policy, codec=self.codec,
                                 chunk_bytes=chunk_bytes,
                                 whole_frame_seconds=self.config.whole_frame_seconds,
                                 duplicate_chunk=True)
        return ParseResult(np.zeros((0, self.geometry.patch_dim), np.float32),
                           np.zeros((0, 3), np.int64),
                           np.zeros((0, len(FRAME_META_COLUMNS)), np.int64), stats)

    def parse(self, chunk: bytes, policy: str | None = None, final: bool = False,
              au_bytes=None, au_pts=None) -> ParseResult:
        """Decode a chunk (and drain the decoder when final) and emit the sampled frames.

        policy: one of policy.POLICIES; None or "" uses the stream's policy.
        au_bytes, au_pts: the chunk's access units (AU_BYTES int [K], AU_PTS float stream
        seconds [K]); None: one unit without a time (frames 1/source_fps apart).
        Raises protocol.InvalidRequest (a ValueError) the first time a frame size cannot fit
        the pixel budget (a stream's first frames: at START); that size's frames are then
        skipped, with a note.
        """
        requested = policy or self.policy
        applied, note = self.resolve_policy(requested)
        t_start = time.perf_counter()
        errors_before = self.decoder.errors
        frames = self.decoder.feed(chunk, au_bytes=None if au_bytes is None else
                                   [int(n) for n in au_bytes], au_pts=au_pts)
        if final:
            frames += self.decoder.flush()
        decoded = len(frames)
        frame_types = "".join(f.pict_type for f in frames)
        frames = self._check_sizes(frames)
        t_decoded = time.perf_counter()
        signals = self.masks.observe(frames)
        t_signals = time.perf_counter()

        rows, pixels, previous, keeps, all_keeps, why = [], [], [], [], [], []
        kept_masks = []   # ParseStats.kept_masks: what the operator page overlays
        whole_frames = collections.Counter()
        candidates = select_s = convert_s = 0.0
        sampled = 0
        for f, signal in zip(frames, signals):
            self.masks.add(f, signal)
            time_s = self.frame_time(f.pts)
            slot = self.sampler.sample(time_s)
            if slot is None:
                continue
            sampled += 1
            self.frame_shape = (f.height, f.width)
            t0 = time.perf_counter()
            selection = self.masks.select(applied, f, float(time_s))
            t1 = time.perf_counter()
            select_s += t1 - t0
            keep = selection.keep
            if selection.whole_frame:
                whole_frames[selection.whole_frame] += 1
            if selection.fallback:
                note = selection.fallback
            candidates += selection.candidates
            all_keeps.append(keep)
            why.append(selection.whole_frame)
            this = _Sampled(slot, f.index, time_s, f.pict_type, keep, selection,
                            _token_pruning(applied, selection.whole_frame))
            if self.geometry.frame_layout == "pairs":
                for first, second in self._pairs(this):
                    _emit_pair(first, second, rows, pixels, previous, keeps)
                    kept_masks.append(_kept_mask(rows[-1], first, second, self.geometry))
            else:
                _emit_overlapping(this, rows, pixels, previous, keeps)
                kept_masks.append(_kept_mask(rows[-1], this, None, self.geometry))
            convert_s += time.perf_counter() - t1
        if final and self._half is not None:   # the stream ends inside a pair: a lone frame
            _emit_pair(self._half, None, rows, pixels, previous, keeps)
            kept_masks.append(_kept_mask(rows[-1], self._half, None, self.geometry))
            self._half = None
        meta = np.array(rows, dtype=np.int64).reshape(-1, len(FRAME_META_COLUMNS))
        t_patchify = time.perf_counter()
        if pixels:
            with_pixels = meta[meta[:, META["kept_groups"]] > 0]
            # lists, not np.stack: patchify copies only the kept groups of each frame
            patches, positions = patchify(pixels, self.geometry,
                                          frame_ids=with_pixels[:, META["t"]],
                                          keep=np.stack(keeps), previous=previous)
        else:
            patches = np.zeros((0, self.geometry.patch_dim), np.float32)
            positions = np.zeros((0, 3), np.int64)
        t_end = time.perf_counter()
        total_groups = int(meta[:, META["grid_h"]].dot(meta[:, META["grid_w"]]))
        kept_groups = int(meta[:, META["kept_groups"]].sum())
        codec_frames = [s for s in signals if s.intra_share is not None]
        errors = self.decoder.errors - errors_before
        served = self.masks.picture if sampled else None   # the last sampled frame's
        stats = ParseStats(
            whole_frame_seconds=self.config.whole_frame_seconds,
            served_size=[served.width, served.height] if served else None,
            rotation=self.masks.rotation,
            policy=applied, policy_requested=requested, codec=self.codec,
            chunk_bytes=len(chunk), frames_decoded=decoded, frames_sampled=sampled,
            frame_types=frame_types,
            patches_kept=int(len(patches)),
            patches_total=total_groups * self.geometry.patches_per_group,
            groups_kept=kept_groups, groups_total=total_groups,
            kept_share=kept_groups / total_groups if total_groups else None,
            groups_kept_per_frame=meta[:, META["kept_groups"]].tolist(),
            groups_flagged_by_codec=int(candidates) if applied == "codec" else None,
            whole_frames=dict(whole_frames),
            intra_share=float(np.mean([s.intra_share for s in codec_frames]))
            if codec_frames else None,
            moving_share=float(np.mean([s.moving_share for s in codec_frames]))
            if codec_frames else None,
            decode_errors=errors,
            decode_ms=(t_decoded - t_start) * 1000.0,
            signals_ms=(t_signals - t_decoded) * 1000.0,
            select_ms=select_s * 1000.0,
            convert_ms=convert_s * 1000.0,
            patchify_ms=(t_end - t_patchify) * 1000.0,
            parser_ms=(t_end - t_start) * 1000.0,
            policy_fallback=note,
            decode_error=self.decoder.last_error if errors else None,
            note=self._note(decoded, len(frames), len(chunk), errors),
            kept_masks=kept_masks,
        )
        return ParseResult(patches.astype(np.float32, copy=False), positions, meta, stats,
                           all_keeps, why)

    def _note(self, decoded: int, kept: int, chunk_bytes: int, errors: int) -> str | None:
        """Why a request with video decoded or kept no frame, else None."""
        if decoded and kept < decoded:
            sizes = ", ".join(f"{w}x{h}" for w, h in sorted(self.refused_shapes))
            return f"frames of size {sizes} skipped: no picture within max_pixels fits them"
        if decoded or not chunk_bytes:
            return None
        waiting = self.decoder.waiting
        if waiting:
            return waiting
        if errors:
            return "no frame decoded: the chunk was damaged (decode_error says how)"
        return ("no frame completed yet: the decoder holds this chunk's frames for B-frame "
                "reordering, and returns them with the next chunk")
