"""Synthetic surveillance-like clips with ground truth, and their H.264 encoding.

A clip is a static textured background seen by a camera that may pan, with textured
rectangles ("objects") moving over it at constant screen velocities, plus optional Gaussian
sensor noise. Ground truth is exact: each object's rectangle in every frame and, per 16x16
macroblock, whether an object moved across it since the previous frame. Everything is
deterministic for a given seed, so the same clip (and, with `encode_h264`, the same
bitstream) can be rebuilt anywhere.

The pieces are kept separate (background, objects, rendering, truth, encoding) so that the
scene generator can grow more object kinds, scripted events and labelled questions on top.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

MACROBLOCK = 16  # H.264 macroblock side in pixels: the resolution of the motion truth


@dataclasses.dataclass(frozen=True)
class Box:
    """A textured rectangle moving at a constant screen velocity (pixels, pixels/frame)."""

    x: float                 # left edge in frame 0
    y: float                 # top edge in frame 0
    width: int
    height: int
    vx: float = 0.0          # screen velocity, px/frame (positive: right)
    vy: float = 0.0          # screen velocity, px/frame (positive: down)
    color: tuple[int, int, int] = (220, 40, 40)

    def rect(self, t: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in frame t, unclipped; x1/y1 exclusive."""
        x0 = int(round(self.x + self.vx * t))
        y0 = int(round(self.y + self.vy * t))
        return x0, y0, x0 + self.width, y0 + self.height


DEFAULT_BOXES = (
    Box(x=16, y=24, width=48, height=32, vx=4.0, vy=0.0, color=(220, 40, 40)),
    Box(x=160, y=96, width=32, height=48, vx=-2.0, vy=1.0, color=(40, 80, 220)),
)


@dataclasses.dataclass
class Truth:
    """Ground truth of a generated clip."""

    boxes: np.ndarray    # int32 [F, B, 4]: (x0, y0, x1, y1) per frame and box, clipped to
                         # the frame; x1/y1 exclusive
    moving: np.ndarray   # bool [F, ceil(H/16), ceil(W/16)]: an object moved across the
                         # macroblock since the previous frame (relative to the background);
                         # frame 0 is all False

    @property
    def num_frames(self) -> int:
        return self.boxes.shape[0]


def textured_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Static scene texture, uint8 [H, W, 3]: coarse blotches plus fine grain.

    Texture matters: on a flat background a moving camera or object leaves the encoder
    nothing to match, so motion vectors would say little.
    """
    coarse = _blocky_noise(height, width, 32, rng, amplitude=80)
    fine = _blocky_noise(height, width, 4, rng, amplitude=30)
    base = rng.integers(60, 180, size=3)
    return np.clip(base + coarse + fine, 0, 255).astype(np.uint8)


def _blocky_noise(height: int, width: int, cell: int, rng: np.random.Generator,
                  amplitude: float) -> np.ndarray:
    """Uniform noise constant over cell x cell squares, float32 [H, W, 3] in [-amp, amp]."""
    cells = rng.uniform(-amplitude, amplitude,
                        size=(-(-height // cell), -(-width // cell), 3)).astype(np.float32)
    return np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)[:height, :width]


def box_sprite(box: Box, rng: np.random.Generator) -> np.ndarray:
    """The object's appearance, uint8 [h, w, 3]: its colour with a texture that moves with it."""
    texture = _blocky_noise(box.height, box.width, 4, rng, amplitude=40)
    return np.clip(np.asarray(box.color, np.float32) + texture, 0, 255).astype(np.uint8)


def moving_boxes(num_frames: int, width: int, height: int, *,
                 boxes: Sequence[Box] = DEFAULT_BOXES, noise_sigma: float = 0.0, seed: int = 0,
                 pan_px_per_frame: int = 0) -> tuple[np.ndarray, Truth]:
    """Render textured boxes moving over a static textured scene; returns (frames, truth).

    frames: uint8 [F, H, W, 3] RGB. Box velocities are screen velocities. The camera pans
    right by `pan_px_per_frame` (integer px/frame, may be negative), so the background shifts
    left on screen by that much each frame. `noise_sigma` is the standard deviation of
    Gaussian sensor noise in 8-bit levels, drawn independently per frame.
    """
    if num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"need num_frames, width, height >= 1, "
                         f"got {num_frames}, {width}, {height}")
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    pan = int(pan_px_per_frame)
    rng = np.random.default_rng(seed)
    span = abs(pan) * (num_frames - 1)
    world = textured_background(height, width + span, rng)
    sprites = [box_sprite(b, rng) for b in boxes]
    noise_rng = np.random.default_rng([seed, 1])  # noise stream independent of the scene

    frames = np.empty((num_frames, height, width, 3), np.uint8)
    rects = np.zeros((num_frames, len(boxes), 4), np.int32)
    for t in range(num_frames):
        left = pan * t if pan >= 0 else span + pan * t
        frame = world[:, left:left + width].copy()
        for b, (box, sprite) in enumerate(zip(boxes, sprites)):
            rects[t, b] = _paste(frame, sprite, box.rect(t))
        if noise_sigma > 0:
            noise = noise_rng.standard_normal(frame.shape, dtype=np.float32) * noise_sigma
            frame = np.clip(np.rint(frame + noise), 0, 255).astype(np.uint8)
        frames[t] = frame
    return frames, Truth(boxes=rects, moving=_moving_mask(boxes, rects, pan, height, width))


def _paste(frame: np.ndarray, sprite: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Draw sprite at rect (clipped to the frame) in place; returns the clipped rect."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = rect
    cx0, cy0 = min(max(x0, 0), width), min(max(y0, 0), height)
    cx1, cy1 = min(max(x1, 0), width), min(max(y1, 0), height)
    if cx1 > cx0 and cy1 > cy0:
        frame[cy0:cy1, cx0:cx1] = sprite[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return np.array([cx0, cy0, cx1, cy1], np.int32)


def _moving_mask(boxes: Sequence[Box], rects: np.ndarray, pan: int,
                 height: int, width: int) -> np.ndarray:
    """Macroblocks an object moved across between frames t-1 and t, bool [F, Hmb, Wmb].

    An object counts as moving when it moves relative to the background (screen velocity
    plus pan), because that is what the codec path sees after removing global motion. The
    region is the union of its old and new rectangle: both uncovered and covered pixels change.
    """
    num_frames = rects.shape[0]
    mb_h, mb_w = -(-height // MACROBLOCK), -(-width // MACROBLOCK)
    moving = np.zeros((num_frames, mb_h, mb_w), bool)
    for b, box in enumerate(boxes):
        if box.vx + pan == 0 and box.vy == 0:
            continue
        for t in range(1, num_frames):
            for x0, y0, x1, y1 in (rects[t - 1, b], rects[t, b]):
                if x1 > x0 and y1 > y0:
                    moving[t, y0 // MACROBLOCK:-(-y1 // MACROBLOCK),
                           x0 // MACROBLOCK:-(-x1 // MACROBLOCK)] = True
    return moving


def encode_h264(frames: np.ndarray, fps: float, *, gop: int | None = None, bframes: int = 0,
                crf: int = 23, preset: str = "veryfast", path: str | Path | None = None,
                codec: str = "libx264") -> bytes | Path:
    """Encode RGB frames uint8 [F, H, W, 3] to H.264 (yuv420p) with an exact GOP length.

    path None: returns a raw Annex-B byte stream (SPS/PPS repeated before every IDR).
    path "*.mp4": writes an MP4 and returns the path; any other suffix is written raw.
    gop: frames from one IDR to the next (None: one IDR, then x264's maximum). Scene-cut
    detection is off and B-frame placement fixed (b-adapt=0) so the frame-type pattern is
    exactly what was asked. The encoder runs single-threaded: x264's output depends on its
    thread count, and generated clips must be identical on every machine.
    codec: "libx265" gives HEVC with the same settings (GOP, B-frames, CRF, preset).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3] RGB, "
                         f"got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
    if gop is not None and gop < 1:
        raise ValueError(f"gop must be >= 1 frame, got {gop}")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")

    mp4 = path is not None and str(path).lower().endswith(".mp4")
    container = stream = None
    if mp4:
        container = av.open(str(path), "w")
        stream = container.add_stream(codec, rate=rate)
        ctx = stream.codec_context
    else:
        ctx = av.CodecContext.create(codec, "w")
        ctx.framerate = rate
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = 1 / rate
    ctx.options = _encoder_options(codec, gop, bframes, crf, preset)
    if gop is not None:
        ctx.gop_size = gop
    ctx.max_b_frames = bframes

    encode = stream.encode if mp4 else ctx.encode
    packets = []
    for t, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        frame.pts = t
        packets += encode(frame)
    packets += encode(None)

    if mp4:
        container.mux(packets)
        container.close()
        return Path(path)
    data = b"".join(bytes(p) for p in packets)
    if path is not None:
        Path(path).write_bytes(data)
        return Path(path)
    return data


def _encoder_options(codec: str, gop: int | None, bframes: int, crf: int,
                     preset: str) -> dict[str, str]:
    """Encoder options that pin GOP length, B-frame pattern and threading."""
    if bframes < 0:
        raise ValueError(f"bframes must be >= 0, got {bframes}")
    params = {"scenecut": "0", "bframes": str(bframes), "b-adapt": "0"}
    if gop is not None:
        params.update({"keyint": str(gop), "min-keyint": str(gop)})
    options = {"preset": preset, "crf": str(crf)}
    if codec == "libx264":
        # mbtree off: with B-frames, single-threaded x264 (core 165) still gave different
        # bitstreams from run to run with it on.
        params.update({"threads": "1", "mbtree": "0"})
        options["x264-params"] = ":".join(f"{k}={v}" for k, v in params.items())
    elif codec == "libx265":
        params.update({"open-gop": "0", "pools": "none", "frame-threads": "1",
                       "log-level": "error"})
        options["x265-params"] = ":".join(f"{k}={v}" for k, v in params.items())
    else:
        raise ValueError(f"encode_h264 supports libx264 and libx265, not {codec!r}")
    return options
