"""Write perf_analyzer --input-data files: real chunks of real clips, one file per policy pair.

Each file is perf_analyzer's JSON for sequence models: {"data": [stream, stream, ...]}, each
stream a list of steps, each step one ensemble request (a chunk of Annex-B H.264 in base64,
plus the scalar inputs). perf_analyzer plays one stream per sequence, round robin, with START
on the first step and END on the last, exactly as codecsight-client would send it.

    .venv/bin/python perf/make_inputs.py media/car-detection.mp4 --chunks 4 \
        --policies dense,codec --refresh full --out-dir perf/out/inputs
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codecsight import protocol as P  # noqa: E402
from codecsight.tools import exit_code  # noqa: E402
from codecsight.tools.bench import check_policies, split_list  # noqa: E402
from codecsight_client import settings as defaults  # noqa: E402
from codecsight_client.demux import iter_chunks, probe  # noqa: E402
from codecsight_client.stream import StreamSettings, request_arrays  # noqa: E402


def stream_steps(video: str, *, policy: str, refresh: str, fps: float, window_seconds: float,
                 stride_seconds: float, chunks: int, question: str) -> list[dict]:
    """One stream's requests: the first `chunks` chunks of video, every ensemble input set
    exactly as StreamClient sends it (codecsight_client.stream.request_arrays)."""
    info = probe(video)
    settings = StreamSettings(question=question, codec=info.codec, source_fps=info.fps,
                              analysis_fps=fps, window_seconds=window_seconds, policy=policy,
                              refresh=refresh)
    token = secrets.token_urlsafe(24)   # one owner for every sequence replaying this stream
    steps = []
    for seq, chunk in enumerate(itertools.islice(iter_chunks(video, stride_seconds), chunks)):
        arrays = request_arrays(chunk.access_units(), settings, chunk_seq=seq, token=token,
                                time_jump=chunk.time_jump_s)
        step = {}
        for name, value in arrays.items():
            value = value[0]   # shapes leave out the batch axis (the ensemble batches)
            if name == P.CHUNK:
                step[name] = {"b64": base64.b64encode(value.tobytes()).decode("ascii"),
                              "shape": [len(value)]}
            elif value.dtype == object:
                step[name] = [v.decode("utf-8") for v in value]
            elif name in (P.AU_BYTES, P.AU_PTS):   # variable length: give the shape
                step[name] = {"content": value.tolist(), "shape": list(value.shape)}
            else:
                step[name] = value.tolist()
        steps.append(step)
    if not steps:
        raise ValueError(f"{video}: no chunks of {stride_seconds} s to send")
    return steps


def input_data(videos: list[str], **settings) -> dict:
    """perf_analyzer's JSON: one data stream per video (a sequence replays one of them)."""
    return {"data": [stream_steps(v, **settings) for v in videos]}


def input_file_name(policy: str, refresh: str) -> str:
    return f"{policy}-{refresh}.json"


def write_inputs(videos: list[str], out_dir: Path, policies: list[str], refreshes: list[str],
                 **settings) -> dict[tuple[str, str], Path]:
    """Write one input file per (policy, refresh); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for policy, refresh in itertools.product(policies, refreshes):
        path = out_dir / input_file_name(policy, refresh)
        path.write_text(json.dumps(input_data(videos, policy=policy, refresh=refresh,
                                              **settings)))
        paths[(policy, refresh)] = path
    return paths


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with perf_analyzer.py (same names as codecsight bench)."""
    parser.add_argument("videos", nargs="*", help="H.264 clips (default: the bundled sample)")
    parser.add_argument("--policies", default=",".join(P.PATCH_POLICIES))
    parser.add_argument("--refresh", default="full",
                        help="KV refresh policies, comma-separated")
    defaults.add_window_arguments(parser)
    parser.add_argument("--chunks", type=int, default=4,
                        help="requests per sequence (chunks from the start of each clip)")
    defaults.add_question_argument(parser)


def settings_from(args) -> dict:
    """stream_steps keywords from add_input_arguments flags (the stride resolved)."""
    return dict(fps=args.fps, window_seconds=args.window_seconds,
                stride_seconds=defaults.stride_seconds(args.window_seconds, args.stride_seconds),
                chunks=args.chunks, question=args.question)


def default_videos(videos: list[str]) -> list[str]:
    from codecsight.serve import REPO_ROOT

    return [str(v) for v in videos] or [str(REPO_ROOT / "media" / "car-detection.mp4")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--out-dir", type=Path, default=Path("perf/out/inputs"))
    args = parser.parse_args(argv)
    paths = write_inputs(default_videos(args.videos), args.out_dir,
                         check_policies(split_list(args.policies), P.PATCH_POLICIES, "policy"),
                         check_policies(split_list(args.refresh), P.REFRESH_POLICIES, "refresh"),
                         **settings_from(args))
    for (policy, refresh), path in paths.items():
        print(f"{policy}/{refresh}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code("make_inputs.py", main))
