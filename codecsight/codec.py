"""Server side: decode one stream's Annex-B chunks and read the codec's metadata.

`StreamDecoder` keeps the decoder of one stream across chunks: it is fed bytes, returns
decoded frames in display order with their frame type and motion vectors, and never raises
on damaged input (a camera stream with a bad packet must keep going). Frames stay lazy
`av.VideoFrame`s: converting to pixels is the expensive part, and only sampled frames pay it.
`FrameSampler` picks the frames analysed at the analysis rate; `frame_to_rgb` turns one into
pixels padded to whole merge groups.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import av
import numpy as np

PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "SI", 6: "SP", 7: "BI"}  # AVPictureType
# Decode-order numbers of packets whose frame has not come out yet are kept this long
# (in packets) before being given up: far beyond any reorder delay, bounded after errors.
_PENDING_PACKETS = 256


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
    packet_bytes: int                       # size of the coded access unit of this frame
                                            # (Annex-B, parameter sets included); 0 if unknown
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
                 skip_loop_filter: bool = False, thread_count: int = 0):
        self.codec = codec
        self._ctx = av.CodecContext.create(codec, "r")
        options = {}
        if export_mvs:
            options["flags2"] = "+export_mvs"
        if skip_loop_filter:
            # Deblocking only smooths the picture; motion vectors and frame types are
            # unchanged and H.264 decodes 8-37% faster without it.
            options["skip_loop_filter"] = "all"
        self._ctx.options = options
        self._ctx.thread_count = thread_count   # 0: one per core (slice threads, no delay)
        self._packet_sizes: dict[int, int] = {}  # decode-order number -> bytes
        self._packets_in = 0
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
        if packet is not None:
            # The parser leaves timestamps unset; numbering packets in decode order lets each
            # frame (which carries its packet's pts through reordering) find its packet size.
            packet.pts = self._packets_in
            self._packet_sizes[self._packets_in] = packet.size
            self._packet_sizes.pop(self._packets_in - _PENDING_PACKETS, None)
            self._packets_in += 1
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
            packet_bytes=self._packet_sizes.pop(frame.pts, 0) if frame.pts is not None else 0,
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
