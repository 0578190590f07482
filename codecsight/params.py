"""Typed `parameters` from a Triton model config (config.pbtxt is the one source of settings)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def model_params(model_config: str | dict, defaults: dict[str, Any]) -> dict[str, Any]:
    """Read config `parameters`, converting each to the type of its default.

    Unknown parameter names are an error, so a typo in config.pbtxt cannot be silently ignored.
    """
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    raw = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"model {config.get('name')!r}: unknown parameters {unknown}; "
                         f"known: {sorted(defaults)}")
    out = dict(defaults)
    for key, value in raw.items():
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                out[key] = kind(value)
            except ValueError as e:
                raise ValueError(f"model {config.get('name')!r}: parameter {key}={value!r} "
                                 f"is not a {kind.__name__}") from e
    return out


def resolve_model_dir(model_repository_arg: str, model_dir: str) -> Path:
    """A model_dir parameter, relative paths taken from the model repository's root.

    Triton passes each model its own folder (<repository>/<model>) as args["model_repository"].
    """
    path = Path(model_dir)
    return path if path.is_absolute() else (Path(model_repository_arg).parent / path).resolve()
