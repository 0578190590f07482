#!/usr/bin/env bash
# Set-up on a fresh machine (Python, pip and apt present): system libraries, a virtualenv with
# pinned packages, and the ONNX export of the committed demo model's vision tower. Idempotent
# and quick when everything is already in place. Sourced by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
log() { echo "setup: $*" >&2; }

pyver="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
case "$pyver" in 3.10|3.11|3.12|3.13) ;; *) log "Python $pyver is not supported (use 3.10-3.13)"; exit 1;; esac

# System libraries: the Triton Python-backend stub links libpython$pyver; perf_analyzer needs libb64.
apt_pkgs=()
ldconfig -p | grep -q "libpython${pyver}.so.1.0" || apt_pkgs+=("libpython${pyver}")
ldconfig -p | grep -q "libb64.so.0d" || apt_pkgs+=("libb64-0d")
# A C compiler and the Python headers build codecsight's compiled kernel (codec metadata).
command -v gcc >/dev/null || apt_pkgs+=("gcc")
[ -f "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
  || apt_pkgs+=("python${pyver}-dev")
# Tests start real peers: nginx (the scale-out proxy), headless Chromium (the operator page,
# driven by Playwright with no browser download) and GStreamer's RTSP server (a live camera),
# which runs under the system python3 with Debian's GObject bindings.
[ -x /usr/sbin/nginx ] || apt_pkgs+=("nginx-light")
[ -x /usr/lib/chromium/chromium ] || apt_pkgs+=("chromium")
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null \
  && /usr/bin/python3 -c "import gi; gi.require_version('Gst', '1.0'); from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find('h264parse') and Gst.ElementFactory.find('qtdemux') and Gst.ElementFactory.find('rtph264pay')" 2>/dev/null \
  || apt_pkgs+=("python3-gi" "gir1.2-gst-rtsp-server-1.0" "gstreamer1.0-plugins-good" "gstreamer1.0-plugins-bad")
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  log "installing ${apt_pkgs[*]} with apt-get"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.codecsight-installed"
# the C source too: `pip install -e` compiles it, and an edit needs a rebuild
want="$(cat pyproject.toml codecsight/*.c | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! compgen -G "codecsight/_codec_kernels*.so" >/dev/null; then
  log "installing pinned packages into $VENV (first time: a few minutes)"
  "$VENV/bin/pip" install --quiet --upgrade pip >/dev/null
  # torch first and alone, so nothing resolves an unpinned (CUDA) torch.
  "$VENV/bin/pip" install --quiet "torch==2.13.0"
  "$VENV/bin/pip" install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi

"$VENV/bin/codecsight" build
