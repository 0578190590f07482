#!/usr/bin/env bash
# The main job: set up, serve the model repository, stream the bundled clip through the
# ensemble and print each window's answer and the savings. Extra flags go to `codecsight demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec "$VENV/bin/codecsight" demo "$@"
