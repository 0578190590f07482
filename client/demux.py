"""Client side: read a video source's compressed stream and cut it into Annex-B chunks.

Nothing here decodes. MP4/MKV store H.264/HEVC packets length-prefixed (AVCC/HVCC) with the
parameter sets in the container header; the server's decoder reads a bare byte stream, so
packets are rewritten to Annex-B with FFmpeg's `*_mp4toannexb` bitstream filters, which also
put SPS/PPS (and VPS) in front of every keyframe. A chunk holds whole access units in decode
order, covering about `stride_seconds` of presentation time.
"""
from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction
from typing import Iterator

import av

# Bitstream filters that turn a container's length-prefixed packets into Annex-B.
ANNEXB_FILTERS = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
# NAL unit types of the parameter sets a decoder needs before a keyframe.
PARAMETER_SET_NAL_TYPES = {"h264": {7, 8}, "hevc": {32, 33, 34}}
START_CODE = b"\x00\x00\x00\x01"
# Chunk boundaries are multiples of a float stride; timestamps exactly on one must count as
# reaching it despite rounding (0.3 * 3 < 0.9 in floating point).
_TIME_EPS_S = 1e-6


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the client needs to know about a source's video stream."""

    codec: str                 # FFmpeg codec name: "h264", "hevc", ...
    fps: float                 # frames per second (average rate, else FFmpeg's guess)
    width: int
    height: int
    duration_s: float | None   # None for live sources


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Whole access units of one stream, Annex-B, in decode order."""

    data: bytes
    start_s: float             # earliest presentation time in the chunk, s from stream start
    end_s: float               # latest presentation time + that frame's duration, s
    index: int                 # 0, 1, 2, ... within the stream
    starts_with_keyframe: bool  # decodable without the chunks before it
    au_sizes: tuple[int, ...]  # bytes of each access unit in data, decode order (the wire's
                               # AU_BYTES)
    au_pts: tuple[float, ...]  # presentation time of each access unit, s from stream start
                               # (the wire's AU_PTS)
    time_jump_s: float = 0.0   # stream seconds removed from the timeline just before this
                               # chunk (a timestamp discontinuity; the wire's TIME_JUMP)

    @property
    def packets(self) -> int:
        """Access units (container packets) in the chunk."""
        return len(self.au_sizes)

    def access_units(self) -> list[tuple[bytes, float]]:
        """(Annex-B bytes, presentation time s) of each access unit, decode order."""
        ends = itertools.accumulate(self.au_sizes)
        starts = itertools.chain([0], itertools.accumulate(self.au_sizes))
        return [(self.data[a:b], pts) for a, b, pts in zip(starts, ends, self.au_pts)]


def is_live(source: str) -> bool:
    """True for network stream URLs (rtsp://, rtsps://, rtmp://, udp://, ...)."""
    return "://" in str(source) and not str(source).startswith("file://")


def _open(source: str):
    """Open a file or URL; RTSP over TCP (UDP loses packets behind NAT and on busy links)."""
    options = {"rtsp_transport": "tcp"} if str(source).startswith(("rtsp://", "rtsps://")) else {}
    container = av.open(str(source), options=options)
    if not container.streams.video:
        container.close()
        raise ValueError(
            f"{source}: no video stream found (streams: "
            f"{[s.type for s in container.streams] or 'none'}); give a video file or camera URL")
    return container, container.streams.video[0]


# Raw elementary-stream "containers": their demuxer assumes 25 fps whatever the stream says.
RAW_FORMATS = {"h264", "hevc"}


def _fps(stream) -> float:
    """Frame rate: the container's average rate, else the rate the bitstream/FFmpeg gives."""
    raw = stream.container.format.name in RAW_FORMATS
    rate = (stream.codec_context.framerate or stream.guessed_rate) if raw else \
        (stream.average_rate or stream.guessed_rate)
    if not rate:
        raise ValueError(f"{stream.container.name}: frame rate unknown; the stream has no "
                         "timing information")
    return float(rate)


def probe(source: str) -> SourceInfo:
    """Codec, frame rate, size and duration of the source's first video stream."""
    container, stream = _open(source)
    try:
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None and not is_live(source):
            duration = container.duration / av.time_base
        else:
            duration = None
        ctx = stream.codec_context
        return SourceInfo(codec=ctx.name, fps=_fps(stream), width=ctx.width,
                          height=ctx.height, duration_s=duration)
    finally:
        container.close()


def iter_chunks(source: str, stride_seconds: float, loop: bool = False) -> Iterator[Chunk]:
    """Yield Annex-B chunks of about `stride_seconds` each, as the source is read.

    A new chunk starts at the first packet (in decode order) whose presentation time reaches
    the next multiple of `stride_seconds`; packets are never split, and B-frames that follow
    that packet in decode order stay with it even though they are shown earlier.
    loop=True replays a file forever with times continuing to increase (ignored for live URLs).
    """
    if not stride_seconds > 0:
        raise ValueError(f"stride_seconds must be > 0, got {stride_seconds}")
    index = 0
    offset_s = 0.0   # time added on each replay of a looped file
    boundary = 1     # the next chunk starts at boundary * stride_seconds
    parts: list[bytes] = []
    times: list[tuple[float, float]] = []   # (pts_s, end_s) per packet of the pending chunk
    first_keyframe = False

    def flush() -> Chunk:
        nonlocal parts, times, index
        chunk = Chunk(data=b"".join(parts), start_s=min(t for t, _ in times),
                      end_s=max(e for _, e in times), index=index,
                      starts_with_keyframe=first_keyframe,
                      au_sizes=tuple(len(p) for p in parts),
                      au_pts=tuple(t for t, _ in times))
        parts, times, index = [], [], index + 1
        return chunk

    while True:
        end_of_pass = offset_s
        for data, pts_s, end_s, keyframe in _annexb_packets(source):
            pts_s, end_s = pts_s + offset_s, end_s + offset_s
            if times and pts_s >= boundary * stride_seconds - _TIME_EPS_S:
                yield flush()
            while pts_s >= boundary * stride_seconds - _TIME_EPS_S:
                boundary += 1
            if not times:
                first_keyframe = keyframe
            parts.append(data)
            times.append((pts_s, end_s))
            end_of_pass = max(end_of_pass, end_s)
        if not loop or is_live(source) or end_of_pass == offset_s:
            break
        offset_s = end_of_pass
    if times:
        yield flush()


def _annexb_packets(source: str) -> Iterator[tuple[bytes, float, float, bool]]:
    """(Annex-B bytes, pts s, end s, keyframe) per packet of the first video stream."""
    container, stream = _open(source)
    try:
        codec = stream.codec_context.name
        bsf = av.BitStreamFilterContext(ANNEXB_FILTERS[codec], stream) \
            if codec in ANNEXB_FILTERS else None
        # Annex-B input (raw .h264 files, RTSP) passes through the filter untouched, and a
        # camera may send its parameter sets only out of band (SDP): put them back in band.
        extra = bytes(stream.codec_context.extradata or b"")
        in_band = extra if codec in PARAMETER_SET_NAL_TYPES and extra.startswith(
            (b"\x00\x00\x01", START_CODE)) else b""
        time_base = stream.time_base
        origin = stream.start_time
        frame_duration = Fraction(1) / Fraction(_fps(stream)).limit_denominator(1001)
        clock = Fraction(0)   # for packets without timestamps (raw streams): sum of durations
        for packet in container.demux(stream):
            if packet.size == 0:   # the demuxer's end-of-stream marker
                continue
            duration = packet.duration * time_base if packet.duration else frame_duration
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                if origin is None:
                    origin = ts
                pts = (ts - origin) * time_base
            else:
                pts = clock
            clock = pts + duration
            keyframe = packet.is_keyframe
            data = b"".join(bytes(p) for p in bsf.filter(packet)) if bsf else bytes(packet)
            if in_band and keyframe and not _has_parameter_sets(data, codec):
                data = in_band + data
            yield data, float(pts), float(pts + duration), keyframe
    finally:
        container.close()


# The NAL unit type of the first unit of a keyframe's access unit as h264_mp4toannexb
# writes it: H.264 SPS, HEVC VPS (parameter sets go in front of every keyframe).
_KEYFRAME_FIRST_NAL = {"h264": 7, "hevc": 32}


def nal_units(data: bytes, codec: str = "h264") -> Iterator[tuple[int, int]]:
    """(offset, NAL unit type) of each NAL unit in Annex-B data, in order.

    offset is where its start code begins (a 4-byte start code's leading zero included).
    Types: H.264 5 IDR, 7 SPS, 8 PPS; HEVC 32 VPS, 33 SPS, 34 PPS.
    """
    pos = data.find(b"\x00\x00\x01")
    while pos != -1 and pos + 3 < len(data):
        header = data[pos + 3]
        nal_type = header & 0x1F if codec == "h264" else (header >> 1) & 0x3F
        yield (pos - 1 if pos > 0 and data[pos - 1] == 0 else pos), nal_type
        pos = data.find(b"\x00\x00\x01", pos + 3)


def nal_unit_types(data: bytes, codec: str = "h264") -> list[int]:
    """NAL unit types in an Annex-B byte stream, in order (H.264: 5 IDR, 7 SPS, 8 PPS)."""
    return [nal_type for _, nal_type in nal_units(data, codec)]


def last_keyframe_offset(data: bytes, codec: str = "h264") -> int:
    """Byte offset where the last keyframe's access unit starts in Annex-B data, or -1.

    Keyframes carry their parameter sets in front (h264_mp4toannexb puts them there), so the
    last H.264 SPS (HEVC VPS) starts the last access unit a fresh decoder can begin with.
    """
    first_type = _KEYFRAME_FIRST_NAL.get(codec)
    return max((offset for offset, nal_type in nal_units(data, codec) if nal_type == first_type),
               default=-1)


def _has_parameter_sets(data: bytes, codec: str) -> bool:
    return PARAMETER_SET_NAL_TYPES[codec] <= set(nal_unit_types(data, codec))
