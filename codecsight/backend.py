"""Glue shared by the Python-backend model.py files: request fields, sequence flags,
responses, and errors with Triton codes. Takes the `triton_python_backend_utils` module as an
argument so the library never imports it (it exists only inside the Triton stub).
"""
from __future__ import annotations

import contextlib
import json
import traceback

import numpy as np

from codecsight.protocol import InvalidRequest, StreamError, read_string
from codecsight.requests import Sequence


def sequence(request, pb_utils) -> Sequence:
    """The request's stream ID (correlation ID) and START/END flags; not yet validated."""
    corr = request.correlation_id()
    flags = request.flags()
    return Sequence(corr if isinstance(corr, str) else int(corr),
                    start=bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START),
                    end=bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END))


@contextlib.contextmanager
def stream_state(streams, seq: Sequence, make, replace: bool = False):
    """The request's per-stream state: made on START (a throwaway for warmup), looked up
    otherwise (StreamNotFound if it has none), freed on END even on error.

    make() builds the state from the request's settings, so a ValueError it raises (an
    unknown codec, a bad frame rate) is the request's fault: InvalidRequest.
    """
    if seq.dry_run or seq.start:
        try:
            state = make()
        except StreamError:
            raise
        except ValueError as e:
            raise InvalidRequest(seq.stream_id, str(e)) from e
        if not seq.dry_run:
            state = streams.start(seq.stream_id, state, replace=replace)
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
        raise InvalidRequest(request.correlation_id(), f"missing input {name}")
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


def error(pb_utils, message: str, code: str = "INTERNAL") -> object:
    """An error response with a Triton error code (a `pb_utils.TritonError` constant name:
    INVALID_ARG, NOT_FOUND, ALREADY_EXISTS, UNAVAILABLE, INTERNAL, ...)."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


def failure(pb_utils, model: str, request, exc: Exception) -> object:
    """The error response for a request that raised `exc`.

    A StreamError carries its own code and names the stream. Anything else is a bug or a
    fault here, not the request's: its traceback goes to Triton's log before an INTERNAL
    error goes back, and the model carries on with its other requests and streams.
    """
    if isinstance(exc, StreamError):
        return error(pb_utils, f"{model}: {exc}", exc.code)
    stream = request.correlation_id()
    pb_utils.Logger.log_error(f"{model}: stream {stream!r}: unexpected error\n"
                              + "".join(traceback.format_exception(exc)))
    return error(pb_utils, f"{model}: stream {stream!r}: {type(exc).__name__}: {exc}",
                 "INTERNAL")


def respond(pb_utils, model: str, request, handle) -> object:
    """handle(request) -> InferenceResponse, or the `failure` response if it raises: one bad
    request must never take the model down (python_backend answers errors, never raises)."""
    try:
        return handle(request)
    except Exception as e:
        return failure(pb_utils, model, request, e)
