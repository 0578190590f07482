"""vit_pruned's ViT cost per frame: the old packed execution against per-frame batches.

    .venv/bin/python perf/bench_vit_frames.py            # writes perf/results/vit_frames.{md,json}
    .venv/bin/python perf/bench_vit_frames.py --quick    # 1 call per stream count, no sweep

Patch sets come from the real codecsight.parser.StreamParser over a clip (default
media/car-detection.mp4) at the served defaults: the client's analysis fps and stride (one
chunk per request), codec_parser's config.pbtxt pruning settings and pixel budget, for the
dense and codec policies. S streams (1, 4, 8) of the same clip, each started `--stagger`
chunks after the previous, send one chunk each per execute call, as Triton's sequence
batcher hands vit_pruned one request per stream. Every call's sets are encoded by the demo
model's ONNX graph in ONNX Runtime (vit_pruned's served max_patches and thread count, default
2), with

  alone       every frame in its own execution ([1, n]): the reference cost of a frame
  before      the base commit's encode_patch_sets (git show BASE:codecsight/vision.py):
              all streams' frames packed into executions of up to max_patches patches,
              attention over each whole execution under a frame mask
  per-stream  the same packing, one stream's set per execution
  pad-X       encode_patch_sets of this tree: one frame per batch item, frames sorted by
              length, each frame's padding at most X of its batch's L
              (vision.MAX_PADDING_SHARE is the served one, "after")

timed round-robin (best of --repeats per call, wall clock, the load average beside each
figure: the machine is shared). Ratios are against `alone` of the same frames in the same
run; the target is after / alone <= 1.25 for dense and codec. Variants whose execution
plan equals one already timed (dense frames all have one length) reuse its time.
A sweep gives ms per frame against the frame's N: frames cut to N patches, k of them per
call, before (one execution of k * N) and after ([k, N]) beside alone.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codecsight import params, vision  # noqa: E402
from codecsight.checkpoint import Geometry  # noqa: E402
from codecsight.parser import StreamParser  # noqa: E402
from codecsight.policy import PruningConfig  # noqa: E402
from codecsight.serve import DEFAULT_MODEL_DIR, DEFAULT_REPOSITORY, build  # noqa: E402
from codecsight_client import settings as defaults  # noqa: E402
from codecsight_client.demux import iter_chunks, probe  # noqa: E402

CLIP = REPO / "media" / "car-detection.mp4"
BASE = "b4c338f"              # the commit before per-frame batching
TARGET = 1.25                 # after / alone, ms per frame
PADDINGS = (0.0, 0.1, 0.25, 0.5)
POLICIES = ("dense", "codec")
SWEEP_N = (64, 256, 1024, 1792)


def load_base_vision(commit: str):
    """The base commit's codecsight.vision as a separate module (its packing path)."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:codecsight/vision.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="base-vision-")) / "base_vision.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("base_vision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def stream_sets(clip: Path, policy: str, geometry: Geometry, max_pixels: int,
                seconds: float | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """One stream's patch sets, one per chunk (request), as codec_parser makes them."""
    info = probe(str(clip))
    served = params.served_parameters("codec_parser")
    parser = StreamParser(geometry, info.codec, info.fps, defaults.ANALYSIS_FPS, policy=policy,
                          config=PruningConfig.served(), window_seconds=defaults.WINDOW_SECONDS,
                          skip_loop_filter=served["skip_loop_filter"], max_pixels=max_pixels,
                          min_pixels=geometry.min_pixels)
    stride = defaults.stride_seconds(defaults.WINDOW_SECONDS)
    chunks = list(iter_chunks(str(clip), stride))
    if seconds:
        chunks = chunks[:max(1, int(round(seconds / stride)))]
    out = []
    for i, chunk in enumerate(chunks):
        result = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts,
                              final=i == len(chunks) - 1)
        out.append((result.patches, result.positions))
    return out


def execute_calls(chunk_sets: list, streams: int, calls: int, stagger: int) -> list[list]:
    """calls x streams patch sets: call c holds stream k's chunk (c + k * stagger) mod n."""
    n = len(chunk_sets)
    return [[chunk_sets[(c + k * stagger) % n] for k in range(streams)] for c in range(calls)]


def frames_of(sets: list) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(p[a:b], q[a:b]) for p, q in sets for a, b in vision.frame_spans(q)]


def plan_of(variant: str, sets: list, max_patches: int, base) -> tuple:
    """A hashable description of the executions a variant runs (shapes, in order)."""
    if variant == "alone":
        return ("alone",) + tuple(len(p) for p, _ in frames_of(sets))
    if variant == "before":
        return ("packed",) + tuple(len(b.patches) for b in base.pack_patch_sets(sets, max_patches))
    if variant == "per-stream":
        return ("packed",) + tuple(len(b.patches) for s in sets
                                   for b in base.pack_patch_sets([s], max_patches))
    share = float(variant.removeprefix("pad-"))
    return ("frames",) + tuple(b.patches.shape[:2] for b in
                               vision.batch_frames(sets, max_patches, max_padding=share))


def runner(variant: str, encoder, sets: list, max_patches: int, base):
    if variant == "alone":
        frames = frames_of(sets)
        return lambda: [encoder(p, q) for p, q in frames]
    if variant == "before":
        return lambda: base.encode_patch_sets(encoder, sets, max_patches)
    if variant == "per-stream":
        return lambda: [base.encode_patch_sets(encoder, [s], max_patches) for s in sets]
    share = float(variant.removeprefix("pad-"))
    return lambda: vision.encode_patch_sets(encoder, sets, max_patches, max_padding=share)


def time_calls(variants: list[str], calls: list[list], encoder, max_patches: int, base,
               repeats: int) -> dict[str, float]:
    """Seconds per variant summed over the calls, best of `repeats` per call, round-robin;
    a variant with the plan of one timed before it takes that one's time."""
    total = dict.fromkeys(variants, 0.0)
    for sets in calls:
        plans, timed = {}, {}
        for v in variants:
            plan = plan_of(v, sets, max_patches, base)
            plans[v] = plan
            timed.setdefault(plan, v)
        best = {v: float("inf") for v in set(timed.values())}
        for _ in range(repeats):
            for v in best:
                run = runner(v, encoder, sets, max_patches, base)
                t0 = time.perf_counter()
                run()
                best[v] = min(best[v], time.perf_counter() - t0)
        for v in variants:
            total[v] += best[timed[plans[v]]]
    return total


def measure(policy: str, chunk_sets: list, streams: int, args, encoder, base,
            max_patches: int) -> dict:
    calls = execute_calls(chunk_sets, streams, args.calls, args.stagger)
    variants = ["alone", "before", "per-stream", *(f"pad-{p:g}" for p in args.paddings)]
    if streams == 1:
        variants.remove("per-stream")     # one stream: the same as before
    load_before = os.getloadavg()[0]
    seconds = time_calls(variants, calls, encoder, max_patches, base, args.repeats)
    frames = sum(len(vision.frame_spans(q)) for sets in calls for _, q in sets)
    patches = sum(len(p) for sets in calls for p, _ in sets)
    before_n = [n for sets in calls for n in plan_of("before", sets, max_patches, base)[1:]]
    after = f"pad-{vision.MAX_PADDING_SHARE:g}"
    after_shapes = [s for sets in calls
                    for s in plan_of(after, sets, max_patches, base)[1:]]
    ms = {v: 1000 * s / max(frames, 1) for v, s in seconds.items()}
    executions = {v: sum(len(plan_of(v, sets, max_patches, base)) - 1 for sets in calls)
                  for v in variants}
    row = {
        "policy": policy, "streams": streams, "calls": len(calls), "frames": frames,
        "patches_per_frame": round(patches / max(frames, 1), 1),
        "before_executions": len(before_n),
        "before_mean_n": round(float(np.mean(before_n)), 1) if before_n else 0,
        "after_executions": len(after_shapes),
        "after_mean_items": round(float(np.mean([b for b, _ in after_shapes])), 2)
        if after_shapes else 0,
        "ms_per_frame": {v: round(x, 2) for v, x in ms.items()},
        "executions": executions,
        "vs_alone": {v: round(x / ms["alone"], 3) if ms["alone"] else None
                     for v, x in ms.items()},
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    row["after"] = after
    row["target_met"] = row["vs_alone"][after] is not None and row["vs_alone"][after] <= TARGET
    print(f"[vit-frames] {policy} x{streams}: {frames} frames, {row['patches_per_frame']} "
          f"patches/frame; ms/frame " + ", ".join(f"{v} {x:.1f}" for v, x in ms.items())
          + f"; after/alone {row['vs_alone'][after]}; load {row['load_average']}", flush=True)
    return row


def sweep(frame: tuple[np.ndarray, np.ndarray], encoder, base, max_patches: int,
          repeats: int, sizes=SWEEP_N) -> list[dict]:
    """ms per frame against N: k = max_patches // N frames of N patches (a dense frame's
    first N), each encoded alone, packed into one execution of k * N (before) and as one
    [k, N] batch (after)."""
    patches, positions = frame
    rows = []
    for n in sizes:
        if n > min(len(patches), max_patches):
            continue
        k = max_patches // n
        sets = [(patches[:n], np.concatenate([positions[:n, :1] + i, positions[:n, 1:]], 1))
                for i in range(k)]
        load = os.getloadavg()[0]
        seconds = time_calls(["alone", "before", "pad-0"], [sets], encoder, max_patches,
                             base, repeats)
        ms = {v: round(1000 * s / k, 2) for v, s in seconds.items()}
        rows.append({"n": n, "frames": k, "before_execution_n": k * n,
                     "ms_per_frame": ms, "us_per_patch_alone": round(1000 * ms["alone"] / n, 1),
                     "before_vs_alone": round(ms["before"] / ms["alone"], 3),
                     "after_vs_alone": round(ms["pad-0"] / ms["alone"], 3),
                     "load_average": round(load, 2)})
        print(f"[vit-frames] sweep N={n} x{k}: ms/frame {ms}; load {load:.2f}", flush=True)
    return rows


def markdown(report: dict) -> str:
    after = f"pad-{report['max_padding_share']:g}"
    out = [f"# vit_pruned: ViT ms per frame, packed (before) vs per-frame batches (after)",
           "",
           f"`{report['command']}`  ",
           f"Clip {report['clip']}, {report['analysis_fps']:g} fps, {report['stride_s']:g} s "
           f"chunks, max_pixels {report['max_pixels']}; ONNX Runtime {report['onnxruntime']}, "
           f"{report['threads']} threads, max_patches {report['max_patches']}; "
           f"before = {report['base']}'s packing; after = {after} "
           f"(vision.MAX_PADDING_SHARE). Best of {report['repeats']} per call, wall clock; "
           "load average (1 min) before and after each row. Ratios are against `alone` "
           "(each frame in its own execution) of the same frames in the same run.",
           "",
           "| policy | streams | frames | patches/frame | before: executions x mean N "
           "| executions: before / " + " / ".join(f"pad-{p:g}" for p in report["paddings"]) + " "
           "| alone ms/frame | before ms/frame | before/alone | per-stream/alone "
           + "".join(f"| pad-{p:g}/alone " for p in report["paddings"])
           + "| after ms/frame | target after/alone <= 1.25 | load |",
           "|---" * (13 + len(report["paddings"])) + "|"]
    for r in report["rows"]:
        v = r["vs_alone"]
        out.append(
            f"| {r['policy']} | {r['streams']} | {r['frames']} | {r['patches_per_frame']} "
            f"| {r['before_executions']} x {r['before_mean_n']} "
            f"| {' / '.join(str(r['executions'][x]) for x in ['before'] + [f'pad-{p:g}' for p in report['paddings']])} "
            f"| {r['ms_per_frame']['alone']} | {r['ms_per_frame']['before']} | {v['before']} "
            f"| {v.get('per-stream', '=before')} "
            + "".join(f"| {v[f'pad-{p:g}']} " for p in report["paddings"])
            + f"| {r['ms_per_frame'][after]} | {'met' if r['target_met'] else 'MISSED'} "
            f"({v[after]}) | {r['load_average'][0]}-{r['load_average'][1]} |")
    if report.get("sweep"):
        out += ["", "## ms per frame against N", "",
                "k = max_patches // N frames of N patches each (a dense frame's first N): "
                "`alone` encodes each in its own execution, `before` packs them into one "
                f"execution of k x N patches, `after` runs one [k, N] batch. Best of "
                f"{report['sweep_repeats']}.", "",
                "| N | frames k | before execution N | alone ms/frame | alone us/patch "
                "| before ms/frame | before/alone | after ms/frame | after/alone | load |",
                "|---" * 10 + "|"]
        for s in report["sweep"]:
            ms = s["ms_per_frame"]
            out.append(f"| {s['n']} | {s['frames']} | {s['before_execution_n']} | {ms['alone']} "
                       f"| {s['us_per_patch_alone']} | {ms['before']} | {s['before_vs_alone']} "
                       f"| {ms['pad-0']} | {s['after_vs_alone']} | {s['load_average']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, default=CLIP)
    ap.add_argument("--onnx", type=Path, default=None,
                    help="ONNX export to run (default: vit_pruned's, built if missing)")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                    help="checkpoint whose geometry the parser uses (default: the demo model)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--calls", type=int, default=3, help="execute calls per row")
    ap.add_argument("--repeats", type=int, default=2, help="timings per call (best kept)")
    ap.add_argument("--stagger", type=int, default=3, help="chunks between streams' starts")
    ap.add_argument("--seconds", type=float, default=None, help="clip seconds to parse")
    ap.add_argument("--paddings", type=float, nargs="+", default=list(PADDINGS))
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="picture budget (default: codec_parser's served max_pixels)")
    ap.add_argument("--threads", type=int, default=None,
                    help="ONNX Runtime threads (default: vit_pruned's served "
                         "intra_op_threads, or 2 where that is 0: the machine's cores)")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quick", action="store_true", help="--calls 1 --no-sweep")
    ap.add_argument("--base", default=BASE, help="commit whose packing is `before`")
    ap.add_argument("--out", type=Path, default=REPO / "perf" / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.calls, args.sweep = 1, False
    if vision.MAX_PADDING_SHARE not in args.paddings:
        args.paddings.append(vision.MAX_PADDING_SHARE)

    served = params.served_parameters("vit_pruned", config_name="cpu")
    max_patches = served["max_patches"]
    threads = args.threads or served["intra_op_threads"] or 2
    onnx_path = args.onnx or build() / "vit_pruned" / "1" / served["onnx_file"]
    encoder = vision.OnnxVisionEncoder(onnx_path, threads)
    base = load_base_vision(args.base)
    geometry = Geometry.from_model_dir(args.model_dir)
    max_pixels = args.max_pixels or params.served_parameters("codec_parser")["max_pixels"]
    import onnxruntime

    report = {"command": "python perf/bench_vit_frames.py " + " ".join(argv or sys.argv[1:]),
              "clip": str(args.clip.relative_to(REPO) if args.clip.is_relative_to(REPO)
                          else args.clip),
              "analysis_fps": defaults.ANALYSIS_FPS,
              "stride_s": defaults.stride_seconds(defaults.WINDOW_SECONDS),
              "max_pixels": max_pixels, "max_patches": max_patches, "threads": threads,
              "onnxruntime": onnxruntime.__version__, "base": args.base,
              "max_padding_share": vision.MAX_PADDING_SHARE, "paddings": args.paddings,
              "repeats": args.repeats, "target": TARGET, "rows": [], "sweep": []}
    dense_frame = None
    for policy in args.policies:
        chunk_sets = stream_sets(args.clip, policy, geometry, max_pixels, args.seconds)
        if policy == "dense":
            dense_frame = frames_of(chunk_sets[:1])[0]
        for streams in args.streams:
            report["rows"].append(measure(policy, chunk_sets, streams, args, encoder, base,
                                          max_patches))
    if args.sweep and dense_frame is not None:
        report["sweep_repeats"] = max(args.repeats, 3)
        report["sweep"] = sweep(dense_frame, encoder, base, max_patches,
                                report["sweep_repeats"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vit_frames.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "vit_frames.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["target_met"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
