"""The LLM stage's time per window at 1, 4 and 8 concurrent streams: the sequential path of
the base commit against the batched one, side by side in one run.

What llm_prefill gets from the sequence batcher when N streams are live: one request per
stream per round, each a stride of new frames. Before (base commit b4c338f, run from a git
worktree): the streams are stepped one after another (StreamSession.step each). After (this
tree): llm.step_streams prefills every due stream's rows and question in one packed forward
and decodes their answers together. Both run the committed demo model on the same real
visual tokens: the bundled clip parsed by codec_parser's code (StreamParser, served pruning
settings, dense or codec) and encoded by the pruned ViT (torch), computed once and cached.

Stream k replays the clip from its k-th request on, so the N windows hold different video.
After the window has filled (window / stride rounds), each round is timed: wall time and the
process's CPU time of the N streams' steps, divided by N, per window. Each (policy, refresh,
N) runs before and after in two fresh processes, one after the other, with the load average
recorded beside each; the answers of before and after are compared token for token.

    .venv/bin/python perf/bench_prefill_batch.py                      # the committed results
    .venv/bin/python perf/bench_prefill_batch.py --streams 1,4 --policies codec \\
        --refresh selective --rounds 2
    git worktree add /tmp/base-B b4c338f   # the "before" code (--base)

Results: perf/results/prefill_batch.{json,md}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLIP = REPO / "media" / "car-detection.mp4"
QUESTION = "is anyone in the loading bay?"
OUT = REPO / "perf" / "results" / "prefill_batch"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the inputs: real visual tokens, computed once ------------------------------------------

def visual_requests(model_dir: Path, clip: Path, policy: str, seconds: float, stride: float,
                    fps: float, max_pixels: int | None, cache_dir: Path) -> Path:
    """The clip's requests to llm_prefill under a patch policy, cached as one .npz: per
    request its TOKENS float32 [n, hidden], POSITIONS int64 [N, 3], FRAME_META int64 [F, C],
    as codec_parser and vit_pruned make them (StreamParser with the served pruning settings,
    the pruned ViT in torch). Returns the file."""
    key = hashlib.sha1(json.dumps([str(Path(model_dir).resolve()), str(clip), policy, seconds,
                                   stride, fps, max_pixels]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"requests-{policy}-{key}.npz"
    if path.is_file():
        return path
    sys.path.insert(0, str(REPO))
    from codecsight.families import family_for_dir
    from codecsight.parser import StreamParser
    from codecsight.policy import PruningConfig
    from codecsight.vision import PrunedVisionEncoder
    from codecsight_client.demux import iter_chunks, probe

    family = family_for_dir(model_dir)
    info = probe(str(clip))
    parser = StreamParser(family.geometry, info.codec, info.fps, fps, policy=policy,
                          config=PruningConfig.served(), window_seconds=8.0,
                          max_pixels=max_pixels, min_pixels=family.geometry.min_pixels)
    encoder = PrunedVisionEncoder.from_model_dir(model_dir)
    chunks = list(iter_chunks(str(clip), stride))[:max(1, int(round(seconds / stride)))]
    arrays = {}
    for i, chunk in enumerate(chunks):
        parsed = parser.parse(chunk.data, final=i == len(chunks) - 1, au_bytes=chunk.au_sizes,
                              au_pts=chunk.au_pts)
        arrays[f"tokens{i}"] = encoder.encode(parsed.patches, parsed.positions)
        arrays[f"positions{i}"] = parsed.positions
        arrays[f"meta{i}"] = parsed.frame_meta
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, count=len(chunks), **arrays)
    return path


# --- one side of one configuration, in its own process --------------------------------------

def worker(args) -> dict:
    """Step N streams over the cached requests with one code path; timings and answers.

    Runs in a process whose `codecsight` is args.code's (the base worktree or this tree):
    "sequential" steps each stream alone (StreamSession.step, there since the base commit),
    "batched" steps all of a round's streams together (llm.step_streams, this tree only).
    """
    sys.path.insert(0, str(args.code))
    import torch

    from codecsight import llm
    from codecsight.families import family_for_dir

    torch.set_num_threads(args.threads)
    data = np.load(args.requests)
    count = int(data["count"])
    family = family_for_dir(args.model_dir)
    model, tokenizer = family.load(args.model_dir)
    vlm = llm.VisualLM(model, tokenizer, args.max_new_tokens, family=family)
    merge = family.geometry.merge_size
    fill = int(round(args.window / args.stride))
    rounds = min(fill + args.rounds, count - (args.streams - 1))
    if rounds <= fill:
        raise SystemExit(f"the clip has {count} requests: too few for {args.streams} streams "
                         f"offset by one request each, a {fill}-request fill and a timed round")
    requests = [(data[f"tokens{i}"], data[f"positions{i}"], data[f"meta{i}"])
                for i in range(count)]
    sessions = [llm.StreamSession(args.window, refresh=args.refresh, anchor_frames=args.anchors,
                                  seconds_per_t=family.seconds_per_t(args.fps))
                for _ in range(args.streams)]
    wall, cpu, answers, prefill_tokens = [], [], [[] for _ in sessions], 0
    with torch.inference_mode():
        for r in range(rounds):
            frames = [llm.split_frames(*requests[k + r], merge) for k in range(args.streams)]
            t_wall, t_cpu = time.perf_counter(), time.process_time()
            if args.mode == "sequential":
                results = [s.step(vlm, f, QUESTION) for s, f in zip(sessions, frames)]
            else:
                results = llm.step_streams(vlm, [(s, f, QUESTION, "")
                                                 for s, f in zip(sessions, frames)])
            t_wall, t_cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
            if r >= fill:
                wall.append(t_wall * 1000.0 / args.streams)
                cpu.append(t_cpu * 1000.0 / args.streams)
                prefill_tokens += sum(stats.tokens_prefilled for _, stats in results)
            for k, (answer, _) in enumerate(results):
                answers[k].append(answer.token_ids if answer is not None else None)
    return {"mode": args.mode, "streams": args.streams, "refresh": args.refresh,
            "timed_rounds": len(wall), "wall_ms_per_window": wall, "cpu_ms_per_window": cpu,
            "tokens_prefilled_per_window": prefill_tokens / max(1, len(wall) * args.streams),
            "answers": answers, "load_average": load_average(), "threads": args.threads,
            "code": llm.__file__}


def run_worker(code: Path, mode: str, requests: Path, streams: int, refresh: str,
               settings: argparse.Namespace) -> dict:
    """One worker in a fresh process (its own imports, caches and allocator)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode,
               "--code", str(code), "--requests", str(requests), "--streams", str(streams),
               "--refresh", refresh, "--model-dir", str(settings.model_dir),
               "--rounds", str(settings.rounds), "--window", str(settings.window),
               "--stride", str(settings.stride), "--fps", str(settings.fps),
               "--anchors", str(settings.anchors), "--threads", str(settings.threads),
               "--max-new-tokens", str(settings.max_new_tokens)]
    load_before = load_average()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(code)})
    if done.returncode:
        raise RuntimeError(f"{mode} worker failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average_before"] = load_before
    return result


def median(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def compare(before: dict, after: dict) -> dict:
    """One table row: medians per window, ratios before / after, answers compared."""
    pairs = [(a, b) for sa, sb in zip(before["answers"], after["answers"])
             for a, b in zip(sa, sb) if a is not None]
    row = {"streams": before["streams"], "refresh": before["refresh"],
           "timed_windows": before["timed_rounds"] * before["streams"],
           "tokens_prefilled_per_window": round(after["tokens_prefilled_per_window"], 1),
           "same_answers": sum(a == b for a, b in pairs), "answers": len(pairs),
           "load_before": before["load_average_before"], "load_after": after["load_average_before"]}
    for clock in ("wall", "cpu"):
        b = median(before[f"{clock}_ms_per_window"])
        a = median(after[f"{clock}_ms_per_window"])
        row[f"{clock}_ms_before"], row[f"{clock}_ms_after"] = round(b, 1), round(a, 1)
        row[f"{clock}_ratio"] = round(b / a, 2) if a else None
    return row


def table(rows: list[dict]) -> str:
    lines = ["| policy | refresh | streams | tokens prefilled / window | LLM ms / window, before "
             "(sequential, wall / CPU) | after (batched, wall / CPU) | before / after (wall, "
             "CPU) | same answers | load avg (1, 5, 15 min) before ; after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['refresh']} | {r['streams']} | "
            f"{r['tokens_prefilled_per_window']:g} | {r['wall_ms_before']:g} / "
            f"{r['cpu_ms_before']:g} | {r['wall_ms_after']:g} / {r['cpu_ms_after']:g} | "
            f"{r['wall_ratio']:g}x, {r['cpu_ratio']:g}x | {r['same_answers']}/{r['answers']} | "
            f"{', '.join(map(str, r['load_before']))} ; {', '.join(map(str, r['load_after']))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=REPO / "models" / "codecsight-demo")
    ap.add_argument("--clip", type=Path, default=CLIP)
    ap.add_argument("--base", type=Path, default=Path("/tmp/base-B"),
                    help="a checkout of the base commit b4c338f: the sequential 'before'")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--policies", default="codec,dense")
    ap.add_argument("--refresh", default="selective,full")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the window fills")
    ap.add_argument("--seconds", type=float, default=30.0, help="video of the clip used")
    ap.add_argument("--window", type=float, default=8.0, help="window seconds (client default)")
    ap.add_argument("--stride", type=float, default=2.0, help="video per request, seconds")
    ap.add_argument("--fps", type=float, default=2.0, help="analysis fps (client default)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="picture pixel budget (default: codec_parser's served max_pixels)")
    ap.add_argument("--anchors", type=int, default=None,
                    help="anchor_refresh_frames (default: llm_prefill's served value)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="answer tokens at most (default: llm_prefill's served value)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/codecsight-prefill-batch"))
    ap.add_argument("--out", type=Path, default=OUT, help="results stem (.json and .md)")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("sequential", "batched"))
    ap.add_argument("--code", type=Path)
    ap.add_argument("--requests", type=Path)
    args = ap.parse_args(argv)
    if args.worker:
        args.mode, args.streams = args.worker, int(args.streams)
        args.refresh = args.refresh.split(",")[0]
        print(json.dumps(worker(args)))
        return 0

    sys.path.insert(0, str(REPO))
    from codecsight import params

    served_llm = params.served_parameters("llm_prefill")
    if args.max_pixels is None:
        args.max_pixels = params.served_parameters("codec_parser")["max_pixels"]
    if args.anchors is None:
        args.anchors = served_llm["anchor_refresh_frames"]
    if args.max_new_tokens is None:
        args.max_new_tokens = served_llm["max_new_tokens"]
    if not (args.base / "codecsight" / "llm.py").is_file():
        raise SystemExit(f"--base {args.base}: no checkout there; run "
                         f"`git worktree add {args.base} b4c338f`")
    streams = [int(s) for s in args.streams.split(",")]
    rows, runs = [], []
    started = time.time()
    for policy in args.policies.split(","):
        requests = visual_requests(args.model_dir, args.clip, policy, args.seconds, args.stride,
                                   args.fps, args.max_pixels, args.cache)
        for refresh in args.refresh.split(","):
            for n in streams:
                before = run_worker(args.base, "sequential", requests, n, refresh, args)
                after = run_worker(REPO, "batched", requests, n, refresh, args)
                row = {"policy": policy, **compare(before, after)}
                rows.append(row)
                runs.append({"policy": policy, "before": before, "after": after})
                print(json.dumps(row), flush=True)
    result = {
        "what": "llm_prefill's LLM stage per window: sequential streams (base b4c338f) vs one "
                "packed forward + batched decoding (this tree), same process settings",
        "command": "perf/bench_prefill_batch.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
        "model_dir": str(args.model_dir), "clip": str(args.clip), "window_s": args.window,
        "stride_s": args.stride, "analysis_fps": args.fps, "max_pixels": args.max_pixels,
        "anchor_refresh_frames": args.anchors, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "cpu_count": os.cpu_count(), "seconds": round(
            time.time() - started, 1), "rows": rows, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(
        f"# llm_prefill: streams prefilled in one forward (after) vs one by one (before)\n\n"
        f"`{result['command']}`; demo model, {args.clip.name}, window {args.window:g} s, "
        f"stride {args.stride:g} s, {args.fps:g} fps, max_pixels {args.max_pixels}, "
        f"{args.threads} torch thread(s), {os.cpu_count()} cores shared with other work. "
        f"Medians of {args.rounds} timed rounds after the window filled; ms per window = a "
        f"round's time / streams.\n\n{table(rows)}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
