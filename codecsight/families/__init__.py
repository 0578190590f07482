"""Model families CodecSight serves, detected from a checkpoint's config.json.

    family_for(config_json)   -> Family (codecsight.families.base), or UnsupportedFamily
    family_for_dir(model_dir) -> Family with the directory's preprocessor and settings

Each family module defines Family subclasses; this registry lists them by config.json
"model_type". An unsupported checkpoint is refused with the list of supported families.
"""
from __future__ import annotations

import json
from pathlib import Path

from codecsight.families.base import (SETTINGS_FILE, CheckpointSettings, Family,
                                      UnsupportedFamily)
from codecsight.families.qwen2_5_vl import Qwen2_5VL
from codecsight.families.qwen2_vl import Qwen2VL

FAMILIES: list[type[Family]] = [Qwen2VL, Qwen2_5VL]
try:   # Qwen3-VL and Qwen3-VL-MoE (helper 16B's module; absent until it lands)
    from codecsight.families import qwen3_vl as _qwen3_vl
except ModuleNotFoundError as e:   # only the module itself may be missing
    if e.name != "codecsight.families.qwen3_vl":
        raise
else:
    FAMILIES += list(getattr(_qwen3_vl, "FAMILIES", []))

# InternVL3 is not served: its pixel-shuffle connector folds whole 2x2 neighbourhoods of the
# full grid into each token, so a pruned set cannot be connected soundly (README).
NOT_SERVED = {"internvl": "InternVL3", "internvl_chat": "InternVL3"}


def supported() -> str:
    """'Qwen2-VL (qwen2_vl), Qwen2.5-VL (qwen2_5_vl), ...' for messages and docs."""
    return ", ".join(f"{f.title} ({', '.join(f.model_types)})" for f in FAMILIES)


def family_class(config_json: dict) -> type[Family]:
    """The Family subclass serving a config.json; UnsupportedFamily listing the supported."""
    model_type = config_json.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = config_json.get("architectures") or []
    why = (f" ({NOT_SERVED[model_type]} cannot be served: its pixel-shuffle connector needs "
           "the full grid; see README 'Model families')") if model_type in NOT_SERVED else ""
    raise UnsupportedFamily(
        f"checkpoint of model_type {model_type!r} (architectures {architectures}) is not a "
        f"family CodecSight serves{why}; supported: {supported()}")


def family_for(config_json: dict, preprocessor: dict | None = None,
               settings: CheckpointSettings | None = None) -> Family:
    """The Family for a parsed config.json (and preprocessor_config.json, codecsight.json)."""
    return family_class(config_json)(config_json, preprocessor, settings)


def family_for_dir(model_dir: str | Path) -> Family:
    """The Family of a checkpoint directory. FileNotFoundError without config.json,
    UnsupportedFamily for a family CodecSight does not serve, ValueError for a bad
    codecsight.json."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in model directory {model_dir}: run `codecsight build` or point "
            f"--model-dir at a checkpoint of a supported family ({supported()})")
    config = json.loads(config_path.read_text())
    pre_path = model_dir / "preprocessor_config.json"
    preprocessor = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    return family_for(config, preprocessor, CheckpointSettings.for_model_dir(model_dir))


__all__ = ["FAMILIES", "SETTINGS_FILE", "CheckpointSettings", "Family", "UnsupportedFamily",
           "family_class", "family_for", "family_for_dir", "supported"]
