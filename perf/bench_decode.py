"""Decoder cost per StreamDecoder setting, side by side on the same chunks, in one run.

    .venv/bin/python perf/bench_decode.py                          # media/car-detection.mp4
    .venv/bin/python perf/bench_decode.py --generated --repeats 10 --json perf/out/decode.json
    .venv/bin/python perf/bench_decode.py my-clip.mp4 --threads 0 --skip noref,bidir,all
    git worktree add /tmp/base b4c338f
    .venv/bin/python perf/bench_decode.py --static --generated --metadata --before /tmp/base \
        --skip-frame NONREF --json perf/results/decode.json     # also writes decode.md

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
every --psnr-every'th frame and on every frame sampled at --analysis-fps (what the ViT sees).
Skipping the loop filter must keep the codec metadata exactly; its pixels may drift ("all":
within a GOP) or not ("noref": no reference frame changes, but a non-reference B-frame that is
sampled is shown to the ViT without deblocking). --skip-frame adds FFmpeg's skip_frame=S for
each S (e.g. NONREF: non-reference frames are not decoded at all, so they have no motion
vectors and are never sampled): its frame count and vectors are reported, not compared.

Codec metadata (--metadata): what codec_parser adds over plain decoding for the codec policy,
per decoded frame, measured for this checkout and, with --before DIR, for another checkout
(a `git worktree` of the base commit) side by side in the same run: each checkout runs in its
own worker process (its own `codecsight` on sys.path) and the two are asked for rounds in
turn. Per chunk, as codec_parser does it: StreamDecoder.feed, then StreamMasks.observe and
.add on every decoded frame, and the codec candidate mask at each sampled frame. Parts:

  export   CPU of decoding with motion-vector export minus decoding without: FFmpeg's
           AVMotionVector export, PyAV's side-data lookup, np.frombuffer of the records
  signals  StreamMasks.observe: macroblock_signals (vectors -> moving / intra macroblocks,
           global motion), dynamic_macroblocks (neighbour support), shares, the I-frame
           scene-cut test on luma, I-frames' carried flags
  add      StreamMasks.add: accumulating flags between sampled frames
  mask     at each sampled frame, the candidate merge groups from the accumulated
           macroblocks (groups_from_macroblocks), pending state reset

metadata = export + signals + add + mask. Not included (paid by every policy or not codec
metadata): sampling, the pixel check of candidates (luma of sampled frames), RGB conversion,
patchify. Figures are CPU ms per decoded frame, best of rounds, as a share of plain decoding
(best of rounds too); the export, a small difference of two decodes, is the median of the
per-round differences pooled over the checkouts (its code is the same in each; each
checkout's own median is shown beside it). Identity: each checkout also runs its StreamParser (policy codec, the
served codec_parser settings) over the clip, and the SHA-1 of every sampled frame's kept
merge groups and whole-frame reason must be equal across checkouts.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# The checkout whose `codecsight` is measured: this one, or (a --metadata worker) --before's.
CODE_ROOT = Path(os.environ.get("BENCH_DECODE_CODE_ROOT", REPO))
sys.path.insert(0, str(CODE_ROOT))

from codecsight.codec import LOOP_FILTER_SKIPS, FrameSampler, StreamDecoder  # noqa: E402
from codecsight_client.demux import iter_chunks, probe  # noqa: E402

CAR = REPO / "media" / "car-detection.mp4"
DEMO_MODEL = REPO / "models" / "codecsight-demo"   # its geometry: 28-px merge groups
# FFmpeg's AVDiscard names for skip_frame (PyAV's CodecContext.skip_frame)
SKIP_FRAMES = ("NONREF", "BIDIR", "NONINTRA", "NONKEY")


def settings(skips: list[str], threads: int, skip_frames: list[str] = ()) -> dict[str, dict]:
    """Setting name -> StreamDecoder keyword arguments (+ "skip_frame"), plain first, mvs
    second."""
    out = {"plain": dict(export_mvs=False, thread_count=threads),
           "mvs": dict(export_mvs=True, thread_count=threads)}
    for skip in skips:
        out[f"mvs+skip_loop_filter={skip}"] = dict(export_mvs=True, skip_loop_filter=skip,
                                                   thread_count=threads)
    for skip in skip_frames:
        out[f"mvs+skip_frame={skip}"] = dict(export_mvs=True, thread_count=threads,
                                             skip_frame=skip)
    return out


def make_decoder(options: dict) -> StreamDecoder:
    """A StreamDecoder for one setting; skip_frame goes to FFmpeg's AVCodecContext (PyAV's
    CodecContext.skip_frame), which StreamDecoder does not expose: measured here only."""
    options = dict(options)
    skip_frame = options.pop("skip_frame", None)
    decoder = StreamDecoder(**options)
    if skip_frame is not None:
        decoder._ctx.skip_frame = skip_frame
    return decoder


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
    decoder = make_decoder(options)
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


def fidelity_pass(chunks: list[bytes], options: dict, psnr_every: int,
                  sampled: set[int] = frozenset()) -> dict:
    """What one setting decodes: frame types, a digest of each frame's motion vectors, and the
    luma (float64 [H, W]) of every psnr_every'th frame and of the frames in `sampled` (display
    indices of the frames the ViT sees, from the deblocked decode)."""
    decoder = make_decoder(options)
    types, vectors, lumas = [], [], {}
    for chunk in chunks + [None]:
        for f in decoder.feed(chunk) if chunk is not None else decoder.flush():
            types.append(f.pict_type)
            vectors.append(None if f.motion_vectors is None else vector_digest(f.motion_vectors))
            if f.index % psnr_every == 0 or f.index in sampled:
                lumas[f.index] = f.frame.to_ndarray(format="gray").astype(np.float64)
    return {"types": types, "vectors": vectors, "lumas": lumas, "errors": decoder.errors}


def sampled_indices(frames: int, fps: float, analysis_fps: float) -> set[int]:
    """Display indices of the frames a constant-rate stream samples at analysis_fps."""
    sampler = FrameSampler(fps, analysis_fps)
    return {i for i in range(frames) if sampler.is_sampled(i)}


def _subsequence(part: list, whole: list) -> bool:
    """Whether `part` is `whole` with some items left out (order kept)."""
    items = iter(whole)
    return all(any(x == y for y in items) for x in part)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images in dB; inf when identical."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def bench_clip(path: Path, variants: dict[str, dict], chunk_seconds: float, repeats: int,
               psnr_every: int, analysis_fps: float) -> dict:
    """Every setting on one clip: timings (best of repeats, round-robin) and fidelity."""
    chunks = [c.data for c in iter_chunks(str(path), chunk_seconds)]
    info = probe(str(path))
    names = list(variants)
    for name in names:          # warm up: the first pass also pays imports and page faults
        timed_pass(chunks, variants[name])
    best = {name: {"cpu_s": float("inf"), "wall_s": float("inf")} for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            frames, cpu, wall = timed_pass(chunks, variants[name])
            best[name].update(frames=frames, cpu_s=min(best[name]["cpu_s"], cpu),
                              wall_s=min(best[name]["wall_s"], wall))
    sampled = sampled_indices(best["mvs"]["frames"], info.fps, analysis_fps)
    seen = {name: fidelity_pass(chunks, options, psnr_every, sampled)
            for name, options in variants.items()}
    reference = seen["mvs"]
    rows = {}
    for name in names:
        b, s = best[name], seen[name]
        cpu_ms, wall_ms = 1000 * b["cpu_s"] / b["frames"], 1000 * b["wall_s"] / b["frames"]
        # skip_frame drops frames: its display indices no longer match, nothing to compare
        comparable = b["frames"] == best["mvs"]["frames"]
        psnr = [psnr_db(reference["lumas"][i], s["lumas"][i]) for i in reference["lumas"]
                if i % psnr_every == 0] if comparable else []
        sampled_psnr = [psnr_db(reference["lumas"][i], s["lumas"][i]) for i in sorted(sampled)] \
            if comparable else []
        rows[name] = {
            "frames": b["frames"], "decode_errors": s["errors"],
            "cpu_ms_per_frame": cpu_ms, "wall_ms_per_frame": wall_ms,
            # per frame of the full clip, so skipped frames count as saved time
            "cpu_ms_per_clip_frame": 1000 * b["cpu_s"] / best["mvs"]["frames"],
            "frame_types": "".join(s["types"]) if not comparable else None,
            # skip_frame: the frames it decodes must be those of mvs, in order, with the same
            # type and vectors (a subsequence); the others: every frame
            "types_equal_mvs": s["types"] == reference["types"] if comparable else
            _subsequence(s["types"], reference["types"]),
            # plain exports none, so it has nothing to compare
            "vectors_equal_mvs": None if name == "plain" else (
                s["vectors"] == reference["vectors"] if comparable else
                _subsequence(list(zip(s["types"], s["vectors"])),
                             list(zip(reference["types"], reference["vectors"])))),
            "sampled_frames": len(sampled_psnr),
            "sampled_luma_identical": sum(p == float("inf") for p in sampled_psnr),
            # identical frames have no finite PSNR: count them, average the others
            "luma_frames_compared": len(psnr),
            "luma_frames_identical": sum(p == float("inf") for p in psnr),
            "luma_psnr_min_db": min(psnr, default=float("inf")),
            "luma_psnr_mean_db": (float(np.mean(finite)) if (finite := [p for p in psnr
                                                                       if p != float("inf")])
                                  else float("inf")),
        }
    plain = rows["plain"]
    for row in rows.values():
        row["cpu_vs_plain"] = row["cpu_ms_per_clip_frame"] / plain["cpu_ms_per_frame"]
        row["wall_vs_plain"] = row["wall_ms_per_frame"] / plain["wall_ms_per_frame"]
    return {"path": str(path), "width": info.width, "height": info.height, "fps": info.fps,
            "chunks": len(chunks), "frame_types": "".join(reference["types"]),
            "settings": rows}


def table(name: str, clip: dict) -> str:
    """One Markdown table of a clip's decoder settings."""
    def fmt_db(x):
        return "-" if x == float("inf") else f"{x:.1f}"

    def yes(x):
        return "-" if x is None else ("yes" if x else "NO")

    lines = [f"\n{name} ({clip['width']}x{clip['height']}, {clip['fps']:g} fps, "
             f"{clip['chunks']} chunks, frame types {_types_summary(clip['frame_types'])})\n",
             "| setting | frames | CPU ms/frame of the clip | CPU vs plain | wall ms/frame "
             "| wall vs plain | types = mvs | vectors = mvs (skip_frame: of the frames left) "
             "| luma identical to mvs | PSNR of "
             "the others, min / mean dB | sampled frames' luma identical | codec keeps = mvs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, r in clip["settings"].items():
        compared = r["luma_frames_compared"] or r["sampled_frames"]
        lines.append(
            f"| {setting} | {r['frames']} | {r['cpu_ms_per_clip_frame']:.3f} | "
            f"{r['cpu_vs_plain']:.2f}x | {r['wall_ms_per_frame']:.3f} | {r['wall_vs_plain']:.2f}x "
            f"| {yes(r['types_equal_mvs'])} | {yes(r['vectors_equal_mvs'])} | "
            + (f"{r['luma_frames_identical']}/{r['luma_frames_compared']} | "
               f"{fmt_db(r['luma_psnr_min_db'])} / {fmt_db(r['luma_psnr_mean_db'])} | "
               f"{r['sampled_luma_identical']}/{r['sampled_frames']} | " if compared else
               "- | - | - | ")
            + f"{yes(r.get('keeps_equal_mvs'))} |")
    return "\n".join(lines)


def _types_summary(types: str) -> str:
    return ", ".join(f"{t} {types.count(t)}" for t in "IPB" if t in types)


# -------------------------------------------------------------------------------------------
# Codec metadata: what the codec policy adds over plain decoding, per checkout


def _geometry():
    from codecsight.checkpoint import Geometry

    return Geometry.from_model_dir(DEMO_MODEL)


def _chunks(path: str, chunk_seconds: float) -> list:
    return [(c.data, list(c.au_sizes), list(c.au_pts))
            for c in iter_chunks(path, chunk_seconds)]


def metadata_round(chunks: list, fps: float, analysis_fps: float, threads: int) -> dict:
    """One pass of plain decoding and one of codec_parser's codec metadata over a clip's
    chunks: CPU seconds of each part (module docstring) and the frame count."""
    from codecsight.policy import PruningConfig, StreamMasks

    # Both passes hold a chunk's frames until the next chunk, as codec_parser does (the
    # decoder then draws new picture buffers: part of decoding, not of the metadata).
    plain = make_decoder(dict(export_mvs=False, thread_count=threads))
    frames = 0
    cpu = time.process_time()
    for data, sizes, pts in chunks:
        decoded = plain.feed(data, au_bytes=sizes, au_pts=pts)
        frames += len(decoded)
    decoded = plain.flush()
    frames += len(decoded)
    plain_s = time.process_time() - cpu
    del decoded

    # the served settings without the pixel check: the mask is the codec's candidates
    config = dataclasses.replace(PruningConfig.served(), pixel_check=False)
    decoder = make_decoder(dict(export_mvs=True, thread_count=threads))
    masks, sampler = StreamMasks(config, _geometry(), True), FrameSampler(fps, analysis_fps)
    parts = dict.fromkeys(("decode", "signals", "add", "mask", "sampling"), 0.0)
    for chunk in chunks + [None]:    # None: the end of the stream (flush)
        t0 = time.process_time()
        decoded = decoder.feed(chunk[0], au_bytes=chunk[1], au_pts=chunk[2]) \
            if chunk is not None else decoder.flush()
        t1 = time.process_time()
        signals = masks.observe(decoded)
        t2 = time.process_time()
        parts["decode"] += t1 - t0
        parts["signals"] += t2 - t1
        for f, signal in zip(decoded, signals):
            t0 = time.process_time()
            masks.add(f, signal)
            t1 = time.process_time()
            slot = sampler.sample(f.pts)
            t2 = time.process_time()
            parts["add"] += t1 - t0
            parts["sampling"] += t2 - t1
            if slot is not None:
                masks._geometry_for(f.width, f.height)
                masks._codec_keep(None, masks.picture.grid)   # no luma: pixel_check is off
                masks.pending, masks.pending_camera = None, False
                masks.pending_whole_frame = None
                parts["mask"] += time.process_time() - t2
    return {"frames": frames, "plain_s": plain_s, **{f"{k}_s": v for k, v in parts.items()}}


def keeps_digest(path: str, chunk_seconds: float, analysis_fps: float,
                 skip_loop_filter: str = "none") -> dict:
    """SHA-1 of the codec policy's kept merge groups and whole-frame reasons of every sampled
    frame of a clip, through StreamParser with the served codec_parser settings."""
    from codecsight.parser import StreamParser

    info = probe(path)
    parser = StreamParser(_geometry(), "h264", info.fps, analysis_fps, policy="codec",
                          skip_loop_filter=skip_loop_filter)
    chunks = _chunks(path, chunk_seconds)
    digest, sampled, kept, total = hashlib.sha1(), 0, 0, 0
    for k, (data, sizes, pts) in enumerate(chunks):
        result = parser.parse(data, final=k == len(chunks) - 1, au_bytes=sizes, au_pts=pts)
        for keep, why in zip(result.keep, result.whole_frame):
            digest.update(np.packbits(keep).tobytes() + repr((keep.shape, why)).encode())
            sampled, kept, total = sampled + 1, kept + int(keep.sum()), total + keep.size
    return {"sha1": digest.hexdigest(), "sampled_frames": sampled, "groups_kept": kept,
            "groups_total": total}


def worker() -> int:
    """--worker: answer one JSON request per stdin line with one JSON line (CODE_ROOT's
    codecsight): {"round": {...}} -> metadata_round, {"keeps": {...}} -> keeps_digest."""
    cache = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "round" in request:
            r = request["round"]
            key = (r["path"], r["chunk_seconds"])
            if key not in cache:
                cache[key] = _chunks(r["path"], r["chunk_seconds"])
            answer = metadata_round(cache[key], r["fps"], r["analysis_fps"], r["threads"])
        else:
            answer = keeps_digest(**request["keeps"])
        print(json.dumps(answer), flush=True)
    return 0


class Worker:
    """A --worker process measuring the checkout at root."""

    def __init__(self, root: Path):
        self.root = root
        env = dict(os.environ, BENCH_DECODE_CODE_ROOT=str(root))
        self.process = subprocess.Popen([sys.executable, __file__, "--worker"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.root} died (its stderr says why)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def bench_metadata(path: Path, roots: dict[str, Path], chunk_seconds: float, repeats: int,
                   analysis_fps: float, threads: int) -> dict:
    """Codec metadata per checkout on one clip: best-of-rounds CPU ms per frame of each part,
    rounds taken in turn (order rotating), the load average beside them, and the kept groups'
    digest."""
    fps = probe(str(path)).fps
    request = {"round": {"path": str(path), "chunk_seconds": chunk_seconds, "fps": fps,
                         "analysis_fps": analysis_fps, "threads": threads}}
    workers = {name: Worker(root) for name, root in roots.items()}
    try:
        for w in workers.values():        # warm up: imports, page faults, first decoder
            w.ask(request)
        rounds: dict[str, list[dict]] = {name: [] for name in workers}
        load = [os.getloadavg()[0]]
        names = list(workers)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rounds[name].append(workers[name].ask(request))
            load.append(os.getloadavg()[0])
        keeps = {name: w.ask({"keeps": {"path": str(path), "chunk_seconds": chunk_seconds,
                                        "analysis_fps": analysis_fps}})
                 for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    # The export is a difference of two decodes of about 0.5 ms a frame: on a loaded machine
    # a difference of two best-of figures swings by more than the export itself. Its code
    # (FFmpeg, PyAV, StreamDecoder._wrap) is the same in every checkout here, so it is the
    # median of the per-round differences (the two decodes of one round run back to back),
    # pooled over every checkout's rounds; each checkout's own median is reported beside it.
    frames = rounds[names[0]][0]["frames"]

    def export_ms(answers: list[dict]) -> float:
        return 1000 * float(np.median([a["decode_s"] - a["plain_s"] for a in answers])) / frames

    pooled_export = export_ms([a for answers in rounds.values() for a in answers])
    out = {"path": str(path), "fps": fps, "load_average_1min": load,
           "export_ms_pooled": pooled_export, "checkouts": {}}
    for name, answers in rounds.items():
        b = {k: min(a[k] for a in answers) for k in answers[0] if k.endswith("_s")}
        ms = {k[:-2]: 1000 * v / frames for k, v in b.items()}
        ms["export_own_rounds"] = export_ms(answers)
        ms["export"] = pooled_export
        ms["python_side"] = ms["signals"] + ms["add"] + ms["mask"]
        ms["metadata"] = ms["export"] + ms["python_side"]
        out["checkouts"][name] = {
            "root": str(roots[name]), "frames": frames, "ms_per_frame": ms,
            "share_of_plain": {k: ms[k] / ms["plain"]
                               for k in ("export", "signals", "add", "mask", "python_side",
                                         "metadata")},
            "keeps": keeps[name]}
    digests = {c["keeps"]["sha1"] for c in out["checkouts"].values()}
    out["keeps_identical"] = len(digests) == 1
    if "before" in out["checkouts"] and "after" in out["checkouts"]:
        before, after = (out["checkouts"][k]["ms_per_frame"] for k in ("before", "after"))
        out["after_vs_before"] = {k: after[k] / before[k] if before[k] else None
                                  for k in ("plain", "signals", "python_side", "metadata")}
    return out


def metadata_table(name: str, m: dict) -> str:
    """One Markdown table of a clip's codec metadata per checkout."""
    load = m["load_average_1min"]
    lines = [f"\n{name}: codec metadata per decoded frame (CPU ms, best of rounds; load "
             f"average {min(load):.1f}-{max(load):.1f} over the rounds)\n",
             "| checkout | plain decode | export (pooled; own rounds) | signals | add | mask "
             "| metadata | metadata / plain | Python side / plain | export / plain | sampled "
             "frames, groups kept / total | keeps digest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for checkout, c in m["checkouts"].items():
        ms, share, keeps = c["ms_per_frame"], c["share_of_plain"], c["keeps"]
        lines.append(
            f"| {checkout} ({c['root']}) | {ms['plain']:.3f} | {ms['export']:.4f}; "
            f"{ms['export_own_rounds']:.4f} | "
            f"{ms['signals']:.4f} | {ms['add']:.4f} | {ms['mask']:.4f} | {ms['metadata']:.4f} | "
            f"{100 * share['metadata']:.1f}% | {100 * share['python_side']:.1f}% | "
            f"{100 * share['export']:.1f}% | {keeps['sampled_frames']}, "
            f"{keeps['groups_kept']} / {keeps['groups_total']} | {keeps['sha1'][:12]} |")
    lines.append(f"\nkept merge groups identical across checkouts: "
                 f"{'yes' if m['keeps_identical'] else 'NO'}")
    if "after_vs_before" in m:
        lines.append("after / before: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in m["after_vs_before"].items() if v is not None))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", nargs="*", type=Path,
                        help=f"H.264 files (default: {CAR.relative_to(REPO)})")
    parser.add_argument("--generated", action="store_true",
                        help="add a generated static-camera clip with B-frames")
    parser.add_argument("--static", action="store_true",
                        help="add the benchmarks' static-camera clip "
                             "(codecsight.tools.bench.static_clip_path, P-frames only)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "perf" / "out",
                        help="where --static's clip is generated once (default perf/out)")
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
    parser.add_argument("--skip-frame", default="",
                        help="skip_frame settings to compare, comma-separated "
                             f"(of {', '.join(SKIP_FRAMES)}; default none)")
    parser.add_argument("--psnr-every", type=int, default=10,
                        help="compare the luma of every Nth frame (default 10)")
    parser.add_argument("--analysis-fps", type=float, default=2.0,
                        help="frames per second sampled, for the sampled frames' luma and "
                             "the codec keeps (default 2)")
    parser.add_argument("--metadata", action="store_true",
                        help="also measure the codec metadata (module docstring)")
    parser.add_argument("--before", type=Path,
                        help="with --metadata: another checkout (e.g. a git worktree of the "
                             "base commit) measured side by side as 'before'")
    parser.add_argument("--no-decoder-settings", action="store_true",
                        help="skip the decoder-settings tables (only --metadata)")
    parser.add_argument("--json", type=Path,
                        help="also write every figure here, and the tables beside it (.md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    args.skip_frame = [s for s in args.skip_frame.split(",") if s]
    unknown = [s for s in args.skip if s not in LOOP_FILTER_SKIPS or s == "none"]
    if unknown:
        parser.error(f"--skip: unknown setting {', '.join(unknown)}; choose from "
                     f"{', '.join(s for s in LOOP_FILTER_SKIPS if s != 'none')}")
    unknown = [s for s in args.skip_frame if s not in SKIP_FRAMES]
    if unknown:
        parser.error(f"--skip-frame: unknown setting {', '.join(unknown)}; choose from "
                     f"{', '.join(SKIP_FRAMES)}")
    if args.repeats < 1 or args.psnr_every < 1 or not args.chunk_seconds > 0 \
            or not args.analysis_fps > 0:
        parser.error("--repeats and --psnr-every must be >= 1, --chunk-seconds and "
                     "--analysis-fps > 0")
    missing = [str(p) for p in args.clips if not p.is_file()]
    if missing:
        parser.error(f"no such clip: {', '.join(missing)}")
    if args.before is not None and not (args.before / "codecsight" / "codec.py").is_file():
        parser.error(f"--before {args.before}: not a checkout of this project "
                     "(no codecsight/codec.py); make one with git worktree add DIR COMMIT")
    if args.before is not None and not args.metadata:
        parser.error("--before compares the codec metadata: add --metadata")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker()
    variants = settings(args.skip, args.threads, args.skip_frame)
    report = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(),
              "repeats": args.repeats, "threads": args.threads,
              "chunk_seconds": args.chunk_seconds, "analysis_fps": args.analysis_fps,
              "clips": {}, "metadata": {}}
    tables = []

    def show(text: str) -> None:
        print(text, flush=True)
        tables.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        paths = {p.name: p for p in args.clips or [CAR]}
        if args.static:
            from codecsight.tools.bench import static_clip_path

            paths["static camera (generated, P-frames)"] = static_clip_path(args.cache_dir)
        if args.generated:
            paths["static camera, B-frames (generated)"] = generated_clip(Path(tmp))
        for name, path in paths.items():
            if args.metadata:
                roots = {"after": REPO} if args.before is None else \
                    {"before": args.before.resolve(), "after": REPO}
                print(f"{name}: codec metadata, {len(roots)} checkout(s) x "
                      f"{args.repeats + 1} rounds", file=sys.stderr, flush=True)
                report["metadata"][name] = bench_metadata(path, roots, args.chunk_seconds,
                                                          args.repeats, args.analysis_fps,
                                                          args.threads)
                show(metadata_table(name, report["metadata"][name]))
            if args.no_decoder_settings:
                continue
            print(f"{name}: decoding {len(variants)} settings x {args.repeats + 1} rounds",
                  file=sys.stderr, flush=True)
            clip = bench_clip(path, variants, args.chunk_seconds, args.repeats,
                              args.psnr_every, args.analysis_fps)
            keeps = {skip: keeps_digest(str(path), args.chunk_seconds, args.analysis_fps, skip)
                     for skip in ["none"] + args.skip}
            for setting, row in clip["settings"].items():
                skip = setting.split("skip_loop_filter=")[1] if "skip_loop_filter=" in setting \
                    else "none" if setting == "mvs" else None
                row["keeps_equal_mvs"] = None if skip is None else \
                    keeps[skip]["sha1"] == keeps["none"]["sha1"]
            report["clips"][name] = clip
            show(table(name, clip))
    report["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # numpy scalars (frame counts, PSNR) become plain numbers
        args.json.write_text(json.dumps(report, indent=1, default=lambda x: x.item()))
        md = args.json.with_suffix(".md")
        md.write_text(f"# Decoding and codec metadata (perf/bench_decode.py)\n\n"
                      f"`{report['command']}`, {report['date']}, {report['cpus']} CPUs, load "
                      f"average {report['load_average_at_start'][0]:.1f} at the start and "
                      f"{report['load_average_at_end'][0]:.1f} at the end.\n"
                      + "\n".join(tables) + "\n")
        print(f"wrote {args.json} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
