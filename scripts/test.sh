#!/usr/bin/env bash
# The test suite: set up, then pytest (unit tests, then tests against a real tritonserver).
# Opt-in suites: `bash scripts/test.sh -m slow`, `-m soak`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$VENV/bin/python" -m pytest "$@"
