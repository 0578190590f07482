"""Send one camera stream's compressed chunks to the CodecSight ensemble over gRPC.

The stream's ID is its Triton sequence ID: the first chunk carries START, the last END, so
every composing model keeps (and frees) that stream's state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from codecsight import protocol as P
from codecsight_client import settings as defaults
from codecsight_client.demux import Chunk, last_keyframe_offset

ENSEMBLE = "ensemble"
# The most video kept for resuming from the last keyframe (one GOP is far less).
MAX_RESUME_BYTES = 16 * 1024 * 1024
# Triton's sequence batcher answers a continuation of a sequence it does not know (after a
# server restart, or its idle timeout) itself, with INVALID_ARGUMENT and this text: the one
# error read by its message. Our models answer NOT_FOUND (protocol.StreamNotFound).
_BATCHER_NEEDS_START = "must specify the START flag"
# gRPC metadata carrying the stream ID on every request: Triton's sequence ID sits inside the
# request body where no proxy can see it; nginx routes on this header
# (`hash $http_x_stream_id consistent`), so all of a stream's requests reach one instance.
STREAM_ID_HEADER = "x-stream-id"
# nginx in front of several instances (deploy/nginx.conf.j2) starts its own errors with this:
# an UNAVAILABLE from it is an instance that died under the request, never a refusal.
PROXY_ERROR_PREFIX = "codecsight proxy:"


def state_lost(error: InferenceServerException) -> bool:
    """The server no longer holds the stream's state: restart the stream with START."""
    status = error.status()
    return status == "StatusCode.NOT_FOUND" or (
        status == "StatusCode.INVALID_ARGUMENT" and _BATCHER_NEEDS_START in error.message())


def unreachable(error: InferenceServerException) -> bool:
    """The server is down or restarting (not a refusal of this request)."""
    return "UNAVAILABLE" in str(error.status()) and "restricted" not in str(error)


def _live_server_refused(client, error: InferenceServerException) -> bool:
    """A live, ready server answered UNAVAILABLE itself: a refusal (the stream cap), not a
    server that is down or restarting. Only asked after an UNAVAILABLE START."""
    if "UNAVAILABLE" not in str(error.status()) or \
            error.message().startswith(PROXY_ERROR_PREFIX):
        # Through the proxy, a live instance would answer the probe below for a dead one.
        return False
    try:
        return bool(client.is_server_live() and client.is_model_ready(ENSEMBLE))
    except Exception:  # unreachable: the error was the connection's, not the server's answer
        return False


class StreamRefused(RuntimeError):
    """The server refused to open the stream (admission control: it holds its cap of
    streams). Retrying at once would be refused again; the server's message says the cap."""


def _deadline_exceeded(error: InferenceServerException) -> bool:
    return "DEADLINE_EXCEEDED" in str(error.status()) or "Deadline Exceeded" in str(error)


def default_token_file() -> Path:
    """Where the client secret lives: $XDG_CONFIG_HOME/codecsight/client-secret, else
    ~/.config/codecsight/client-secret."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "codecsight" / "client-secret"


def client_secret(path: str | Path | None = None) -> bytes:
    """This client's secret (32 random bytes), created on first use with mode 600.

    Raises ValueError if the file exists but is empty or readable by others.
    """
    path = Path(path) if path else default_token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two clients starting at once must not each write a different secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    if path.stat().st_mode & 0o077:
        raise ValueError(f"client secret {path} is readable by other users: "
                         f"chmod 600 {path}, or delete it to make a new one")
    secret = path.read_bytes()
    if not secret:
        raise ValueError(f"client secret {path} is empty: delete it to make a new one")
    return secret


def stream_token(stream_id: str, token_file: str | Path | None = None) -> str:
    """The stream's owner token: HMAC-SHA256(client secret, stream ID), hex.

    The same on every run of this client (the secret file persists), so a client restarted
    after a crash proves it owns its streams and takes them back at once; another client
    (another secret) cannot write into or end them. Never print it.
    """
    return hmac.new(client_secret(token_file), stream_id.encode(), hashlib.sha256).hexdigest()


def check_stream_id(stream_id: str) -> None:
    """Raises ValueError naming stream_id unless it is a valid stream ID (the server's rule,
    protocol.STREAM_ID_PATTERN), so a bad one is refused before anything is read or sent."""
    if not P.STREAM_ID_PATTERN.match(stream_id):
        raise ValueError(f"invalid stream ID {stream_id!r}: use 1-128 letters, digits or "
                         "._:- starting with a letter or digit")


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
    rotation: int = 0                  # degrees clockwise that turn frames upright (ROTATION)


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


# protocol's Triton data types as tritonclient names them.
_WIRE_DTYPES = {"TYPE_UINT8": "UINT8", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
                "TYPE_FP32": "FP32", "TYPE_FP64": "FP64", "TYPE_STRING": "BYTES"}
_ENSEMBLE_DTYPES = {t.name: _WIRE_DTYPES[t.dtype] for t in P.MODEL_TENSORS["ensemble"]["input"]}
_NUMPY_DTYPES = {"UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
                 "FP64": np.float64, "BYTES": np.object_}


def request_arrays(access_units: list[tuple[bytes, float]], settings: StreamSettings, *,
                   chunk_seq: int, token: str, time_jump: float = 0.0) -> dict[str, np.ndarray]:
    """The ensemble's inputs for one request, each with Triton's batch axis of 1.

    access_units: (Annex-B bytes, presentation time in stream seconds) per access unit, in
    decode order. Returns name -> array in protocol.MODEL_TENSORS["ensemble"]'s dtypes:
    CHUNK uint8 [1, L], AU_BYTES int64 [1, K], AU_PTS float64 [1, K], scalars [1, 1].
    """
    data = b"".join(au for au, _ in access_units)

    def scalar(name: str, value) -> np.ndarray:
        dtype = _NUMPY_DTYPES[_ENSEMBLE_DTYPES[name]]
        return P.bytes_scalar(value) if dtype is np.object_ else np.array([[value]], dtype)

    s = settings
    return {
        P.CHUNK: np.frombuffer(data, dtype=np.uint8)[None],
        P.CODEC: scalar(P.CODEC, s.codec), P.SOURCE_FPS: scalar(P.SOURCE_FPS, s.source_fps),
        P.ANALYSIS_FPS: scalar(P.ANALYSIS_FPS, s.analysis_fps),
        P.POLICY: scalar(P.POLICY, s.policy), P.REFRESH: scalar(P.REFRESH, s.refresh),
        P.WINDOW_SECONDS: scalar(P.WINDOW_SECONDS, s.window_seconds),
        P.QUESTION: scalar(P.QUESTION, s.question),
        P.AU_BYTES: np.array([[len(au) for au, _ in access_units]], np.int64).reshape(1, -1),
        P.AU_PTS: np.array([[pts for _, pts in access_units]], np.float64).reshape(1, -1),
        P.CHUNK_SEQ: scalar(P.CHUNK_SEQ, chunk_seq),
        P.STREAM_TOKEN: scalar(P.STREAM_TOKEN, token),
        P.ROTATION: scalar(P.ROTATION, s.rotation),
        P.TIME_JUMP: scalar(P.TIME_JUMP, time_jump),
    }


class StreamClient:
    """One stream: call send() for each chunk in order; the first is START, last=True is END."""

    def __init__(self, client, stream_id: str, settings: StreamSettings, timeout_s: float = 600,
                 reconnect_s: float = 60.0, notice=_stderr_notice, token: str | None = None):
        check_stream_id(stream_id)
        self.client, self.stream_id, self.settings = client, stream_id, settings
        self.timeout_s = timeout_s
        self.reconnect_s = reconnect_s
        self.notice = notice
        self.resumes = 0
        self.started = False
        # The stream's owner secret (STREAM_TOKEN): the server binds it at START. Random per
        # object unless given; codecsight-client gives stream_token(), stable across runs.
        self.token = token or secrets.token_urlsafe(24)
        self.next_seq = 0          # CHUNK_SEQ of the next chunk
        # Access units sent since the last keyframe, (bytes, pts s), to resume from.
        self._since_keyframe: list[tuple[bytes, float]] = []
        self._next_pts = 0.0       # for bytes sent without timing (tests, fault injection)
        self.windows = 0
        self.bytes_sent = 0

    def inputs(self, chunk: Chunk | bytes, chunk_seq: int = 0,
               time_jump: float = 0.0) -> list[grpcclient.InferInput]:
        """tritonclient inputs of one request carrying chunk (see request_arrays)."""
        return self._inputs(self._access_units(chunk), chunk_seq, time_jump)

    def _inputs(self, units: list[tuple[bytes, float]], chunk_seq: int,
                time_jump: float) -> list[grpcclient.InferInput]:
        arrays = request_arrays(units, self.settings, chunk_seq=chunk_seq, token=self.token,
                                time_jump=time_jump)
        return [_input(name, value, _ENSEMBLE_DTYPES[name]) for name, value in arrays.items()]

    def _access_units(self, chunk: Chunk | bytes) -> list[tuple[bytes, float]]:
        """A Chunk's access units; raw bytes (no timing known) as one unit at the next time."""
        if isinstance(chunk, Chunk):
            return chunk.access_units()
        return [(bytes(chunk), self._next_pts)] if len(chunk) else []

    def send_once(self, chunk: Chunk | bytes, last: bool = False) -> WindowResult:
        """Send one request as it is: no resume, no retry (what a naive client sends)."""
        window = self._send(self._access_units(chunk), last, self.next_seq,
                            chunk.time_jump_s if isinstance(chunk, Chunk) else 0.0)
        self.next_seq += 1
        return window

    def send(self, chunk: Chunk | bytes, last: bool = False) -> WindowResult:
        """Send one chunk; returns the window's answer and the models' statistics.

        If the server lost the stream's state (restart, idle eviction), the chunk is sent
        again with START, so the stream resumes from its next decodable frame; while the
        server is unreachable it is retried with backoff for up to reconnect_s seconds.
        """
        deadline, delay, resumed = None, 0.5, False
        units = self._access_units(chunk)
        time_jump = chunk.time_jump_s if isinstance(chunk, Chunk) else 0.0
        seq = self.next_seq
        while True:
            try:
                window = self._send(units, last, seq, time_jump)
                self.next_seq = seq + 1
                return window
            except InferenceServerException as e:
                if not self.started and _live_server_refused(self.client, e):
                    self._refused(seq + 1)
                    raise StreamRefused(
                        f"stream {self.stream_id!r}: the server refused to open it: "
                        f"{e.message()}; not retrying (close other streams, or raise the "
                        "server's stream cap)") from e
                if _deadline_exceeded(e):
                    # The server may have applied it: this number now means these bytes.
                    self.next_seq = seq + 1
                    raise
                if self.started and not resumed and state_lost(e):
                    # A fresh decoder can only begin at a keyframe: re-send the video since
                    # the last one ahead of this chunk, so the resumed window has frames.
                    self.notice(f"stream {self.stream_id!r}: the server lost its state; "
                                f"resuming it with START from its last keyframe "
                                f"({sum(len(au) for au, _ in self._since_keyframe)} bytes "
                                "re-sent)")
                    units = self._since_keyframe + units
                    # Other bytes than those sent under seq: a new number, never a reused one.
                    self.started, resumed, seq = False, True, seq + 1
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

    def end(self) -> WindowResult | None:
        """End the stream now with an empty END request, so the server frees its state at
        once (a watcher restarting a camera, or stopping). Returns the final window's answer,
        or None when the stream never started or the server no longer held it (a failed END
        leaves nothing the server's TTL would not free)."""
        if not self.started:
            return None
        try:
            return self.send_once(b"", last=True)
        except InferenceServerException:
            return None
        finally:
            self.started = False
            self._since_keyframe = []

    def _refused(self, seq: int) -> None:
        """End the refused sequence at once: Triton's sequence batcher holds a slot for it
        (it ran the START) until END or its idle timeout. The models may refuse the END of a
        stream they never opened; the batcher frees the slot either way."""
        try:
            self.client.infer(
                ENSEMBLE, self._inputs([], seq, 0.0),
                outputs=[grpcclient.InferRequestedOutput(n) for n in P.ENSEMBLE_OUTPUTS],
                request_id=self.stream_id, sequence_id=self.stream_id, sequence_start=False,
                sequence_end=True, client_timeout=self.timeout_s,
                headers={STREAM_ID_HEADER: self.stream_id})
        except InferenceServerException:
            pass

    def _send(self, units: list[tuple[bytes, float]], last: bool, chunk_seq: int,
              time_jump: float = 0.0) -> WindowResult:
        outputs = [grpcclient.InferRequestedOutput(n) for n in P.ENSEMBLE_OUTPUTS]
        t_start = time.perf_counter()
        # The request ID is the stream ID, so even errors Triton raises before any model
        # runs (wrong dtype or shape) name the stream.
        result = self.client.infer(
            ENSEMBLE, self._inputs(units, chunk_seq, time_jump), outputs=outputs,
            request_id=self.stream_id, sequence_id=self.stream_id,
            sequence_start=not self.started, sequence_end=last, client_timeout=self.timeout_s,
            headers={STREAM_ID_HEADER: self.stream_id})
        latency = time.perf_counter() - t_start
        self.started = True
        sent = sum(len(au) for au, _ in units)
        self.bytes_sent += sent
        self._remember(units)
        window = WindowResult(
            stream_id=self.stream_id, index=self.windows,
            answer=P.read_string(result.as_numpy(P.ANSWER)), latency_s=latency,
            bytes_sent=sent,
            parse=P.ParseStats.from_json(P.read_string(result.as_numpy(P.PARSE_STATS))),
            llm=P.LlmStats.from_json(P.read_string(result.as_numpy(P.LLM_STATS))))
        self.windows += 1
        if window.parse.owner_restart:
            self.notice(f"stream {self.stream_id!r}: took the stream back from an earlier "
                        "session with the same stream ID and client secret (a restart)")
        return window

    def _remember(self, units: list[tuple[bytes, float]]) -> None:
        """Keep the access units since the last keyframe (a fresh decoder starts there)."""
        for au, pts in units:
            keyframe = last_keyframe_offset(au, self.settings.codec)
            if keyframe >= 0:
                self._since_keyframe = [(au[keyframe:], pts)]
            else:
                self._since_keyframe.append((au, pts))
            self._next_pts = max(self._next_pts, pts + 1.0 / self.settings.source_fps)
        if sum(len(au) for au, _ in self._since_keyframe) > MAX_RESUME_BYTES:
            self._since_keyframe = []


def run_stream(client, stream_id: str, settings: StreamSettings, chunks, on_window=None, *,
               token: str | None = None, stop: threading.Event | None = None):
    """Send every chunk of an iterable as one stream (END on the last); returns the windows.

    token: the stream's owner token (default: a random one for this run). stop: once set,
    the chunk in hand is sent with END and the stream ends there (Ctrl-C, SIGTERM), so the
    server frees its state at once.
    Raises StreamRefused if the server refuses to open the stream.
    """
    stream = StreamClient(client, stream_id, settings, token=token)
    results, pending = [], None
    for chunk in chunks:
        if stop is not None and stop.is_set():
            break
        if pending is not None:
            results.append(stream.send(pending))
            if on_window:
                on_window(results[-1], pending)
        pending = chunk
    if pending is not None:
        results.append(stream.send(pending, last=True))
        if on_window:
            on_window(results[-1], pending)
    return results
