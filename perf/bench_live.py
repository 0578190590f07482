"""Live cameras: capture-to-answer latency, recovery after a source restart, drops under
overload (issue 13's closing figures).

Every camera is a real RTSP source (tests/rtsp_server.py: GStreamer's RTSP server, one
unshared factory per client) playing a clip live, followed by the watcher
(codecsight_client.live) exactly as `codecsight-client watch` runs it. Phases:

  latency-1, latency-4  1 and 4 cameras at the client defaults (fps 2, window 8 s,
                        stride 2 s, codec policy) on the bundled clip looped to --seconds:
                        p50/p99 of latency_ms (capture to answer) and of request_ms
  small-1, small-4      the same on a generated 256x144 clip (moving boxes, IDR every 1 s):
                        cameras light enough for this machine to follow in real time
  recovery              1 camera; its RTSP server is killed for --down seconds and
                        restarted: seconds from "listening again" to the first answer of
                        the new connection (and to its `connected` event), --restarts times
  overload              more cameras than the server sustains (--overload-cameras of a
                        generated 256x144 clip, dense policy, 4 fps, 4 s window,
                        --overload-stride): drops per camera, p99 latency, the slowest
                        request

    .venv/bin/python perf/bench_live.py --json perf/out/live.json

Opt-in and slow (~3 minutes plus the server's start): not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import tempfile

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # rtsp_server.py: the tests' live source

from codecsight.tools.bench import command_line, machine_info, now_utc, serving  # noqa: E402
from codecsight.tools.synth import encode_h264, moving_boxes  # noqa: E402
from codecsight_client.live import Camera, Watcher  # noqa: E402
from codecsight_client.observe import Observer, Observers  # noqa: E402
from codecsight_client.stream import connect  # noqa: E402
from rtsp_server import RtspServer  # noqa: E402

CLIP = ROOT / "media" / "car-detection.mp4"   # 768x432, 12.5 fps, 30 s, IDR every 4.8 s


class Recorder(Observer):
    def __init__(self):
        self.windows, self.events = [], []
        self.lock = threading.Lock()

    def on_window(self, record):
        with self.lock:
            self.windows.append((time.monotonic(), record))

    def on_event(self, event):
        with self.lock:
            self.events.append((time.monotonic(), event))


def watch(url: str, rtsp: RtspServer, cameras: list[Camera], seconds: float,
          during=None) -> Recorder:
    """Follow cameras for seconds (during(rtsp) runs meanwhile, if given); then stop."""
    seen = Recorder()
    watcher = Watcher(connect(url), cameras, Observers([seen]),
                      tokens={c.stream_id: f"bench-{c.stream_id}" for c in cameras})
    watcher.start()
    t_end = time.monotonic() + seconds
    if during is not None:
        during(rtsp, seen)
    time.sleep(max(0.0, t_end - time.monotonic()))
    watcher.stop()
    watcher.wait(120)
    return seen


def pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def latency_summary(seen: Recorder, skip_first: int = 1) -> dict:
    """Percentiles over every camera's windows, each camera's first skip_first left out
    (its first request pays for the stream's START: decoder, caches)."""
    by_camera: dict[str, list] = {}
    for _, r in seen.windows:
        by_camera.setdefault(r.stream_id, []).append(r)
    kept = [r for records in by_camera.values() for r in records[skip_first:]]
    latency = [r.latency_ms for r in kept]
    request = [r.request_ms for r in kept]
    return {"windows": len(kept), "latency_ms_p50": pct(latency, 50),
            "latency_ms_p99": pct(latency, 99), "latency_ms_max": pct(latency, 100),
            "request_ms_p50": pct(request, 50), "request_ms_p99": pct(request, 99),
            "dropped_windows": {sid: records[-1].dropped_windows
                                for sid, records in by_camera.items()},
            "windows_per_camera": {sid: len(records) for sid, records in by_camera.items()}}


def loop_clip(source: Path, dest: Path, seconds: float) -> Path:
    """The clip's packets repeated (remuxed, not re-encoded) until it lasts seconds: an RTSP
    mount plays a file once, and a phase must not see its camera end."""
    with av.open(str(source)) as inp, av.open(str(dest), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        step = round(1 / (stream_in.average_rate * stream_in.time_base))  # one frame
        offset, last = 0, 0
        while offset * stream_in.time_base < seconds:
            inp.seek(0)
            for packet in inp.demux(stream_in):
                if packet.pts is None:
                    continue
                packet.pts += offset
                packet.dts += offset
                last = max(last, packet.pts)
                packet.stream = stream_out
                out.mux(packet)
            offset = last + step
    return dest


def cameras_for(rtsp: RtspServer, count: int, prefix: str, **settings) -> list[Camera]:
    return [Camera(f"{prefix}-{i}", rtsp.url(f"/cam{i}"), **settings) for i in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's gRPC address (default: start one)")
    parser.add_argument("--clip", default=str(CLIP))
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="each latency and overload phase's length")
    parser.add_argument("--down", type=float, default=3.0,
                        help="seconds the RTSP server stays down in the recovery phase")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--overload-cameras", type=int, default=6)
    parser.add_argument("--overload-stride", type=float, default=0.25)
    parser.add_argument("--phases",
                        default="latency-1,latency-4,small-1,small-4,recovery,overload")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    result = {"command": command_line(), "when": now_utc(), "machine": machine_info(),
              "load_before": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    looped = loop_clip(Path(args.clip), work / "looped.mp4", args.seconds + 10)
    busy = work / "busy.mp4"
    frames, _ = moving_boxes(int((args.seconds + 10) * 10), 256, 144, seed=0)
    encode_h264(frames, 10, gop=10, path=busy)
    mounts = {f"/cam{i}": looped for i in range(4)}
    mounts.update({f"/busy{i}": busy for i in range(max(4, args.overload_cameras))})
    with serving(args.url) as (url, _, _):
        with RtspServer(mounts) as rtsp:
            for n in (1, 4):
                if f"latency-{n}" in phases:
                    seen = watch(url, rtsp, cameras_for(rtsp, n, f"lat{n}"), args.seconds)
                    result[f"latency_{n}_camera"] = latency_summary(seen)
                    print(f"latency, {n} camera(s):", result[f"latency_{n}_camera"], flush=True)
            for n in (1, 4):
                if f"small-{n}" in phases:
                    cameras = [Camera(f"small{n}-{i}", rtsp.url(f"/busy{i}")) for i in range(n)]
                    seen = watch(url, rtsp, cameras, args.seconds)
                    result[f"small_{n}_camera"] = latency_summary(seen)
                    print(f"latency, {n} small camera(s):", result[f"small_{n}_camera"],
                          flush=True)
            if "recovery" in phases:
                recoveries = []

                def restart(rtsp, seen):
                    for _ in range(args.restarts):
                        time.sleep(6.0)      # answering steadily first
                        rtsp.stop()
                        time.sleep(args.down)
                        rtsp.start()
                        back = time.monotonic()
                        before = len(seen.windows)
                        deadline = back + 60
                        while time.monotonic() < deadline:
                            new = [(t, r) for t, r in seen.windows[before:]
                                   if r.reconnects == len(recoveries) + 1]
                            if new:
                                connected = [t for t, e in seen.events
                                             if e.kind == "connected" and t >= back]
                                recoveries.append({
                                    "first_answer_s": round(new[0][0] - back, 2),
                                    "connected_s": round(connected[0] - back, 2)
                                    if connected else None})
                                break
                            time.sleep(0.05)

                seconds = args.restarts * (6.0 + args.down + 8.0) + 4.0
                watch(url, rtsp, cameras_for(rtsp, 1, "rec", stride_seconds=1.0,
                                             window_seconds=4.0), seconds, during=restart)
                first = [r["first_answer_s"] for r in recoveries]
                result["recovery"] = {"down_s": args.down, "restarts": recoveries,
                                      "first_answer_s_median": pct(first, 50),
                                      "first_answer_s_max": pct(first, 100)}
                print("recovery:", result["recovery"], flush=True)
            if "overload" in phases:
                heavy = dict(policy="dense", analysis_fps=4.0, window_seconds=4.0,
                             stride_seconds=args.overload_stride)
                cameras = [Camera(f"over-{i}", rtsp.url(f"/busy{i}"), **heavy)
                           for i in range(args.overload_cameras)]
                seen = watch(url, rtsp, cameras, args.seconds)
                summary = latency_summary(seen)
                summary["settings"] = heavy
                summary["drop_events"] = sum(e.kind == "drop" for _, e in seen.events)
                summary["request_ms_max"] = pct([r.request_ms for _, r in seen.windows], 100)
                result["overload"] = summary
                print("overload:", summary, flush=True)
    result["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
