"""Run Triton's perf_analyzer against the ensemble, one policy pair after another, with
several concurrent sequences (camera streams) replaying real chunks of real clips.

Collects, per (policy, refresh, concurrency): requests/s, sequences/s, client p50/p99
latency, and the per-composing-model breakdown perf_analyzer prints (queue and compute per
model). Starts a server on free loopback ports unless --url names a running one.

    .venv/bin/python perf/perf_analyzer.py --chunks 4 --concurrency 1,2 \
        --json perf/results/perf_analyzer.json

perf_analyzer (shipped by tritonclient[all]==2.51.0) needs libb64.so.0d (scripts/setup.sh
installs Debian's libb64-0d) and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel, a
project dependency); this script puts the wheel's lib/ on LD_LIBRARY_PATH for it.
`--print-env` prints that line for running perf_analyzer by hand.

Not through the stream proxy (`codecsight cluster`, deploy/nginx.conf.j2): the proxy routes
each stream by its `x-stream-id` gRPC metadata and refuses inference without it, and
perf_analyzer 2.51 cannot send gRPC metadata (its `-H` "is ignored for GRPC requests"; one
header per run could not name each of its sequences anyway). Point `--url` at one instance
(the `instance i: grpc ...` lines `codecsight cluster` prints). Locust goes through the proxy.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from codecsight import protocol as P  # noqa: E402
from codecsight.tools import ToolError, exit_code  # noqa: E402
from codecsight.tools.bench import (ENSEMBLE, check_policies, command_line, machine_info,  # noqa: E402
                              model_statistics, now_utc, say, server_meta, serving,
                              split_list, stage_deltas)
from make_inputs import add_input_arguments, default_videos, settings_from, write_inputs  # noqa: E402

# "  vit_pruned, version: 1 ... Avg request latency: 196324 usec (overhead 4 usec + queue
# 31571 usec + compute input 662 usec + compute infer 163631 usec + compute output 455 usec)"
_COMPOSING = re.compile(
    r"^\s*(?P<model>[\w.-]+), version: \S+\s*$.*?Avg request latency: (?P<total>\d+) usec "
    r"\(overhead (?P<overhead>\d+) usec \+ queue (?P<queue>\d+) usec \+ compute input "
    r"(?P<compute_input>\d+) usec \+ compute infer (?P<compute_infer>\d+) usec \+ compute "
    r"output (?P<compute_output>\d+) usec\)", re.MULTILINE | re.DOTALL)
_SEQUENCES = re.compile(r"Sequence count: \d+ \((?P<rate>[\d.]+) seq/sec\)")


def perf_analyzer_binary() -> Path:
    """The perf_analyzer tritonclient[all] installs next to this Python."""
    here = Path(sys.executable).parent / "perf_analyzer"
    found = here if here.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise ToolError("perf_analyzer not found: install tritonclient[all]==2.51.0 "
                         "(bash scripts/setup.sh does)")
    return Path(found)


def cuda_runtime_lib() -> Path | None:
    """lib/ of the nvidia-cuda-runtime-cu12 wheel (holds libcudart.so.12), if installed."""
    lib = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    return lib if (lib / "libcudart.so.12").exists() else None


def perf_analyzer_env() -> dict[str, str]:
    """Environment in which perf_analyzer finds libcudart.so.12 (no GPU needed)."""
    env = dict(os.environ)
    lib = cuda_runtime_lib()
    if lib is None:
        raise ToolError("libcudart.so.12 not found: install nvidia-cuda-runtime-cu12 "
                         "(a project dependency: bash scripts/setup.sh)")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(lib), env.get("LD_LIBRARY_PATH")) if p)
    return env


def parse_output(stdout: str) -> dict:
    """perf_analyzer's stdout: sequences/s and each composing model's breakdown (ms)."""
    composing = {}
    section = stdout.split("Composing models:", 1)
    if len(section) == 2:
        for m in _COMPOSING.finditer(section[1]):
            composing[m["model"]] = {k + "_ms": int(m[k]) / 1000.0 for k in
                                     ("total", "overhead", "queue", "compute_input",
                                      "compute_infer", "compute_output")}
    seq = _SEQUENCES.search(stdout)
    return {"sequences_per_s": float(seq["rate"]) if seq else None, "composing": composing}


def parse_csv(path: Path) -> dict:
    """The one row of perf_analyzer's -f CSV for a single concurrency: throughput, latency."""
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    us = lambda key: float(row[key]) / 1000.0  # noqa: E731 - usec -> ms
    return {"requests_per_s": float(row["Inferences/Second"]),
            "latency_ms_p50": us("p50 latency"), "latency_ms_p90": us("p90 latency"),
            "latency_ms_p95": us("p95 latency"), "latency_ms_p99": us("p99 latency"),
            "server_queue_ms": us("Server Queue"),
            "server_compute_infer_ms": us("Server Compute Infer")}


def run_one(url: str, input_file: Path, concurrency: int, args, work_dir: Path,
            label: str, first_id: int) -> dict:
    """One perf_analyzer measurement; returns its figures (raises with its output on error)."""
    csv_path = work_dir / f"{label}.csv"
    cmd = [str(perf_analyzer_binary()), "-m", ENSEMBLE, "-u", url, "-i", "grpc",
           "--input-data", str(input_file), "--concurrency-range", str(concurrency),
           # A camera sends its next chunk after the previous one is answered.
           "--serial-sequences",
           # Fresh IDs per run: a stream ID must not be reused while the server holds it.
           "--sequence-id-range", f"{first_id}:{first_id + 1_000_000}",
           # A fixed amount of work per measurement: whole sequences on every stream. The
           # stability search would chase the noise of a shared machine for minutes.
           "--request-count", str(concurrency * args.chunks * args.sequences),
           "--percentile", "99", "-f", str(csv_path)]
    say(f"{label}: {' '.join(cmd[1:])}")
    done = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True,
                          timeout=args.timeout_s)
    (work_dir / f"{label}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not csv_path.exists():
        raise ToolError(f"perf_analyzer failed ({done.returncode}) for {label}:\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    return {**parse_csv(csv_path), **parse_output(done.stdout),
            "command": "perf_analyzer " + " ".join(cmd[1:])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser)
    parser.add_argument("--concurrency", default="1,2",
                        help="concurrent sequences (streams), comma-separated levels")
    parser.add_argument("--sequences", type=int, default=3,
                        help="whole sequences measured per concurrent stream")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per measurement")
    parser.add_argument("--url", help="gRPC address of a running server (loopback)")
    parser.add_argument("--model-dir", help="checkpoint for the server started here")
    parser.add_argument("--work-dir", type=Path, default=Path("perf/out/perf_analyzer"),
                        help="input files, CSVs and raw logs")
    parser.add_argument("--json", metavar="OUT", type=Path,
                        default=Path("perf/results/perf_analyzer.json"))
    parser.add_argument("--print-env", action="store_true",
                        help="print the LD_LIBRARY_PATH export perf_analyzer needs, and exit")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.print_env:
        print(f"export LD_LIBRARY_PATH={perf_analyzer_env()['LD_LIBRARY_PATH']}")
        return 0
    policies = check_policies(split_list(args.policies), P.PATCH_POLICIES, "policy")
    refreshes = check_policies(split_list(args.refresh), P.REFRESH_POLICIES, "refresh")
    levels = [int(c) for c in split_list(args.concurrency)]
    videos = default_videos(args.videos)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    inputs = write_inputs(videos, args.work_dir / "inputs", policies, refreshes,
                          **settings_from(args))
    records = []
    with serving(args.url, args.model_dir) as (url, _pid, server):
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)
        meta = {"date": now_utc(), "command": command_line(), "machine": machine_info(),
                "server": server_meta(client, url, server),
                "settings": {**settings_from(args), "videos": videos, "concurrency": levels,
                             "sequences_per_stream": args.sequences}}
        first_id = 1
        # Interleaved: every policy pair at one concurrency before the next level.
        for concurrency in levels:
            for (policy, refresh), path in inputs.items():
                label = f"{policy}-{refresh}-c{concurrency}"
                before = model_statistics(client)
                figures = run_one(url, path, concurrency, args, args.work_dir, label, first_id)
                first_id += 1_000_000
                records.append({"policy": policy, "refresh": refresh,
                                "concurrency": concurrency, **figures,
                                # Triton's own counters over the whole run, warm-up included.
                                "stages": stage_deltas(before, model_statistics(client)),
                                # Video seconds served per wall second: ~ real-time streams.
                                "realtime_factor": figures["requests_per_s"]
                                * settings_from(args)["stride_seconds"]})
                say(f"{label}: {figures['requests_per_s']:.2f} req/s, p50 "
                    f"{figures['latency_ms_p50']:.0f} ms, p99 {figures['latency_ms_p99']:.0f} ms")
    for r in records:
        base = next((b for b in records if b["policy"] == "dense" and b["refresh"] == r["refresh"]
                     and b["concurrency"] == r["concurrency"]), None)
        r["throughput_vs_dense"] = (r["requests_per_s"] / base["requests_per_s"]
                                    if base and base["requests_per_s"] else None)
    print(format_table(records))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"kind": "codecsight-perf-analyzer", "meta": meta,
                                     "records": records}, indent=1))
    say(f"wrote {args.json}")
    return 0


def format_table(records: list[dict]) -> str:
    from codecsight.tools.bench import align_rows, fmt_value

    models = ("codec_parser", "vit_pruned", "llm_prefill")
    head = ("policy", "refresh", "conc", "req/s", "vs dense", "p50 ms", "p99 ms",
            *(f"{m} ms" for m in models))
    rows = [(r["policy"], r["refresh"], r["concurrency"], fmt_value(r["requests_per_s"], "{:.2f}"),
             fmt_value(r["throughput_vs_dense"], "{:.2f}x"), fmt_value(r["latency_ms_p50"], "{:.0f}"),
             fmt_value(r["latency_ms_p99"], "{:.0f}"),
             *(fmt_value(r["composing"].get(m, {}).get("compute_infer_ms"), "{:.1f}")
               for m in models)) for r in records]
    return "\n".join(align_rows(head, rows))


if __name__ == "__main__":
    sys.exit(exit_code("perf_analyzer.py", main))
