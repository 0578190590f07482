"""Client side: read a video source's compressed stream and cut it into Annex-B chunks.

Nothing here decodes video for the server: chunks are the container's packets. (probe decodes
one frame, only to read the display matrix: PyAV 18 exposes a stream's side data on decoded
frames alone.) MP4/MKV store H.264/HEVC packets length-prefixed (AVCC/HVCC) with the
parameter sets in the container header; the server's decoder reads a bare byte stream, so
packets are rewritten to Annex-B with FFmpeg's `*_mp4toannexb` bitstream filters, which also
put SPS/PPS (and VPS) in front of every keyframe. A chunk holds whole access units in decode
order, covering about `stride_seconds` of presentation time.

Stream time is the source's presentation time from its first packet, re-anchored at timestamp
discontinuities (a camera reboot, concatenated recordings) so that it always increases; each
chunk says how much time was removed before it (`Chunk.time_jump_s`, the wire's TIME_JUMP).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import struct
import sys
import time
from fractions import Fraction
from typing import Callable, Iterator

import av

# Bitstream filters that turn a container's length-prefixed packets into Annex-B.
ANNEXB_FILTERS = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
# NAL unit types of the parameter sets a decoder needs before a keyframe.
PARAMETER_SET_NAL_TYPES = {"h264": {7, 8}, "hevc": {32, 33, 34}}
START_CODE = b"\x00\x00\x00\x01"
# Chunk boundaries are multiples of a float stride; timestamps exactly on one must count as
# reaching it despite rounding (0.3 * 3 < 0.9 in floating point).
_TIME_EPS_S = 1e-6
# A presentation time this many strides away from where the stream should be next is a
# timestamp discontinuity, not B-frame reordering (a few frames) or jitter.
JUMP_STRIDES = 3
# Packets decoded at most, at probe time, to read the display matrix from the first frame.
_ROTATION_PROBE_PACKETS = 300
# Opening an RTSP camera: TCP (UDP loses packets behind NAT and on busy links), and a short
# probe (0.5 s, 64 KiB) so that a reconnect answers again quickly (RUNBOOK: ~0.65 s to open).
RTSP_OPTIONS = {"rtsp_transport": "tcp", "analyzeduration": "500000", "probesize": "65536"}
# Source clocks that wrap, in ticks: MPEG-TS/PES timestamps are 33 bits, RTP's 32 bits. A
# backward step of one such period (in the stream's time base) is a wrap, undone exactly.
WRAP_BITS = (33, 32)


def _stderr_notice(message: str) -> None:
    print(f"codecsight-client: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What the client needs to know about a source's video stream."""

    codec: str                 # FFmpeg codec name: "h264", "hevc", ...
    fps: float                 # frames per second (average rate, else FFmpeg's guess)
    width: int
    height: int
    duration_s: float | None   # None for live sources
    track: int = 0             # the container's stream index of the chosen video stream
    rotation: int = 0          # degrees clockwise that turn frames upright (0/90/180/270)


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
    picture_size: tuple[int, int] | None = None  # (width, height) its SPS gives, for a chunk
                               # that starts with a keyframe (None: not known)
    resolution_change: bool = False  # its keyframe's SPS gives another size than the
                               # stream's previous keyframe did

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


def describe_streams(container) -> str:
    """The container's streams as ffprobe numbers them: '#0 audio pcm_s16le, #1 video h264 ...'."""
    parts = []
    for st in container.streams:
        text = f"#{st.index} {st.type} {st.codec_context.name if st.codec_context else '?'}"
        if st.type == "video":
            text += f" {st.codec_context.width}x{st.codec_context.height}"
            flags = [d for d in ("default", "attached_pic", "timed_thumbnails", "still_image")
                     if _has_disposition(st, d)]
            text += f" ({', '.join(flags)})" if flags else ""
        parts.append(text)
    return ", ".join(parts) or "none"


def _has_disposition(stream, name: str) -> bool:
    return bool(stream.disposition & getattr(av.stream.Disposition, name))


def _is_real_video(stream) -> bool:
    """A camera's picture track, not a cover image or thumbnail track."""
    return not any(_has_disposition(stream, d)
                   for d in ("attached_pic", "timed_thumbnails", "still_image"))


def select_video_stream(container, source: str, video_track: int | None = None,
                        notice: Callable[[str], None] | None = None):
    """The video stream to analyse: video_track (a stream index) if given, else the default
    real video track, else the largest real one. Attached pictures and thumbnail tracks are
    never chosen by default. notice() is told when there was a choice.

    Raises ValueError naming the source and listing its streams when there is no usable one.
    """
    streams = describe_streams(container)
    if video_track is not None:
        chosen = [st for st in container.streams if st.index == video_track]
        if not chosen or chosen[0].type != "video":
            what = "is not a video stream" if chosen else "does not exist"
            raise ValueError(f"{source}: stream #{video_track} {what} (streams: {streams}); "
                             "choose another --video-track")
        return chosen[0]
    real = [st for st in container.streams.video if _is_real_video(st)]
    if not real:
        what = "no video stream" if not container.streams.video else \
            "no video stream other than attached pictures or thumbnails"
        hint = "give a video file or camera URL" if not container.streams.video else \
            "choose one of its video streams with --video-track if it is the camera's"
        raise ValueError(f"{source}: {what} found (streams: {streams}); {hint}")
    # Matroska marks every track default unless told otherwise, so "default" decides only
    # when it tells the tracks apart; size decides among the rest.
    default = [st for st in real if _has_disposition(st, "default")]
    pool = default if default else real
    chosen = max(pool, key=lambda st: st.codec_context.width * st.codec_context.height)
    if len(real) > 1 and notice is not None:
        notice(f"{source}: {len(real)} video streams ({streams}); analysing #{chosen.index} "
               "(the default, else the largest); choose another with --video-track")
    return chosen


def _open_options(source: str) -> dict:
    return dict(RTSP_OPTIONS) if str(source).startswith(("rtsp://", "rtsps://")) else {}


def _open(source: str, video_track: int | None = None,
          notice: Callable[[str], None] | None = None, timeout=None):
    """Open a file or URL (RTSP_OPTIONS for cameras). timeout: seconds to wait for data, or
    (open, read) seconds (PyAV's; None waits for ever)."""
    container = av.open(str(source), options=_open_options(source), timeout=timeout)
    try:
        return container, select_video_stream(container, source, video_track, notice)
    except Exception:
        container.close()
        raise


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


def probe(source: str, video_track: int | None = None,
          notice: Callable[[str], None] = _stderr_notice, timeout=None) -> SourceInfo:
    """Codec, frame rate, size, duration and display rotation of the source's video stream.

    The stream is chosen by select_video_stream (notice() is told when there was a choice).
    timeout: as in _open (None: wait for ever).
    Raises ValueError for a source without a usable video stream, or whose display matrix
    is not a rotation by a multiple of 90 degrees; av.error.FFmpegError (an OSError) when the
    source cannot be opened or read.
    """
    container, stream = _open(source, video_track, notice, timeout)
    try:
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None and not is_live(source):
            duration = container.duration / av.time_base
        else:
            duration = None
        ctx = stream.codec_context
        info = SourceInfo(codec=ctx.name, fps=_fps(stream), width=ctx.width,
                          height=ctx.height, duration_s=duration, track=stream.index)
    finally:
        container.close()
    return dataclasses.replace(info, rotation=display_rotation(source, info.track, notice,
                                                               timeout))


def display_rotation(source: str, video_track: int,
                     notice: Callable[[str], None] = _stderr_notice, timeout=None) -> int:
    """Degrees clockwise (0, 90, 180, 270) that turn the stream's frames upright.

    Read from the display matrix (MP4/MOV tkhd, or the bitstream's display orientation SEI)
    that FFmpeg attaches to decoded frames: PyAV 18 has no reader for a stream's side data,
    so the first frame is decoded. A mirrored matrix is analysed unmirrored, with a
    notice.
    Raises ValueError for a rotation that is not a multiple of 90 degrees.
    """
    matrix = None
    container = av.open(str(source), options=_open_options(source), timeout=timeout)
    try:
        stream = container.streams[video_track]
        for packet in itertools.islice(container.demux(stream), _ROTATION_PROBE_PACKETS):
            frames = stream.decode(packet) if packet.size else []
            if frames:
                side = frames[0].side_data.get("DISPLAYMATRIX")
                matrix = struct.unpack("<9i", bytes(side)[:36]) if side is not None else ()
                break
    except av.error.FFmpegError:
        matrix = None
    finally:
        container.close()
    if matrix is None:
        notice(f"{source}: no frame decoded in its first {_ROTATION_PROBE_PACKETS} packets; "
               "display rotation unknown, frames are analysed as stored")
        return 0
    if not matrix:
        return 0
    a, b, _, c, d = (v / 65536 for v in matrix[:5])
    mirrored = a * d - b * c < 0
    if mirrored:   # factor out a horizontal mirror: what remains is a pure rotation
        a, c = -a, -c
    # av_display_rotation_get: the matrix turns the frame counterclockwise by atan2(-b, a);
    # turning it upright is that many degrees clockwise (FFmpeg's autorotate does the same).
    ccw = -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))
    clockwise = (-ccw) % 360
    quarter = round(clockwise / 90) % 4 * 90
    if abs((clockwise - quarter + 180) % 360 - 180) > 1:
        raise ValueError(f"{source}: its display matrix rotates frames by {clockwise:.1f} "
                         "degrees, not a multiple of 90; CodecSight turns frames upright by "
                         "quarter turns only: re-encode the video upright")
    if mirrored:
        notice(f"{source}: its display matrix mirrors the frames; CodecSight turns them "
               f"upright ({quarter} degrees clockwise) but analyses them unmirrored")
    return quarter


def iter_chunks(source: str, stride_seconds: float, loop: bool = False, *,
                video_track: int | None = None,
                notice: Callable[[str], None] = _stderr_notice,
                from_keyframe: bool = False, timeout=None) -> Iterator[Chunk]:
    """Yield Annex-B chunks of about `stride_seconds` each, as the source is read.

    A new chunk starts at the first packet (in decode order) whose presentation time reaches
    the next multiple of `stride_seconds`; packets are never split, and B-frames that follow
    that packet in decode order stay with it even though they are shown earlier.
    A timestamp discontinuity (see _Timeline) also starts a new chunk, which carries the jump
    in time_jump_s; notice() gets one line about it.
    A keyframe whose SPS gives another picture size than the previous keyframe's also starts
    a new chunk, marked resolution_change (a camera reconfigured mid-stream).
    loop=True replays a file forever with times continuing to increase (ignored for live URLs).
    video_track: the container's stream index to read (default: select_video_stream's choice).
    from_keyframe: drop the packets before the first keyframe (a camera joined mid-GOP: a
    fresh decoder cannot use them); notice() is told how many. Stream time still counts
    from the first packet.
    timeout: seconds to wait for the source's data, or (open, read) seconds (None: for ever);
    a source silent longer raises av.error.ExitError/TimeoutError (OSErrors).
    """
    if not stride_seconds > 0:
        raise ValueError(f"stride_seconds must be > 0, got {stride_seconds}")
    index = 0
    offset_s = 0.0   # time added on each replay of a looped file
    boundary = 1     # the next chunk starts at boundary * stride_seconds
    parts: list[bytes] = []
    times: list[tuple[float, float]] = []   # (pts_s, end_s) per packet of the pending chunk
    first_keyframe = False
    pending_jump = 0.0   # removed before the pending chunk
    size: tuple[int, int] | None = None     # the picture size of the latest keyframe's SPS
    chunk_size: tuple[int, int] | None = None
    size_changed = False
    skipped = 0          # packets dropped before the first keyframe (from_keyframe)
    waiting_for_keyframe = from_keyframe

    def flush() -> Chunk:
        nonlocal parts, times, index, pending_jump, chunk_size, size_changed
        chunk = Chunk(data=b"".join(parts), start_s=min(t for t, _ in times),
                      end_s=max(e for _, e in times), index=index,
                      starts_with_keyframe=first_keyframe,
                      au_sizes=tuple(len(p) for p in parts),
                      au_pts=tuple(t for t, _ in times), time_jump_s=pending_jump,
                      picture_size=chunk_size, resolution_change=size_changed)
        parts, times, index, pending_jump = [], [], index + 1, 0.0
        chunk_size, size_changed = None, False
        return chunk

    while True:
        end_of_pass = offset_s
        packets = _annexb_packets(source, video_track=video_track,
                                  jump_threshold_s=JUMP_STRIDES * stride_seconds,
                                  notice=notice, start_s=offset_s, timeout=timeout)
        for data, pts_s, end_s, jump_s, keyframe, codec in packets:
            if waiting_for_keyframe:
                if not keyframe:
                    skipped += 1
                    continue
                waiting_for_keyframe = False
                if skipped:
                    notice(f"{source}: joined mid-GOP: dropped the {skipped} packet(s) before "
                           f"the first keyframe (a decoder cannot start from them)")
            new_size = picture_size(data, codec) if keyframe else None
            changed = new_size is not None and size is not None and new_size != size
            if times and (jump_s or changed or
                          pts_s >= boundary * stride_seconds - _TIME_EPS_S):
                yield flush()
            while pts_s >= boundary * stride_seconds - _TIME_EPS_S:
                boundary += 1
            if not times:
                first_keyframe = keyframe
                chunk_size = new_size
            if changed:   # the chunk says so (resolution_change); its reader reports it
                size_changed = True
            if new_size is not None:
                size = new_size
            pending_jump += jump_s
            parts.append(data)
            times.append((pts_s, end_s))
            end_of_pass = max(end_of_pass, end_s)
        if not loop or is_live(source) or end_of_pass == offset_s:
            break
        offset_s = end_of_pass
    if times:
        yield flush()


def picture_size(access_unit: bytes, codec: str = "h264") -> tuple[int, int] | None:
    """(width, height) in pixels that the SPS in front of an Annex-B keyframe gives, or None
    (no SPS in it, or a codec FFmpeg has no parser for).

    FFmpeg's own bitstream parser reads the SPS (cropping included); nothing is decoded.
    ~0.1 ms per call.
    """
    try:
        parser = av.CodecContext.create(codec, "r")
        parser.parse(access_unit)
        parser.parse(None)   # the parser holds the last unit back until it is flushed
    except (av.error.FFmpegError, ValueError):
        return None
    return (parser.width, parser.height) if parser.width and parser.height else None


class _Timeline:
    """Stream time from a source's timestamps, re-anchored at discontinuities.

    A packet whose presentation time lands more than threshold_s before where the stream
    should be next (the latest end time so far) is a discontinuity: no container goes back
    in time legitimately. One that lands more than threshold_s after it is a discontinuity
    only where the timestamps are not a continuous clock: formats FFmpeg marks as allowing
    discontinuities (MPEG-TS, HLS), or a live source that delivered it sooner than the
    jump's length of wall-clock time. In MP4/MKV a forward gap is real (variable frame rate,
    a camera that records on motion) and kept: a gap in the video is a gap in the window.
    At a discontinuity the packet is placed right where the stream should be next, so that
    stream time keeps increasing; the removed jump (positive forward) is returned.
    A backward step of one of wrap_periods_s (a 33-bit MPEG or 32-bit RTP clock wrapping,
    where FFmpeg has not undone it) is no discontinuity: the period is added back, exactly.
    """

    def __init__(self, source: str, container, threshold_s: float, notice, start_s: float,
                 wrap_periods_s: tuple[Fraction, ...] = ()):
        self.source, self.threshold_s, self.notice = source, threshold_s, notice
        self.wrap_periods_s = wrap_periods_s
        self.live = is_live(source)
        self.forward_jumps = self.live or bool(
            container.format.flags & av.format.Flags.ts_discont.value)
        self.shift = Fraction(0)   # subtracted from source times (sum of jumps so far)
        self.start_s = start_s     # where this pass of the source starts in stream time
        self.expected: Fraction | None = None   # latest end so far (s from the origin,
        #                                         re-anchored): where the next packet belongs
        self.wall: float | None = None       # monotonic clock at the latest packet

    def place(self, pts: Fraction, duration: Fraction) -> tuple[float, float, float]:
        """(stream pts s, stream end s, removed jump s) of a packet at source time pts (s
        from the origin) lasting duration s. Exact fractions until the last step, so times
        on a stride multiple stay on it."""
        now = time.monotonic()
        jump = Fraction(0)
        if self.expected is not None:
            gap = pts - self.shift - self.expected
            if gap < -self.threshold_s:
                for period in self.wrap_periods_s:
                    if abs(gap + period) <= self.threshold_s:   # the clock wrapped
                        self.shift -= period
                        gap += period
                        break
            waited = now - self.wall
            if gap < -self.threshold_s or (gap > self.threshold_s and self.forward_jumps and
                                           (not self.live or waited < gap - self.threshold_s)):
                jump, self.shift = gap, self.shift + gap
                self.notice(f"{self.source}: timestamps jumped {'back' if gap < 0 else 'ahead'}"
                            f" {abs(float(gap)):.3f} s at stream time "
                            f"{self.start_s + float(pts - self.shift):.3f} s (a camera restart "
                            "or a splice); stream time re-anchored to keep increasing")
        start, end = pts - self.shift, pts - self.shift + duration
        self.expected = max(self.expected, end) if self.expected is not None else end
        self.wall = now
        return self.start_s + float(start), self.start_s + float(end), float(jump)


def _annexb_packets(source: str, *, video_track: int | None = None,
                    jump_threshold_s: float = math.inf, notice=_stderr_notice,
                    start_s: float = 0.0, timeout=None
                    ) -> Iterator[tuple[bytes, float, float, float, bool, str]]:
    """(Annex-B bytes, pts s, end s, removed jump s, keyframe, codec) per packet of the video
    stream.

    Times are stream seconds: from the first packet, plus start_s, re-anchored by _Timeline
    (threshold jump_threshold_s). A live source's first packets may carry no timestamp at
    all (RTSP before the first RTCP sender report): they are timed on from the previous
    packet at the frame interval, and the first timestamped packet becomes the origin.
    """
    container, stream = _open(source, video_track, timeout=timeout)
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
        # The raw demuxers time packets at an assumed 25 fps until their parser meets an SPS
        # (a stream joined mid-GOP); the SPS timing probing found is the stream's own.
        raw = stream.container.format.name in RAW_FORMATS
        timeline = _Timeline(source, container, jump_threshold_s, notice, start_s,
                             tuple(Fraction(2 ** bits) * time_base for bits in WRAP_BITS))
        recent: collections.deque = collections.deque(maxlen=16)   # recent source pts
        clock = Fraction(0)   # for packets without timestamps (raw streams): sum of durations
        for packet in container.demux(stream):
            if packet.size == 0:   # the demuxer's end-of-stream marker
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is not None:
                if origin is None:   # after untimed packets: go on from where they ended
                    origin = ts - round(clock / time_base)
                pts = (ts - origin) * time_base
                recent.append(pts)
            else:
                pts = clock
                if not recent:
                    # Untimed packets before any timed one (RTSP's first keyframe, whose
                    # stream.start_time is the *next* packet's time): the first timed packet
                    # is the origin, after these, or two packets would share time 0.
                    origin = None
            if packet.duration and not raw:
                duration = packet.duration * time_base
            else:
                duration = _frame_interval(recent) or frame_duration
            clock = pts + duration
            keyframe = packet.is_keyframe
            data = b"".join(bytes(p) for p in bsf.filter(packet)) if bsf else bytes(packet)
            if in_band and keyframe and not _has_parameter_sets(data, codec):
                data = in_band + data
            yield (data, *timeline.place(Fraction(pts), Fraction(duration)), keyframe, codec)
    finally:
        container.close()


def _frame_interval(recent) -> Fraction | None:
    """The frame interval the latest timestamps show (Matroska stores no packet durations):
    the median step between recent presentation times, sorted (B-frames arrive out of
    order), or None before there are two."""
    steps = sorted(b - a for a, b in zip(sorted(recent), sorted(recent)[1:]) if b > a)
    return steps[len(steps) // 2] if steps else None


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


# NAL unit types of a picture a decoder can start at: H.264 IDR slice, HEVC IRAP (BLA/IDR/CRA).
_RANDOM_ACCESS_NAL_TYPES = {"h264": {5}, "hevc": set(range(16, 22))}


def is_keyframe_unit(access_unit: bytes, codec: str = "h264") -> bool:
    """True if an Annex-B access unit holds a picture a fresh decoder can start at (H.264
    IDR, HEVC IRAP), whatever comes in front of it (AUD, SEI, parameter sets)."""
    kinds = _RANDOM_ACCESS_NAL_TYPES.get(codec, set())
    return any(kind in kinds for kind in nal_unit_types(access_unit, codec))


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
