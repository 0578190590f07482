"""Run perf/locustfile.py headless once per policy pair against one server, and keep the
figures as JSON for perf/RESULTS.md.

Each policy pair gets its own Locust run with the same users and duration, one after the
other on the same server (a mixed run would make every policy wait in the same queues).

    .venv/bin/python perf/run_locust.py --users 2 --run-time 60 \
        --json perf/results/locust.json
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codecsight import protocol as P  # noqa: E402
from codecsight.tools import ToolError, exit_code  # noqa: E402
from codecsight.tools.bench import (align_rows, check_policies, command_line, fmt_value,  # noqa: E402
                              machine_info, now_utc, say, server_meta, serving, split_list)
from codecsight_client import settings as defaults  # noqa: E402

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def read_stats(csv_prefix: Path) -> list[dict]:
    """Rows of Locust's <prefix>_stats.csv: per request name, counts, rates, percentiles (ms)."""
    out = []
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            num = lambda key: float(row[key]) if row.get(key) not in (None, "", "N/A") else None  # noqa: E731,E501
            out.append({"name": row["Name"], "requests": int(row["Request Count"]),
                        "failures": int(row["Failure Count"]),
                        "requests_per_s": num("Requests/s"),
                        "latency_ms_p50": num("50%"), "latency_ms_p99": num("99%"),
                        "latency_ms_avg": num("Average Response Time"),
                        "latency_ms_max": num("Max Response Time")})
    return out


def locust_command(url: str, csv_prefix: Path, policy: str, refresh: str, args) -> list[str]:
    """The documented headless Locust command for one policy pair."""
    locust = Path(sys.executable).parent / "locust"
    cmd = [str(locust), "-f", str(LOCUSTFILE), "--headless", "--users", str(args.users),
           "--spawn-rate", str(args.users), "--run-time", f"{args.run_time}s",
           # Users finish the stream they are in (its END frees the server's state).
           "--stop-timeout", str(args.stop_timeout), "--host", url, "--csv", str(csv_prefix),
           "--only-summary", "--policies", policy, "--refresh", refresh,
           "--clip", str(args.clip), "--fps", str(args.fps),
           "--window-seconds", str(args.window_seconds),
           "--stride-seconds", str(defaults.stride_seconds(args.window_seconds,
                                                           args.stride_seconds)),
           "--chunks", str(args.chunks)]
    return cmd + (["--realtime"] if args.realtime else [])


def main(argv=None) -> int:
    from codecsight.serve import REPO_ROOT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=REPO_ROOT / "media" / "car-detection.mp4")
    parser.add_argument("--policies", default=",".join(P.PATCH_POLICIES))
    parser.add_argument("--refresh", default="full")
    parser.add_argument("--users", type=int, default=2, help="concurrent camera streams")
    parser.add_argument("--run-time", type=int, default=60, help="seconds per policy pair")
    parser.add_argument("--stop-timeout", type=int, default=60,
                        help="seconds users get to finish their stream at the end")
    defaults.add_window_arguments(parser)
    parser.add_argument("--chunks", type=int, default=0, help="chunks per stream (0: all)")
    parser.add_argument("--realtime", action="store_true", help="pace streams in real time")
    parser.add_argument("--url", help="gRPC address of a running server (loopback)")
    parser.add_argument("--work-dir", type=Path, default=Path("perf/out/locust"))
    parser.add_argument("--json", type=Path, default=Path("perf/results/locust.json"))
    args = parser.parse_args(argv)
    policies = check_policies(split_list(args.policies), P.PATCH_POLICIES, "policy")
    refreshes = check_policies(split_list(args.refresh), P.REFRESH_POLICIES, "refresh")
    records = []
    with serving(args.url) as (url, _pid, server):
        import tritonclient.grpc as grpcclient

        meta = {"date": now_utc(), "command": command_line(), "machine": machine_info(),
                "server": server_meta(grpcclient.InferenceServerClient(url), url, server),
                "settings": {k: (str(v) if isinstance(v, Path) else v)
                             for k, v in vars(args).items() if k not in ("json", "work_dir")}}
        for policy in policies:
            for refresh in refreshes:
                prefix = args.work_dir / f"{policy}-{refresh}"
                cmd = locust_command(url, prefix, policy, refresh, args)
                say(f"locust {policy}/{refresh}: {args.users} users for {args.run_time} s")
                done = subprocess.run(cmd, capture_output=True, text=True,
                                      timeout=args.run_time + args.stop_timeout + 120)
                (args.work_dir / f"{policy}-{refresh}.log").write_text(done.stdout + done.stderr)
                rows = [r for r in read_stats(prefix) if r["name"].startswith("window ")]
                if not rows:
                    raise ToolError(f"locust {policy}/{refresh} recorded no window (exit "
                                     f"{done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
                display = ["locust" if i == 0 else c for i, c in enumerate(cmd)]
                records.append({"policy": policy, "refresh": refresh, "users": args.users,
                                **rows[0], "exit_code": done.returncode,
                                "command": " ".join(display)})
    for r in records:
        base = next((b for b in records if b["policy"] == "dense"
                     and b["refresh"] == r["refresh"]), None)
        r["throughput_vs_dense"] = (r["requests_per_s"] / base["requests_per_s"]
                                    if base and base["requests_per_s"] else None)
    head = ("policy", "refresh", "users", "windows", "fail", "windows/s", "vs dense",
            "p50 ms", "p99 ms")
    print("\n".join(align_rows(head, [
        (r["policy"], r["refresh"], r["users"], r["requests"], r["failures"],
         fmt_value(r["requests_per_s"], "{:.2f}"), fmt_value(r["throughput_vs_dense"], "{:.2f}x"),
         fmt_value(r["latency_ms_p50"], "{:.0f}"), fmt_value(r["latency_ms_p99"], "{:.0f}"))
        for r in records])))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"kind": "codecsight-locust", "meta": meta,
                                     "records": records}, indent=1))
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code("run_locust.py", main))
