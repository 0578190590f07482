"""Server side: decode one stream's Annex-B chunks and read the codec's metadata.

`StreamDecoder` keeps the decoder of one stream across chunks: it is fed bytes, returns
decoded frames in display order with their frame type and motion vectors, and never raises
on damaged input (a camera stream with a bad packet must keep going). Frames stay lazy
`av.VideoFrame`s: converting to pixels is the expensive part, and only sampled frames pay it.
Each frame carries its presentation time (the access unit's AU_PTS) through the decoder's
reordering. `FrameSampler` picks the frames analysed at the analysis rate, by time.
`Picture` says how a decoded frame becomes the picture the ViT sees (turned upright, scaled
to the pixel budget); `frame_to_rgb` turns a frame into those pixels padded to whole merge
groups, `frame_to_luma` gives its Y plane the same way (a plane copy when nothing changes).
`macroblock_signals` reads what the codec says about each 16x16 macroblock of a frame
(motion after global-motion compensation, intra coding): the input of codec-guided pruning.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from fractions import Fraction
from typing import Sequence

import av
import numpy as np
from av.video.reformatter import VideoReformatter

PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "SI", 6: "SP", 7: "BI"}  # AVPictureType
MACROBLOCK = 16  # H.264 macroblock side in pixels: the grid of the codec's motion signals
# FFmpeg's AVDiscard names accepted for skip_loop_filter ("noref": non-reference frames only).
LOOP_FILTER_SKIPS = ("none", "noref", "bidir", "nointra", "nokey", "all")
ROTATIONS = (0, 90, 180, 270)  # degrees clockwise that turn a camera's frames upright
PTS_UNITS = 1_000_000  # packet timestamps in microseconds: AU_PTS seconds, exactly enough
# H.264 NAL unit types: coded slices (1-5), sequence / picture parameter sets.
_H264_SLICES, _H264_SPS = range(1, 6), 7
# numpy dtype of FFmpeg's AVMotionVector records, read once from PyAV (whose to_ndarray
# rebuilds it on every call, ~10 us a frame against ~1 us for np.frombuffer with it cached).
_motion_vector_dtype: np.dtype | None = None

try:
    from codecsight import _codec_kernels
except ImportError as error:   # not built: `pip install -e .` compiles it (scripts/setup.sh)
    _codec_kernels = None
    warnings.warn(f"codecsight's compiled kernel is not built ({error}); codec metadata "
                  "falls back to numpy, at several times the cost. Run scripts/setup.sh.",
                  RuntimeWarning, stacklevel=2)


# One swscale converter per thread, reused for every frame. VideoFrame.reformat / to_ndarray
# keep a converter (an SwsContext) on each frame object, so every new frame paid swscale's
# set-up: ~3.9 ms per 640x360 frame to RGB against ~0.8 ms with one kept (sws_getCachedContext
# rebuilds it only when sizes or formats change). The output is the same, byte for byte.
_converters = threading.local()


def convert_frame(frame: av.VideoFrame, format: str, width: int | None = None,
                  height: int | None = None, interpolation: str | None = None) -> np.ndarray:
    """frame converted by swscale to `format` (PyAV's name: "rgb24", "gray", ...) at width x
    height (None: the frame's), as a numpy array ([H, W, 3] uint8 for rgb24, [H, W] for gray;
    VideoFrame.to_ndarray's layout). interpolation: swscale's scaler (None: BILINEAR)."""
    converter = getattr(_converters, "converter", None)
    if converter is None:
        converter = _converters.converter = VideoReformatter()
    return converter.reformat(frame, width=width, height=height, format=format,
                              interpolation=interpolation).to_ndarray()


def motion_vectors_array(side_data) -> np.ndarray:
    """A frame's MOTION_VECTORS side data as AVMotionVector records [N] (a view, no copy)."""
    global _motion_vector_dtype
    if _motion_vector_dtype is None:
        _motion_vector_dtype = side_data.to_ndarray().dtype
    return np.frombuffer(side_data, dtype=_motion_vector_dtype)

WAITING_FOR_PARAMETER_SETS = ("waiting for SPS/PPS/IDR: the raw H.264 stream was joined "
                              "mid-GOP, frames start at its next keyframe")


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
    pts: float | None = None                # presentation time, stream seconds, from the
                                            # access unit's AU_PTS; None if it had none

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
        self._parameter_sets = False      # an SPS was seen (H.264)
        self._slices_without_sps = False  # slices arrived before any SPS: joined mid-GOP

    def feed(self, data, complete: bool = True, au_bytes: Sequence[int] | None = None,
             au_pts: Sequence[float] | None = None) -> list[DecodedFrame]:
        """Decode the access units in `data`; returns the frames now ready, display order.

        data: bytes-like (bytes, memoryview, uint8 numpy array as Triton hands it over).
        au_bytes, au_pts: the wire's AU_BYTES / AU_PTS, bytes and presentation time (stream
        seconds) of each access unit of data in decode order; the time rides on the access
        unit's packet through the decoder's reordering to its frame (DecodedFrame.pts). None:
        data is one unit without a time. A unit the parser splits into several packets (a
        blob of many access units) gives its time to the first of them only.
        """
        if self._draining:
            raise RuntimeError("StreamDecoder was flushed: make a new one for a new stream")
        data = memoryview(data).cast("B")
        if au_bytes is None:
            units = [(data, None)]
        else:
            if au_pts is None or len(au_pts) != len(au_bytes) or sum(au_bytes) != len(data):
                raise ValueError(f"au_bytes ({len(au_bytes)} sizes, {sum(au_bytes)} bytes) and "
                                 f"au_pts must describe the {len(data)}-byte data")
            ends = np.cumsum(np.asarray(au_bytes, np.int64)).tolist()
            units = [(data[a:b], t) for a, b, t in zip([0] + ends[:-1], ends, au_pts)]
        frames = []
        for k, (unit, pts) in enumerate(units):
            if self.codec == "h264" and not self._parameter_sets:
                self._scan_parameter_sets(unit)
            # an empty input would flush the parser mid-access-unit: there is nothing to parse
            packets = self._parse(unit) if len(unit) else []
            # With boundaries known every unit is complete: flush the parser after each, so
            # its packet (and time) is decoded now rather than at the next start code.
            if au_bytes is not None or (complete and k == len(units) - 1):
                packets += self._parse(None)
            for i, packet in enumerate(packets):
                if pts is not None and i == 0:
                    packet.pts = round(float(pts) * PTS_UNITS)
                frames += self._decode(packet)
        return frames

    def _scan_parameter_sets(self, data: memoryview) -> None:
        """Note whether H.264 data holds an SPS, or slices (to name the wait for one)."""
        for nal_type in h264_nal_types(bytes(data)):
            if nal_type == _H264_SPS:
                self._parameter_sets = True
                return
            if nal_type in _H264_SLICES:
                self._slices_without_sps = True

    @property
    def waiting(self) -> str | None:
        """Why no frame has come out yet, if none has: None once one has."""
        if self.frames_decoded:
            return None
        if self.codec == "h264" and not self._parameter_sets and self._slices_without_sps:
            return WAITING_FOR_PARAMETER_SETS
        if self.codec == "h264" and self._parameter_sets:
            return ("waiting for a keyframe: joined mid-GOP (or an intra-refresh stream "
                    "before its recovery point)")
        return None

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
            if self.waiting == WAITING_FOR_PARAMETER_SETS:
                # Slices before any SPS are not damage: FFmpeg's "Invalid data" would only
                # hide that the stream must reach a keyframe first (DecodedFrame-less wait).
                return []
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
            motion_vectors=motion_vectors_array(side_data) if side_data is not None else None,
            corrupt=bool(frame.is_corrupt),
            pts=None if frame.pts is None else frame.pts / PTS_UNITS,
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


def h264_nal_types(data: bytes):
    """H.264 NAL unit types of Annex-B data, in order (1-5 slices, 5 IDR, 7 SPS, 8 PPS)."""
    pos = data.find(b"\x00\x00\x01")
    while pos != -1 and pos + 3 < len(data):
        yield data[pos + 3] & 0x1F
        pos = data.find(b"\x00\x00\x01", pos + 3)


class FrameSampler:
    """Which frames of a stream are analysed at `analysis_fps`, by presentation time.

    Time is cut into slots of 1/analysis_fps seconds; a frame is sampled when it is the first
    to reach a slot after the last sampled one: slot(time) = floor(time * analysis_fps) >
    the last sampled slot (so the first frame after a gap is sampled, and a burst of frames
    inside one slot gives one). The slot is the frame's temporal index t: a gap in the video
    stays a gap in t. Exact rational arithmetic on times given in whole microseconds (the
    wire's AU_PTS, or index / source_fps), so a constant 12.5 fps stream sampled at 2 fps
    gives frames 0, 7, 13, 19, 25, 32, ... forever.
    """

    def __init__(self, source_fps: float, analysis_fps: float):
        self.source_fps = _positive_rate("source_fps", source_fps)
        self.analysis_fps = _positive_rate("analysis_fps", analysis_fps)
        self.last_slot: int | None = None   # slot of the last sampled frame (sample())

    def slot(self, time_s: Fraction | float) -> int:
        """floor(time * analysis_fps); time in seconds, rounded to whole microseconds first
        (half a microsecond of tolerance, so an exact multiple never falls a slot short)."""
        micros = Fraction(time_s) if isinstance(time_s, (int, Fraction)) else \
            Fraction(round(float(time_s) * PTS_UNITS), PTS_UNITS)
        return math.floor((micros + Fraction(1, 2 * PTS_UNITS)) * self.analysis_fps)

    def sample(self, time_s: Fraction | float) -> int | None:
        """The slot t of a frame shown at time_s if it is sampled, else None; frames in
        display order (a time before the last sampled slot is not sampled)."""
        slot = self.slot(time_s)
        if self.last_slot is not None and slot <= self.last_slot:
            return None
        self.last_slot = slot
        return slot

    def frame_time(self, index: int) -> Fraction:
        """index / source_fps: the time of frame `index` of a constant-rate stream, s."""
        return index / self.source_fps

    def is_sampled(self, index: int) -> bool:
        """True if display-order frame `index` (0-based) of a constant-rate stream is
        analysed (stateless: the same rule as `sample` on index / source_fps)."""
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        return index == 0 or self.slot(self.frame_time(index)) > self.slot(
            self.frame_time(index - 1))


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


class PictureTooLarge(ValueError):
    """A frame that no size within the pixel budget can hold (e.g. an extreme aspect ratio)."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis of the upright picture, as the source frame's macroblocks cover it."""

    macroblocks: int     # macroblocks along it
    source_pixels: int   # decoded frame's pixels along it
    scaled_pixels: int   # the picture's pixels along it (before padding)
    offset: int          # where macroblock 0 starts, source px: 0, or <= 0 when the rotation
                         # reverses the axis (the partial last macroblock comes first)


@dataclasses.dataclass(frozen=True)
class Picture:
    """How a decoded frame becomes the picture the ViT sees: turned upright by `rotation`
    (degrees clockwise), then scaled to width x height (swscale), then zero-padded to whole
    merge groups. A frame within the pixel budget keeps its size exactly (`picture_for`)."""

    source_width: int
    source_height: int
    rotation: int        # ROTATIONS
    width: int           # upright, scaled; multiples of group_pixels when scaled
    height: int
    group_pixels: int

    @property
    def k(self) -> int:
        """np.rot90's k (counter-clockwise quarter turns) for a clockwise rotation."""
        return -self.rotation // 90

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) turned upright, before scaling."""
        if self.rotation in (90, 270):
            return self.source_height, self.source_width
        return self.source_width, self.source_height

    @property
    def scaled(self) -> bool:
        return (self.width, self.height) != self.upright_size

    @property
    def grid(self) -> tuple[int, int]:
        """(grid_h, grid_w): merge groups of the padded picture."""
        width, height = padded_size(self.width, self.height, self.group_pixels)
        return height // self.group_pixels, width // self.group_pixels

    def _scaled_source(self, frame: av.VideoFrame, fmt: str) -> np.ndarray:
        """The frame at the picture's scale, still in the source orientation: [h, w(, 3)]."""
        width, height = (self.height, self.width) if self.rotation in (90, 270) \
            else (self.width, self.height)
        # Bicubic, as Qwen's image processors resize.
        return convert_frame(frame, fmt, width, height, "BICUBIC")

    def _finish(self, pixels: np.ndarray) -> np.ndarray:
        """Turn upright and zero-pad bottom/right to whole merge groups."""
        if self.k % 4:
            pixels = np.rot90(pixels, self.k)
        height, width = pixels.shape[:2]
        padded_width, padded_height = padded_size(width, height, self.group_pixels)
        if (padded_width, padded_height) == (width, height):
            return np.ascontiguousarray(pixels)
        out = np.zeros((padded_height, padded_width) + pixels.shape[2:], np.uint8)
        out[:height, :width] = pixels
        return out

    def rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """uint8 [Hp, Wp, 3] RGB of the picture, padded to whole merge groups."""
        rgb = self._scaled_source(frame, "rgb24") if self.scaled \
            else convert_frame(frame, "rgb24")
        return self._finish(rgb)

    def luma(self, frame: av.VideoFrame) -> np.ndarray:
        """uint8 [Hp, Wp] Y plane of the picture, padded like rgb (a plane copy unscaled)."""
        if self.scaled:
            return self._finish(self._scaled_source(frame, "gray"))
        if self.k % 4 == 0:
            return frame_to_luma(frame, self.group_pixels)
        return self._finish(frame_to_luma(frame, 1))

    def upright_macroblocks(self, flags: np.ndarray) -> np.ndarray:
        """A source frame's macroblock grid [..., mb_h, mb_w] turned upright (a view)."""
        return np.rot90(flags, self.k, axes=(-2, -1)) if self.k % 4 else flags

    def axes(self) -> tuple[Axis, Axis]:
        """(rows, columns) of the upright macroblock grid against the picture."""
        mb_h, mb_w = macroblock_grid(self.source_width, self.source_height)
        vertical = (mb_h, self.source_height)     # source rows
        horizontal = (mb_w, self.source_width)    # source columns
        # (source axis, reversed) that becomes the upright rows / columns
        rows, cols = {0: ((vertical, False), (horizontal, False)),
                      90: ((horizontal, False), (vertical, True)),
                      180: ((vertical, True), (horizontal, True)),
                      270: ((horizontal, True), (vertical, False))}[self.rotation]

        def axis(source, reverse, scaled):
            cells, length = source
            return Axis(cells, length, scaled, length - cells * MACROBLOCK if reverse else 0)

        return axis(*rows, self.height), axis(*cols, self.width)


def picture_for(width: int, height: int, group_pixels: int, rotation: int = 0,
                max_pixels: int | None = None, min_pixels: int | None = None) -> Picture:
    """The picture a width x height frame becomes: Qwen's resolution rule.

    Turned upright by rotation (degrees clockwise, ROTATIONS). If the upright frame padded
    to whole merge groups has at most max_pixels pixels (None: no budget) it keeps its size
    exactly; otherwise it is scaled to transformers' Qwen2-VL `smart_resize` (factor =
    group_pixels, min_pixels and max_pixels: sides multiples of the group, area within the
    budget, aspect ratio kept as nearly as possible). Raises PictureTooLarge when no such
    size exists (smart_resize refuses an aspect ratio over 200, or its size is still over
    the budget), ValueError for a rotation not in ROTATIONS.
    """
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {', '.join(map(str, ROTATIONS))} degrees "
                         f"clockwise, got {rotation}")
    up_w, up_h = (height, width) if rotation in (90, 270) else (width, height)
    padded_w, padded_h = padded_size(up_w, up_h, group_pixels)
    if max_pixels is None or padded_w * padded_h <= max_pixels:
        return Picture(width, height, rotation, up_w, up_h, group_pixels)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    minimum = {} if min_pixels is None else {"min_pixels": min_pixels}
    try:
        new_h, new_w = smart_resize(up_h, up_w, factor=group_pixels, max_pixels=max_pixels,
                                    **minimum)
    except ValueError as e:
        raise PictureTooLarge(f"a {width}x{height} frame cannot be scaled within "
                              f"max_pixels={max_pixels}: {e}") from None
    if new_w * new_h > max_pixels:
        raise PictureTooLarge(f"a {width}x{height} frame cannot be scaled within "
                              f"max_pixels={max_pixels}: its smallest {group_pixels}-pixel "
                              f"sides give {new_w}x{new_h}; send a less elongated picture")
    return Picture(width, height, rotation, new_w, new_h, group_pixels)


def frame_to_rgb(frame: av.VideoFrame, group_pixels: int,
                 picture: Picture | None = None) -> np.ndarray:
    """Pixels of a decoded frame, uint8 [Hp, Wp, 3] RGB, zero-padded bottom/right.

    Hp, Wp are height, width rounded up to multiples of group_pixels (the checkpoint's
    `Geometry.group_pixels`), so the frame splits into whole merge groups. picture: turn
    and scale it first (`Picture.rgb`); None keeps the frame as decoded.
    """
    if picture is not None:
        return picture.rgb(frame)
    rgb = convert_frame(frame, "rgb24")
    height, width = rgb.shape[:2]
    padded_width, padded_height = padded_size(width, height, group_pixels)
    if (padded_width, padded_height) == (width, height):
        return rgb
    out = np.zeros((padded_height, padded_width, 3), np.uint8)
    out[:height, :width] = rgb
    return out


def _luma_plane(frame: av.VideoFrame) -> np.ndarray:
    """The Y plane of a decoded frame, uint8 [H, >= W]: a view of the plane's rows (their
    line size may exceed the width) for 8-bit YUV, else swscale's 8-bit gray conversion."""
    if frame.format.name in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "nv12", "gray"):
        plane = frame.planes[0]
        return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return convert_frame(frame, "gray")   # high bit depth or packed formats


def frame_to_luma(frame: av.VideoFrame, group_pixels: int, step: int = 1) -> np.ndarray:
    """The Y plane of a decoded YUV frame, uint8 [Hp, Wp], zero-padded like frame_to_rgb.

    A plane copy, no colour conversion (~0.01 ms at 768x432): what pixel checks compare.
    step > 1: every step-th pixel of every step-th row only, [Hp/step, Wp/step]
    (group_pixels a multiple of step).
    """
    rows = _luma_plane(frame)
    padded_width, padded_height = padded_size(frame.width, frame.height, group_pixels)
    out = np.zeros((padded_height // step, padded_width // step), np.uint8)
    picked = rows[:frame.height:step, :frame.width:step]
    out[:picked.shape[0], :picked.shape[1]] = picked
    return out


def valid_pixels(width: int, height: int, group: int) -> np.ndarray:
    """Pixels of each group that lie inside a width x height frame: float32 [grid_h, grid_w]."""
    grid_h, grid_w = -(-height // group), -(-width // group)
    per_row = np.minimum(height - np.arange(grid_h) * group, group)
    per_col = np.minimum(width - np.arange(grid_w) * group, group)
    return np.outer(per_row, per_col).astype(np.float32)


def changed_macroblocks(frame: av.VideoFrame, previous: av.VideoFrame, threshold: float,
                        step: int = 4) -> np.ndarray:
    """Macroblocks whose mean |dY| between two frames exceeds threshold: bool [mb_h, mb_w].

    threshold in 8-bit levels. The mean is over every step-th pixel of every step-th row
    that lies inside the frame (step 4: a macroblock's 4x4 sample; MACROBLOCK a multiple of
    step): a scene cut changes whole macroblocks, and the full planes would cost ~1 ms a
    frame at 768x432. Read straight from the two Y planes, no padded copies, by the compiled
    kernel (~0.1 ms for numpy's ~15 calls at 640x360; _changed_macroblocks_numpy is the
    reference and the fallback). Raises ValueError if the frames differ in size.
    """
    width, height = frame.width, frame.height
    if (previous.width, previous.height) != (width, height):
        raise ValueError(f"frames of different sizes ({width}x{height}, "
                         f"{previous.width}x{previous.height}) have no macroblocks in common")
    if _codec_kernels is None:
        return _changed_macroblocks_numpy(frame, previous, threshold, step)
    a, b = _luma_plane(frame), _luma_plane(previous)
    out = np.empty(macroblock_grid(width, height), bool)
    _codec_kernels.changed_macroblocks(a, a.shape[1], b, b.shape[1], width, height, step,
                                       float(threshold), out)
    return out


def _changed_macroblocks_numpy(frame: av.VideoFrame, previous: av.VideoFrame,
                               threshold: float, step: int = 4) -> np.ndarray:
    """changed_macroblocks in numpy (frames of one size)."""
    width, height = frame.width, frame.height
    a = _luma_plane(frame)[:height:step, :width:step]
    b = _luma_plane(previous)[:height:step, :width:step]
    diff = np.abs(a.astype(np.int16) - b)                # [rows, cols] sampled |dY|
    cell = MACROBLOCK // step                            # samples per macroblock side
    rows, cols = diff.shape
    mb_h, mb_w = -(-rows // cell), -(-cols // cell)
    if (rows, cols) != (mb_h * cell, mb_w * cell):       # partial macroblocks: pad with 0
        padded = np.zeros((mb_h * cell, mb_w * cell), np.int16)
        padded[:rows, :cols] = diff
        diff = padded
    # sums over each cell x cell block: strided slices added (numpy's reductions over short
    # inner axes cost several times more)
    across = diff[0::cell].astype(np.int32)
    for k in range(1, cell):
        across += diff[k::cell]
    sums = across[:, 0::cell].copy()
    for k in range(1, cell):
        sums += across[:, k::cell]
    samples = valid_pixels(cols, rows, cell)              # samples inside the frame per MB
    return sums > threshold * np.maximum(samples, 1)


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


def _direction_medians(dx: np.ndarray, dy: np.ndarray, future: np.ndarray,
                       starts: np.ndarray, sizes: np.ndarray, ahead: np.ndarray,
                       split: np.ndarray) -> np.ndarray:
    """_median of each split frame's past and future vectors: float64 [4, S] (past x, past
    y, future x, future y; past 0 where a frame has no past reference).

    dx, dy: int [N], future: bool [N], starts/sizes/ahead (future vectors): int [F], split:
    bool [F] (ahead > 0). A median is provably 0, without sorting, where the sampled values
    (every (n // _MEDIAN_SAMPLES)-th of the direction's n, as _median takes them) have both
    middle order statistics 0: at most that many negatives below them and enough zeros to
    reach them. With a still camera that is every one, so B-frames cost no per-frame call;
    the others take _median on their own rows.
    """
    frames = len(sizes)
    owner = np.repeat(np.arange(frames), sizes)
    segment = 2 * owner + future                                 # (frame, direction)
    counts = np.stack([sizes - ahead, ahead], axis=1).ravel()    # [2F]
    step = np.where(counts > _MEDIAN_SAMPLES, counts // _MEDIAN_SAMPLES, 1)
    sampled = np.ones(len(dx), bool)
    if (step > 1).any():
        # each vector's rank among its frame's vectors of the same direction
        futures_before = np.cumsum(future) - future
        rank_future = futures_before - futures_before[starts][owner]
        rank = np.where(future, rank_future, np.arange(len(dx)) - starts[owner] - rank_future)
        thinned = step[segment] > 1
        sampled[thinned] = rank[thinned] % step[segment[thinned]] == 0
    kept = -(-counts // step)
    low, high = np.maximum((kept - 1) // 2, 0), kept // 2        # the middle ranks
    out = np.zeros((4, int(split.sum())))
    for axis, values in enumerate((dx, dy)):
        picked = segment[sampled & (values < 0)], segment[sampled & (values == 0)]
        negative, zero = (np.bincount(p, minlength=2 * frames) for p in picked)
        provably_zero = (negative <= low) & (negative + zero > high)
        for j, i in enumerate(np.flatnonzero(split).tolist()):
            start, size = starts[i], sizes[i]
            for direction in (0, 1):
                if counts[2 * i + direction] and not provably_zero[2 * i + direction]:
                    rows = start + np.flatnonzero(future[start:start + size] == direction)
                    out[axis + 2 * direction, j] = _median(values[rows])
    return out


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
    counts: np.ndarray | None = dataclasses.field(default=None, repr=False)
    # int64 [F, 2]: intra and moving macroblocks per frame, where the compiled kernel counted
    # them as it went (None: counted from the flags when asked)

    @property
    def intra_share(self) -> np.ndarray:
        """float64 [F]: share of each frame's macroblocks that are intra."""
        return self._share(0, self.intra)

    @property
    def moving_share(self) -> np.ndarray:
        """float64 [F]: share of each frame's macroblocks that move."""
        return self._share(1, self.moving)

    def _share(self, column: int, flags: np.ndarray) -> np.ndarray:
        if self.counts is None:
            return _share(flags)
        return self.counts[:, column] / (flags.shape[1] * flags.shape[2])


def _share(flags: np.ndarray) -> np.ndarray:
    """float64 [F]: share of True per frame of bool [F, h, w] (equal to mean(axis=(1, 2)),
    at a fraction of its cost: counts are exact, one division each)."""
    frames, height, width = flags.shape
    return np.count_nonzero(flags.reshape(frames, height * width), axis=1) / (height * width)


def macroblock_signals(motion_vectors: Sequence[np.ndarray | None], width: int, height: int,
                       threshold_px: float,
                       bidirectional: Sequence[bool] | None = None) -> MacroblockSignals:
    """Per-macroblock motion and intra flags of P/B-frames from FFmpeg's exported vectors.

    motion_vectors: per frame, AVMotionVector records [N] (DecodedFrame.motion_vectors), all
    frames width x height; None or empty means no macroblock has a vector (an all-intra
    P-frame). bidirectional: per frame, whether it may reference the future (B-frames);
    None: read every vector's `source`. Returns MacroblockSignals with arrays [F, mb_h, mb_w]
    (16x16 macroblocks) and global motion float32 [F, 2] in pixels.

    A macroblock moves if any of its partitions moved by at least threshold_px after
    global-motion compensation; see _macroblock_signals_numpy for the method. This runs the
    compiled kernel (codecsight/_codec_kernels.c, one pass per frame: ~60 numpy calls a batch
    cost more than the work at a few hundred vectors a frame), which computes exactly what the
    numpy version computes (tests/test_codec_kernels.py); where the extension is not built it
    falls back to numpy, with one warning. Raises ValueError if the records are not
    AVMotionVector records or bidirectional has the wrong length.
    """
    if _codec_kernels is None:
        return _macroblock_signals_numpy(motion_vectors, width, height, threshold_px,
                                         bidirectional)
    mb_h, mb_w = macroblock_grid(width, height)
    count = len(motion_vectors)
    moving = np.empty((count, mb_h, mb_w), bool)
    intra = np.empty((count, mb_h, mb_w), bool)
    global_motion = np.empty((count, 2), np.float32)
    counts = np.empty((count, 2), np.int64)
    layout, frames = None, []
    for mv in motion_vectors:
        if mv is None or not len(mv):
            frames.append(None)
            continue
        own = _kernel_layout(mv.dtype)
        if layout is not None and own != layout:
            raise ValueError(f"motion vector records of one call must share a dtype; got "
                             f"{mv.dtype} after {layout}")
        layout = own
        frames.append(np.ascontiguousarray(mv))
    if bidirectional is not None:
        if len(bidirectional) != count:
            raise ValueError(f"bidirectional has {len(bidirectional)} flags for {count} frames")
        bidirectional = np.ascontiguousarray(bidirectional, bool)   # one byte a frame
    _codec_kernels.macroblock_signals(frames, bidirectional, layout or _NO_RECORDS, mb_h,
                                      mb_w, float(threshold_px), moving, intra, global_motion,
                                      counts)
    return MacroblockSignals(moving, intra, global_motion, counts)


_MOTION_VECTOR_FIELDS = ("source", "dst_x", "dst_y", "motion_x", "motion_y", "motion_scale")
_MOTION_VECTOR_TYPES = ("<i4", "<i2", "<i2", "<i4", "<i4", "<u2")


def _kernel_layout(dtype: np.dtype) -> tuple[int, ...]:
    """(itemsize, byte offset of each field the kernel reads) of an AVMotionVector dtype.

    Raises ValueError naming the field if a record lacks one or stores it in another type
    (the kernel reads raw bytes; a different dtype would be misread, not converted).
    """
    layout = _layouts.get(dtype)
    if layout is None:
        offsets = []
        for name, kind in zip(_MOTION_VECTOR_FIELDS, _MOTION_VECTOR_TYPES):
            field = (dtype.fields or {}).get(name)
            if field is None or field[0] != np.dtype(kind):
                raise ValueError(f"motion vector records need field {name!r} of type {kind}; "
                                 f"got dtype {dtype}")
            offsets.append(field[1])
        layout = _layouts[dtype] = (dtype.itemsize, *offsets)
    return layout


_layouts: dict[np.dtype, tuple[int, ...]] = {}
_NO_RECORDS = (40, 0, 10, 12, 24, 28, 32)   # FFmpeg's layout; passed when no frame has records


def _macroblock_signals_numpy(motion_vectors: Sequence[np.ndarray | None], width: int,
                              height: int, threshold_px: float,
                              bidirectional: Sequence[bool] | None = None
                              ) -> MacroblockSignals:
    """The reference of macroblock_signals, in numpy (same arguments and result).

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
    maybe_future = np.ones(len(frames), bool) if bidirectional is None else \
        np.array([bidirectional[k] for k in present], bool)
    # B-frames with future references get a median per direction ("split" frames).
    split = np.zeros(len(frames), bool)
    if maybe_future.any():
        future = np.concatenate([m["source"] for m in frames]) > 0
        if not maybe_future.all():
            future &= np.repeat(maybe_future, sizes)
        ahead = np.add.reduceat(future, starts)           # future-referencing vectors
        split = ahead > 0
    rest_x = np.zeros(len(frames))   # split frames: future median - past median
    rest_y = np.zeros(len(frames))
    if split.any():
        medians = _direction_medians(dx, dy, future, starts, sizes, ahead, split)
        median_x[split], median_y[split] = medians[0], medians[1]
        rest_x[split] = medians[2] - median_x[split]
        rest_y[split] = medians[3] - median_y[split]
    for i in np.flatnonzero(~split & (~zero_x | ~zero_y)).tolist():
        start, size = starts[i], sizes[i]
        if not zero_x[i]:
            median_x[i] = _median(dx[start:start + size])
        if not zero_y[i]:
            median_y[i] = _median(dy[start:start + size])
    if median_x.any() or median_y.any() or rest_x.any() or rest_y.any():
        dx = dx - np.repeat(median_x, sizes)
        dy = dy - np.repeat(median_y, sizes)
        if rest_x.any() or rest_y.any():
            dx[future] -= np.repeat(rest_x[split], ahead[split])
            dy[future] -= np.repeat(rest_y[split], ahead[split])
            # only future references: the scene moved +v towards the future one
            only = split & (ahead == sizes) & (median_x == 0) & (median_y == 0) & \
                ((rest_x != 0) | (rest_y != 0))
            median_x[only], median_y[only] = -rest_x[only], -rest_y[only]
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
    row = np.clip(np.concatenate([m["dst_y"] for m in frames]) >> 4, 0, mb_h - 1)
    col = np.clip(np.concatenate([m["dst_x"] for m in frames]) >> 4, 0, mb_w - 1)
    # intp: row * mb_w overflows int16 past 32767 macroblocks (8K), and numpy's fancy
    # indexing casts any other index type first (twice the time of the scatter itself)
    index = np.repeat(np.array(present, np.intp) * (mb_h * mb_w), sizes) + \
        row.astype(np.intp) * mb_w + col
    cells = shape[0] * mb_h * mb_w
    moving = np.zeros(cells, bool)
    moving[index[fast]] = True
    intra = np.ones(cells, bool)
    intra[index] = False
    return MacroblockSignals(moving.reshape(shape), intra.reshape(shape), global_motion)
