"""What the operator page costs the watcher, and how far it trails the answers.

    .venv/bin/python perf/bench_dashboard.py                   # starts its own tritonserver
    .venv/bin/python perf/bench_dashboard.py --url 127.0.0.1:8001 --json perf/out/dash.json

Runs `codecsight-client watch CONFIG --dashboard 127.0.0.1:0` twice as a subprocess, with
--streams cameras replaying the bundled clip in real time (replay_realtime), and measures:

- watcher CPU: the subprocess's CPU seconds (user + system, psutil) per wall second, over the
  same span of stream time in both runs (from --skip-s after the page URL is printed, for
  --measure-s seconds): once with no page open, once with a headless Chromium page open the
  whole time (so thumbnails are decoded and drawn, plots rendered, events sent);
- page latency: for each new answer, the time from the watcher receiving it (the record's
  answered_at) to the page rendering it (Date.now() in the page's render(); the same clock:
  one machine), and from the event leaving the server (sent_at_ms) to the render.

The machine is shared (uptime's load is printed): CPU figures are this process alone, but a
loaded machine makes every figure noisier.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLIP = REPO / "media" / "car-detection.mp4"
CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
CLIENT = REPO / ".venv" / "bin" / "codecsight-client"


def write_config(path: Path, url: str, streams: int, fps: float, window_s: float) -> Path:
    cameras = "".join(f'\n[[cameras]]\nstream_id = "bench-cam-{i}"\nurl = "{CLIP}"\n'
                      f'question = "is anyone moving?"\n' for i in range(streams))
    path.write_text(f'server = "{url}"\n[defaults]\nreplay_realtime = true\nfps = {fps}\n'
                    f'window_seconds = {window_s}\n{cameras}')
    return path


def run(config: Path, with_page: bool, skip_s: float, measure_s: float) -> dict:
    """One watcher run; returns its CPU share over the measured span and the page's
    latencies (with_page)."""
    proc = subprocess.Popen([str(CLIENT), "watch", str(config), "--dashboard", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, lines = None, []
    ready = threading.Event()

    def read_stderr():
        nonlocal url
        for line in proc.stderr:
            lines.append(line)
            if "operator page at " in line and url is None:
                url = line.split("operator page at ", 1)[1].strip()
                ready.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise RuntimeError("the watcher printed no page URL:\n" + "".join(lines[-20:]))
    page = browser = playwright = None
    if with_page:
        from playwright.sync_api import sync_playwright

        playwright = sync_playwright().start()
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
    watcher = psutil.Process(proc.pid)
    time.sleep(skip_s)
    cpu0, t0 = sum(watcher.cpu_times()[:2]), time.monotonic()
    time.sleep(measure_s)
    cpu1, t1 = sum(watcher.cpu_times()[:2]), time.monotonic()
    out = {"with_page": with_page, "cpu_s_per_s": round((cpu1 - cpu0) / (t1 - t0), 4),
           "measured_s": round(t1 - t0, 1)}
    if page is not None:
        marks = page.evaluate("window.codecsight.latencies")
        answer = sorted(m["ms"] for m in marks)
        event = sorted(m["event_ms"] for m in marks if m["event_ms"] is not None)
        out.update(answers_rendered=len(answer),
                   answer_to_render_ms={"median": statistics.median(answer),
                                        "p95": answer[int(0.95 * (len(answer) - 1))],
                                        "max": answer[-1]} if answer else None,
                   event_to_render_ms={"median": statistics.median(event),
                                       "max": event[-1]} if event else None)
        api = json.loads(page.request.get(url + "api/streams").body())
        # Thumbnails drawn per stream (each card's image URLs carry the version).
        out["thumbnails_drawn"] = [int((c["thumbnail"]["frame_url"] or "v=0").split("v=")[1])
                                   for c in api["streams"]]
        browser.close()
        playwright.stop()
    proc.send_signal(signal.SIGTERM)   # measured: END every stream now
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's gRPC address (default: start one)")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--fps", type=float, default=2.0, help="analysis fps")
    parser.add_argument("--window-seconds", type=float, default=8.0)
    parser.add_argument("--skip-s", type=float, default=4.0,
                        help="seconds after the page URL before measuring (start-up)")
    parser.add_argument("--measure-s", type=float, default=22.0,
                        help="seconds measured (the clip lasts 30 s)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    server = None
    if args.url is None:
        from codecsight.serve import start_server

        server = start_server(progress=lambda m: print(m, file=sys.stderr))
        args.url = server.grpc_url
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(Path(tmp) / "cameras.toml", args.url, args.streams,
                                  args.fps, args.window_seconds)
            runs = [run(config, with_page, args.skip_s, args.measure_s)
                    for with_page in (False, True)]
    finally:
        if server is not None:
            server.stop()
    result = {"streams": args.streams, "analysis_fps": args.fps, "clip": CLIP.name,
              "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "runs": runs}
    print(json.dumps(result, indent=2))
    without, with_ = runs
    print(f"watcher CPU, {args.streams} streams: {without['cpu_s_per_s']:.3f} CPU s/s without "
          f"the page, {with_['cpu_s_per_s']:.3f} with it open")
    if with_.get("answer_to_render_ms"):
        lat = with_["answer_to_render_ms"]
        print(f"page update latency behind the answer ({with_['answers_rendered']} answers): "
              f"median {lat['median']:.0f} ms, p95 {lat['p95']:.0f} ms, max {lat['max']:.0f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
