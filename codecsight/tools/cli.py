"""codecsight: build the artifacts, serve the model repository, run the demo."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from codecsight.serve import REPO_ROOT, TritonServer, build, prepared_repository, start_server
from codecsight.tools import exit_code

SAMPLE = REPO_ROOT / "media" / "car-detection.mp4"


def say(message: str) -> None:
    print(f"codecsight: {message}", file=sys.stderr, flush=True)


def cmd_build(args) -> int:
    if args.model_dir:
        prepared_repository(args.model_dir, progress=say)
    else:
        build(force=args.force, progress=say)
    return 0


def admin_key(path: Path) -> str:
    """The admin-API key kept in path (mode 600), created at random on first use."""
    import secrets

    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24))
        say(f"wrote a new admin key to {path}")
    return path.read_text().strip()


def serve_from_flags(args) -> TritonServer:
    """codecsight.serve.start_server with the add_server_arguments flags; progress to stderr."""
    return start_server(args.model_dir, host=args.host, grpc_port=args.grpc_port,
                        http_port=args.http_port, metrics_port=args.metrics_port,
                        log_path=args.log, admin_key=admin_key(args.admin_key_file),
                        progress=say)


def cmd_serve(args) -> int:
    server = serve_from_flags(args)
    stop = {"now": False}

    def on_signal(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["now"] and server.process.poll() is None:
        time.sleep(0.2)
    code = server.process.poll()
    say("shutting down" if code is None else f"tritonserver exited with code {code}")
    server.stop()
    return 0 if code in (None, 0) else 1


def cmd_demo(args) -> int:
    from codecsight_client.cli import stream_all, write_json
    from codecsight_client.stream import connect

    t0 = time.perf_counter()
    server = serve_from_flags(args)
    try:
        results = stream_all(connect(server.grpc_url), str(args.source), args)
        if args.json:
            write_json(args.json, results)
    finally:
        server.stop()
    say(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def add_server_arguments(parser: argparse.ArgumentParser, ports=(8001, 8000, 8002)) -> None:
    parser.add_argument("--model-dir", help="local Qwen2-VL checkpoint directory "
                        "(default: the trained demo model, models/codecsight-demo)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; 0.0.0.0 exposes the server)")
    grpc, http, metrics = ports
    parser.add_argument("--grpc-port", type=int, default=grpc,
                        help="0: any free port (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=http,
                        help="0: any free port (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=metrics,
                        help="0: any free port (default: %(default)s)")
    parser.add_argument("--log", type=Path, help="tritonserver log file")
    parser.add_argument("--admin-key-file", type=Path,
                        default=REPO_ROOT / ".codecsight" / "admin-key",
                        help="key for the model-repository, shared-memory, trace and logging "
                        "APIs (gRPC header 'triton-grpc-protocol-admin-key', HTTP header "
                        "'admin-key'); created at random if missing")


# Subcommands whose module (and torch) is imported only when chosen: name -> (module, help).
LIBRARY_COMMANDS = {
    "train": ("codecsight.tools.train", "train the demo model on generated clips "
              "(Micro-Batch Streaming)"),
    "eval": ("codecsight.tools.eval", "F1 per task and policy on held-out clips through a real "
             "tritonserver"),
    "bench": ("codecsight.tools.bench", "every patch x refresh policy side by side through a real "
              "tritonserver: JSON records, ratios against dense, PNG plot"),
    "cluster": ("codecsight.tools.cluster", "N tritonservers behind nginx, each stream routed "
                "to one instance by its x-stream-id header"),
}


def main(argv=None) -> int:
    import importlib

    from codecsight_client.cli import add_stream_arguments

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="codecsight", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="export the default model's vision tower to ONNX for vit_pruned")
    p.add_argument("--model-dir", help="export for this checkpoint instead")
    p.add_argument("--force", action="store_true",
                   help="re-export the ONNX vision tower even if it is up to date")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("serve", help="run tritonserver on the model repository")
    add_server_arguments(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="serve, stream the bundled clip, print answers and savings")
    add_server_arguments(p, ports=(0, 0, 0))  # free ports: never clash with a running server
    p.add_argument("source", nargs="?", default=SAMPLE, help="video (default: bundled sample)")
    add_stream_arguments(p)
    p.set_defaults(func=cmd_demo, streams=2)
    for name, (module_name, help_text) in LIBRARY_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv[:1] == [name]:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    return exit_code("codecsight", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
