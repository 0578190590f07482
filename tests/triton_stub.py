"""One stand-in for `triton_python_backend_utils`, as far as our model.py files use it.

The real module exists only inside Triton's Python-backend stub process. With this one a test
imports a model_repository/<model>/1/model.py by path and calls initialize/execute with no
server: `pb = pb_utils()`, `model = load_model("codec_parser", pb)`,
`model.TritonPythonModel().initialize(model_args("codec_parser", model_dir=...))`.

It mirrors the real API the models touch (checked against tritonserver 2.51's stub):
TritonError(message, code) with the build's code constants (no RESOURCE_EXHAUSTED there, so
none here), Logger.log_*, MetricFamily, the sequence flags. Responses keep their outputs as
numpy arrays in `outputs` for tests to read.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = REPO_ROOT / "model_repository"

TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2


class Tensor:
    def __init__(self, name: str, array):
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError:
    """pb_utils.TritonError; the codes are the constant names this build has."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG = "UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG"
    UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS = "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"

    def __init__(self, message: str, code: str = INTERNAL):
        self.message, self.code = message, code

    def __repr__(self) -> str:
        return f"TritonError({self.message!r}, {self.code})"


class InferenceResponse:
    def __init__(self, output_tensors=None, error: TritonError | None = None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error

    def string(self, name: str) -> str:
        """A BYTES output's one string (the batch axis and all)."""
        item = self.outputs[name].reshape(-1)[0]
        return item.decode() if isinstance(item, bytes) else str(item)

    def json(self, name: str) -> dict:
        return json.loads(self.string(name))


class InferenceRequest:
    """A request as the sequence batcher hands it over: inputs with their batch axis of 1."""

    def __init__(self, inputs: dict[str, np.ndarray], correlation_id: str | int = 0,
                 start: bool = False, end: bool = False):
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}
        self._correlation_id = correlation_id
        self._flags = (TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if start else 0) | (
            TRITONSERVER_REQUEST_FLAG_SEQUENCE_END if end else 0)

    def correlation_id(self):
        return self._correlation_id

    def flags(self) -> int:
        return self._flags


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return request.inputs.get(name)


class Logger:
    """pb_utils.Logger; keeps (level, message) records instead of writing Triton's log."""

    def __init__(self):
        self.records: list[tuple[str, str]] = []

    def log(self, message: str, level: str = "info") -> None:
        self.records.append((level, message))

    def log_info(self, message: str) -> None:
        self.log(message, "info")

    def log_warn(self, message: str) -> None:
        self.log(message, "warn")

    def log_error(self, message: str) -> None:
        self.log(message, "error")

    def log_verbose(self, message: str) -> None:
        self.log(message, "verbose")


class Metric:
    def __init__(self, family: "MetricFamily", labels: dict):
        self.family, self.labels, self._value = family, labels, 0.0

    def increment(self, value: float) -> None:
        if self.family.kind == MetricFamily.COUNTER and value < 0:
            raise ValueError("counters only go up")
        self._value += value

    def set(self, value: float) -> None:
        if self.family.kind == MetricFamily.COUNTER:
            raise ValueError("a counter cannot be set")
        self._value = value

    def value(self) -> float:
        return self._value


class MetricFamily:
    """pb_utils.MetricFamily as far as codecsight.metrics.ModelMetrics uses it."""

    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name: str, description: str, kind: str):
        self.name, self.description, self.kind = name, description, kind
        self.metrics: dict[frozenset, Metric] = {}

    def Metric(self, labels: dict) -> Metric:  # noqa: N802 - Triton's name
        key = frozenset(labels.items())
        assert key not in self.metrics, "a metric must be created once per label set"
        self.metrics[key] = Metric(self, labels)
        return self.metrics[key]


def pb_utils() -> types.ModuleType:
    """A fresh stand-in module (its own Logger records)."""
    module = types.ModuleType("triton_python_backend_utils")
    for name in ("Tensor", "TritonError", "InferenceResponse", "InferenceRequest",
                 "MetricFamily", "get_input_tensor_by_name",
                 "TRITONSERVER_REQUEST_FLAG_SEQUENCE_START",
                 "TRITONSERVER_REQUEST_FLAG_SEQUENCE_END"):
        setattr(module, name, globals()[name])
    module.Logger = Logger()
    return module


def load_model(model: str, pb: types.ModuleType) -> types.ModuleType:
    """model_repository/<model>/1/model.py imported by path, bound to the stand-in `pb`."""
    path = REPOSITORY / model / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"{model}_model", path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = pb
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved
    return module


def model_args(model: str, config_name: str | None = None, sequence_idle_s: float | None = None,
               **parameters) -> dict:
    """initialize()'s args as Triton builds them from the served config (configs/<name>.pbtxt
    where config_name names one), with the given parameters replaced (values as strings) and,
    given sequence_idle_s, the sequence batcher's idle timeout."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.params import config_path

    config = text_format.Parse(config_path(model, REPOSITORY, config_name).read_text(),
                               model_config_pb2.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    if sequence_idle_s is not None:
        config.sequence_batching.max_sequence_idle_microseconds = round(sequence_idle_s * 1e6)
    return {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_name": model, "model_version": "1",
            "model_repository": str(REPOSITORY / model)}
