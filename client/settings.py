"""Client and tool defaults: what a stream asks the server for, in one place.

codecsight-client, `codecsight demo`, `codecsight bench`, `codecsight eval`, `codecsight train`
and the perf/ scripts take their flag defaults from here (and `StreamSettings` its field
defaults), so they agree. Server-side settings live in each model's config.pbtxt instead.
"""
from __future__ import annotations

import argparse

QUESTION = "how many objects are moving?"   # one the demo model was trained on
ANALYSIS_FPS = 2.0           # frames per second the server samples for the ViT
WINDOW_SECONDS = 8.0         # video the LLM's window holds, seconds
# Video per request (how often the window slides and is answered): unless given, this share
# of the window, so an 8 s window is answered every 2 s and each frame is seen in 4 windows.
STRIDE_SHARE = 0.25
PATCH_POLICY = "codec"       # protocol.PATCH_POLICIES; dense is the reference
REFRESH_POLICY = "selective"  # protocol.REFRESH_POLICIES; full is the reference

# The one deviation. The demo model was trained (`codecsight train`) on 4 s windows, and
# `codecsight eval` asks it about windows like those; both slide by a whole window
# (stride = window) so windows do not overlap: each held-out window is scored once and
# each training window is one sample.
TRAINED_WINDOW_SECONDS = 4.0
TRAINED_STRIDE_SHARE = 1.0


def stride_seconds(window_seconds: float, stride: float | None = None,
                   share: float = STRIDE_SHARE) -> float:
    """Video per request in seconds: stride when given (> 0), else share x window_seconds."""
    return stride if stride else window_seconds * share


def _stride_rule(share: float) -> str:
    if share == 1.0:
        return "the window length"
    if share == 0.25:
        return "a quarter of the window"
    return f"{share:g} x the window"


def add_window_arguments(parser: argparse.ArgumentParser, *,
                         window_seconds: float = WINDOW_SECONDS,
                         stride_share: float = STRIDE_SHARE) -> None:
    """--fps, --window-seconds and --stride-seconds, with the defaults above.

    --stride-seconds parses to None when not given: resolve it with
    `stride_seconds(args.window_seconds, args.stride_seconds, stride_share)`.
    """
    parser.add_argument("--fps", type=float, default=ANALYSIS_FPS,
                        help=f"analysis frames per second (default: {ANALYSIS_FPS:g})")
    parser.add_argument("--window-seconds", type=float, default=window_seconds,
                        help=f"video the window holds, seconds (default: {window_seconds:g})")
    parser.add_argument("--stride-seconds", type=float, default=None,
                        help="video per request, i.e. how often the window slides and is "
                        f"answered (default: {_stride_rule(stride_share)})")


def add_question_argument(parser: argparse.ArgumentParser) -> None:
    """--question with the default above."""
    parser.add_argument("--question", default=QUESTION,
                        help=f"question answered for every window (default: {QUESTION!r})")

# Watching live cameras (codecsight-client watch / --live; codecsight_client.live).
# Chunks a camera may hold unsent while the server is busy; one more and the oldest two are
# merged into one request (one window dropped). 2 absorbs one slow answer without a drop.
QUEUE_DEPTH = 2
# Reconnecting a lost source: exponential backoff from BACKOFF_INITIAL_S, doubling, capped at
# BACKOFF_MAX_S, plus up to BACKOFF_JITTER_S of random jitter so that cameras lost together
# do not reconnect in lockstep. The first attempt after a loss is immediate.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
BACKOFF_JITTER_S = 0.5
# Each request's deadline (gRPC client_timeout): a request past it is a server_error event
# and the camera goes on with its next chunk. Generous: a cold server's first answer is slow.
REQUEST_TIMEOUT_S = 60.0
# Opening a source, and waiting for its next packet: a camera silent longer is lost.
SOURCE_OPEN_TIMEOUT_S = 10.0
SOURCE_READ_TIMEOUT_S = 5.0
