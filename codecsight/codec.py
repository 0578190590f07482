"""Server side: decode one stream's Annex-B chunks and read the codec's metadata.

`StreamDecoder` keeps the decoder of one stream across chunks: it is fed bytes, returns
decoded frames in display order with their frame type and motion vectors, and never raises
on damaged input (a camera stream with a bad packet must keep going). Frames stay lazy
`av.VideoFrame`s: converting to pixels is the expensive part, and only sampled frames pay it.
`FrameSampler` picks the frames analysed at the analysis rate; `frame_to_rgb` turns one into
pixels padded to whole merge groups, `frame_to_luma` copies its Y plane (no colour conversion).
`macroblock_signals` reads what the codec says about each 16x16 macroblock of a frame
(motion after global-motion compensation, intra coding): the input of codec-guided pruning.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Sequence

import av
import numpy as np

PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "SI", 6: "SP", 7: "BI"}  # AVPictureType
MACROBLOCK = 16  # H.264 macroblock side in pixels: the grid of the codec's motion signals
# FFmpeg's AVDiscard names accepted for skip_loop_filter ("noref": non-reference frames only).
LOOP_FILTER_SKIPS = ("none", "noref", "bidir", "nointra", "nokey", "all")


class UnknownCodec(ValueError):
    """A stream names a codec FFmpeg has no decoder for (PyAV's UnknownCodecError, translated
    so that callers need not know PyAV)."""


@dataclasses.dataclass
class DecodedFrame:
    """One decoded frame of a stream, with its codec metadata; pixels not converted."""

    index: int                              # display-order frame number in the stream, from 0
    pict_type: str                          # "I", "P" or "B" (frame.pict_type)
    keyframe: bool
    frame: av.VideoFrame                    # lazy: call frame_to_rgb only for frames you keep;
                                            # holding it pins a decoder picture buffer
    motion_vectors: np.ndarray | None       # FFmpeg AVMotionVector records [N]; None if the
                                            # frame has none (I-frames, or export off)
    corrupt: bool = False                   # decoded with errors concealed (damaged input)

    @property
    def width(self) -> int:
        return self.frame.width

    @property
    def height(self) -> int:
        return self.frame.height


class StreamDecoder:
    """Decoder of one compressed stream fed in chunks of Annex-B bytes.

    The codec's parser splits the bytes into access units and buffers an incomplete one, so
    feeds may be cut anywhere; with `complete=True` (the default, what `iter_chunks`
    guarantees) the chunk ends on an access-unit boundary and its last access unit is decoded
    at once instead of waiting for the next chunk's start code. Frames still come out with
    the decoder's reorder delay: with B-frames, the last one or two frames of a chunk are
    returned by the next `feed` (or by `flush`).
    """

    def __init__(self, codec: str = "h264", export_mvs: bool = True,
                 skip_loop_filter: bool | str = False, thread_count: int = 0):
        """skip_loop_filter: False/"none", True/"all", or another LOOP_FILTER_SKIPS name.

        Raises UnknownCodec if FFmpeg has no decoder named `codec`, ValueError for a bad
        skip_loop_filter.
        """
        self.codec = codec
        try:
            self._ctx = av.CodecContext.create(codec, "r")
        except av.codec.codec.UnknownCodecError as e:
            raise UnknownCodec(f"unknown codec {codec!r}: send h264 (the codec policy's input) "
                               "or another codec FFmpeg decodes") from e
        options = {}
        if export_mvs:
            options["flags2"] = "+export_mvs"
        skip = {False: "none", True: "all"}.get(skip_loop_filter, skip_loop_filter)
        if skip not in LOOP_FILTER_SKIPS:
            raise ValueError(f"skip_loop_filter must be one of {', '.join(LOOP_FILTER_SKIPS)}, "
                             f"got {skip_loop_filter!r}")
        if skip != "none":
            # Deblocking only smooths the picture; motion vectors and frame types are
            # unchanged. "all" decodes ~15% faster but lets pixels drift from the encoder's
            # within a GOP (PSNR down to ~33-35 dB on the sample); "noref" skips it only on
            # frames nothing is predicted from, so no error propagates.
            options["skip_loop_filter"] = skip
        self._ctx.options = options
        self._ctx.thread_count = thread_count   # 0: one per core (slice threads, no delay)
        self.frames_decoded = 0
        self.errors = 0              # damaged packets: rejected, or decoded with concealment
        self.corrupt_frames = 0      # of those, frames returned with errors concealed
        self.last_error: str | None = None
        self._draining = False

    def feed(self, data, complete: bool = True) -> list[DecodedFrame]:
        """Decode the access units in `data`; returns the frames now ready, display order.

        data: bytes-like (bytes, memoryview, uint8 numpy array as Triton hands it over).
        """
        if self._draining:
            raise RuntimeError("StreamDecoder was flushed: make a new one for a new stream")
        data = memoryview(data).cast("B")
        # an empty input would flush the parser mid-access-unit: there is nothing to parse
        packets = self._parse(data) if len(data) else []
        if complete:
            packets += self._parse(None)
        frames = []
        for packet in packets:
            frames += self._decode(packet)
        return frames

    def flush(self) -> list[DecodedFrame]:
        """End of stream: decode what the parser buffered and drain the reorder buffer."""
        frames = []
        if not self._draining:
            for packet in self._parse(None):
                frames += self._decode(packet)
            self._draining = True
            frames += self._decode(None)
        return frames

    def _parse(self, data: bytes | None) -> list[av.Packet]:
        try:
            return self._ctx.parse(data)
        except av.error.FFmpegError as e:
            self._record(e)
            return []

    def _decode(self, packet: av.Packet | None) -> list[DecodedFrame]:
        try:
            frames = self._ctx.decode(packet)
        except av.error.FFmpegError as e:
            # A damaged packet: drop it; the decoder conceals or resyncs at the next slice.
            self._record(e)
            return []
        return [self._wrap(f) for f in frames]

    def _wrap(self, frame: av.VideoFrame) -> DecodedFrame:
        side_data = frame.side_data.get("MOTION_VECTORS")
        decoded = DecodedFrame(
            index=self.frames_decoded,
            pict_type=PICT_TYPES.get(int(frame.pict_type), "?"),
            keyframe=bool(frame.key_frame),
            frame=frame,
            motion_vectors=side_data.to_ndarray() if side_data is not None else None,
            corrupt=bool(frame.is_corrupt),
        )
        self.frames_decoded += 1
        if decoded.corrupt:
            # Still returned: concealed frames keep their type and most motion vectors.
            self.corrupt_frames += 1
            self._record(f"frame {decoded.index} ({decoded.pict_type}) decoded with errors "
                         "concealed")
        return decoded

    def _record(self, error: Exception | str) -> None:
        self.errors += 1
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.last_error = message[:200]


class FrameSampler:
    """Which frames of a `source_fps` stream are analysed at `analysis_fps`.

    Frame 0 and then the first frame at or after each multiple of 1/analysis_fps seconds
    (frame i is shown at i/source_fps): frame i is sampled iff
    floor(i * analysis_fps / source_fps) > floor((i - 1) * analysis_fps / source_fps).
    Exact rational arithmetic, so 12.5 -> 2 fps gives 0, 7, 13, 19, 25, 32, ... forever.
    """

    def __init__(self, source_fps: float, analysis_fps: float):
        self.source_fps = _positive_rate("source_fps", source_fps)
        self.analysis_fps = _positive_rate("analysis_fps", analysis_fps)
        ratio = self.analysis_fps / self.source_fps
        self._num, self._den = ratio.numerator, ratio.denominator

    def is_sampled(self, index: int) -> bool:
        """True if display-order frame `index` (0-based) is analysed."""
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        return (index * self._num) // self._den > ((index - 1) * self._num) // self._den


def _positive_rate(name: str, value) -> Fraction:
    """A frame rate as an exact fraction (30000/1001 stays 30000/1001), validated."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of frames per second, got {value!r}") from None
    if not math.isfinite(as_float) or as_float <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    return Fraction(as_float).limit_denominator(1_000_000)


def padded_size(width: int, height: int, group_pixels: int) -> tuple[int, int]:
    """(width, height) rounded up to whole merge groups of group_pixels (28 for Qwen2-VL)."""
    if group_pixels < 1:
        raise ValueError(f"group_pixels must be >= 1, got {group_pixels}")
    return -(-width // group_pixels) * group_pixels, -(-height // group_pixels) * group_pixels


def frame_to_rgb(frame: av.VideoFrame, group_pixels: int) -> np.ndarray:
    """Pixels of a decoded frame, uint8 [Hp, Wp, 3] RGB, zero-padded bottom/right.

    Hp, Wp are height, width rounded up to multiples of group_pixels (the checkpoint's
    `Geometry.group_pixels`), so the frame splits into whole merge groups.
    """
    rgb = frame.to_ndarray(format="rgb24")
    height, width = rgb.shape[:2]
    padded_width, padded_height = padded_size(width, height, group_pixels)
    if (padded_width, padded_height) == (width, height):
        return rgb
    out = np.zeros((padded_height, padded_width, 3), np.uint8)
    out[:height, :width] = rgb
    return out


def frame_to_luma(frame: av.VideoFrame, group_pixels: int, step: int = 1) -> np.ndarray:
    """The Y plane of a decoded YUV frame, uint8 [Hp, Wp], zero-padded like frame_to_rgb.

    A plane copy, no colour conversion (~0.01 ms at 768x432): what pixel checks compare.
    step > 1: every step-th pixel of every step-th row only, [Hp/step, Wp/step]
    (group_pixels a multiple of step).
    """
    if frame.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "nv12", "gray"):
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    else:  # high bit depth or packed formats: let swscale produce 8-bit luma
        rows = frame.to_ndarray(format="gray")
    padded_width, padded_height = padded_size(frame.width, frame.height, group_pixels)
    out = np.zeros((padded_height // step, padded_width // step), np.uint8)
    picked = rows[:frame.height:step, :frame.width:step]
    out[:picked.shape[0], :picked.shape[1]] = picked
    return out


# Global motion is the median of at most this many evenly spaced vectors of a frame: as
# robust as all of them (a pan moves every block) at a fraction of the sorting.
_MEDIAN_SAMPLES = 256


def _median(values: np.ndarray) -> float:
    """Median of a 1-D array, from at most _MEDIAN_SAMPLES evenly spaced values.

    (np.median's checks cost more than the work here.)
    """
    if len(values) > _MEDIAN_SAMPLES:
        values = values[::len(values) // _MEDIAN_SAMPLES]
    n = len(values)
    half = n // 2
    part = np.partition(values, [half - 1, half] if n % 2 == 0 else half)
    return float(part[half]) if n % 2 else float(0.5 * (part[half - 1] + part[half]))


def macroblock_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, columns) of 16x16 macroblocks covering a width x height frame."""
    return -(-height // MACROBLOCK), -(-width // MACROBLOCK)


@dataclasses.dataclass
class MacroblockSignals:
    """What the codec says about each macroblock of F P/B-frames; arrays [F, mb_h, mb_w]."""

    moving: np.ndarray        # bool: some partition moved by >= threshold_px against its
                              # reference after global-motion compensation (a P-frame after
                              # B-frames references several frames back: larger motion)
    intra: np.ndarray         # bool: coded without a motion vector (intra prediction)
    global_motion_px: np.ndarray  # float32 [F, 2]: (dx, dy) the scene moved on screen since
                                  # the past reference: minus its median motion vector

    @property
    def intra_share(self) -> np.ndarray:
        """float [F]: share of each frame's macroblocks that are intra."""
        return self.intra.mean(axis=(1, 2))

    @property
    def moving_share(self) -> np.ndarray:
        """float [F]: share of each frame's macroblocks that move."""
        return self.moving.mean(axis=(1, 2))


def macroblock_signals(motion_vectors: Sequence[np.ndarray | None], width: int, height: int,
                       threshold_px: float,
                       bidirectional: Sequence[bool] | None = None) -> MacroblockSignals:
    """Per-macroblock motion and intra flags of P/B-frames from FFmpeg's exported vectors.

    motion_vectors: per frame, AVMotionVector records [N] (DecodedFrame.motion_vectors), all
    frames width x height; None or empty means no macroblock has a vector (an all-intra
    P-frame). bidirectional: per frame, whether it may reference the future (B-frames);
    None: read every vector's `source`. A macroblock moves if any of its partitions (split
    macroblocks give several, bi-predicted ones one per direction) moved by at least
    threshold_px: an object edge often covers only part of a macroblock. Global motion (a
    camera pan) is the median vector of each reference direction of each frame, subtracted
    first: past and future references point opposite ways and lie at different distances,
    so one median over both would leave a pan's motion behind.

    Frames are processed together, in the codec's integer motion units (FFmpeg writes one
    motion_scale per frame): the metadata must stay a small fraction of decoding, and
    per-frame numpy calls would cost more than the work.
    """
    mb_h, mb_w = macroblock_grid(width, height)
    cells = mb_h * mb_w
    shape = (len(motion_vectors), mb_h, mb_w)
    global_motion = np.zeros((len(motion_vectors), 2), np.float32)
    present = [k for k, mv in enumerate(motion_vectors) if mv is not None and len(mv)]
    if not present:
        return MacroblockSignals(np.zeros(shape, bool), np.ones(shape, bool), global_motion)
    frames = [motion_vectors[k] for k in present]
    sizes = np.array([len(m) for m in frames])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # Only the fields used, one by one: concatenating the structured records is 10x slower.
    dx = np.concatenate([m["motion_x"] for m in frames])
    dy = np.concatenate([m["motion_y"] for m in frames])
    scale = np.array([m["motion_scale"][0] for m in frames], np.float32)

    # Median motion per frame (the past direction of B-frames). Where more than half of a
    # frame's vectors are 0 on an axis, as with a still camera, that median is 0 unsorted.
    median_x = np.zeros(len(frames), np.float32)
    median_y = np.zeros(len(frames), np.float32)
    zero_x = np.add.reduceat(dx == 0, starts) * 2 > sizes
    zero_y = np.add.reduceat(dy == 0, starts) * 2 > sizes
    future_rows = []   # B-frames: (rows, their own median - the frame's, frame)
    maybe_future = np.ones(len(frames), bool) if bidirectional is None else \
        np.array([bidirectional[k] for k in present], bool)
    for i in np.flatnonzero(maybe_future | ~zero_x | ~zero_y).tolist():
        start, size = starts[i], sizes[i]
        future = frames[i]["source"] > 0 if maybe_future[i] else None
        if future is not None and future.any():
            past_rows = start + np.flatnonzero(~future)
            ahead = start + np.flatnonzero(future)
            if len(past_rows):
                median_x[i], median_y[i] = _median(dx[past_rows]), _median(dy[past_rows])
            future_rows.append((ahead, _median(dx[ahead]) - median_x[i],
                                _median(dy[ahead]) - median_y[i], i))
            continue
        if not zero_x[i]:
            median_x[i] = _median(dx[start:start + size])
        if not zero_y[i]:
            median_y[i] = _median(dy[start:start + size])
    if median_x.any() or median_y.any() or future_rows:
        dx = dx - np.repeat(median_x, sizes)
        dy = dy - np.repeat(median_y, sizes)
        for rows, rest_x, rest_y, i in future_rows:
            dx[rows] -= rest_x
            dy[rows] -= rest_y
            if median_x[i] == median_y[i] == 0 and len(rows) == sizes[i]:
                # only future references: the scene moved +v towards the future one
                median_x[i], median_y[i] = -rest_x, -rest_y
    # vectors point from the block to its source in the past: the scene moved -v
    global_motion[present] = np.stack([-median_x / scale, -median_y / scale], axis=1)

    # A partition moves if |motion - global motion| >= threshold, in motion units.
    limit = np.square(np.float32(threshold_px) * scale)
    if (limit == limit[0]).all():
        # one scalar; an integer one while the motion is still integer (no median removed)
        limit = int(np.ceil(limit[0])) if dx.dtype.kind == "i" else limit[0]
    else:
        limit = np.repeat(limit, sizes)
    fast = dx * dx + dy * dy >= limit
    # dst_x/dst_y are partition centres, inside their macroblock (clamped for safety);
    # >> 4 is // 16 at a third of the cost on int16
    row = np.minimum(np.concatenate([m["dst_y"] for m in frames]) >> 4, mb_h - 1)
    col = np.minimum(np.concatenate([m["dst_x"] for m in frames]) >> 4, mb_w - 1)
    row = row.astype(np.int32)   # row * mb_w overflows int16 past 32767 macroblocks (8K)
    index = np.repeat(np.array(present, np.int32) * cells, sizes) + row * mb_w + col
    moving = np.zeros(shape[0] * cells, bool)
    moving[index[fast]] = True
    intra = np.ones(shape[0] * cells, bool)
    intra[index] = False
    return MacroblockSignals(moving.reshape(shape), intra.reshape(shape), global_motion)
