"""Regenerate perf/RESULTS.md from the JSON the benchmark tools wrote (perf/results/*.json).

Never edit RESULTS.md by hand: rerun the tools (perf/run_all.sh) or just this script.

    .venv/bin/python perf/results.py            # perf/results/*.json -> perf/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codecsight.tools.bench import RATIO_FIELDS, STAGES, fmt_value  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 3.0   # issue #6: codec >= 3x dense throughput
STREAMS_TARGET_RATIO = 10.0   # issue 17: codec sustains >= 10x dense's streams (static camera)


def table(head, rows) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def code_line(data: dict) -> str:
    """Which code measured the figures: the commit the tool recorded, or (for results from
    before tools recorded it) the commit that added the JSON, and how far HEAD has moved."""
    commit = data["meta"].get("machine", {}).get("commit")
    how = "recorded by the tool"
    if not commit:
        commit = _git("log", "-1", "--format=%h", "--", str(data["_source"]))
        how = "the commit that added these results; the tool did not record its own"
    if not commit:
        return "- Code: unknown commit"
    when = _git("log", "-1", "--format=%cs, %s", commit.split("+")[0])
    return f"- Code: commit `{commit}` ({how}){f': {when}' if when else ''}"


def provenance(data: dict) -> list[str]:
    meta = data["meta"]
    m = meta.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    server = meta.get("server", {})
    return [
        f"- Date: {meta.get('date')}",
        f"- Machine: {m.get('cpu')}, {m.get('cpu_count')} cores, {m.get('memory_gb')} GB RAM, "
        f"GPU: {'yes' if m.get('gpu') else 'none'}; load average at start "
        f"{m.get('load_average')} ({m.get('platform')})",
        f"- Server: tritonserver {server.get('triton_version')}, "
        + (f"started by the tool (model config `{server.get('config_name') or 'default'}`)"
           if server.get("started_here") else f"already running at {server.get('url')}"),
        f"- Software: Python {m.get('python')}, {versions}",
        f"- Command: `{meta.get('command')}`",
        code_line(data),
    ]


def short(path: str) -> str:
    return Path(path).name


def bench_section(data: dict, out_dir: Path) -> list[str]:
    lines = ["## Side by side: `codecsight bench`", ""]
    lines += provenance(data)
    s = data["meta"]["settings"]
    lines += [f"- Settings: analysis {s['fps']:g} fps, window {s['window_seconds']:g} s, stride "
              f"{s['stride_seconds']:g} s, {s['streams']} stream(s) per run, {s['rounds']} "
              f"interleaved round(s), chunks per video: {s.get('max_chunks') or 'all'}", ""]
    lines += ["Videos: " + "; ".join(
        f"`{short(v['path'])}` ({v['codec']} {v['width']}x{v['height']} @ {v['fps']:g} fps, "
        f"{fmt_value(v.get('duration_s'), '{:.0f}')} s)" for v in data["videos"]), ""]
    head = ("video", "policy", "refresh", "frames/s", "kept %", "ViT ms/frame",
            "parser ms/frame", "LLM ms/frame", "prefill tok/window", "prefill ms/window",
            "p50 ms", "p99 ms", "sent / raw RGB", "peak RSS MB")
    rows = []
    for r in data["records"]:
        kept = 100.0 * r["patches_kept"] / r["patches_total"] if r["patches_total"] else None
        rows.append((short(r["video"]), r["policy"], r["refresh"],
                     fmt_value(r["throughput_frames_per_s"], "{:.2f}"), fmt_value(kept, "{:.1f}"),
                     fmt_value(r["vit_ms_per_frame"], "{:.1f}"),
                     fmt_value(r["parser_ms_per_frame"], "{:.1f}"),
                     fmt_value(r.get("llm_ms_per_frame"), "{:.1f}"),
                     fmt_value(r["prefill_tokens_per_window"], "{:.0f}"),
                     fmt_value(r["prefill_ms_per_window"], "{:.1f}"),
                     fmt_value(r["window_latency_ms_p50"], "{:.0f}"),
                     fmt_value(r["window_latency_ms_p99"], "{:.0f}"),
                     f"1/{r['raw_rgb_bytes'] / r['bytes_sent']:.0f}" if r["bytes_sent"] else "-",
                     fmt_value(r["peak_rss_mb"], "{:.0f}")))
    lines += table(head, rows) + [""]
    lines += ["Ratios against dense/full of the same video in the same run (value / dense's). "
              "Throughput in brackets: the median of per-round ratios.", ""]
    head = ("video", "policy", "refresh") + tuple(label for _, label, _ in RATIO_FIELDS)
    rows = []
    for q in data["ratios"]:
        # "-" for a ratio an older bench.json did not record (llm_tokens_kept came later)
        cells = [fmt_value(q.get(f), fmt) for f, _, fmt in RATIO_FIELDS]
        cells[0] += f" [{fmt_value(q.get('throughput_ratio_median'), '{:.2f}')}]"
        rows.append((short(q["video"]), q["policy"], q["refresh"], *cells))
    lines += table(head, rows) + [""]
    plot = data.get("plot") and Path(data["plot"])
    if plot and not plot.is_file():   # written relative to another folder: look beside us
        plot = out_dir / "results" / plot.name
    if plot and plot.is_file():
        lines += [f"![bench]({os.path.relpath(plot.resolve(), out_dir.resolve())})", ""]
    lines += stage_lines(data["records"])
    return lines


def stage_lines(records: list[dict]) -> list[str]:
    """Per-stage ms per frame (Triton's compute time per composing model), all records."""
    lines = ["Per stage, ms of Triton compute per sampled frame (input + infer + output of each "
             "composing model):", ""]
    head = ("video", "policy", "refresh", *STAGES, "largest")
    rows = []
    for r in records:
        stages = r.get("stage_compute_ms_per_frame") or {}
        largest = max(stages, key=lambda k: stages[k] or 0) if stages else "-"
        rows.append((short(r["video"]), r["policy"], r["refresh"],
                     *(fmt_value(stages.get(s), "{:.1f}") for s in STAGES), largest))
    return lines + table(head, rows) + [""]


def targets_section(bench: dict | None, streams: dict | None) -> list[str]:
    lines = ["## Targets (issues #6 and 17)", ""]
    if bench:
        codec = [q for q in bench["ratios"] if q["policy"] == "codec"]
        # Static-camera clips carry the target; other footage is reported beside it.
        codec.sort(key=lambda q: "static" not in short(q["video"]))
        for q in codec:
            ratio = q.get("throughput_ratio_median") or q["throughput_frames_per_s"]
            met = ratio is not None and ratio >= TARGET_RATIO
            static = "static" in short(q["video"])
            verdict = (f"target >= {TARGET_RATIO:g}x: {'met' if met else 'NOT met'}" if static
                       else "not static-camera footage: no target, shown for comparison")
            lines.append(f"- Throughput, codec/{q['refresh']} vs dense/full on "
                         f"{'static-camera ' if static else ''}`{short(q['video'])}`: "
                         f"**{fmt_value(ratio, '{:.2f}')}x** ({verdict})")
            if not met:
                lines += shortfall(bench["records"], q)
    if streams:
        s = streams["sustained"]
        dense = next((k for k in s if k.startswith("dense/")), None)
        for key, n in s.items():
            ratio = streams["ratio_vs_dense"].get(key)
            if key == dense:
                verdict = "the baseline"
            elif key.startswith("codec/"):
                met = ratio is not None and ratio >= STREAMS_TARGET_RATIO
                verdict = f"target >= {STREAMS_TARGET_RATIO:g}x: {'met' if met else 'NOT met'}"
            else:
                verdict = "a peer policy: no target, shown for comparison"
            lines.append(f"- Streams sustained in real time: {key} {n} vs {dense} "
                         f"{s.get(dense)}: **{fmt_value(ratio, '{:.2f}')}x** ({verdict})")
            cap = streams["meta"]["settings"].get("max_streams")
            if n == cap:
                lines.append(f"  - {key} reached the search's cap of {cap} streams "
                             "(--max-streams): the ratio is a lower bound")
            else:        # what saturates first, for every policy
                lines += streams_shortfall(streams["records"], key)
    return lines + [""]


def streams_shortfall(records: list[dict], key: str) -> list[str]:
    """At the first level a policy failed: each stage's compute per request, and the bound."""
    policy, refresh = key.split("/")
    failed = sorted((r for r in records if r["policy"] == policy and r["refresh"] == refresh
                     and not r["sustained"]), key=lambda r: r["streams"])
    if not failed:
        return []
    r = failed[0]
    stages = {m: r["stage_ms_per_request"].get(m, {}).get("compute") for m in STAGES}
    worst = max(stages, key=lambda k: stages[k] or 0)
    parts = ", ".join(f"{m} {fmt_value(v, '{:.0f}')}" for m, v in stages.items())
    return [f"  - At {r['streams']} streams (p99 {fmt_value(r['latency_ms_p99'], '{:.0f}')} ms "
            f"over a {r['stride_ms']:.0f} ms stride) the largest stage is **{worst}**; compute "
            f"ms per request: {parts}"]


def shortfall(records: list[dict], ratio_row: dict) -> list[str]:
    """Which stage holds codec back: per-stage ms per frame, codec against dense."""
    def find(policy, refresh):
        return next((r for r in records if r["video"] == ratio_row["video"]
                     and r["policy"] == policy and r["refresh"] == refresh), None)

    codec, dense = find("codec", ratio_row["refresh"]), find("dense", "full")
    if not codec or not dense:
        return []
    cs, ds = codec["stage_compute_ms_per_frame"], dense["stage_compute_ms_per_frame"]
    worst = max(cs, key=lambda k: cs[k] or 0)
    parts = ", ".join(f"{k} {fmt_value(ds.get(k), '{:.1f}')} -> {fmt_value(cs.get(k), '{:.1f}')}"
                      for k in STAGES)
    return [f"  - Held back by **{worst}** ({fmt_value(cs[worst], '{:.1f}')} ms/frame of "
            f"{fmt_value(sum(v or 0 for v in cs.values()), '{:.1f}')}); per stage, dense -> "
            f"codec ms/frame: {parts}"]


def perf_analyzer_section(data: dict) -> list[str]:
    s = data["meta"]["settings"]
    lines = ["## perf_analyzer (ensemble, concurrent sequences)", ""] + provenance(data)
    lines += [f"- Inputs: {s['chunks']} chunks of {s['stride_seconds']:g} s per sequence from "
              f"{', '.join(short(v) for v in s['videos'])}; {s['sequences_per_stream']} whole "
              f"sequences per concurrent stream", ""]
    head = ("policy", "refresh", "sequences", "req/s", "vs dense", "video s per s",
            "p50 ms", "p99 ms", *(f"{m} queue+infer ms" for m in STAGES))
    rows = []
    for r in data["records"]:
        comp = r.get("composing", {})
        rows.append((r["policy"], r["refresh"], r["concurrency"],
                     fmt_value(r["requests_per_s"], "{:.2f}"),
                     fmt_value(r.get("throughput_vs_dense"), "{:.2f}x"),
                     fmt_value(r.get("realtime_factor"), "{:.1f}"),
                     fmt_value(r["latency_ms_p50"], "{:.0f}"),
                     fmt_value(r["latency_ms_p99"], "{:.0f}"),
                     *(f"{fmt_value(comp.get(m, {}).get('queue_ms'), '{:.0f}')}+"
                       f"{fmt_value(comp.get(m, {}).get('compute_infer_ms'), '{:.0f}')}"
                       for m in STAGES)))
    lines += table(head, rows) + ["", "Exact perf_analyzer command of each row:", ""]
    lines += [f"- {r['policy']}/{r['refresh']} x{r['concurrency']}: `{r['command']}`"
              for r in data["records"]]
    return lines + [""]


def locust_section(data: dict) -> list[str]:
    lines = ["## Locust (gRPC users streaming the clip)", ""] + provenance(data)
    s = data["meta"]["settings"]
    lines += [f"- {s['users']} users per policy pair, {s['run_time']} s each, "
              f"{'real-time pacing' if s.get('realtime') else 'as fast as answered'}, "
              f"clip `{short(s['clip'])}`", ""]
    head = ("policy", "refresh", "users", "windows", "failures", "windows/s", "vs dense",
            "p50 ms", "p99 ms")
    rows = [(r["policy"], r["refresh"], r["users"], r["requests"], r["failures"],
             fmt_value(r["requests_per_s"], "{:.2f}"),
             fmt_value(r.get("throughput_vs_dense"), "{:.2f}x"),
             fmt_value(r["latency_ms_p50"], "{:.0f}"), fmt_value(r["latency_ms_p99"], "{:.0f}"))
            for r in data["records"]]
    lines += table(head, rows) + ["", "Locust command of each row:", ""]
    lines += [f"- {r['policy']}/{r['refresh']}: `{r['command']}`" for r in data["records"]]
    return lines + [""]


def streams_section(data: dict) -> list[str]:
    s = data["meta"]["settings"]
    lines = ["## Streams sustained in real time", ""] + provenance(data)
    lines += [f"- Clip `{short(s['clip'])}` looped; analysis {s['fps']:g} fps, window "
              f"{s['window_seconds']:g} s, stride {s['stride_seconds']:g} s (the latency bound), "
              f"{s['seconds']:g} s per level, first {s['skip_first']} window(s) of each stream "
              f"not counted (window filling), nor the last (sent with END: stream teardown)", ""]
    for key, n in data["sustained"].items():
        note = "" if data["search_complete"].get(key) else " (search cut short)"
        lines.append(f"- **{key}: {n} stream(s)**{note}, "
                     f"{fmt_value(data['ratio_vs_dense'].get(key), '{:.2f}')}x dense")
    lines.append("")
    head = ("policy", "refresh", "streams", "windows", "p50 ms", "p99 ms", "frames/s",
            "sustained", *(f"{m} ms/req" for m in STAGES))
    rows = [(r["policy"], r["refresh"], r["streams"], r["windows_measured"],
             fmt_value(r["latency_ms_p50"], "{:.0f}"), fmt_value(r["latency_ms_p99"], "{:.0f}"),
             fmt_value(r["frames_per_s"], "{:.1f}"), "yes" if r["sustained"] else "no",
             *(fmt_value(r["stage_ms_per_request"].get(m, {}).get("compute"), "{:.0f}")
               for m in STAGES)) for r in data["records"]]
    return lines + table(head, rows) + [""]


def load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return {**json.loads(path.read_text()), "_source": path}


def render(results_dir: Path, out_dir: Path) -> str:
    bench = load(results_dir / "bench.json")
    pa = load(results_dir / "perf_analyzer.json")
    locust = load(results_dir / "locust.json")
    streams = load(results_dir / "streams_sustained.json")
    lines = ["# CodecSight performance results", "",
             "<!-- Generated by perf/results.py from perf/results/*.json. Do not edit: rerun "
             "`bash perf/run_all.sh` (or one tool, then `.venv/bin/python perf/results.py`). -->",
             "",
             "Every figure below comes from the command printed with it. The machines these "
             "ran on are small and shared (other jobs run alongside), so absolute figures are "
             "noisy: compare the ratios, which are taken between policies measured in the same "
             "run.", ""]
    lines += targets_section(bench, streams)
    if bench:
        lines += bench_section(bench, out_dir)
    if streams:
        lines += streams_section(streams)
    if pa:
        lines += perf_analyzer_section(pa)
    if locust:
        lines += locust_section(locust)
    if not any((bench, pa, locust, streams)):
        lines += [f"No results in {results_dir} yet: run `bash perf/run_all.sh`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    args.out.write_text(render(args.results, args.out.parent))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
