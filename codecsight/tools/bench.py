"""codecsight bench: every patch policy x refresh policy side by side, on the same clips,
through one real tritonserver, in one process.

Runs are interleaved (round r plays every video under every policy pair, the pairs' order
rotated by r), so slow drift of a shared machine hits every policy alike; ratios against
`dense` are computed per video within the same run, and per round, because on a noisy
machine the ratio is the figure that holds still.

Per-stage time comes from Triton's own statistics API (compute time per composing model),
read before and after each run: no model has to report its own timing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from codecsight import protocol as P
from codecsight.tools import UsageError, exit_code
from codecsight_client import settings as defaults

ENSEMBLE = "ensemble"
STAGES = ("codec_parser", "vit_pruned", "llm_prefill")
BASELINE_POLICY, BASELINE_REFRESH = "dense", "full"
# A static camera: textured still background, two objects crossing it, light sensor noise;
# what a fixed surveillance camera sees most of the day. Sizes in px, speeds in px/frame.
STATIC_CLIP = dict(width=640, height=360, fps=10.0, seconds=24.0, gop_seconds=5.0,
                   noise_sigma=1.0, seed=7)


# -------------------------------------------------------------------------------------------
# Measuring one run


@dataclasses.dataclass
class AnsweredWindow:
    """One answered window as the bench sees it."""

    latency_s: float
    bytes_sent: int
    parse: dict
    llm: dict


@dataclasses.dataclass
class Run:
    """One pass of one video under one (policy, refresh), possibly as several streams."""

    windows: list[AnsweredWindow]
    wall_s: float
    stages: dict            # model -> statistics deltas over the run (see stage_deltas)
    peak_rss_bytes: int | None


def model_statistics(client) -> dict[str, dict[str, int]]:
    """Cumulative Triton statistics per model: request count and ns per phase."""
    stats = client.get_inference_statistics(as_json=True)
    out = {}
    for model in stats.get("model_stats", []):
        inference = model.get("inference_stats", {})
        row = {"executions": int(model.get("execution_count", 0)),
               "requests": int(inference.get("success", {}).get("count", 0))}
        for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
            row[f"{phase}_ns"] = int(inference.get(phase, {}).get("ns", 0))
        out[model["name"]] = row
    return out


def stage_deltas(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model: requests, executions and ms per phase between two model_statistics."""
    out = {}
    for name, row in after.items():
        base = before.get(name, {})
        delta = {k: v - base.get(k, 0) for k, v in row.items()}
        out[name] = {"requests": delta["requests"], "executions": delta["executions"],
                     **{k[:-3] + "_ms": delta[k] / 1e6 for k in delta if k.endswith("_ns")}}
    return out


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Triton's model stubs)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class PeakRss:
    """Samples a process tree's RSS in a thread; `peak` is the largest sum seen, bytes."""

    def __init__(self, pid: int | None, interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRss":
        if self.pid is not None:
            self.peak = process_tree_rss(self.pid)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak or 0, process_tree_rss(self.pid))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak or 0, process_tree_rss(self.pid))


def server_pid_on_port(port: int) -> int | None:
    """The local process listening on a TCP port (to watch an already running server)."""
    import psutil

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return conn.pid
    except (psutil.AccessDenied, PermissionError):
        pass
    return None


def stream_video(client, video: str, settings, stride_s: float, stream_id: str,
                 max_chunks: int | None = None) -> list[AnsweredWindow]:
    """Send one video as one stream, chunk after chunk as fast as answers come back."""
    from codecsight_client.stream import StreamClient
    from codecsight_client.demux import iter_chunks

    chunks = list(itertools.islice(iter_chunks(video, stride_s), max_chunks))
    stream = StreamClient(client, stream_id, settings)
    return [_window(stream.send(c, last=i == len(chunks) - 1))
            for i, c in enumerate(chunks)]


def _window(result) -> AnsweredWindow:
    return AnsweredWindow(latency_s=result.latency_s, bytes_sent=result.bytes_sent,
                          parse=result.parse, llm=result.llm)


def run_once(client, url: str, video: str, info, policy: str, refresh: str, args,
             server_pid: int | None, label: str) -> Run:
    """One measured pass of a video as args.streams concurrent streams under one policy."""
    from codecsight_client.stream import StreamSettings, connect

    settings = StreamSettings(question=args.question, codec=info.codec, source_fps=info.fps,
                              analysis_fps=args.fps, window_seconds=args.window_seconds,
                              policy=policy, refresh=refresh)
    ids = [f"bench-{uuid.uuid4().hex[:8]}-{label}-{i}" for i in range(args.streams)]
    # One gRPC channel per stream, as separate cameras would have.
    clients = [client] + [connect(url) for _ in ids[1:]]
    before = model_statistics(client)
    with PeakRss(server_pid) as rss:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            futures = [pool.submit(stream_video, c, video, settings, stride_of(args), sid,
                                   args.max_chunks) for c, sid in zip(clients, ids)]
            windows = [w for f in futures for w in f.result()]
        wall_s = time.perf_counter() - t0
    return Run(windows=windows, wall_s=wall_s,
               stages=stage_deltas(before, model_statistics(client)),
               peak_rss_bytes=rss.peak)


# -------------------------------------------------------------------------------------------
# Records and ratios


def _percentile(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def make_record(video: str, info, policy: str, refresh: str, runs: list[Run], args) -> dict:
    """One JSON record from every round's run of (video, policy, refresh)."""
    windows = [w for run in runs for w in run.windows]
    frames = sum(w.parse.frames_sampled for w in windows)
    answered = [w for w in windows if w.llm.prefill_ms is not None]
    wall = sum(run.wall_s for run in runs)
    stage_ms = {name: sum(run.stages.get(name, {}).get("compute_infer_ms", 0.0) for run in runs)
                for name in STAGES}
    stage_total_ms = {
        name: sum(sum(run.stages.get(name, {}).get(k, 0.0) for k in
                      ("compute_input_ms", "compute_infer_ms", "compute_output_ms"))
                  for run in runs) for name in STAGES}
    queue_ms = {name: sum(run.stages.get(name, {}).get("queue_ms", 0.0) for run in runs)
                for name in STAGES}
    per_frame = (lambda ms: ms / frames) if frames else (lambda ms: None)
    peaks = [run.peak_rss_bytes for run in runs if run.peak_rss_bytes is not None]
    latencies = [w.latency_s * 1000.0 for w in windows]
    return {
        "video": video, "policy": policy, "refresh": refresh,
        "streams": args.streams, "rounds": len(runs),
        "fps": args.fps, "window_seconds": args.window_seconds,
        "stride_seconds": stride_of(args),
        "frames_sampled": frames, "windows": len(windows),
        "patches_total": sum(w.parse.patches_total for w in windows),
        "patches_kept": sum(w.parse.patches_kept for w in windows),
        # Visual tokens (merge groups) of the sampled frames, and those that reached the LLM:
        # the ViT's output less what llm_prefill dropped after it (vllm_evs).
        "llm_tokens_total": sum(w.parse.groups_total for w in windows),
        "llm_tokens_kept": sum(w.parse.groups_kept - w.llm.visual_tokens_pruned
                               for w in windows),
        "vit_ms_per_frame": per_frame(stage_ms["vit_pruned"]),
        "parser_ms_per_frame": per_frame(sum(w.parse.parser_ms for w in windows)),
        "llm_ms_per_frame": per_frame(stage_ms["llm_prefill"]),
        "prefill_tokens_per_window": _mean([w.llm.tokens_prefilled for w in windows]),
        "prefill_ms_per_window": _mean([w.llm.prefill_ms for w in answered]),
        "tokens_reused_per_window": _mean([w.llm.tokens_reused for w in windows]),
        "tokens_refreshed_per_window": _mean([w.llm.tokens_refreshed
                                              for w in windows]),
        "throughput_frames_per_s": frames / wall if wall > 0 else None,
        "throughput_frames_per_s_rounds": [
            sum(w.parse.frames_sampled for w in run.windows) / run.wall_s
            for run in runs],
        "window_latency_ms_p50": _percentile(latencies, 50),
        "window_latency_ms_p99": _percentile(latencies, 99),
        "bytes_sent": sum(w.bytes_sent for w in windows),
        "raw_rgb_bytes": frames * info.width * info.height * 3,
        "peak_rss_mb": max(peaks) / 2**20 if peaks else None,
        "kv_bytes_max": max((w.llm.kv_bytes for w in windows), default=0),
        "wall_s": wall,
        # Triton's view of each composing model over these runs, ms per sampled frame:
        # compute = input + infer + output (tensor copies into and out of the Python stub).
        "stage_compute_ms_per_frame": {k: per_frame(v) for k, v in stage_total_ms.items()},
        "stage_queue_ms_per_frame": {k: per_frame(v) for k, v in queue_ms.items()},
        "answers": sum(1 for w in windows if w.llm.prefill_ms is not None),
    }


# (field, label, format) of the ratio table; every ratio is this record / the baseline's.
RATIO_FIELDS = (
    ("throughput_frames_per_s", "throughput", "{:.2f}x"),
    ("patches_kept", "ViT patches", "{:.2f}x"),
    ("llm_tokens_kept", "LLM tokens", "{:.2f}x"),
    ("vit_ms_per_frame", "ViT ms/frame", "{:.2f}x"),
    ("parser_ms_per_frame", "parser ms/frame", "{:.2f}x"),
    ("prefill_tokens_per_window", "prefill tokens/win", "{:.2f}x"),
    ("prefill_ms_per_window", "prefill ms/win", "{:.2f}x"),
    ("window_latency_ms_p50", "p50 latency", "{:.2f}x"),
    ("window_latency_ms_p99", "p99 latency", "{:.2f}x"),
)


def baseline_for(record: dict, records: list[dict]) -> dict | None:
    """The record a ratio is taken against: dense/full of the same video (else dense)."""
    same = [r for r in records if r["video"] == record["video"] and r["policy"] == BASELINE_POLICY]
    for r in same:
        if r["refresh"] == BASELINE_REFRESH:
            return r
    for r in same:
        if r["refresh"] == record["refresh"]:
            return r
    return None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def make_ratios(records: list[dict]) -> list[dict]:
    """Per record: each RATIO_FIELDS value over the baseline's, plus per-round throughput."""
    out = []
    for record in records:
        base = baseline_for(record, records)
        if base is None:
            continue
        row = {"video": record["video"], "policy": record["policy"],
               "refresh": record["refresh"],
               "baseline": f"{base['policy']}/{base['refresh']}"}
        for field, _, _ in RATIO_FIELDS:
            row[field] = _ratio(record.get(field), base.get(field))
        # Rounds are paired (same round = same stretch of machine load), so their ratios
        # cancel most of the drift a shared machine adds.
        rounds = [_ratio(a, b) for a, b in zip(record["throughput_frames_per_s_rounds"],
                                               base["throughput_frames_per_s_rounds"])]
        row["throughput_ratio_rounds"] = rounds
        row["throughput_ratio_median"] = float(np.median(rounds)) if rounds else None
        out.append(row)
    return out


def format_table(records: list[dict], ratios: list[dict]) -> str:
    """Absolute figures, then ratios against dense, as aligned text."""
    lines = []
    # kept %: patches the ViT encoded; LLM tok %: visual tokens that reached the LLM (they
    # differ under vllm_evs, which prunes after the ViT).
    head = ("video", "policy", "refresh", "frames/s", "kept %", "LLM tok %", "ViT ms/f",
            "parse ms/f", "prefill tok/w", "prefill ms/w", "p50 ms", "p99 ms", "RSS MB")
    rows = []
    for r in records:
        kept = 100.0 * r["patches_kept"] / r["patches_total"] if r["patches_total"] else None
        llm_kept = 100.0 * r["llm_tokens_kept"] / r["llm_tokens_total"] \
            if r.get("llm_tokens_total") else None
        rows.append((Path(r["video"]).name, r["policy"], r["refresh"],
                     fmt_value(r["throughput_frames_per_s"], "{:.2f}"), fmt_value(kept, "{:.1f}"),
                     fmt_value(llm_kept, "{:.1f}"),
                     fmt_value(r["vit_ms_per_frame"], "{:.1f}"),
                     fmt_value(r["parser_ms_per_frame"], "{:.1f}"),
                     fmt_value(r["prefill_tokens_per_window"], "{:.0f}"),
                     fmt_value(r["prefill_ms_per_window"], "{:.1f}"),
                     fmt_value(r["window_latency_ms_p50"], "{:.0f}"),
                     fmt_value(r["window_latency_ms_p99"], "{:.0f}"),
                     fmt_value(r["peak_rss_mb"], "{:.0f}")))
    lines += align_rows(head, rows)
    if ratios:
        lines.append("")
        lines.append("ratios against dense/full of the same video in this run "
                     "(value / dense's; throughput: median of per-round ratios in brackets)")
        head = ("video", "policy", "refresh") + tuple(label for _, label, _ in RATIO_FIELDS)
        rows = []
        for q in ratios:
            cells = [fmt_value(q[f], fmt) for f, _, fmt in RATIO_FIELDS]
            cells[0] += f" [{fmt_value(q['throughput_ratio_median'], '{:.2f}')}]"
            rows.append((Path(q["video"]).name, q["policy"], q["refresh"], *cells))
        lines += align_rows(head, rows)
    return "\n".join(lines)


def fmt_value(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def align_rows(head, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
            for row in (head, *rows)]


def plot(records: list[dict], path: Path) -> Path:
    """A PNG of throughput, ViT ms/frame, prefill tokens/window and p99 latency per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("throughput_frames_per_s", "throughput (sampled frames/s)"),
              ("vit_ms_per_frame", "ViT compute (ms/frame)"),
              ("prefill_tokens_per_window", "LLM prefill (tokens/window)"),
              ("window_latency_ms_p99", "p99 window latency (ms)"))
    videos = list(dict.fromkeys(r["video"] for r in records))
    pairs = list(dict.fromkeys((r["policy"], r["refresh"]) for r in records))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    width = 0.8 / max(1, len(pairs))
    for ax, (field, title) in zip(axes, panels):
        for j, (policy, refresh) in enumerate(pairs):
            values = []
            for video in videos:
                match = [r for r in records if r["video"] == video and r["policy"] == policy
                         and r["refresh"] == refresh]
                values.append((match[0][field] or 0.0) if match else 0.0)
            ax.bar(np.arange(len(videos)) + j * width, values, width,
                   label=f"{policy}/{refresh}")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(np.arange(len(videos)) + width * (len(pairs) - 1) / 2)
        ax.set_xticklabels([Path(v).stem[:18] for v in videos], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------
# Inputs and provenance


def make_static_clip(path: Path, *, width: int, height: int, fps: float, seconds: float,
                     gop_seconds: float, noise_sigma: float, seed: int) -> Path:
    """Encode a static-camera clip with codecsight.tools.synth (deterministic); returns path."""
    from codecsight.tools import synth

    frames_n = int(round(seconds * fps))
    # A pedestrian crossing slowly and a car crossing the other way, far apart.
    boxes = (synth.Box(x=-40, y=int(height * 0.55), width=40, height=88, vx=2.0,
                       color=(200, 60, 50)),
             synth.Box(x=width, y=int(height * 0.25), width=120, height=56, vx=-5.0,
                       color=(40, 70, 200)))
    frames, _ = synth.moving_boxes(frames_n, width, height, boxes=boxes,
                                   noise_sigma=noise_sigma, seed=seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return synth.encode_h264(frames, fps, gop=max(1, int(round(gop_seconds * fps))), path=path)


def static_clip_path(cache_dir: Path) -> Path:
    """Where the default static-camera clip lives; generated on first use."""
    spec = STATIC_CLIP
    name = (f"static-{spec['width']}x{spec['height']}-{spec['fps']:g}fps-{spec['seconds']:g}s"
            f"-seed{spec['seed']}.mp4")
    path = Path(cache_dir) / name
    if not path.is_file():
        make_static_clip(path, **spec)
    return path


def machine_info() -> dict:
    """CPU, memory, load and software versions: what a figure was measured on."""
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("nvidia-pytriton", "tritonclient", "onnxruntime", "torch", "transformers",
                 "av"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "hostname": platform.node(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "gpu": _has_gpu(), "versions": versions,
        "commit": code_commit(),
    }


def code_commit() -> str | None:
    """The checkout's commit (short hash, "+changes" when the tree differs from it), or None
    outside a git checkout: results say which code they measured."""
    from codecsight.serve import REPO_ROOT

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                         else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _has_gpu() -> bool:
    from codecsight.serve import has_gpu

    return has_gpu()


def server_meta(client, url: str, server) -> dict:
    """Which server answered: address, whether started here, its config and version."""
    return {"url": url, "started_here": server is not None,
            "config_name": server.config_name if server is not None else None,
            "triton_version": client.get_server_metadata(as_json=True).get("version")}


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def command_line(argv=None) -> str:
    """The command as it was run, paths relative to the repository (for RESULTS.md)."""
    from codecsight.serve import REPO_ROOT

    argv = sys.argv if argv is None else argv

    def rel(path) -> str:
        path = Path(os.path.abspath(path))  # not resolve(): keep .venv/bin/python a venv path
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)

    prog = Path(argv[0])
    if prog.suffix == ".py" and Path(os.path.abspath(prog)) == Path(__file__).resolve():
        head = [rel(sys.executable), "-m", "codecsight.tools.bench"]
    elif prog.suffix == ".py":
        head = [rel(sys.executable), rel(prog)]
    else:
        head = [rel(prog) if prog.exists() else str(prog)]
    return " ".join(shlex.quote(a) for a in [*head, *argv[1:]])


# -------------------------------------------------------------------------------------------
# The command


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def check_policies(names: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    """names, if every one is in allowed; else UsageError naming the unknown ones."""
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UsageError(f"unknown {what} {', '.join(unknown)}; this build has "
                         f"{', '.join(allowed)}")
    return names


def stride_of(args) -> float:
    """Video per request, seconds: --stride-seconds, else the client's rule (settings)."""
    return defaults.stride_seconds(args.window_seconds, args.stride_seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `codecsight bench` (same names as the client's where they mean the same)."""
    parser.add_argument("videos", nargs="*", help="video files (H.264); default: the bundled "
                        "sample plus a generated static-camera clip")
    parser.add_argument("--policies", default=",".join(P.PATCH_POLICIES),
                        help=f"patch policies, comma-separated (default: all: "
                        f"{','.join(P.PATCH_POLICIES)})")
    parser.add_argument("--refresh", default=",".join(P.REFRESH_POLICIES),
                        help=f"KV refresh policies, comma-separated (default: all: "
                        f"{','.join(P.REFRESH_POLICIES)})")
    # The client's defaults (codecsight_client.settings): windows overlap as a live client's do.
    defaults.add_window_arguments(parser)
    parser.add_argument("--streams", type=int, default=1,
                        help="concurrent streams per run (each a full replay of the video)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved repetitions of every (video, policy, refresh)")
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="send only the first N chunks of each video (quick runs)")
    parser.add_argument("--warmup-chunks", type=int, default=2,
                        help="chunks per policy streamed once, unmeasured, before the runs")
    defaults.add_question_argument(parser)
    parser.add_argument("--static-clip", action="store_true",
                        help="add the generated static-camera clip (codecsight.tools.synth) to the "
                        "videos")
    parser.add_argument("--cache-dir", type=Path, default=Path(".codecsight") / "bench",
                        help="where generated clips are kept")
    parser.add_argument("--url", help="gRPC address of a running server (default: start one "
                        "on free loopback ports for the run)")
    parser.add_argument("--model-dir", help="checkpoint for the server started here")
    parser.add_argument("--json", metavar="OUT", type=Path, help="write records as JSON")
    parser.add_argument("--plot", metavar="PNG", type=Path,
                        help="plot file (default: OUT with .png; none without --json)")


def say(message: str) -> None:
    """A progress line on stderr, prefixed with the running tool's name."""
    tool = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prefix = "codecsight bench" if tool in ("codecsight", "bench.py", "-m", "") else tool
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    """Run the benchmark described by parsed add_arguments flags; returns an exit code."""
    from codecsight_client.stream import StreamSettings, connect
    from codecsight_client.demux import probe

    policies = check_policies(split_list(args.policies), P.PATCH_POLICIES, "patch policy")
    refreshes = check_policies(split_list(args.refresh), P.REFRESH_POLICIES, "refresh policy")
    if args.streams < 1 or args.rounds < 1:
        raise UsageError("--streams and --rounds must be >= 1")
    videos = [str(v) for v in args.videos]
    if args.static_clip or not videos:
        if not videos:
            from codecsight.serve import REPO_ROOT

            videos.append(str(REPO_ROOT / "media" / "car-detection.mp4"))
        say("generating the static-camera clip (first time only)")
        videos.append(str(static_clip_path(args.cache_dir)))
    infos = {v: probe(v) for v in videos}
    pairs = [(p, r) for p in policies for r in refreshes]

    with serving(args.url, args.model_dir) as (url, server_pid, server):
        client = connect(url)
        meta = {"date": now_utc(), "command": command_line(), "machine": machine_info(),
                "server": server_meta(client, url, server),
                "settings": {"fps": args.fps, "window_seconds": args.window_seconds,
                             "stride_seconds": stride_of(args), "streams": args.streams,
                             "rounds": args.rounds, "max_chunks": args.max_chunks,
                             "question": args.question, "policies": policies,
                             "refresh": refreshes}}
        if args.warmup_chunks:
            say(f"warming up: {args.warmup_chunks} chunk(s) per policy, not measured")
            for policy, refresh in pairs:
                info = infos[videos[0]]
                stream_video(client, videos[0], StreamSettings(
                    question=args.question, codec=info.codec, source_fps=info.fps,
                    analysis_fps=args.fps, window_seconds=args.window_seconds, policy=policy,
                    refresh=refresh), stride_of(args), f"warmup-{uuid.uuid4().hex[:8]}",
                    args.warmup_chunks)
        runs: dict[tuple, list[Run]] = {}
        for round_index in range(args.rounds):
            shift = round_index % len(pairs)
            order = pairs[shift:] + pairs[:shift]
            for video in videos:
                for policy, refresh in order:
                    run_ = run_once(client, url, video, infos[video], policy, refresh, args,
                                    server_pid, f"{policy}-{refresh}-r{round_index}")
                    runs.setdefault((video, policy, refresh), []).append(run_)
                    frames = sum(w.parse.frames_sampled for w in run_.windows)
                    say(f"round {round_index + 1}/{args.rounds} {Path(video).name} "
                        f"{policy}/{refresh}: {len(run_.windows)} windows, {frames} frames "
                        f"in {run_.wall_s:.1f} s")
    records = [make_record(video, infos[video], p, r, runs[(video, p, r)], args)
               for video in videos for p, r in pairs]
    ratios = make_ratios(records)
    print(format_table(records, ratios))
    result = {"kind": "codecsight-bench", "meta": meta,
              "videos": [{"path": v, **dataclasses.asdict(infos[v])} for v in videos],
              "records": records, "ratios": ratios}
    if args.json:
        plot_path = args.plot or Path(args.json).with_suffix(".png")
        result["plot"] = str(plot(records, plot_path))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        say(f"wrote {args.json} and {plot_path}")
    elif args.plot:
        result["plot"] = str(plot(records, args.plot))
    return 0


@contextlib.contextmanager
def serving(url: str | None = None, model_dir: str | None = None):
    """Yield (gRPC address, server pid or None, TritonServer or None) for a load run.

    With url, that running server (its pid found by its port, for RSS); else one started on
    free loopback ports for the length of the block.
    """
    from codecsight.serve import start_server

    if url:
        if url.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
            # Load tests saturate what they hit: never aim them at someone else's machine.
            raise UsageError(f"load runs only hit this machine; {url} is not loopback")
        yield url, server_pid_on_port(int(url.rsplit(":", 1)[1])), None
        return
    server = start_server(model_dir, progress=say)
    try:
        yield server.grpc_url, server.process.pid, server
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="codecsight bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(exit_code("codecsight bench", main))
