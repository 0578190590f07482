"""How many live camera streams one server sustains in real time, per policy.

Each stream sends a chunk only when its stride of wall time has passed (a live camera), the
streams staggered evenly across the stride. A window's latency runs from the moment its
chunk was due to its answer, so a stream that falls behind keeps paying for it. N streams
are sustained when the p99 window latency stays under the stride, over the steady state: the
windows before the window first fills and the last one (sent with END) are not counted. N is
ramped per policy, doubling until a level fails, then bisected; the policies' levels are interleaved in time,
and each level is bounded (--seconds, then every stream ends with END).

    .venv/bin/python perf/streams_sustained.py --policies dense,vllm_evs,codec \
        --json perf/results/streams_sustained.json

Opt-in and slow (minutes): not part of the test suite.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codecsight import protocol as P  # noqa: E402
from codecsight.tools import exit_code  # noqa: E402
from codecsight.tools.bench import (align_rows, check_policies, command_line,  # noqa: E402
                                    fmt_value, machine_info, model_statistics, now_utc, say,
                                    server_meta, serving, split_list, stage_deltas,
                                    static_clip_path)
from codecsight_client import settings as defaults  # noqa: E402


def stream_live(url: str, clip: str, info, settings, chunks: list, offset_s: float,
                t0: float, stride_s: float, deadline: float, skip_first: int,
                out: list, lock: threading.Lock) -> None:
    """One live camera: chunk k is due at t0 + offset + k * stride; END on the last sent."""
    from codecsight_client.stream import StreamClient, connect

    stream = StreamClient(connect(url), f"live-{uuid.uuid4().hex[:10]}", settings)
    for k, chunk in enumerate(chunks):
        due = t0 + offset_s + k * stride_s
        time.sleep(max(0.0, due - time.perf_counter()))
        # Past the level's end (overloaded streams lag far behind): this chunk is the last.
        last = k == len(chunks) - 1 or time.perf_counter() > deadline
        try:
            window = stream.send(chunk, last=last)
            latency, error = time.perf_counter() - due, None
        except Exception as e:  # a failed window counts as an infinitely late one
            window, latency, error = None, float("inf"), f"{type(e).__name__}: {e}"
        with lock:
            # Not counted: the windows before the first fills, and the one sent with END
            # (the stream's teardown, paid once per stream, not per window: ~0.5 s, which
            # with 7 counted windows per stream would be the p99 at any load)
            out.append({"k": k, "latency_s": latency,
                        "measured": k >= skip_first and not last,
                        "frames": window.parse.frames_sampled if window else 0,
                        # visual tokens of the frames, and those that reached the LLM (the
                        # ViT's output less what vllm_evs dropped after it)
                        "tokens": window.parse.groups_total if window else 0,
                        "llm_tokens": window.parse.groups_kept
                        - window.llm.visual_tokens_pruned if window else 0,
                        "error": error})
        if last or error:
            return


def run_level(url: str, clip: str, info, policy: str, refresh: str, streams: int,
              args) -> dict:
    """N staggered live streams for args.seconds; their windows' latency and stage times."""
    import tritonclient.grpc as grpcclient

    from codecsight_client.stream import StreamSettings
    from codecsight_client.demux import iter_chunks

    settings = StreamSettings(question=args.question, codec=info.codec, source_fps=info.fps,
                              analysis_fps=args.fps, window_seconds=args.window_seconds,
                              policy=policy, refresh=refresh)
    per_stream = max(1, int(args.seconds / args.stride_seconds))
    # The clip looped as long as the level lasts (times keep increasing across replays).
    chunks = list(itertools.islice(iter_chunks(clip, args.stride_seconds, loop=True),
                                   per_stream))
    client = grpcclient.InferenceServerClient(url)
    before = model_statistics(client)
    windows, lock = [], threading.Lock()
    t0 = time.perf_counter() + 0.5
    deadline = t0 + args.seconds + args.stride_seconds
    threads = [threading.Thread(target=stream_live, args=(
        url, clip, info, settings, chunks, i * args.stride_seconds / streams, t0,
        args.stride_seconds, deadline, args.skip_first, windows, lock)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    measured = [w["latency_s"] * 1000.0 for w in windows if w["measured"]]
    p99 = float(np.percentile(measured, 99)) if measured else float("inf")
    stages = stage_deltas(before, model_statistics(client))
    requests = max(1, stages.get("codec_parser", {}).get("requests", 0))
    return {
        "policy": policy, "refresh": refresh, "streams": streams,
        "windows": len(windows), "windows_measured": len(measured),
        "errors": [w["error"] for w in windows if w["error"]][:3],
        "latency_ms_p50": float(np.percentile(measured, 50)) if measured else None,
        "latency_ms_p99": p99 if np.isfinite(p99) else None,
        "latency_ms_max": max(measured) if measured and np.isfinite(max(measured)) else None,
        "stride_ms": args.stride_seconds * 1000.0,
        "sustained": bool(measured) and p99 < args.stride_seconds * 1000.0,
        "frames_per_s": sum(w["frames"] for w in windows) / wall,
        "llm_token_share": sum(w["llm_tokens"] for w in windows)
        / max(1, sum(w["tokens"] for w in windows)),
        "wall_s": wall,
        # Per composing model, compute (input + infer + output) and queue ms per request:
        # the stage whose compute nears stride / N is the one that holds the level back.
        "stage_ms_per_request": {
            name: {"compute": (d["compute_input_ms"] + d["compute_infer_ms"]
                               + d["compute_output_ms"]) / requests,
                   "queue": d["queue_ms"] / requests}
            for name, d in stages.items() if name != "ensemble"},
    }


class Ramp:
    """Search for the largest sustained N: double until a failure, then bisect."""

    def __init__(self, max_streams: int):
        self.max_streams = max_streams
        self.best = 0          # largest N seen sustained
        self.failed = None     # smallest N seen failing

    def next(self) -> int | None:
        if self.failed is None:
            n = 1 if self.best == 0 else min(2 * self.best, self.max_streams)
            return None if n == self.best else n
        if self.failed - self.best <= 1:
            return None
        return (self.best + self.failed) // 2

    def record(self, streams: int, sustained: bool) -> None:
        if sustained:
            self.best = max(self.best, streams)
        else:
            self.failed = streams if self.failed is None else min(self.failed, streams)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", help="H.264 clip (default: the generated static-camera clip)")
    parser.add_argument("--policies", default="dense,vllm_evs,codec",
                        help=f"comma-separated, of {','.join(P.PATCH_POLICIES)} (vllm_evs: "
                        "vLLM's EVS, a dense ViT then tokens dropped before the LLM)")
    parser.add_argument("--refresh", default="full")
    # --stride-seconds is also the latency bound a level must hold.
    defaults.add_window_arguments(parser)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each level")
    parser.add_argument("--skip-first", type=int, default=None,
                        help="windows per stream left out of the percentiles (default: those "
                        "before the window first fills: steady state is what must hold)")
    parser.add_argument("--max-streams", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=1200.0,
                        help="stop ramping after this long (the last level finishes)")
    defaults.add_question_argument(parser)
    parser.add_argument("--cache-dir", type=Path, default=Path(".codecsight") / "bench")
    parser.add_argument("--url", help="gRPC address of a running server (loopback)")
    parser.add_argument("--model-dir", help="checkpoint for the server started here")
    parser.add_argument("--json", type=Path, default=Path("perf/results/streams_sustained.json"))
    args = parser.parse_args(argv)
    args.stride_seconds = defaults.stride_seconds(args.window_seconds, args.stride_seconds)

    from codecsight_client.demux import probe

    if args.skip_first is None:
        args.skip_first = max(0, int(np.ceil(args.window_seconds / args.stride_seconds)) - 1)

    pairs = [(p, r) for p in check_policies(split_list(args.policies), P.PATCH_POLICIES,
                                            "policy")
             for r in check_policies(split_list(args.refresh), P.REFRESH_POLICIES, "refresh")]
    clip = args.clip or str(static_clip_path(args.cache_dir))
    info = probe(clip)
    ramps = {pair: Ramp(args.max_streams) for pair in pairs}
    records = []
    started = time.monotonic()
    with serving(args.url, args.model_dir) as (url, _pid, server):
        import tritonclient.grpc as grpcclient

        meta = {"date": now_utc(), "command": command_line(), "machine": machine_info(),
                "server": server_meta(grpcclient.InferenceServerClient(url), url, server),
                "settings": {"clip": clip, "fps": args.fps, "window_seconds": args.window_seconds,
                             "stride_seconds": args.stride_seconds, "seconds": args.seconds,
                             "skip_first": args.skip_first, "max_streams": args.max_streams}}
        while time.monotonic() - started < args.budget_s:
            todo = [(pair, ramp.next()) for pair, ramp in ramps.items()]
            todo = [(pair, n) for pair, n in todo if n is not None]
            if not todo:
                break
            for (policy, refresh), n in todo:   # interleaved: one level of each policy
                level = run_level(url, clip, info, policy, refresh, n, args)
                ramps[(policy, refresh)].record(n, level["sustained"])
                records.append(level)
                say(f"{policy}/{refresh} x{n}: p50 {fmt_value(level['latency_ms_p50'], '{:.0f}')}"
                    f" ms, p99 {fmt_value(level['latency_ms_p99'], '{:.0f}')} ms vs stride "
                    f"{level['stride_ms']:.0f} ms: "
                    f"{'sustained' if level['sustained'] else 'NOT sustained'}")
    sustained = {f"{p}/{r}": ramp.best for (p, r), ramp in ramps.items()}
    complete = {f"{p}/{r}": ramp.next() is None for (p, r), ramp in ramps.items()}
    dense = next((n for key, n in sustained.items() if key.startswith("dense/")), None)
    ratios = {key: (n / dense if dense else None) for key, n in sustained.items()}
    head = ("policy", "refresh", "streams", "windows", "p50 ms", "p99 ms", "frames/s",
            "LLM tok %", "sustained")
    print("\n".join(align_rows(head, [
        (r["policy"], r["refresh"], r["streams"], r["windows_measured"],
         fmt_value(r["latency_ms_p50"], "{:.0f}"), fmt_value(r["latency_ms_p99"], "{:.0f}"),
         fmt_value(r["frames_per_s"], "{:.1f}"), fmt_value(100 * r["llm_token_share"], "{:.1f}"),
         "yes" if r["sustained"] else "no")
        for r in records])))
    for key, n in sustained.items():
        print(f"{key}: {n} stream(s) sustained"
              + ("" if complete[key] else " (search cut short by --budget-s)")
              + (f", {ratios[key]:.2f}x dense" if ratios[key] is not None else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"kind": "codecsight-streams-sustained", "meta": meta,
                                     "records": records, "sustained": sustained,
                                     "search_complete": complete,
                                     "ratio_vs_dense": ratios}, indent=1))
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code("streams_sustained.py", main))
