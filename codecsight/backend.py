"""Glue shared by the Python-backend model.py files: request fields, sequence flags, and
responses. Takes the `triton_python_backend_utils` module as an argument so the library
never imports it (it exists only inside the Triton stub).
"""
from __future__ import annotations

import contextlib
import json

import numpy as np

from codecsight.protocol import STREAM_ID_PATTERN, StreamError, read_string


class Sequence:
    """Stream ID and START/END flags of one request; CORRID 0 (warmup) is a dry run."""

    def __init__(self, request, pb_utils):
        corr = request.correlation_id()
        self.stream_id = corr if isinstance(corr, str) else int(corr)
        flags = request.flags()
        self.start = bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
        self.end = bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
        self.dry_run = self.stream_id in (0, "")
        if not self.dry_run and not STREAM_ID_PATTERN.match(str(self.stream_id)):
            raise StreamError(str(self.stream_id)[:64], "invalid stream ID: use 1-128 letters, "
                              "digits or ._:- starting with a letter or digit")


@contextlib.contextmanager
def stream_state(streams, seq: Sequence, make, replace: bool = False):
    """The request's per-stream state: made on START (a throwaway for warmup), looked up
    otherwise (StreamError naming the stream if it has none), freed on END even on error."""
    if seq.dry_run:
        state = make()
    elif seq.start:
        state = streams.start(seq.stream_id, make(), replace=replace)
    else:
        state = streams.get(seq.stream_id)
    try:
        yield state
    finally:
        if seq.end and not seq.dry_run:
            streams.end(seq.stream_id)


def array(request, name: str, pb_utils) -> np.ndarray:
    """An input as numpy with the leading batch dimension (always 1 here) removed."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"missing input {name}")
    value = tensor.as_numpy()
    return value[0] if value.ndim > 0 and value.shape[0] == 1 else value


def string(request, name: str, pb_utils) -> str:
    return read_string(array(request, name, pb_utils))


def scalar(request, name: str, pb_utils) -> float:
    return float(np.asarray(array(request, name, pb_utils)).reshape(-1)[0])


def response(pb_utils, **outputs) -> object:
    """An InferenceResponse whose outputs get a batch dimension of 1; str -> BYTES; a
    statistics dataclass (protocol.ParseStats, LlmStats) or a dict -> JSON."""
    tensors = []
    for name, value in outputs.items():
        if hasattr(value, "to_json"):
            value = value.to_json()
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        if isinstance(value, str):
            value = np.array([value.encode("utf-8")], dtype=np.object_)
        tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)[None]))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error(pb_utils, message: str) -> object:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
