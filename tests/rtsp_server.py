"""A real live source for the tests: GStreamer's RTSP server serving MP4 files as cameras.

Run as a script by the system Python (`/usr/bin/python3`: Debian's python3-gi and
gir1.2-gst-rtsp-server-1.0; the venv has no `gi`):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 /cam1=clip.mp4 /cam2=other.mp4

Each mount plays its file live from the start for every client that connects (one
unshared media factory per client: with a shared one, a second client's PLAY rewinds
the stream for everyone), with SPS/PPS repeated in band and in the SDP, and ends at the
file's end. The script prints "ready <port>" on stdout once it listens.

Imported by the tests (the venv's Python), RtspServer starts, stops and restarts that
script as a subprocess on a fixed port, so a camera URL stays valid across a restart.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
# RUNBOOK "Live RTSP source for tests": the verified launch line.
LAUNCH = ("( filesrc location={path} ! qtdemux name=d d.video_0 ! queue ! "
          "h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=-1 )")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """The script above as a subprocess: start(), stop(), restart(); url(mount)."""

    def __init__(self, mounts: dict[str, str | Path], port: int | None = None):
        self.mounts = {m if m.startswith("/") else f"/{m}": str(p) for m, p in mounts.items()}
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def url(self, mount: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}{mount if mount.startswith('/') else '/' + mount}"

    def start(self, timeout_s: float = 20.0) -> "RtspServer":
        args = [SYSTEM_PYTHON, __file__, "--port", str(self.port),
                *(f"{m}={p}" for m, p in self.mounts.items())]
        deadline = time.monotonic() + timeout_s
        while True:   # the port may still be held for a moment after a stop
            self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                            env={**os.environ, "PYTHONPATH": ""})
            line = self.process.stdout.readline()
            if line.startswith("ready"):
                return self
            self.process.wait(5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the RTSP server on port {self.port} did not start "
                                   f"(exit status {self.process.returncode})")
            time.sleep(0.2)

    def stop(self) -> None:
        """Kill it, as a camera losing power would: clients see their connection drop."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> "RtspServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(port: int, mounts: dict[str, str]) -> None:
    import gi
    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    points = server.get_mount_points()
    for mount, path in mounts.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(LAUNCH.format(path=path))
        factory.set_shared(False)
        points.add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {port}")
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    print(f"ready {port}", flush=True)
    loop.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("mounts", nargs="+", help="/mount=file.mp4")
    args = parser.parse_args()
    serve(args.port, dict(m.split("=", 1) for m in args.mounts))
