"""ViT and LLM time per sampled frame for every model family, dense vs codec, on a clip.

For each registered family a tiny random checkpoint is built (checkpoint.build_tiny_family,
laid out as a real checkpoint: non-overlapping temporal pairs), and the clip is run through
the serving library in one process, as the ensemble runs it: StreamParser (codec_parser) ->
the family's served encoder (vit_pruned: its ONNX export in ONNX Runtime, or its torch tower)
-> StreamSession.step (llm_prefill, selective refresh). Per sampled frame, both CPU time of
this process (time.process_time, one intra-op thread: stable on a shared, loaded machine)
and wall-clock time. The tiny checkpoints' absolute numbers say little about real ones; the
dense/codec ratio says more.

    .venv/bin/python perf/bench_families.py [--clip media/car-detection.mp4] [--seconds 20]
        [--families qwen2_vl,qwen2_5_vl,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "client"))


def run_family(name: str, clip: str, seconds: float, stride: float, fps: float,
               window: float, work: Path, threads: int) -> dict:
    import itertools

    import torch

    from codecsight import checkpoint, params
    from codecsight.families import family_for_dir
    from codecsight.llm import StreamSession, VisualLM, split_frames
    from codecsight.parser import StreamParser
    from codecsight.policy import PruningConfig
    from codecsight.vision import encode_patch_sets, export_onnx, frame_grid_positions, \
        served_encoder
    from codecsight_client.demux import iter_chunks, probe

    model_dir = checkpoint.build_tiny_family(work / name, name)
    family = family_for_dir(model_dir)
    onnx_path = work / f"{name}.onnx"
    if family.onnx_exportable:
        export_onnx(model_dir, onnx_path)
    torch.set_num_threads(threads)
    encoder = served_encoder(family, model_dir, onnx_path, threads)
    model, tokenizer = family.load(model_dir)
    vlm = VisualLM(model, tokenizer, 1, family=family)
    info = probe(clip)
    served = params.served_parameters("codec_parser")
    max_patches = params.served_parameters("vit_pruned", config_name="cpu")["max_patches"]
    out = {"family": family.title, "onnx": family.onnx_exportable}
    for policy in ("dense", "codec"):
        parser = StreamParser(family.geometry, info.codec, info.fps, fps, policy=policy,
                              config=PruningConfig.served(), window_seconds=window,
                              max_pixels=served["max_pixels"],
                              min_pixels=family.geometry.min_pixels)
        session = StreamSession(window, seconds_per_t=family.seconds_per_t(fps))
        vit_s = llm_s = vit_cpu = llm_cpu = 0.0
        sampled = kept = total = 0
        chunks = list(itertools.islice(iter_chunks(clip, stride), int(seconds / stride)))
        for i, c in enumerate(chunks):
            result = parser.parse(c.data, au_bytes=c.au_sizes, au_pts=c.au_pts,
                                  final=i == len(chunks) - 1)
            sampled += result.stats.frames_sampled
            kept += result.stats.groups_kept
            total += result.stats.groups_total
            positions = result.positions
            if family.position_columns == 5:
                positions = frame_grid_positions(positions, result.frame_meta,
                                                 family.geometry.merge_size)
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = encode_patch_sets(encoder, [(result.patches, positions)], max_patches,
                                       family.geometry.merge_size)[0]
            t1, c1 = time.perf_counter(), time.process_time()
            frames = split_frames(tokens, result.positions, result.frame_meta,
                                  family.geometry.merge_size)
            with torch.inference_mode():
                session.step(vlm, frames, "is anyone moving?")
            llm_s += time.perf_counter() - t1
            llm_cpu += time.process_time() - c1
            vit_s += t1 - t0
            vit_cpu += c1 - c0
        out[policy] = {"sampled_frames": sampled, "kept_share": round(kept / max(total, 1), 3),
                       "vit_ms_per_frame": round(1000 * vit_s / max(sampled, 1), 2),
                       "llm_ms_per_frame": round(1000 * llm_s / max(sampled, 1), 2),
                       "vit_cpu_ms_per_frame": round(1000 * vit_cpu / max(sampled, 1), 2),
                       "llm_cpu_ms_per_frame": round(1000 * llm_cpu / max(sampled, 1), 2)}
    return out


def main() -> None:
    from codecsight import families

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", default=str(REPO / "media" / "car-detection.mp4"))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--stride", type=float, default=2.0, help="chunk length, s")
    ap.add_argument("--fps", type=float, default=2.0, help="analysis fps")
    ap.add_argument("--window", type=float, default=8.0, help="LLM window, s")
    ap.add_argument("--families", default=",".join(f.name for f in families.FAMILIES))
    ap.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        for name in args.families.split(","):
            row = run_family(name, args.clip, args.seconds, args.stride, args.fps,
                             args.window, Path(tmp), args.threads)
            results.append(row)
            print(f"{row['family']:14s} " + "  ".join(
                f"{p}: ViT {row[p]['vit_cpu_ms_per_frame']:6.1f} (wall {row[p]['vit_ms_per_frame']:6.1f})"
                f" LLM {row[p]['llm_cpu_ms_per_frame']:6.1f} (wall {row[p]['llm_ms_per_frame']:6.1f})"
                f" CPU ms per sampled frame, kept {row[p]['kept_share']:.0%}"
                for p in ("dense", "codec")), flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
