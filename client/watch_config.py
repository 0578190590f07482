"""The camera list `codecsight-client watch CONFIG` follows: a TOML or YAML file.

TOML is read by the standard library's tomllib, YAML by PyYAML; pydantic validates both
against one schema, so a mistake is reported with the file, the camera and the key:

    server = "127.0.0.1:8001"        # optional (--url overrides it)
    [defaults]                       # optional: any camera key but stream_id and url
    policy = "codec"
    [[cameras]]
    stream_id = "dock-1"
    url = "rtsp://10.0.0.5/stream1"  # or a file (relative to this config's folder)
    question = "is a truck at the dock?"
    # optional: policy, refresh, fps, window_seconds, stride_seconds, replay_realtime,
    # max_attempts, video_track
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import pydantic
import yaml

from codecsight import protocol as P
from codecsight_client import settings as defaults
from codecsight_client.demux import is_live
from codecsight_client.live import Camera

Policy = Literal[P.PATCH_POLICIES]       # type: ignore[valid-type]
Refresh = Literal[P.REFRESH_POLICIES]    # type: ignore[valid-type]


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file, camera and key."""


class CameraDefaults(pydantic.BaseModel):
    """Keys a camera may set, with their defaults (also the [defaults] table)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    question: str = pydantic.Field(defaults.QUESTION, min_length=1)
    policy: Policy = defaults.PATCH_POLICY
    refresh: Refresh = defaults.REFRESH_POLICY
    fps: float = pydantic.Field(defaults.ANALYSIS_FPS, gt=0)
    window_seconds: float = pydantic.Field(defaults.WINDOW_SECONDS, gt=0)
    stride_seconds: float | None = pydantic.Field(None, gt=0)
    replay_realtime: bool = False
    max_attempts: int | None = pydantic.Field(None, ge=1)
    video_track: int | None = pydantic.Field(None, ge=0)


class CameraConfig(CameraDefaults):
    stream_id: str = pydantic.Field(pattern=P.STREAM_ID_PATTERN.pattern)
    url: str = pydantic.Field(min_length=1)


class WatchConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    server: str | None = None
    queue_depth: int = pydantic.Field(defaults.QUEUE_DEPTH, ge=1)
    request_timeout_s: float = pydantic.Field(defaults.REQUEST_TIMEOUT_S, gt=0)
    defaults: dict = pydantic.Field(default_factory=dict)
    cameras: list[CameraConfig] = pydantic.Field(min_length=1)

    @pydantic.field_validator("defaults")
    @classmethod
    def _known_defaults(cls, value: dict) -> dict:
        CameraDefaults.model_validate(value)   # the same keys and checks as a camera's
        return value

    @pydantic.model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data):
        if isinstance(data, dict) and isinstance(data.get("defaults"), dict) \
                and isinstance(data.get("cameras"), list):
            data = dict(data, cameras=[{**data["defaults"], **c} if isinstance(c, dict) else c
                                       for c in data["cameras"]])
        return data

    @pydantic.model_validator(mode="after")
    def _unique_ids(self):
        ids = [c.stream_id for c in self.cameras]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"stream_id {repeated[0]!r} is given to more than one camera; "
                             "each camera needs its own")
        return self


def _read(path: Path) -> object:
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from e
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except tomllib.TOMLDecodeError as e:   # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except yaml.YAMLError as e:
        # One line, not PyYAML's multi-line excerpt: where (1-based, as editors count) and what.
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {where}{problem}") from None
    raise ConfigError(f"{path}: unknown config format {suffix or '(no suffix)'!r}; "
                      "name it .toml, .yaml or .yml")


def _where(data, loc: tuple) -> str:
    """'camera 2 (dock-1), key fps' from a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "cameras" and isinstance(loc[1], int):
        cameras = data.get("cameras") if isinstance(data, dict) else None
        entry = cameras[loc[1]] if isinstance(cameras, list) and loc[1] < len(cameras) else None
        name = f" ({entry['stream_id']})" if isinstance(entry, dict) and \
            isinstance(entry.get("stream_id"), str) else ""
        keys = ".".join(str(k) for k in loc[2:])
        return f"camera {loc[1] + 1}{name}" + (f", key {keys!r}" if keys else "")
    return f"key {'.'.join(str(k) for k in loc)!r}" if loc else "the file"


def load(path: str | Path) -> tuple[WatchConfig, list[Camera]]:
    """The validated config and its cameras (file URLs made relative to the config's folder).

    Raises ConfigError naming the file, the camera (number and stream_id) and the key; a file
    camera whose file does not exist is one (the resolved path named).
    """
    path = Path(path)
    data = _read(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a table of keys (server, defaults, "
                          f"cameras), not a {type(data).__name__}")
    try:
        config = WatchConfig.model_validate(data)
    except pydantic.ValidationError as e:
        problems = []
        for error in e.errors():
            loc = tuple(error["loc"])
            if error["type"] == "extra_forbidden" and loc[:1] == ("defaults",) \
                    and loc[-1] in ("stream_id", "url"):
                problems.append(f"{_where(data, loc)}: not allowed in defaults (each camera "
                                "needs its own)")
            elif error["type"] == "extra_forbidden":
                problems.append(f"{_where(data, loc)}: unknown key (a typo?)")
            elif error["type"] == "missing":
                problems.append(f"{_where(data, loc)}: missing")
            else:   # a validator's ValueError reads "Value error, ..." in pydantic: not ours
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"{_where(data, loc)}: {message}")
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None
    cameras = []
    for number, c in enumerate(config.cameras, 1):
        source = c.url
        if not is_live(source):
            # A file: ~ expanded, relative to the config's folder; what the camera opens.
            file = Path(source).expanduser()
            file = file if file.is_absolute() else path.parent / file
            source = str(file)
            if not file.is_file():
                # A camera may come back later; a file that is not there now will not.
                raise ConfigError(f"{path}: camera {number} ({c.stream_id}), key 'url': no "
                                  f"such file {file.resolve()}")
        cameras.append(Camera(
            stream_id=c.stream_id, source=source, question=c.question, policy=c.policy,
            refresh=c.refresh, analysis_fps=c.fps, window_seconds=c.window_seconds,
            stride_seconds=c.stride_seconds, replay_realtime=c.replay_realtime,
            max_attempts=c.max_attempts, video_track=c.video_track))
    return config, cameras
