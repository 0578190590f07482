"""Locust load test of the ensemble: every user is a camera streaming a clip over gRPC.

A user sends the clip's chunks as one Triton sequence (START on the first, END on the last)
with tritonclient, then starts a new stream; each window is one request in Locust's stats,
named by its policy pair, so `--policies dense,codec` runs them side by side in one test
(user i streams policy pair i mod len). With --realtime a chunk is sent only once its stride
of wall time has passed, as a live camera would.

One command, headless, CSV out (a server must be listening, e.g. `codecsight serve`):

    .venv/bin/locust -f perf/locustfile.py --headless --users 4 --spawn-rate 2 \
        --run-time 60s --host 127.0.0.1:8001 --csv perf/out/locust --only-summary \
        --policies dense,codec --refresh full

perf/run_locust.py does the same around a server it starts, and writes JSON for RESULTS.md.
Through the stream proxy (`codecsight cluster`) give its port as --host: each user's
StreamClient sends its stream ID as `x-stream-id` metadata, which nginx routes on.
"""
from __future__ import annotations

# gRPC's own threads must yield to gevent's loop, before anything creates a channel.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import csv  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codecsight_client.stream import StreamClient, StreamSettings, connect  # noqa: E402
from codecsight import protocol as P  # noqa: E402
from codecsight.tools.bench import split_list  # noqa: E402
from codecsight_client import settings as defaults  # noqa: E402
from codecsight_client.demux import iter_chunks, probe  # noqa: E402
from codecsight.serve import REPO_ROOT  # noqa: E402

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _make_csv_folder(argv: list[str]) -> None:
    """Create the folder of --csv PREFIX: Locust opens its CSV files (before any event a
    locustfile can hook) without making their folder."""
    for i, arg in enumerate(argv):
        prefix = arg.split("=", 1)[1] if arg.startswith("--csv=") else (
            argv[i + 1] if arg == "--csv" and i + 1 < len(argv) else None)
        if prefix:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)


_make_csv_folder(sys.argv)


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--clip", default=str(REPO_ROOT / "media" / "car-detection.mp4"),
                        help="H.264 clip every user streams")
    parser.add_argument("--policies", default="dense,codec",
                        help="patch policies; users take them in turn")
    parser.add_argument("--refresh", default="full", help="KV refresh policies; in turn too")
    defaults.add_window_arguments(parser)
    defaults.add_question_argument(parser)
    parser.add_argument("--chunks", type=int, default=0,
                        help="chunks per stream (0: the whole clip)")
    parser.add_argument("--realtime", action="store_true",
                        help="pace each stream at the camera's rate (one chunk per stride)")


@events.init.add_listener
def _check_host(environment, **_kwargs):
    host = (environment.host or "").rsplit(":", 1)[0]
    if host not in LOOPBACK:
        # Load tests saturate what they hit: only this machine's own server.
        raise SystemExit(f"locustfile: --host must be a loopback gRPC address "
                         f"(127.0.0.1:PORT), got {environment.host!r}")


_ENVIRONMENT = []   # the Locust environment, for the final CSV write at quit


@events.init.add_listener
def _remember(environment, **_kwargs):
    _ENVIRONMENT.append(environment)


@events.quit.add_listener
def _exit_now(exit_code, **_kwargs):
    # Locust rewrites its CSVs once a second while running but not after the users have
    # stopped, so the last windows could be missing: write them once more, complete.
    prefix = getattr(_ENVIRONMENT[0].parsed_options, "csv_prefix", None) if _ENVIRONMENT \
        else None
    if prefix:
        stats_csv = StatsCSV(_ENVIRONMENT[0], PERCENTILES_TO_REPORT)
        for suffix, write in (("_stats.csv", stats_csv.requests_csv),
                              ("_failures.csv", stats_csv.failures_csv),
                              ("_exceptions.csv", stats_csv.exceptions_csv)):
            with open(prefix + suffix, "w", newline="") as f:
                write(csv.writer(f))
    # gRPC's non-daemon threads (patched for gevent) would keep the interpreter from exiting.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


@functools.lru_cache(maxsize=None)
def clip_chunks(clip: str, stride_s: float, limit: int) -> tuple:
    """The clip's chunks, read once per process and shared by every user."""
    chunks = iter_chunks(clip, stride_s)
    return tuple(itertools.islice(chunks, limit) if limit else chunks)


class CameraStream(User):
    """One camera: streams the clip as a sequence, again and again, under one policy pair."""

    wait_time = constant(0)
    _ids = itertools.count()

    def on_start(self):
        opts = self.environment.parsed_options
        pairs = [(p, r) for p in split_list(opts.policies) for r in split_list(opts.refresh)]
        for policy, refresh in pairs:
            if policy not in P.PATCH_POLICIES or refresh not in P.REFRESH_POLICIES:
                raise SystemExit(f"locustfile: unknown policy pair {policy}/{refresh}")
        self.policy, self.refresh = pairs[next(self._ids) % len(pairs)]
        info = probe(opts.clip)
        self.settings = StreamSettings(
            question=opts.question, codec=info.codec, source_fps=info.fps,
            analysis_fps=opts.fps, window_seconds=opts.window_seconds, policy=self.policy,
            refresh=self.refresh)
        stride_s = defaults.stride_seconds(opts.window_seconds, opts.stride_seconds)
        self.chunks = clip_chunks(opts.clip, stride_s, opts.chunks)
        self.stride_s, self.realtime = stride_s, opts.realtime
        self.client = connect(self.host)

    def on_stop(self):
        self.client.close()

    @task
    def stream_clip(self):
        stream = StreamClient(self.client, f"locust-{uuid.uuid4().hex[:12]}", self.settings)
        name = f"window {self.policy}/{self.refresh}"
        t0 = time.perf_counter()
        for i, chunk in enumerate(self.chunks):
            if self.realtime:
                # Due when its stride of wall time has passed since the stream began.
                gevent.sleep(max(0.0, t0 + i * self.stride_s - time.perf_counter()))
            t_send = time.perf_counter()
            try:
                window = stream.send(chunk, last=i == len(self.chunks) - 1)
            except Exception as e:  # tritonclient's errors carry the server's message
                events.request.fire(request_type="grpc", name=name,
                                    response_time=(time.perf_counter() - t_send) * 1000.0,
                                    response_length=len(chunk.data), exception=e, context={})
                return  # the stream's state is unknown now: start a new one
            events.request.fire(request_type="grpc", name=name,
                                response_time=window.latency_s * 1000.0,
                                response_length=len(chunk.data), exception=None,
                                context={"frames": window.parse.frames_sampled,
                                         "patches_kept": window.parse.patches_kept})
