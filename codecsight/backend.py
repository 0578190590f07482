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
def stream_state(streams, seq: Sequence, make, replace: bool = False,
                 owner: str | None = None):
    """The request's per-stream state: made on START (a throwaway for warmup), looked up
    otherwise (StreamNotFound if it has none), freed on END even on error.

    owner: the request's STREAM_TOKEN where the model checks ownership (StreamStates.start
    and .get; a refused request leaves the owner's state untouched), None where it does not.
    make() builds the state from the request's settings, so a ValueError it raises (an
    unknown codec, a bad frame rate) is the request's fault: InvalidRequest.
    A START whose request then fails leaves no state: the camera's retry must find the
    stream free, not "already active".
    """
    started = False
    if seq.dry_run or seq.start:
        try:
            state = make()
        except StreamError:
            raise
        except ValueError as e:
            raise InvalidRequest(seq.stream_id, str(e)) from e
        if not seq.dry_run:
            state = streams.start(seq.stream_id, state, replace=replace, owner=owner)
            started = True
    else:
        state = streams.get(seq.stream_id, owner=owner)
    try:
        yield state
    except BaseException:
        if started:
            streams.end(seq.stream_id)
        raise
    finally:
        if seq.end and not seq.dry_run:
            streams.end(seq.stream_id)


def sequence_batching(model: str, model_config: str | dict) -> tuple[float, int | None]:
    """(idle timeout in seconds, max_candidate_sequences or None) of the model's
    sequence_batching, from the config Triton passes to initialize (JSON text or dict).

    Triton's default idle timeout is 1 s; max_candidate_sequences is None unless the
    "oldest" strategy sets it. Raises ValueError when the model has no sequence batcher.
    """
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    batching = config.get("sequence_batching")
    if batching is None:
        raise ValueError(f"model {model!r} is stateful per stream: its config needs a "
                         "sequence_batching section")
    # protobuf's JSON writes uint64 as a string: int() reads either form.
    idle_s = int(batching.get("max_sequence_idle_microseconds") or 1_000_000) / 1e6
    oldest = batching.get("oldest")
    candidates = int(oldest["max_candidate_sequences"]) if oldest and \
        oldest.get("max_candidate_sequences") else None
    return idle_s, candidates


def check_stream_limits(model: str, model_config: str | dict, state_ttl_seconds: float,
                        max_streams: int | None = None) -> None:
    """Refuse to load (ValueError naming the values) a config whose settings contradict its
    sequence batcher.

    state_ttl_seconds must be at least the batcher's idle timeout: Triton keeps a sequence
    that long without telling the model, so a shorter TTL would evict a live stream.
    max_streams (the admission cap) must be below max_candidate_sequences: a START over
    the cap must reach the model to be refused at once, not wait in Triton's backlog for
    a free sequence slot.
    """
    idle_s, candidates = sequence_batching(model, model_config)
    if state_ttl_seconds < idle_s:
        raise ValueError(
            f"model {model!r}: state_ttl_seconds={state_ttl_seconds:g} is shorter than its "
            f"sequence batcher's max_sequence_idle_microseconds={round(idle_s * 1e6)} "
            f"({idle_s:g} s): a stream Triton still holds would lose its state; raise "
            "state_ttl_seconds or lower the idle timeout")
    if max_streams is None:
        return
    if candidates is None:
        raise ValueError(f"model {model!r}: max_streams={max_streams} needs sequence_batching "
                         "with the oldest strategy and its max_candidate_sequences set")
    if max_streams >= candidates:
        raise ValueError(
            f"model {model!r}: max_streams={max_streams} must be below its sequence "
            f"batcher's max_candidate_sequences={candidates}: a START over the cap would wait "
            "in Triton's backlog instead of being refused; lower max_streams or raise "
            "max_candidate_sequences (here and in llm_prefill)")


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
        # A refusal is the client's business, but the operator's too: another client's
        # token, an out-of-order chunk or a flood of bad input leave a trace in the log.
        pb_utils.Logger.log_warn(f"{model}: refused ({exc.code}): {exc}")
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
