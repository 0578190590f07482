#!/usr/bin/env bash
# Regenerate every figure in perf/RESULTS.md: side-by-side bench, streams sustained,
# perf_analyzer, Locust, then the Markdown. Each tool starts its own tritonserver on free
# loopback ports. Slow (tens of minutes on 2 cores): opt in, never part of the test suite.
# Extra arguments go to `codecsight bench`, e.g. --rounds 3. Fps, window, stride and question
# are the client's defaults (codecsight_client.settings) in every tool.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
OUT=perf/results
mkdir -p "$OUT"
.venv/bin/codecsight bench --static-clip --rounds 2 --json "$OUT/bench.json" "$@"
$PY perf/streams_sustained.py --policies dense,codec --json "$OUT/streams_sustained.json"
$PY perf/perf_analyzer.py --concurrency 1,2,4 --json "$OUT/perf_analyzer.json"
$PY perf/run_locust.py --users 2 --run-time 60 --json "$OUT/locust.json"
$PY perf/results.py
