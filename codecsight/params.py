"""Each served model's `parameters`: declared here once, names and types, never values.

config.pbtxt is the one source of the values. A model reads its parameters from the config
Triton hands it (`read`); a tool reads the served ones from the repository's config.pbtxt
(`served_parameters`). Either way a parameter the config lacks, or one it has that the model
does not declare, is a ValueError naming the model and the key: a typo cannot be ignored and
a setting cannot fall back to a copy kept in code.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from codecsight.codec import LOOP_FILTER_SKIPS
from codecsight.policy import PruningConfig
from codecsight.protocol import PATCH_POLICIES, REFRESH_POLICIES

# A parameter's kind: bool, int, float, str, or a tuple of the strings it may take.
Kind = typing.Union[type, tuple]


def _pruning_parameters() -> dict[str, Kind]:
    """PruningConfig's fields and their types: codec_parser's pruning parameters."""
    hints = typing.get_type_hints(PruningConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PruningConfig)}


# Model name -> parameter -> kind, for the Python-backend models (model.py reads these).
PARAMETERS: dict[str, dict[str, Kind]] = {
    "codec_parser": {
        "model_dir": str,                # the checkpoint, for its patch geometry
        "state_ttl_seconds": float,
        "max_state_bytes": int,
        "max_streams": int,              # admission cap per instance
        "max_chunk_bytes": int,
        "max_pixels": int,               # a picture's pixel budget (codec.picture_for)
        "default_policy": PATCH_POLICIES,
        "skip_loop_filter": LOOP_FILTER_SKIPS,
        **_pruning_parameters(),
    },
    "llm_prefill": {
        "model_dir": str,
        "max_new_tokens": int,
        "max_question_tokens": int,
        "state_ttl_seconds": float,
        "max_state_bytes": int,
        "default_refresh": REFRESH_POLICIES,
        "anchor_refresh_frames": int,
        "report_first_logits": bool,     # LLM_STATS carries them (exactness tests)
        "video_pruning_rate": float,     # vllm_evs: share of video tokens dropped after the ViT
        "device": ("cpu", "cuda"),       # where the LLM, its KV caches and masks live
    },
    "vit_pruned": {                      # configs/cpu.pbtxt: ONNX Runtime in the Python backend
        "model_dir": str,                # the checkpoint: its family (and a torch tower's weights)
        "onnx_file": str,
        "max_patches": int,
        "intra_op_threads": int,
        "device": ("cpu", "cuda"),       # where the encoder runs (vision.served_encoder)
    },
}
# vit_pruned's production config.pbtxt runs the TensorRT backend, which reads none of our
# parameters; build_trt_plan.py reads max_patches from it for the engine's profile.
TENSORRT_PARAMETERS: dict[str, dict[str, Kind]] = {"vit_pruned": {"max_patches": int}}
# Lower bounds checked on reading; the library checks the other values where it takes them
# (StreamStates the TTL and byte cap, PruningConfig the pruning settings).
MINIMUM = {"max_streams": 1, "max_chunk_bytes": 1, "max_new_tokens": 1, "max_question_tokens": 1,
           "anchor_refresh_frames": 0, "max_patches": 1, "max_pixels": 784, "intra_op_threads": 0}
# Half-open ranges [low, high) checked on reading (vLLM's range for its video_pruning_rate).
RANGE = {"video_pruning_rate": (0.0, 1.0)}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def torch_device(model: str, name: str, index: int = 0):
    """The torch.device a model's `device` parameter names ('cpu' or 'cuda'; index: the GPU).

    Raises ValueError naming the model and the parameter for a name the model does not
    declare, or for 'cuda' where torch sees no CUDA device, so the model fails to load instead
    of serving somewhere else.
    """
    import torch   # only the models that place tensors need it

    devices = PARAMETERS[model]["device"]
    if name not in devices:
        raise ValueError(f"model {model!r}: parameter device {name!r} is not one of "
                         f"{', '.join(devices)}")
    if name != "cuda":
        return torch.device(name)
    if not torch.cuda.is_available():
        raise ValueError(
            f"model {model!r}: parameter device is 'cuda' but torch finds no CUDA device here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): set "
            "device to 'cpu' in its config.pbtxt, or serve it on a machine with an NVIDIA GPU "
            "and a CUDA build of torch")
    return torch.device("cuda", index)


def declared(model: str, tensorrt: bool = False) -> dict[str, Kind]:
    """The parameters a model declares (parameter -> kind); ValueError for an unknown model."""
    table = TENSORRT_PARAMETERS if tensorrt else PARAMETERS
    if model not in table:
        raise ValueError(f"no parameters are declared for model {model!r}"
                         f"{' on TensorRT' if tensorrt else ''}; known: {sorted(table)}")
    return table[model]


def read(model: str, model_config: str | dict) -> dict[str, Any]:
    """A model's parameters, typed, from its config as Triton passes it to `initialize`.

    model_config: args["model_config"] (JSON text) or that JSON as a dict; its parameters
    are {"key": {"string_value": "..."}}. Returns parameter -> value of its declared kind.
    Raises ValueError naming the model and the key for a missing, unknown or badly typed
    parameter.
    """
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    tensorrt = config.get("platform") == "tensorrt_plan" or config.get("backend") == "tensorrt"
    kinds = declared(model, tensorrt)
    raw = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    unknown, missing = sorted(set(raw) - set(kinds)), sorted(set(kinds) - set(raw))
    if unknown:
        raise ValueError(f"model {model!r}: unknown parameter(s) {unknown} in its config; "
                         f"it declares {sorted(kinds)} (codecsight.params)")
    if missing:
        raise ValueError(f"model {model!r}: its config lacks parameter(s) {missing}; "
                         "config.pbtxt must set every parameter the model declares")
    return {key: _typed(model, key, raw[key], kind) for key, kind in kinds.items()}


def _typed(model: str, key: str, text: str, kind: Kind):
    def bad(expected: str) -> ValueError:
        return ValueError(f"model {model!r}: parameter {key} {text!r} is not {expected}")

    if isinstance(kind, tuple):
        if text not in kind:
            raise bad(f"one of {', '.join(kind)}")
        return text
    if kind is bool:
        value = _BOOLS.get(text.strip().lower())
        if value is None:
            raise bad("a bool (true/false, 1/0, yes/no)")
        return value
    try:
        value = kind(text)
    except ValueError:
        raise bad(f"a {kind.__name__}") from None
    if key in MINIMUM and value < MINIMUM[key]:
        raise bad(f">= {MINIMUM[key]}")
    if key in RANGE and not RANGE[key][0] <= value < RANGE[key][1]:
        raise bad(f"in [{RANGE[key][0]}, {RANGE[key][1]})")
    return value


def config_path(model: str, repository: Path | str | None = None,
                config_name: str | None = None) -> Path:
    """The config.pbtxt Triton serves for a model: `configs/<config_name>.pbtxt` where it
    exists (`--model-config-name`), else `config.pbtxt`. repository: None is the project's."""
    if repository is None:
        from codecsight.serve import DEFAULT_REPOSITORY  # serve is heavier; only tools need it
        repository = DEFAULT_REPOSITORY
    folder = Path(repository) / model
    named = folder / "configs" / f"{config_name}.pbtxt"
    return named if config_name and named.is_file() else folder / "config.pbtxt"


def served_parameters(model: str, repository: Path | str | None = None,
                      config_name: str | None = None) -> dict[str, Any]:
    """The parameters a server on `repository` gives `model`, typed as `read` types them.

    For tools that must use the served settings (training masks, benchmarks). model_dir
    comes back as written (relative to the repository root: `resolve_model_dir`).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = config_path(model, repository, config_name)
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    as_triton_passes_it = {
        "platform": config.platform, "backend": config.backend,
        "parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()},
    }
    try:
        return read(model, as_triton_passes_it)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def resolve_model_dir(model_repository_arg: str, model_dir: str) -> Path:
    """A model_dir parameter, relative paths taken from the model repository's root.

    Triton passes each model its own folder (<repository>/<model>) as args["model_repository"].
    """
    path = Path(model_dir)
    return path if path.is_absolute() else (Path(model_repository_arg).parent / path).resolve()
