"""codecsight-client: stream a video file or RTSP camera through the CodecSight ensemble.

It demuxes with PyAV and never decodes: compressed chunks go over gRPC, answers come back.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import signal
import sys
import threading

import numpy as np

from codecsight_client import settings as defaults
from codecsight_client.stream import (StreamRefused, StreamSettings, check_stream_id, connect,
                                      run_stream, stream_token)
from codecsight import protocol as P
from codecsight_client.demux import is_live, iter_chunks, probe
from codecsight_client.observe import redact_text


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by codecsight-client and `codecsight demo` (same names as the server's)."""
    defaults.add_question_argument(parser)
    defaults.add_window_arguments(parser)
    parser.add_argument("--policy", default=defaults.PATCH_POLICY, choices=P.PATCH_POLICIES,
                        help="patch policy (dense: every patch, the reference; default: "
                        f"{defaults.PATCH_POLICY})")
    parser.add_argument("--refresh", default=defaults.REFRESH_POLICY,
                        choices=P.REFRESH_POLICIES, help="KV refresh policy (full: re-prefill "
                        f"every window, the reference; default: {defaults.REFRESH_POLICY})")
    parser.add_argument("--stream-id", default="cam-1",
                        help="the stream's ID: 1-128 letters, digits or ._:- (default: cam-1; "
                        "with --streams N, ID-0 ... ID-N-1)")
    parser.add_argument("--streams", type=int, default=1,
                        help="replay the source as N concurrent streams with distinct IDs "
                        "(default: %(default)s)")
    parser.add_argument("--json", metavar="OUT", help="write every window's record as JSON")
    parser.add_argument("--video-track", type=int, default=None, metavar="N",
                        help="the container's stream index to analyse (default: the default "
                        "video track, else the largest; cover images and thumbnails never)")
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="this client's secret, created at random (mode 600) on first "
                        "use; each stream's owner token is derived from it, so a restarted "
                        "client takes its streams back (default: "
                        "$XDG_CONFIG_HOME/codecsight/client-secret or "
                        "~/.config/codecsight/client-secret)")


class StreamsFailed(RuntimeError):
    """Some streams of a run stopped with an error (each already reported on stderr)."""


def stream_ids(base: str, count: int) -> list[str]:
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


def stream_all(client, source: str, args, out=None) -> list:
    """Replay source as args.streams concurrent streams; print each window; return all.

    Raises ValueError for an invalid stream ID before anything is read or sent. out: where
    lines go (default: sys.stdout as it is at call time, so a redirected stdout is honoured).
    """
    out = out or sys.stdout
    ids = stream_ids(args.stream_id, args.streams)
    for sid in ids:
        check_stream_id(sid)
    info = probe(source, getattr(args, "video_track", None))
    settings = StreamSettings(
        question=args.question, codec=info.codec, source_fps=info.fps, analysis_fps=args.fps,
        window_seconds=args.window_seconds, policy=args.policy, refresh=args.refresh,
        rotation=info.rotation)
    tokens = {sid: stream_token(sid, getattr(args, "token_file", None)) for sid in ids}
    stride = defaults.stride_seconds(args.window_seconds, args.stride_seconds)
    lock = threading.Lock()
    rotated = f", shown rotated {info.rotation} degrees clockwise" if info.rotation else ""
    print(f"{redact_text(source)}: {info.codec} {info.width}x{info.height} @ {info.fps:g} fps{rotated}; "
          f"{args.streams} stream(s), policy={args.policy}, refresh={args.refresh}, "
          f"analysis {args.fps:g} fps, window {args.window_seconds:g} s, stride {stride:g} s",
          file=out, flush=True)

    def show(window, chunk):
        frames = window.llm.window_frame_range
        kept, total = window.parse.patches_kept, window.parse.patches_total
        with lock:
            print(f"[{window.stream_id}] window {window.index:>3} "
                  f"video {chunk.start_s:6.2f}-{chunk.end_s:6.2f} s "
                  f"frames {frames} kept {kept}/{total} patches, "
                  f"prefilled {window.llm.tokens_prefilled} tokens, "
                  f"{window.latency_s * 1000:7.1f} ms  answer: {window.answer!r}",
                  file=out, flush=True)

    def run(sid):
        def notice(message):   # timestamp discontinuities, named by the stream they hit
            print(f"codecsight-client: stream {sid!r}: {redact_text(message)}",
                  file=sys.stderr, flush=True)
        chunks = iter_chunks(source, stride, video_track=info.track, notice=notice)
        try:
            return run_stream(client, sid, settings, chunks, show, token=tokens[sid],
                              stop=stop)
        except StreamRefused as e:
            # Stop this stream only; the others carry on.
            print(f"codecsight-client: {redact_text(e)}", file=sys.stderr, flush=True)
            return e

    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        futures = [pool.submit(run, sid) for sid in ids]
        while True:
            try:
                concurrent.futures.wait(futures)
                break
            except KeyboardInterrupt:
                # The first Ctrl-C (or SIGTERM) ends every stream with END and keeps what was
                # answered; the stream threads see it at their next chunk.
                if stop.is_set():
                    raise
                stop.set()
                print("codecsight-client: stopping: ending every stream with END "
                      "(interrupt again to quit at once)", file=sys.stderr, flush=True)
        outcomes = [f.result() for f in futures]
    results = [r for r in outcomes if not isinstance(r, Exception)]
    summarize(results, info, out)
    failed = [r for r in outcomes if isinstance(r, Exception)]
    if failed:
        raise StreamsFailed(f"{len(failed)} of {len(ids)} stream(s) refused by the server")
    return results


def summarize(results: list, info, out=None) -> dict:
    """Print (to out, default sys.stdout) and return totals: bytes sent against raw RGB,
    patches kept, latency."""
    out = out or sys.stdout
    windows = [w for stream in results for w in stream]
    sampled = sum(w.parse.frames_sampled for w in windows)
    summary = {
        "streams": len(results), "windows": len(windows), "frames_sampled": sampled,
        "bytes_sent": sum(w.bytes_sent for w in windows),
        "raw_rgb_bytes": sampled * info.width * info.height * 3,
        "patches_kept": sum(w.parse.patches_kept for w in windows),
        "patches_total": sum(w.parse.patches_total for w in windows),
        "tokens_prefilled": sum(w.llm.tokens_prefilled for w in windows),
        "tokens_reused": sum(w.llm.tokens_reused for w in windows),
        "window_latency_ms_p50": float(np.percentile([w.latency_s * 1000 for w in windows], 50))
        if windows else None,
    }
    if windows:
        print(f"summary: {summary['windows']} windows over {summary['streams']} stream(s); "
              f"sent {summary['bytes_sent'] / 1e6:.2f} MB of H.264 instead of "
              f"{summary['raw_rgb_bytes'] / 1e6:.1f} MB of RGB frames at the analysis fps "
              f"({summary['raw_rgb_bytes'] / max(1, summary['bytes_sent']):.0f}x less); "
              f"ViT saw {summary['patches_kept']}/{summary['patches_total']} patches "
              f"({100 * summary['patches_kept'] / max(1, summary['patches_total']):.0f}%); "
              f"LLM prefilled {summary['tokens_prefilled']} tokens and reused "
              f"{summary['tokens_reused']} from its KV caches; "
              f"p50 window latency {summary['window_latency_ms_p50']:.0f} ms", file=out)
    return summary


def write_json(path: str, results: list) -> None:
    records = [dataclasses.asdict(w) for stream in results for w in stream]
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def add_connection_arguments(parser: argparse.ArgumentParser, url_default) -> None:
    parser.add_argument("--url", default=url_default,
                        help="Triton gRPC address (default: %(default)s)")
    parser.add_argument("--ssl", action="store_true", help="use gRPC over TLS")
    parser.add_argument("--root-certificates", help="PEM file of the CA to trust (with --ssl)")
    parser.add_argument("--private-key", help="client key PEM (mutual TLS)")
    parser.add_argument("--certificate-chain", help="client certificate PEM (mutual TLS)")


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    """Output flags of the watcher (`watch CONFIG`, and one source with --live)."""
    parser.add_argument("--jsonl", action="store_true",
                        help="print every answered window as one JSON object per line on "
                        "stdout, and nothing else there (events go to stderr)")
    parser.add_argument("--dashboard", metavar="HOST:PORT", default=None,
                        help="serve the operator page on HOST:PORT while watching")


def _connect(args):
    return connect(args.url, ssl=args.ssl, root_certificates=args.root_certificates,
                   private_key=args.private_key, certificate_chain=args.certificate_chain)


def run_watcher(client, cameras, args, *, queue_depth: int = defaults.QUEUE_DEPTH,
                request_timeout_s: float = defaults.REQUEST_TIMEOUT_S) -> int:
    """Follow cameras until every one ends (files) or Ctrl-C/SIGTERM; the exit status.

    0: stopped, or every source ended; 1: a camera gave up (its max_attempts failed, or its
    file could not be read).
    Ctrl-C or SIGTERM ends every stream with END; a second one quits at once.
    """
    from codecsight_client.live import (EventPrinter, JsonLinesPrinter, TextPrinter,
                                        Watcher)
    from codecsight_client.observe import Observers

    observers = [EventPrinter(), JsonLinesPrinter() if args.jsonl else TextPrinter()]
    board = None
    if args.dashboard:
        try:
            from codecsight_client.dashboard import DashboardError, start_dashboard
        except ImportError as e:
            print(f"codecsight-client: --dashboard needs codecsight_client.dashboard, which "
                  f"cannot be imported: {e}", file=sys.stderr)
            return 2
        try:
            board = start_dashboard(args.dashboard, admin_key=None)
        except DashboardError as e:   # a port in use, a non-loopback address: say so, stop
            print(f"codecsight-client: {e}", file=sys.stderr)
            return 2
        observers.append(board)
        print(f"codecsight-client: operator page at {board.url}", file=sys.stderr, flush=True)
    tokens = {c.stream_id: stream_token(c.stream_id, getattr(args, "token_file", None))
              for c in cameras}
    watcher = Watcher(client, cameras, Observers(observers), tokens=tokens,
                      queue_depth=queue_depth, request_timeout_s=request_timeout_s,
                      server=args.url)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    stopped = False
    try:
        watcher.start()
        try:
            while not watcher.wait(0.5):
                pass
        except KeyboardInterrupt:
            stopped = True
            print("codecsight-client: stopping: ending every stream with END "
                  "(interrupt again to quit at once)", file=sys.stderr, flush=True)
            watcher.stop()
            try:
                watcher.wait()
            except KeyboardInterrupt:
                print("codecsight-client: interrupted again: quitting without END",
                      file=sys.stderr, flush=True)
                os._exit(130)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        if board is not None:
            board.close()
    gave_up = [c.camera.stream_id for c in watcher.cameras if c.gave_up]
    if gave_up and not stopped:
        print(f"codecsight-client: gave up on camera(s) {', '.join(gave_up)}: a camera after "
              "its max_attempts, a file after one failure (see their `ended` events above)",
              file=sys.stderr)
        return 1
    return 0


def watch_main(argv) -> int:
    """codecsight-client watch CONFIG: follow every camera of a TOML/YAML config."""
    from codecsight_client.watch_config import ConfigError, load

    parser = argparse.ArgumentParser(
        prog="codecsight-client watch", description="Follow the live cameras a TOML or YAML "
        "config lists, in real time (README: Watching live cameras).")
    parser.add_argument("config", help="cameras config, .toml, .yaml or .yml")
    add_connection_arguments(parser, None)
    parser.set_defaults(url=None)
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help="this client's secret (see codecsight-client --help)")
    add_watch_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config, cameras = load(args.config)
    except ConfigError as e:
        print(f"codecsight-client: invalid config: {e}", file=sys.stderr)
        return 2
    args.url = args.url or config.server or DEFAULT_URL
    return run_watcher(_connect(args), cameras, args, queue_depth=config.queue_depth,
                       request_timeout_s=config.request_timeout_s)


def _watch_one(args) -> int:
    """One source (or --streams copies of it) through the watcher: --live and friends."""
    from codecsight_client.live import Camera

    ids = stream_ids(args.stream_id, args.streams)
    try:
        for sid in ids:
            check_stream_id(sid)
    except ValueError as e:
        print(f"codecsight-client: {e}", file=sys.stderr)
        return 2
    # A file given --live behaves like a camera: paced at its own frame rate.
    realtime = args.replay_realtime or args.live
    cameras = [Camera(stream_id=sid, source=args.source, question=args.question,
                      policy=args.policy, refresh=args.refresh, analysis_fps=args.fps,
                      window_seconds=args.window_seconds, stride_seconds=args.stride_seconds,
                      replay_realtime=realtime, video_track=args.video_track) for sid in ids]
    return run_watcher(_connect(args), cameras, args)


DEFAULT_URL = "127.0.0.1:8001"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "watch":
        return watch_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="codecsight-client", description=__doc__,
        epilog="codecsight-client watch CONFIG follows the cameras a TOML/YAML config lists "
        "(codecsight-client watch --help).")
    parser.add_argument("source", help="video file or rtsp:// URL (H.264/HEVC); a live URL "
                        "(rtsp://, rtmp://, udp://, ...) is always followed as with --live")
    add_connection_arguments(parser, DEFAULT_URL)
    add_stream_arguments(parser)
    parser.add_argument("--live", action="store_true",
                        help="follow the source as a live camera: real-time pacing, stale "
                        "windows dropped when the server lags, reconnects with backoff, "
                        "events on stderr; until Ctrl-C/SIGTERM (or a file's end). Implied "
                        "for a live URL such as rtsp://")
    parser.add_argument("--replay-realtime", action="store_true",
                        help="pace a file at its own frame rate, like a camera (implies the "
                        "watcher, as --live)")
    add_watch_arguments(parser)
    args = parser.parse_args(argv)
    # A live source does not come back by itself: follow it as a camera (reconnects, events),
    # never a replay that exits 0 when the camera drops.
    live = args.live or is_live(args.source)
    if (args.jsonl or args.dashboard) and not (live or args.replay_realtime):
        # A file replayed as fast as the server answers ends in seconds: not a watch.
        parser.error("--jsonl and --dashboard follow a source in real time: add "
                     "--replay-realtime to pace this file like a camera (or list it in a "
                     "`codecsight-client watch CONFIG` config)")
    if live or args.replay_realtime:
        if args.json:
            parser.error("--json writes a file replay's records; a live source (rtsp://..., "
                         "--live) or --replay-realtime prints --jsonl's lines instead")
        args.live = live
        return _watch_one(args)
    client = _connect(args)
    on_main = threading.current_thread() is threading.main_thread()
    # SIGTERM stops like Ctrl-C (a signal handler can only be set on the main thread).
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        results = stream_all(client, args.source, args)
    except KeyboardInterrupt:
        # A second interrupt: quit at once; the server's TTL frees what is left.
        print("codecsight-client: interrupted again: quitting without END", file=sys.stderr)
        os._exit(130)
    except Exception as e:  # tritonclient raises InferenceServerException with the server's text
        print(f"codecsight-client: {redact_text(e)}", file=sys.stderr)
        return 1
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
