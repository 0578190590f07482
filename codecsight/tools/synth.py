"""Synthetic surveillance-like clips with ground truth, and their H.264 encoding.

A clip is a static textured background seen by a camera that may pan, with textured
rectangles ("objects") moving over it at constant screen velocities, plus optional Gaussian
sensor noise. Ground truth is exact: each object's rectangle in every frame and, per 16x16
macroblock, whether an object moved across it since the previous frame. Everything is
deterministic for a given seed, so the same clip (and, with `encode_h264`, the same
bitstream) can be rebuilt anywhere.

The pieces are kept separate (background, objects, rendering, truth, encoding). On top of
them, `generate_scene` / `write_clip` make the labelled suite that trains and evaluates the
demo model: surveillance-like shots with several kinds of objects in several colours and at
several speeds (pauses, slow movers, runners, wrong-way movers), sensor noise, illumination
drift, camera shake and pan, and scene cuts; `serving_windows` replays an encoded clip the
way the serving pipeline windows a stream, and `window_facts` + `ask` turn each window's
ground truth into question/answer pairs for four analytics tasks.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from codecsight.codec import MACROBLOCK, macroblock_grid



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
    return frames, Truth(boxes=rects, moving=_moving_mask(
        rects, np.array([[b.vx + pan != 0 or b.vy != 0 for b in boxes]] * num_frames, bool),
        height, width))


def _paste(frame: np.ndarray, sprite: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Draw sprite at rect (clipped to the frame) in place; returns the clipped rect."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = rect
    cx0, cy0 = min(max(x0, 0), width), min(max(y0, 0), height)
    cx1, cy1 = min(max(x1, 0), width), min(max(y1, 0), height)
    if cx1 > cx0 and cy1 > cy0:
        frame[cy0:cy1, cx0:cx1] = sprite[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return np.array([cx0, cy0, cx1, cy1], np.int32)


def _moving_mask(rects: np.ndarray, moved: np.ndarray, height: int, width: int) -> np.ndarray:
    """Macroblocks an object moved across between frames t-1 and t, bool [F, Hmb, Wmb].

    rects: int [F, B, 4] (x0, y0, x1, y1) per frame and object; moved: bool [F, B], whether
    object b moved relative to the background between t-1 and t (what the codec path sees
    after removing global motion). The region is the union of the old and new rectangle:
    both uncovered and covered pixels change.
    """
    mb_h, mb_w = macroblock_grid(width, height)
    moving = np.zeros((rects.shape[0], mb_h, mb_w), bool)
    for t, b in zip(*np.nonzero(moved[1:])):
        for x0, y0, x1, y1 in (rects[t, b], rects[t + 1, b]):
            if x1 > x0 and y1 > y0:
                moving[t + 1, y0 // MACROBLOCK:-(-y1 // MACROBLOCK),
                       x0 // MACROBLOCK:-(-x1 // MACROBLOCK)] = True
    return moving


def _moved_in_scene(world: np.ndarray) -> np.ndarray:
    """bool [F, B]: object b's world position changed between t-1 and t (NaN across a cut)."""
    moved = np.zeros(world.shape[:2], bool)
    with np.errstate(invalid="ignore"):
        moved[1:] = np.abs(world[1:] - world[:-1]).max(axis=2) > 0
    return moved


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


# ---------------------------------------------------------------------------------------------
# Surveillance scenes: the labelled suite the demo model is trained and evaluated on
#
# A clip is one or more shots (a scene cut starts a new shot: new background, new objects).
# Objects live in world coordinates over a static textured background; the camera looks at a
# width x height view of it and may pan or shake, so "moving" always means moving relative to
# the scene, which is also what the codec path measures after removing global motion.
# Traffic flows left to right in every scene (x grows): an object whose world x decreases is
# moving against the flow.

# name -> (width, height) in pixels of the 224x168 default view (jittered +-12% per object)
KINDS = {"person": (12, 30), "car": (46, 21), "truck": (66, 30), "dog": (22, 13)}
VEHICLES = ("car", "truck")
COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
           "yellow": (230, 205, 40), "white": (238, 238, 238)}
ZONES = ("left", "right", "top", "bottom")   # halves of the view
# World speeds in pixels per second, per speed class (uniform ranges).
SPEEDS = {"slow": (4.0, 9.0), "normal": (15.0, 30.0), "fast": (55.0, 80.0)}
# How objects behave, with their probabilities. "run" and "wrong_way" are the anomalies.
BEHAVIOURS = {"walk": 0.28, "slow": 0.12, "pause": 0.12, "parked": 0.12, "run": 0.18,
              "wrong_way": 0.18}
# Label thresholds, on the world displacement between consecutive sampled frames of a window.
MOVING_PX_PER_S = 2.5      # at least this fast: moving (slow movers are 4-9 px/s)
RUNNING_PX_PER_S = 42.0    # at least this fast: running (normal is 15-30, fast 55-80)
AGAINST_FLOW_PX_PER_S = 2.5  # world x decreasing at least this fast: against the flow

TASKS = ("presence", "count", "entered", "anomaly")
BINARY_TASKS = ("presence", "entered", "anomaly")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten")
QUESTIONS = {
    "presence": "is there a {kind} in the {zone} zone?",
    "count": "how many objects are moving?",
    "entered": "did anything enter the {zone} zone?",
    "anomaly": "is there an anomaly?",
}
TRUE_SHARE = 0.7    # ask about something true this often when possible (see `ask`)
_SHAKE_PX = 3       # camera shake amplitude; also the background margin around the view
_SKIN = (225, 185, 150)
_DARK = (40, 42, 50)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Geometry, timing and encoding of generated surveillance clips."""

    width: int = 224            # pixels; 8 x 6 merge groups of 28 px
    height: int = 168
    fps: float = 10.0           # source frame rate
    seconds: float = 16.0
    gop_seconds: float = 2.0    # IDR interval (fixed GOP, no B-frames, as many cameras send)
    crf: int = 23
    max_objects: int = 3        # per shot
    cut_probability: float = 0.35   # chance that a clip has one scene cut
    pan_probability: float = 0.2    # per shot
    shake_probability: float = 0.2  # per shot
    max_noise_sigma: float = 3.0    # sensor noise, 8-bit levels, drawn per clip
    max_drift: float = 0.15         # illumination drift amplitude (relative gain)

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    @property
    def gop(self) -> int:
        return max(1, int(round(self.gop_seconds * self.fps)))


@dataclasses.dataclass(frozen=True)
class Actor:
    """One object of a scene: what it is and how it behaves (its path is in the truth)."""

    kind: str
    colour: str
    behaviour: str
    shot: int
    width: int
    height: int


@dataclasses.dataclass
class SceneTruth(Truth):
    """Ground truth of a generated scene, per frame and object (A objects over all shots)."""

    centres: np.ndarray = None  # float32 [F, A, 2] (x, y) screen centre; NaN outside its shot
    world: np.ndarray = None    # float32 [F, A, 2] world centre; NaN outside its shot
    shot: np.ndarray = None     # int32 [F] shot index of each frame
    camera: np.ndarray = None   # int32 [F, 2] (x, y) world position of the view's corner
    actors: tuple = ()          # Actor per object
    width: int = 0
    height: int = 0
    fps: float = 0.0


def _speed(rng: np.random.Generator, speed_class: str) -> float:
    low, high = SPEEDS[speed_class]
    return float(rng.uniform(low, high))


def _camera_path(rng: np.random.Generator, config: SceneConfig, frames: int):
    """Camera corner per frame of a shot, int32 [frames, 2], and the world size it needs."""
    mode = rng.choice(["static", "pan", "shake"], p=[
        1 - config.pan_probability - config.shake_probability, config.pan_probability,
        config.shake_probability])
    x = np.zeros(frames)
    y = np.zeros(frames)
    if mode == "pan":
        speed = rng.uniform(3.0, 8.0) / config.fps * rng.choice([-1, 1])
        x = speed * np.arange(frames)
    elif mode == "shake":
        for _ in range(int(rng.integers(1, 4))):
            start = int(rng.integers(0, frames))
            length = int(rng.uniform(0.5, 1.5) * config.fps)
            burst = slice(start, min(frames, start + length))
            n = burst.stop - burst.start
            x[burst] = rng.integers(-_SHAKE_PX, _SHAKE_PX + 1, n)
            y[burst] = rng.integers(-_SHAKE_PX, _SHAKE_PX + 1, n)
    x = np.rint(x).astype(np.int32)
    y = np.rint(y).astype(np.int32)
    # Shift so the view never leaves the background: margin on every side.
    x = x - x.min() + _SHAKE_PX
    y = y - y.min() + _SHAKE_PX
    world_w = int(x.max()) + config.width + _SHAKE_PX
    world_h = int(y.max()) + config.height + _SHAKE_PX
    return np.stack([x, y], axis=1), (world_w, world_h)


def _actor_path(rng: np.random.Generator, config: SceneConfig, actor: Actor, frames: int,
                view0: tuple[int, int]) -> np.ndarray:
    """World centre per frame of its shot, float32 [frames, 2], for the actor's behaviour."""
    fps = config.fps
    vx0, vy0 = view0
    half_w = actor.width / 2
    y_low, y_high = vy0 + 0.12 * config.height, vy0 + 0.88 * config.height
    y = rng.uniform(y_low, y_high)
    if actor.behaviour == "parked":
        x = vx0 + rng.uniform(0.08, 0.92) * config.width
        return np.tile(np.array([x, y], np.float32), (frames, 1))
    speed_class = {"slow": "slow", "run": "fast"}.get(actor.behaviour, "normal")
    speed = _speed(rng, speed_class) / fps                      # px per frame
    direction = -1.0 if actor.behaviour == "wrong_way" else 1.0
    vx = np.full(frames, direction * speed)
    vy = np.full(frames, speed * rng.uniform(-0.25, 0.25))
    if actor.behaviour == "pause":
        stop = int(rng.integers(0, frames))
        pause = slice(stop, stop + int(rng.uniform(1.5, 4.0) * fps))
        vx[pause] = 0.0
        vy[pause] = 0.0
    # Either already in view when the shot starts, or walking in from off-screen later.
    if rng.random() < 0.4:
        x0, wait = vx0 + rng.uniform(0.1, 0.9) * config.width, 0
    else:
        x0 = vx0 - half_w - 2 if direction > 0 else vx0 + config.width + half_w + 2
        wait = int(rng.integers(0, max(1, frames - int(3 * fps))))
        vx[:wait] = 0.0
        vy[:wait] = 0.0
    x = x0 + np.concatenate([[0.0], np.cumsum(vx[:-1])])
    ys = np.clip(y + np.concatenate([[0.0], np.cumsum(vy[:-1])]), y_low, y_high)
    return np.stack([x, ys], axis=1).astype(np.float32)


def actor_sprite(actor: Actor, rng: np.random.Generator, facing_left: bool = False) -> np.ndarray:
    """The object's appearance, uint8 [h, w, 3]: colour, texture and the marks of its kind.

    Every kind has a front (a person's face, a vehicle's windscreen or cab, a dog's head)
    and a sprite faces the way it moves (left when facing_left); runners show a stride. So,
    as in real footage, a wrong-way or running object also looks different in a still frame.
    """
    h, w = actor.height, actor.width
    body = np.asarray(COLOURS[actor.colour], np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = body
    if actor.kind == "person":
        head = max(2, h * 3 // 10)
        img[:head] = _DARK                                      # hair
        img[1:head, w // 2:] = _SKIN                            # face, on the front side
        img[h * 7 // 10:] = _DARK                               # legs
        if actor.behaviour == "run":                            # a stride: legs apart
            img[h * 7 // 10:, w * 3 // 10: w * 7 // 10] = body
    elif actor.kind == "car":
        img[: h * 4 // 10, w * 5 // 10: w * 85 // 100] = (60, 75, 95)  # windscreen, front half
        img[h * 8 // 10:, w // 8: w * 3 // 10] = _DARK          # wheels
        img[h * 8 // 10:, w * 7 // 10: w * 7 // 8] = _DARK
    elif actor.kind == "truck":
        img[:, w * 7 // 10:] = 0.6 * body + 0.4 * 255           # cab at the front
        img[: h * 4 // 10, w * 78 // 100: w * 95 // 100] = (60, 75, 95)
        img[h * 85 // 100:, w // 10: w * 3 // 10] = _DARK
        img[h * 85 // 100:, w * 75 // 100: w * 9 // 10] = _DARK
    elif actor.kind == "dog":
        img[: h // 2, w * 75 // 100:] = 0.6 * body               # head at the front
        if actor.behaviour == "run":                            # legs stretched out
            img[h * 7 // 10:, : w // 10] = _DARK
            img[h * 7 // 10:, w * 9 // 10:] = _DARK
            img[h * 7 // 10:, w // 10: w * 9 // 10] = body
        else:
            img[h * 7 // 10:, w // 10: w * 3 // 10] = _DARK      # legs
            img[h * 7 // 10:, w * 6 // 10: w * 8 // 10] = _DARK
    img += _blocky_noise(h, w, 4, rng, amplitude=18)
    sprite = np.clip(img, 0, 255).astype(np.uint8)
    return sprite[:, ::-1] if facing_left else sprite


def _muted_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation textured scene (pavement, grass, walls), uint8 [H, W, 3].

    Muted, so that the objects' saturated colours stand out as they do in real footage.
    """
    grey = textured_background(height, width, rng).astype(np.float32).mean(axis=2, keepdims=True)
    grey = grey.mean() + 0.5 * (grey - grey.mean())   # half the contrast of moving_boxes' scenes
    tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    return np.clip(grey * tint * 0.8 + 20, 0, 255).astype(np.uint8)


def generate_scene(seed: int, config: SceneConfig = SceneConfig()) -> tuple[np.ndarray,
                                                                             SceneTruth]:
    """Render a surveillance clip with its ground truth; deterministic for (seed, config).

    Returns frames uint8 [F, H, W, 3] RGB and a SceneTruth. Shots: one, or two with a scene
    cut at a random time (at least 3 s from either end). Per shot: a muted textured
    background, a static, panning or shaking camera, and up to config.max_objects objects of
    random kind, colour and behaviour (at least one). Per clip: sensor noise (Gaussian, sigma up to
    config.max_noise_sigma) and a slow sinusoidal illumination drift.
    """
    rng = np.random.default_rng([seed, 7])
    n, fps = config.num_frames, config.fps
    if n < 1:
        raise ValueError(f"a clip needs at least one frame, got {config.seconds} s at {fps} fps")
    cuts = [0]
    if rng.random() < config.cut_probability and config.seconds >= 6.0:
        cuts.append(int(rng.integers(int(3 * fps), n - int(3 * fps))))
    cuts.append(n)

    shot_of = np.zeros(n, np.int32)
    camera = np.zeros((n, 2), np.int32)
    backgrounds, actors, paths, sprites = [], [], [], []
    for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        shot_of[a:b] = s
        cam, (world_w, world_h) = _camera_path(rng, config, b - a)
        camera[a:b] = cam
        backgrounds.append(_muted_background(world_h, world_w, rng))
        for _ in range(int(rng.integers(1, config.max_objects + 1))):
            kind = str(rng.choice(list(KINDS)))
            base_w, base_h = KINDS[kind]
            behaviour = str(rng.choice(list(BEHAVIOURS), p=list(BEHAVIOURS.values())))
            if behaviour == "run" and kind in VEHICLES:
                behaviour = "wrong_way"    # vehicles do not run; their anomaly is the wrong way
            actor = Actor(kind=kind, colour=str(rng.choice(list(COLOURS))),
                          behaviour=behaviour,
                          shot=s, width=max(4, int(round(base_w * rng.uniform(0.88, 1.12)))),
                          height=max(4, int(round(base_h * rng.uniform(0.88, 1.12)))))
            path = np.full((n, 2), np.nan, np.float32)
            path[a:b] = _actor_path(rng, config, actor, b - a, tuple(cam[0]))
            actors.append(actor)
            paths.append(path)
            sprites.append(actor_sprite(actor, rng, facing_left=actor.behaviour == "wrong_way"))

    noise_sigma = rng.uniform(0.0, config.max_noise_sigma)
    drift = rng.uniform(0.0, config.max_drift)
    period_s = rng.uniform(8.0, 30.0)
    phase = rng.uniform(0, 2 * np.pi)
    noise_rng = np.random.default_rng([seed, 8])  # noise independent of the scene draws

    world = np.stack(paths, axis=1) if paths else np.zeros((n, 0, 2), np.float32)
    centres = world - camera[:, None, :].astype(np.float32)
    frames = np.empty((n, config.height, config.width, 3), np.uint8)
    rects = np.zeros((n, len(actors), 4), np.int32)
    for t in range(n):
        s = shot_of[t]
        cx, cy = camera[t]
        frame = backgrounds[s][cy:cy + config.height, cx:cx + config.width].copy()
        for i, (actor, sprite) in enumerate(zip(actors, sprites)):
            if actor.shot != s:
                continue
            x0 = int(round(centres[t, i, 0] - actor.width / 2))
            y0 = int(round(centres[t, i, 1] - actor.height / 2))
            rects[t, i] = _paste(frame, sprite, (x0, y0, x0 + actor.width, y0 + actor.height))
        gain = 1.0 + drift * np.sin(2 * np.pi * t / (fps * period_s) + phase)
        pixels = frame.astype(np.float32) * gain
        if noise_sigma > 0:
            pixels += noise_rng.standard_normal(pixels.shape, dtype=np.float32) * noise_sigma
        frames[t] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    truth = SceneTruth(boxes=rects, moving=_moving_mask(rects, _moved_in_scene(world), config.height, config.width),
                       centres=centres, world=world, shot=shot_of, camera=camera,
                       actors=tuple(actors), width=config.width, height=config.height, fps=fps)
    return frames, truth


def write_clip(seed: int, path: str | Path,
               config: SceneConfig = SceneConfig()) -> SceneTruth:
    """Generate a scene and encode it with libx264 to path (.mp4 or raw); returns its truth."""
    frames, truth = generate_scene(seed, config)
    encode_h264(frames, config.fps, gop=config.gop, crf=config.crf, path=path)
    return truth


OBJECT_CLASSES = 1 + 2 * len(KINDS)   # object_map values: none, kind, kind facing back/running


def object_map(truth: SceneTruth, frame_index: int, group_pixels: int) -> np.ndarray:
    """What each merge group of a frame shows: int64 [Hg, Wg] in [0, OBJECT_CLASSES).

    0: no object; 1 + k: an object of kind KINDS[k]; 1 + len(KINDS) + k: one that looks
    anomalous (faces against the flow, or runs). Group (r, c) gets the object covering most
    of it, if that object covers at least 15% of the group or half of the object lies in it.
    """
    grid_h = -(-truth.height // group_pixels)
    grid_w = -(-truth.width // group_pixels)
    best = np.zeros((grid_h, grid_w))
    out = np.zeros((grid_h, grid_w), np.int64)
    kinds = list(KINDS)
    edges_y = np.arange(grid_h + 1) * group_pixels
    edges_x = np.arange(grid_w + 1) * group_pixels
    for a, actor in enumerate(truth.actors):
        x0, y0, x1, y1 = truth.boxes[frame_index, a]
        if x1 <= x0 or y1 <= y0:
            continue
        over_y = np.clip(np.minimum(edges_y[1:], y1) - np.maximum(edges_y[:-1], y0), 0, None)
        over_x = np.clip(np.minimum(edges_x[1:], x1) - np.maximum(edges_x[:-1], x0), 0, None)
        area = np.outer(over_y, over_x).astype(float)
        enough = (area >= 0.15 * group_pixels ** 2) | (area >= 0.5 * actor.width * actor.height)
        take = enough & (area > best)
        looks_anomalous = actor.behaviour in ("wrong_way", "run")
        out[take] = 1 + kinds.index(actor.kind) + (len(kinds) if looks_anomalous else 0)
        best[take] = area[take]
    return out


# ---------------------------------------------------------------------------------------------
# Labels: what is true in a window, and questions about it


@dataclasses.dataclass(frozen=True)
class WindowFacts:
    """Ground truth of one window (a set of sampled frames) for every analytics task."""

    present: frozenset      # (kind, zone) pairs: an object of that kind showed there
    entered: frozenset      # zones an object moved into (showed there after not) in the window
    moving: int             # objects that moved relative to the scene during the window
    anomaly: bool           # an object moved against the flow, or ran
    anomalies: tuple = ()   # (object index, "against the flow" | "running") for explanations


@dataclasses.dataclass(frozen=True)
class QA:
    task: str
    question: str
    answer: str


def zone_mask(centres: np.ndarray, zone: str, width: int, height: int) -> np.ndarray:
    """Whether each (x, y) centre is inside the view and in the zone: bool [...]."""
    x, y = centres[..., 0], centres[..., 1]
    with np.errstate(invalid="ignore"):
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        half = {"left": x < width / 2, "right": x >= width / 2, "top": y < height / 2,
                "bottom": y >= height / 2}
    if zone not in half:
        raise ValueError(f"unknown zone {zone!r}; use one of {', '.join(ZONES)}")
    return inside & half[zone]


# An object is in view when at least this share of it shows in the picture (clipped by the
# view's edge, or painted over by objects drawn after it). Half: for an object cut by one
# edge only, the same as "its centre is inside the view".
VISIBLE_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Sighting:
    """What one frame shows of one object (screen pixels)."""

    box: tuple[int, int, int, int]   # (x0, y0, x1, y1) of its visible pixels, x1/y1 exclusive
    centroid: tuple[float, float]    # mean (x, y) of its visible pixels
    share: float                     # visible pixels / the object's full area


def object_ids(truth: SceneTruth, frame_index: int) -> np.ndarray:
    """Which object each pixel of a frame shows: int64 [H, W], -1 for the background.

    The generator pastes the objects of the frame's shot in index order, each clipped to the
    view, so a later object hides an earlier one; this paints the clipped boxes the same way.
    """
    ids = np.full((truth.height, truth.width), -1, np.int64)
    shot = truth.shot[frame_index]
    for a, actor in enumerate(truth.actors):
        x0, y0, x1, y1 = truth.boxes[frame_index, a]
        if actor.shot == shot and x1 > x0 and y1 > y0:
            ids[y0:y1, x0:x1] = a
    return ids


def sightings(truth: SceneTruth, frame_index: int,
              min_share: float = VISIBLE_SHARE) -> dict[int, Sighting]:
    """Objects a frame shows, {object index: Sighting}, from its id map (`object_ids`).

    Objects showing less than min_share of their area are left out.
    """
    ids = object_ids(truth, frame_index)
    out = {}
    for a, actor in enumerate(truth.actors):
        ys, xs = np.nonzero(ids == a)
        share = len(xs) / float(actor.width * actor.height)
        if len(xs) and share >= min_share:
            out[a] = Sighting(box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                   int(ys.max()) + 1),
                              centroid=(float(xs.mean()), float(ys.mean())), share=share)
    return out


def window_facts(truth: SceneTruth, frame_indices) -> WindowFacts:
    """Facts of the window made of these display-order frames (the serving window's frames).

    Only what the window's pictures show counts: an object is in a frame when at least
    VISIBLE_SHARE of it shows there (`sightings`: cut by the view's edge or hidden behind
    another object, it is not), and its zone is where its visible pixels are (their
    centroid). Moving, running and against-the-flow use its world displacement between
    consecutive window frames in which it shows (so pan and shake do not make a parked car
    move, and an object hidden all window does not count).
    """
    idx = np.asarray(frame_indices, dtype=np.int64)
    if idx.ndim != 1 or len(idx) == 0:
        raise ValueError("a window needs at least one frame index")
    if idx.min() < 0 or idx.max() >= truth.num_frames:
        raise ValueError(f"frame indices {idx.min()}..{idx.max()} outside the clip's "
                         f"{truth.num_frames} frames")
    seen = [sightings(truth, int(f)) for f in idx]
    centres = np.full((len(idx), len(truth.actors), 2), np.nan, np.float32)   # [F, A, 2]
    for f, frame in enumerate(seen):
        for a, sighting in frame.items():
            centres[f, a] = sighting.centroid
    world = truth.world[idx]
    times = idx / truth.fps
    in_zone = {z: zone_mask(centres, z, truth.width, truth.height) for z in ZONES}  # [F, A]
    in_view = in_zone["left"] | in_zone["right"]
    present, entered, anomalies = set(), set(), []
    moving = 0
    for a, actor in enumerate(truth.actors):
        in_shot = truth.shot[idx] == actor.shot            # [F]
        for z in ZONES:
            if in_zone[z][:, a].any():
                present.add((actor.kind, z))
            inside = in_zone[z][in_shot, a]
            # Not shown there (elsewhere, off-screen or hidden) at some frame and shown
            # there at a later one, same shot.
            if inside.any() and (~inside[:int(np.argmax(inside))]).any():
                entered.add(z)
        shown = np.flatnonzero(in_view[:, a])
        pairs = [(i, j) for i, j in zip(shown[:-1], shown[1:]) if j == i + 1]
        if not pairs:
            continue
        velocity = np.array([(world[j, a] - world[i, a]) / (times[j] - times[i])
                             for i, j in pairs])           # [P, 2] px/s
        speed = np.hypot(velocity[:, 0], velocity[:, 1])
        if (speed >= MOVING_PX_PER_S).any():
            moving += 1
        if (velocity[:, 0] <= -AGAINST_FLOW_PX_PER_S).any():
            anomalies.append((a, "against the flow"))
        elif (speed >= RUNNING_PX_PER_S).any():
            anomalies.append((a, "running"))
    return WindowFacts(present=frozenset(present), entered=frozenset(entered), moving=moving,
                       anomaly=bool(anomalies), anomalies=tuple(anomalies))


def answer(facts: WindowFacts, task: str, kind: str | None = None,
           zone: str | None = None) -> str:
    """The true answer to a task's question about a window."""
    if task == "presence":
        return "yes" if (kind, zone) in facts.present else "no"
    if task == "entered":
        return "yes" if zone in facts.entered else "no"
    if task == "count":
        return NUMBER_WORDS[min(facts.moving, len(NUMBER_WORDS) - 1)]
    if task == "anomaly":
        return "yes" if facts.anomaly else "no"
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def ask(facts: WindowFacts, rng: np.random.Generator, tasks=TASKS) -> list[QA]:
    """Questions about a window with their true answers, one per entry of tasks.

    For presence and entry the (kind, zone) or zone asked about is a true one with
    probability TRUE_SHARE when both kinds exist: asking about random pairs would make almost
    every answer "no", and many windows have nothing true to ask about. A task listed again
    asks about something not asked yet, preferring the other answer (a yes/no pair).
    """
    out: list[QA] = []
    asked: dict[str, list] = {}
    for task in tasks:
        kind = zone = None
        if task in ("presence", "entered"):
            options = [(k, z) for k in KINDS for z in ZONES] if task == "presence" else \
                [(None, z) for z in ZONES]
            truth = facts.present if task == "presence" else \
                {(None, z) for z in facts.entered}
            before = asked.setdefault(task, [])
            options = [o for o in options if o not in before] or options
            true = [o for o in options if o in truth]
            false = [o for o in options if o not in truth]
            if before:
                want_true = before[-1] not in truth
            else:
                want_true = rng.random() < TRUE_SHARE
            pool = true if true and (want_true or not false) else false
            kind, zone = pool[int(rng.integers(len(pool)))]
            before.append((kind, zone))
        out.append(QA(task, QUESTIONS[task].format(kind=kind, zone=zone),
                      answer(facts, task, kind, zone)))
    return out


# ---------------------------------------------------------------------------------------------
# Serving windows: which frames the LLM sees for each request of a streamed clip


@dataclasses.dataclass
class ServedWindow:
    """The LLM window after one request of a streamed clip."""

    chunk: int                  # index of the request (chunk) whose answer covers it
    frame_indices: np.ndarray   # int64 [F] display-order frame numbers in the window
    t: np.ndarray               # int64 [F] sampled-frame index in the stream (M-RoPE t)
    time_ms: np.ndarray         # int64 [F] presentation times
    frame_types: str            # "I"/"P"/"B" per window frame
    rgb: np.ndarray | None      # uint8 [F, Hp, Wp, 3] padded pixels, if asked for
    previous_rgb: np.ndarray | None = None  # uint8 [F, Hp, Wp, 3]: each frame's previous
    #                             sampled frame (itself at the first), as codec_parser pairs them


def serving_windows(path: str | Path, *, analysis_fps: float, window_seconds: float,
                    stride_seconds: float | None = None,
                    group_pixels: int | None = None) -> list[ServedWindow]:
    """Replay a clip the way the client and server window it; one ServedWindow per request.

    The client cuts the file into chunks of stride_seconds (default: the window) with
    `demux.iter_chunks`; the server decodes each chunk with a `StreamDecoder` (draining it on
    the last), samples with `FrameSampler` at analysis_fps and keeps the frames of
    (newest - window_seconds, newest] in an `llm.SlidingWindow`. These are the same objects the
    serving path uses, so the frames labelled are exactly the frames the LLM sees.
    group_pixels: also return each window frame's pixels as `codec.frame_to_rgb` gives them.
    """
    import torch

    from codecsight.codec import FrameSampler, StreamDecoder, frame_to_rgb
    from codecsight_client.demux import iter_chunks, probe
    from codecsight.llm import SlidingWindow, WindowFrame

    info = probe(str(path))
    decoder = StreamDecoder(info.codec, export_mvs=False)
    sampler = FrameSampler(info.fps, analysis_fps)
    window = SlidingWindow(window_seconds)
    pixels: dict[int, np.ndarray] = {}
    previous: dict[int, np.ndarray] = {}
    last = None
    out, next_t = [], 0
    chunks = list(iter_chunks(str(path), stride_seconds or window_seconds))
    for c, chunk in enumerate(chunks):
        frames = decoder.feed(chunk.data)
        if c == len(chunks) - 1:
            frames += decoder.flush()
        added = []
        for f in frames:
            if not sampler.is_sampled(f.index):
                continue
            added.append(WindowFrame(t=next_t, frame_index=f.index,
                                     time_ms=round(1000.0 * f.index / info.fps),
                                     frame_type=f.pict_type, grid_h=0, grid_w=0,
                                     tokens=torch.zeros(0, 1), cells=np.zeros((0, 2), np.int64)))
            if group_pixels:
                pixels[next_t] = frame_to_rgb(f.frame, group_pixels)
                same = last is not None and last.shape == pixels[next_t].shape
                previous[next_t] = last if same else pixels[next_t]
                last = pixels[next_t]
            next_t += 1
        for gone in window.add(added):
            pixels.pop(gone.t, None)
            previous.pop(gone.t, None)
        current = window.frames
        out.append(ServedWindow(
            chunk=c, frame_indices=np.array([f.frame_index for f in current], np.int64),
            t=np.array([f.t for f in current], np.int64),
            time_ms=np.array([f.time_ms for f in current], np.int64),
            frame_types="".join(f.frame_type for f in current),
            rgb=np.stack([pixels[f.t] for f in current]) if group_pixels and current else None,
            previous_rgb=np.stack([previous[f.t] for f in current])
            if group_pixels and current else None))
    return out
