"""Decoder cost per StreamDecoder setting, side by side on the same chunks, in one run.

    .venv/bin/python perf/bench_decode.py                          # media/car-detection.mp4
    .venv/bin/python perf/bench_decode.py --generated --repeats 10 --json perf/out/decode.json
    .venv/bin/python perf/bench_decode.py my-clip.mp4 --threads 0 --skip noref,bidir,all

Each clip is cut into chunks as the client sends them (`codecsight_client.demux.iter_chunks`)
and fed to one `codecsight.codec.StreamDecoder` per setting; frames are dropped as they come,
as the server drops the frames it does not sample (holding hundreds of decoded pictures would
time the allocator instead of the decoder). Settings:

  plain                   no motion-vector export: what the dense and evs policies need
  mvs                     + motion-vector export: what the codec policy needs
  mvs+skip_loop_filter=S  + FFmpeg's skip_loop_filter=S, for each S in --skip

Timing: every setting decodes the whole clip once per round, in an order that rotates each
round; each figure is the best of --repeats rounds (the machine may be shared: the least
disturbed run is the steadiest). CPU ms/frame is this process's CPU time (all decoder
threads); wall ms/frame includes waiting for a core. Ratios are against `plain` of the same
clip in the same run.

Fidelity (an untimed pass per setting): whether the frame types and motion vectors equal the
`mvs` setting's on every frame, and the luma's PSNR against the deblocked decode (`mvs`) on
every --psnr-every'th frame. Skipping the loop filter must keep the codec metadata exactly;
its pixels may drift ("all": within a GOP) or not ("noref": no reference frame changes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codecsight.codec import LOOP_FILTER_SKIPS, StreamDecoder  # noqa: E402
from codecsight_client.demux import iter_chunks, probe  # noqa: E402

CAR = REPO / "media" / "car-detection.mp4"


def settings(skips: list[str], threads: int) -> dict[str, dict]:
    """Setting name -> StreamDecoder keyword arguments, plain first, mvs second."""
    out = {"plain": dict(export_mvs=False, thread_count=threads),
           "mvs": dict(export_mvs=True, thread_count=threads)}
    for skip in skips:
        out[f"mvs+skip_loop_filter={skip}"] = dict(export_mvs=True, skip_loop_filter=skip,
                                                   thread_count=threads)
    return out


def generated_clip(out_dir: Path) -> Path:
    """A static camera with B-frames (so "noref" has frames to skip): 640x360, 25 fps, 12 s,
    two boxes moving 2-4 px/frame, sensor noise sigma 2, GOP 2 s, 2 B-frames."""
    from codecsight.tools import synth

    boxes = [synth.Box(x=-60, y=200, width=56, height=40, vx=3.0),
             synth.Box(x=600, y=80, width=40, height=64, vx=-2.0, vy=0.5, color=(40, 80, 220))]
    frames, _ = synth.moving_boxes(300, 640, 360, boxes=boxes, noise_sigma=2.0, seed=0)
    return synth.encode_h264(frames, 25.0, gop=50, bframes=2, path=out_dir / "static-b.mp4")


def timed_pass(chunks: list[bytes], options: dict) -> tuple[int, float, float]:
    """Decode every chunk once: (frames, CPU seconds, wall seconds)."""
    decoder = StreamDecoder(**options)
    frames = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for chunk in chunks:
        frames += len(decoder.feed(chunk))
    frames += len(decoder.flush())
    return frames, time.process_time() - cpu, time.perf_counter() - wall


def vector_digest(vectors: np.ndarray) -> str:
    """SHA-1 of an AVMotionVector record array [N], field by field: the records' alignment
    padding is uninitialised memory, so the raw bytes differ between identical decodes."""
    digest = hashlib.sha1()
    for name in vectors.dtype.names:
        digest.update(np.ascontiguousarray(vectors[name]).tobytes())
    return digest.hexdigest()


def fidelity_pass(chunks: list[bytes], options: dict, psnr_every: int) -> dict:
    """What one setting decodes: frame types, a digest of each frame's motion vectors, and the
    luma (float64 [H, W]) of every psnr_every'th frame."""
    decoder = StreamDecoder(**options)
    types, vectors, lumas = [], [], {}
    for chunk in chunks + [None]:
        for f in decoder.feed(chunk) if chunk is not None else decoder.flush():
            types.append(f.pict_type)
            vectors.append(None if f.motion_vectors is None else vector_digest(f.motion_vectors))
            if f.index % psnr_every == 0:
                lumas[f.index] = f.frame.to_ndarray(format="gray").astype(np.float64)
    return {"types": types, "vectors": vectors, "lumas": lumas, "errors": decoder.errors}


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images in dB; inf when identical."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def bench_clip(path: Path, variants: dict[str, dict], chunk_seconds: float, repeats: int,
               psnr_every: int) -> dict:
    """Every setting on one clip: timings (best of repeats, round-robin) and fidelity."""
    chunks = [c.data for c in iter_chunks(str(path), chunk_seconds)]
    names = list(variants)
    for name in names:          # warm up: the first pass also pays imports and page faults
        timed_pass(chunks, variants[name])
    best = {name: {"cpu_s": float("inf"), "wall_s": float("inf")} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            frames, cpu, wall = timed_pass(chunks, variants[name])
            best[name].update(frames=frames, cpu_s=min(best[name]["cpu_s"], cpu),
                              wall_s=min(best[name]["wall_s"], wall))
    seen = {name: fidelity_pass(chunks, options, psnr_every) for name, options in variants.items()}
    reference = seen["mvs"]
    rows = {}
    for name in names:
        b, s = best[name], seen[name]
        cpu_ms, wall_ms = 1000 * b["cpu_s"] / b["frames"], 1000 * b["wall_s"] / b["frames"]
        psnr = [psnr_db(reference["lumas"][i], s["lumas"][i]) for i in reference["lumas"]]
        rows[name] = {
            "frames": b["frames"], "decode_errors": s["errors"],
            "cpu_ms_per_frame": cpu_ms, "wall_ms_per_frame": wall_ms,
            "types_equal_mvs": s["types"] == reference["types"],
            # plain exports none, so it has nothing to compare
            "vectors_equal_mvs": None if name == "plain" else s["vectors"] == reference["vectors"],
            # identical frames have no finite PSNR: count them, average the others
            "luma_frames_compared": len(psnr),
            "luma_frames_identical": sum(p == float("inf") for p in psnr),
            "luma_psnr_min_db": min(psnr),
            "luma_psnr_mean_db": (float(np.mean(finite)) if (finite := [p for p in psnr
                                                                       if p != float("inf")])
                                  else float("inf")),
        }
    plain = rows["plain"]
    for row in rows.values():
        row["cpu_vs_plain"] = row["cpu_ms_per_frame"] / plain["cpu_ms_per_frame"]
        row["wall_vs_plain"] = row["wall_ms_per_frame"] / plain["wall_ms_per_frame"]
    info = probe(str(path))
    return {"path": str(path), "width": info.width, "height": info.height, "fps": info.fps,
            "chunks": len(chunks), "settings": rows}


def table(name: str, clip: dict) -> str:
    """One Markdown table of a clip's settings."""
    def fmt_db(x):
        return "-" if x == float("inf") else f"{x:.1f}"

    def yes(x):
        return "-" if x is None else ("yes" if x else "NO")

    lines = [f"\n{name} ({clip['width']}x{clip['height']}, {clip['fps']:g} fps, "
             f"{clip['chunks']} chunks)\n",
             "| setting | frames | CPU ms/frame | CPU vs plain | wall ms/frame | wall vs plain "
             "| types = mvs | vectors = mvs | luma identical to mvs | PSNR of the others, "
             "min / mean dB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting, r in clip["settings"].items():
        lines.append(
            f"| {setting} | {r['frames']} | {r['cpu_ms_per_frame']:.3f} | "
            f"{r['cpu_vs_plain']:.2f}x | {r['wall_ms_per_frame']:.3f} | {r['wall_vs_plain']:.2f}x "
            f"| {yes(r['types_equal_mvs'])} | {yes(r['vectors_equal_mvs'])} | "
            f"{r['luma_frames_identical']}/{r['luma_frames_compared']} | "
            f"{fmt_db(r['luma_psnr_min_db'])} / {fmt_db(r['luma_psnr_mean_db'])} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="*", type=Path,
                        help=f"H.264 files (default: {CAR.relative_to(REPO)})")
    parser.add_argument("--generated", action="store_true",
                        help="add a generated static-camera clip with B-frames")
    parser.add_argument("--chunk-seconds", type=float, default=4.0,
                        help="chunk length, as the client cuts the stream (default 4)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds; each figure is the best (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="decoder threads (0: FFmpeg's one per core; default 1 for steady "
                             "timings on a shared machine)")
    parser.add_argument("--skip", default="noref,all",
                        help="skip_loop_filter settings to compare, comma-separated "
                             f"(of {', '.join(LOOP_FILTER_SKIPS)}; default noref,all)")
    parser.add_argument("--psnr-every", type=int, default=10,
                        help="compare the luma of every Nth frame (default 10)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    unknown = [s for s in args.skip if s not in LOOP_FILTER_SKIPS or s == "none"]
    if unknown:
        parser.error(f"--skip: unknown setting {', '.join(unknown)}; choose from "
                     f"{', '.join(s for s in LOOP_FILTER_SKIPS if s != 'none')}")
    if args.repeats < 1 or args.psnr_every < 1 or not args.chunk_seconds > 0:
        parser.error("--repeats and --psnr-every must be >= 1, --chunk-seconds > 0")
    missing = [str(p) for p in args.clips if not p.is_file()]
    if missing:
        parser.error(f"no such clip: {', '.join(missing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = settings(args.skip, args.threads)
    report = {"repeats": args.repeats, "threads": args.threads,
              "chunk_seconds": args.chunk_seconds, "clips": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {p.name: p for p in args.clips or [CAR]}
        if args.generated:
            paths["static camera, B-frames (generated)"] = generated_clip(Path(tmp))
        for name, path in paths.items():
            print(f"{name}: decoding {len(variants)} settings x {args.repeats + 1} rounds",
                  file=sys.stderr, flush=True)
            report["clips"][name] = bench_clip(path, variants, args.chunk_seconds, args.repeats,
                                               args.psnr_every)
            print(table(name, report["clips"][name]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # numpy scalars (frame counts, PSNR) become plain numbers
        args.json.write_text(json.dumps(report, indent=1, default=lambda x: x.item()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
