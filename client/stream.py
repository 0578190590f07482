"""Send one camera stream's compressed chunks to the CodecSight ensemble over gRPC.

The stream's ID is its Triton sequence ID: the first chunk carries START, the last END, so
every composing model keeps (and frees) that stream's state.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from codecsight import protocol as P
from codecsight_client import settings as defaults
from codecsight_client.demux import last_keyframe_offset

ENSEMBLE = "ensemble"
# The most video kept for resuming from the last keyframe (one GOP is far less).
MAX_RESUME_BYTES = 16 * 1024 * 1024
# Triton's sequence batcher answers a continuation of a sequence it does not know (after a
# server restart, or its idle timeout) itself, with INVALID_ARGUMENT and this text: the one
# error read by its message. Our models answer NOT_FOUND (protocol.StreamNotFound).
_BATCHER_NEEDS_START = "must specify the START flag"


def state_lost(error: InferenceServerException) -> bool:
    """The server no longer holds the stream's state: restart the stream with START."""
    status = error.status()
    return status == "StatusCode.NOT_FOUND" or (
        status == "StatusCode.INVALID_ARGUMENT" and _BATCHER_NEEDS_START in error.message())


def unreachable(error: InferenceServerException) -> bool:
    """The server is down or restarting (not a refusal of this request)."""
    return "UNAVAILABLE" in str(error.status()) and "restricted" not in str(error)


def _stderr_notice(message: str) -> None:
    print(f"codecsight-client: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class StreamSettings:
    """What a stream asks the server for; defaults from codecsight_client.settings."""

    question: str = defaults.QUESTION
    codec: str = "h264"                # the source's, from demux.probe
    source_fps: float = 25.0           # the source's, from demux.probe
    analysis_fps: float = defaults.ANALYSIS_FPS
    window_seconds: float = defaults.WINDOW_SECONDS
    policy: str = defaults.PATCH_POLICY
    refresh: str = defaults.REFRESH_POLICY


@dataclasses.dataclass
class WindowResult:
    stream_id: str
    index: int
    answer: str
    latency_s: float
    bytes_sent: int
    parse: P.ParseStats
    llm: P.LlmStats


def connect(url: str, *, ssl: bool = False, root_certificates: str | None = None,
            private_key: str | None = None, certificate_chain: str | None = None):
    """A tritonclient gRPC client; TLS when ssl (certificate paths as in tritonclient)."""
    return grpcclient.InferenceServerClient(
        url, ssl=ssl, root_certificates=root_certificates, private_key=private_key,
        certificate_chain=certificate_chain)


def _input(name: str, value: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(value.shape), dtype)
    tensor.set_data_from_numpy(value)
    return tensor


def _fp32(value: float) -> np.ndarray:
    return np.array([[value]], dtype=np.float32)


class StreamClient:
    """One stream: call send() for each chunk in order; the first is START, last=True is END."""

    def __init__(self, client, stream_id: str, settings: StreamSettings, timeout_s: float = 600,
                 reconnect_s: float = 60.0, notice=_stderr_notice):
        if not P.STREAM_ID_PATTERN.match(stream_id):
            raise ValueError(f"invalid stream ID {stream_id!r}: use 1-128 letters, digits or "
                             "._:- starting with a letter or digit")
        self.client, self.stream_id, self.settings = client, stream_id, settings
        self.timeout_s = timeout_s
        self.reconnect_s = reconnect_s
        self.notice = notice
        self.resumes = 0
        self.started = False
        self._since_keyframe = b""  # video sent since the last keyframe, to resume from
        self.windows = 0
        self.bytes_sent = 0

    def inputs(self, chunk: bytes) -> list[grpcclient.InferInput]:
        s = self.settings
        return [
            _input(P.CHUNK, np.frombuffer(chunk, dtype=np.uint8)[None], "UINT8"),
            _input(P.CODEC, P.bytes_scalar(s.codec), "BYTES"),
            _input(P.SOURCE_FPS, _fp32(s.source_fps), "FP32"),
            _input(P.ANALYSIS_FPS, _fp32(s.analysis_fps), "FP32"),
            _input(P.POLICY, P.bytes_scalar(s.policy), "BYTES"),
            _input(P.REFRESH, P.bytes_scalar(s.refresh), "BYTES"),
            _input(P.WINDOW_SECONDS, _fp32(s.window_seconds), "FP32"),
            _input(P.QUESTION, P.bytes_scalar(s.question), "BYTES"),
        ]

    def _send_continuation_raw(self, chunk: bytes) -> WindowResult:
        """A continuation with no resume or retry: what a naive client would send."""
        self.started = True
        return self._send(chunk, False)

    def send(self, chunk: bytes, last: bool = False) -> WindowResult:
        """Send one chunk; returns the window's answer and the models' statistics.

        If the server lost the stream's state (restart, idle eviction), the chunk is sent
        again with START, so the stream resumes from its next decodable frame; while the
        server is unreachable it is retried with backoff for up to reconnect_s seconds.
        """
        deadline, delay, resumed = None, 0.5, False
        while True:
            try:
                return self._send(chunk, last)
            except InferenceServerException as e:
                if self.started and not resumed and state_lost(e):
                    # A fresh decoder can only begin at a keyframe: re-send the video since
                    # the last one ahead of this chunk, so the resumed window has frames.
                    self.notice(f"stream {self.stream_id!r}: the server lost its state; "
                                f"resuming it with START from its last keyframe "
                                f"({len(self._since_keyframe)} bytes re-sent)")
                    chunk = self._since_keyframe + chunk
                    self.started, resumed = False, True
                    self.resumes += 1
                    continue
                if not unreachable(e):
                    raise
                deadline = deadline or time.monotonic() + self.reconnect_s
                if time.monotonic() + delay > deadline:
                    raise
                self.notice(f"stream {self.stream_id!r}: server unreachable, retrying in "
                            f"{delay:.1f} s")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _send(self, chunk: bytes, last: bool) -> WindowResult:
        outputs = [grpcclient.InferRequestedOutput(n) for n in P.ENSEMBLE_OUTPUTS]
        t_start = time.perf_counter()
        # The request ID is the stream ID, so even errors Triton raises before any model
        # runs (wrong dtype or shape) name the stream.
        result = self.client.infer(
            ENSEMBLE, self.inputs(chunk), outputs=outputs, request_id=self.stream_id,
            sequence_id=self.stream_id, sequence_start=not self.started, sequence_end=last,
            client_timeout=self.timeout_s)
        latency = time.perf_counter() - t_start
        self.started = True
        self.bytes_sent += len(chunk)
        keyframe = last_keyframe_offset(chunk, self.settings.codec)
        tail = chunk[keyframe:] if keyframe >= 0 else self._since_keyframe + chunk
        self._since_keyframe = tail if len(tail) <= MAX_RESUME_BYTES else b""
        window = WindowResult(
            stream_id=self.stream_id, index=self.windows,
            answer=P.read_string(result.as_numpy(P.ANSWER)), latency_s=latency,
            bytes_sent=len(chunk),
            parse=P.ParseStats.from_json(P.read_string(result.as_numpy(P.PARSE_STATS))),
            llm=P.LlmStats.from_json(P.read_string(result.as_numpy(P.LLM_STATS))))
        self.windows += 1
        return window


def run_stream(client, stream_id: str, settings: StreamSettings, chunks, on_window=None):
    """Send every chunk of an iterable as one stream (END on the last); returns the windows."""
    stream = StreamClient(client, stream_id, settings)
    results, pending = [], None
    for chunk in chunks:
        if pending is not None:
            results.append(stream.send(pending.data))
            if on_window:
                on_window(results[-1], pending)
        pending = chunk
    if pending is not None:
        results.append(stream.send(pending.data, last=True))
        if on_window:
            on_window(results[-1], pending)
    return results
