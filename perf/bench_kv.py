"""Selective against full KV-cache refresh, side by side in one run.

For each clip, patch policy and stride, the same visual tokens go through one stream session
per refresh policy, window by window, in one process: "full" (re-prefill the window, the dense
reference) and "selective" (reuse the cache, prefill what is new, re-prefill I-frame anchors).
Reported per window that slid, as ratios full / selective: prefilled tokens and prefill time
(window refresh plus question, to the first logits); and the cost of the approximation: KL
divergence of the first answer token's distribution, KL(full || selective), and the share of
windows whose whole greedy answer is identical.

    .venv/bin/python perf/bench_kv.py                    # the README table
    .venv/bin/python perf/bench_kv.py --window 16f --strides 0.25 --anchors 0,1,all

Clips: media/car-detection.mp4 and a generated static-camera clip (codecsight.tools.synth: textured
boxes moving over a still, textured scene, light sensor noise, H.264 with a 2 s GOP).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codecsight import checkpoint
from codecsight.tools import synth  # noqa: E402
from codecsight_client.demux import iter_chunks, probe  # noqa: E402
from codecsight.llm import StreamSession, VisualLM, WindowFrame, split_frames  # noqa: E402
from codecsight.parser import StreamParser  # noqa: E402
from codecsight.protocol import PATCH_POLICIES  # noqa: E402
from codecsight.serve import DEFAULT_MODEL_DIR  # noqa: E402
from codecsight.vision import PrunedVisionEncoder  # noqa: E402
from codecsight_client import settings as defaults  # noqa: E402

CAR = REPO / "media" / "car-detection.mp4"
# The generated clip: a fixed camera (no pan) at a common surveillance setting, 25 fps with an
# I-frame every 2 s, and a little sensor noise so static areas are not bit-identical.
STATIC = dict(seconds=30, fps=25.0, width=448, height=252, gop=50, noise_sigma=2.0, seed=3)
STATIC_BOXES = (
    synth.Box(x=-40, y=150, width=56, height=40, vx=3.0, color=(220, 40, 40)),
    synth.Box(x=300, y=40, width=24, height=48, vx=-0.6, vy=0.3, color=(40, 80, 220)),
)


def parse_length(text: str) -> tuple[float, str]:
    """'8s' -> (8.0, 's'); '16f' -> (16, 'f'): a window length in seconds or sampled frames."""
    unit = text[-1]
    if unit not in "sf":
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds ('8s') or frames ('16f')")
    return float(text[:-1]), unit


def static_clip(out_dir: Path) -> Path:
    """Render and encode the generated static-camera clip (deterministic)."""
    s = STATIC
    frames, _ = synth.moving_boxes(int(s["seconds"] * s["fps"]), s["width"], s["height"],
                                   boxes=STATIC_BOXES, noise_sigma=s["noise_sigma"],
                                   seed=s["seed"])
    return synth.encode_h264(frames, s["fps"], gop=s["gop"], path=out_dir / "static-camera.mp4")


def clip_frames(source: Path, policy: str, fps: float, encoder, geometry) -> list[WindowFrame]:
    """Every sampled frame of a clip as WindowFrames: parsed under a patch policy, ViT-encoded."""
    info = probe(str(source))
    parser = StreamParser(geometry, info.codec, info.fps, fps)
    chunks = list(iter_chunks(str(source), 2.0))
    frames = []
    for i, chunk in enumerate(chunks):
        parsed = parser.parse(chunk.data, policy, final=i == len(chunks) - 1)
        tokens = encoder.encode(parsed.patches, parsed.positions)
        frames += split_frames(tokens, parsed.positions, parsed.frame_meta, geometry.merge_size)
    return frames


def steps(frames: list[WindowFrame], stride: float, unit: str) -> list[list[WindowFrame]]:
    """Cut frames into what one request carries: `stride` seconds of video, or frames."""
    key = (lambda i, f: int(f.time_ms // round(stride * 1000))) if unit == "s" else \
        (lambda i, f: int(i // stride))
    out: dict[int, list[WindowFrame]] = {}
    for i, f in enumerate(frames):
        out.setdefault(key(i, f), []).append(f)
    return [out[k] for k in sorted(out)]


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax p || softmax q) in nats, in float64."""
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def compare(vlm, frames, window, stride, anchors: list[int], question: str) -> list[dict]:
    """Run full and one selective session per anchor setting over the same steps."""
    length, unit = window
    make = (lambda **kw: StreamSession(length, **kw)) if unit == "s" else \
        (lambda **kw: StreamSession(window_frames=int(length), **kw))
    full = make(refresh="full")
    selective = {a: make(refresh="selective", anchor_frames=a) for a in anchors}
    records = {a: [] for a in anchors}
    for step in steps(frames, stride, unit):
        ref, ref_stats = full.step(vlm, step, question)
        for a, session in selective.items():
            got, stats = session.step(vlm, step, question)
            if ref_stats.frames_dropped == 0:
                continue  # the window has not slid yet: both prefill the same, by construction
            records[a].append(dict(
                tokens_full=ref.tokens_prefilled, tokens_selective=got.tokens_prefilled,
                ms_full=ref.prefill_ms, ms_selective=got.prefill_ms,
                reused=got.tokens_reused, refreshed=got.tokens_refreshed,
                kl=kl_divergence(ref.first_logits, got.first_logits),
                agree=got.token_ids == ref.token_ids, frames=ref_stats.window_frames))
    rows = []
    for a, recs in records.items():
        if not recs:
            continue
        mean = {k: float(np.mean([r[k] for r in recs])) for k in recs[0]}
        rows.append(dict(
            anchors=a, windows=len(recs), window_frames=mean["frames"],
            tokens_full=mean["tokens_full"], tokens_selective=mean["tokens_selective"],
            token_ratio=mean["tokens_full"] / mean["tokens_selective"],
            ms_full=mean["ms_full"], ms_selective=mean["ms_selective"],
            time_ratio=mean["ms_full"] / mean["ms_selective"],
            reused=mean["reused"], refreshed=mean["refreshed"],
            kl_mean=mean["kl"], kl_max=max(r["kl"] for r in recs),
            answer_agreement=mean["agree"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--clips", default="car,static", help="car, static, or video paths")
    parser.add_argument("--policies", default="dense,codec",
                        help="patch policies (those codec_parser does not know are skipped)")
    parser.add_argument("--window", type=parse_length, default=f"{defaults.WINDOW_SECONDS:g}s",
                        help="W: '8s' or '16f' (default: the client's window)")
    parser.add_argument("--strides", default=f"{defaults.STRIDE_SHARE:g},0.5",
                        help="strides as fractions of W (default: the client's, and half)")
    parser.add_argument("--anchors", default="0,1,all",
                        help="anchor_refresh_frames settings for selective ('all' = every one)")
    parser.add_argument("--fps", type=float, default=defaults.ANALYSIS_FPS,
                        help="analysis frames per second")
    parser.add_argument("--question", default="is anyone moving in the scene?")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier timings on a shared machine)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not (args.model_dir / "config.json").is_file():
        checkpoint.build_tiny(args.model_dir)
    model, tokenizer = checkpoint.load(args.model_dir)
    vlm = VisualLM(model, tokenizer, args.max_new_tokens)
    encoder = PrunedVisionEncoder(model.model.visual).eval()
    geometry = checkpoint.Geometry.from_model_dir(args.model_dir)
    anchors = [10 ** 6 if a == "all" else int(a) for a in args.anchors.split(",")]
    policies = [p for p in args.policies.split(",") if p in PATCH_POLICIES]
    skipped = [p for p in args.policies.split(",") if p not in PATCH_POLICIES]
    if skipped:
        print(f"skipping patch policies codec_parser does not offer: {', '.join(skipped)}",
              file=sys.stderr)
    length, unit = args.window

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips = {"car": CAR, "static": None}
        for name in args.clips.split(","):
            source = clips.get(name, Path(name)) or static_clip(Path(tmp))
            label = "static-camera (generated)" if name == "static" else Path(source).name
            for policy in policies:
                t0 = time.perf_counter()
                frames = clip_frames(Path(source), policy, args.fps, encoder, geometry)
                print(f"{label} [{policy}]: {len(frames)} sampled frames, "
                      f"{sum(len(f.tokens) for f in frames)} visual tokens, "
                      f"I-frames at t = {[f.t for f in frames if f.anchor]} "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
                for fraction in (float(x) for x in args.strides.split(",")):
                    stride = length * fraction
                    for row in compare(vlm, frames, args.window, stride, anchors, args.question):
                        rows.append(dict(row, clip=label, policy=policy,
                                         window=f"{length:g}{unit}", stride=f"W*{fraction:g}"))
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def table(rows: list[dict]) -> str:
    head = ("| clip | patches | W | stride | anchors | windows | prefilled full / selective "
            "| tokens ratio | prefill ms full / selective | time ratio | KL mean (max) "
            "| answer agreement |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        anchors = "all" if r["anchors"] >= 10 ** 6 else r["anchors"]
        lines.append(
            f"| {r['clip']} | {r['policy']} | {r['window']} | {r['stride']} | {anchors} "
            f"| {r['windows']} | {r['tokens_full']:.0f} / {r['tokens_selective']:.0f} "
            f"| **{r['token_ratio']:.2f}x** | {r['ms_full']:.0f} / {r['ms_selective']:.0f} "
            f"| {r['time_ratio']:.2f}x | {r['kl_mean']:.2e} ({r['kl_max']:.2e}) "
            f"| {100 * r['answer_agreement']:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
