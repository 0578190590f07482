"""Streams per GPU and per node, on paper, from per-stage costs (docs/SCALING.md).

Throughput on this 2-core machine says little about a GPU node, so this counts work instead:
FLOPs of the vision tower and the LLM prefill per stream-second for a model's geometry and
the kept share of patches measured by `codecsight bench` (perf/RESULTS.md), divided by an
assumed effective GPU rate; and codec_parser's CPU time per stream-second, scaled from its
measured ms per sampled frame by decoded pixels per second. Every assumption is a flag.

    .venv/bin/python perf/scaling_model.py            # markdown tables for docs/SCALING.md
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclasses.dataclass(frozen=True)
class Model:
    """What the cost of a window depends on. Counts from the checkpoints' config.json."""

    name: str
    vit_layers: int
    vit_width: int
    vit_mlp: int
    llm_layers: int
    llm_width: int
    llm_mlp: int
    llm_kv_heads: int
    llm_head_dim: int
    llm_q_width: int          # heads x head_dim of the queries


# The committed demo model (models/codecsight-demo/config.json) and Qwen2-VL-2B's geometry
# (a 2B-class checkpoint: vision 32 x 1280, MLP 5120; LLM Qwen2-1.5B, 28 x 1536, MLP 8960,
# 12 query heads / 2 KV heads of 128).
DEMO = Model("demo (models/codecsight-demo)", 2, 64, 128, 4, 128, 512, 2, 32, 128)
QWEN2VL_2B = Model("2B-class (Qwen2-VL-2B geometry)", 32, 1280, 5120, 28, 1536, 8960, 2, 128,
                   1536)

PATCH_PX = 14
MERGE = 4                  # patches per visual token (2x2 merge)
MAX_PATCHES = 802816 // (PATCH_PX * PATCH_PX)   # codec_parser's max_pixels: 4096 patches


def served_patches(width: int, height: int) -> int:
    """Patches of one frame after codec_parser's smart_resize to max_pixels (28-px sides)."""
    scale = max(1.0, math.sqrt(width * height / (MAX_PATCHES * PATCH_PX ** 2)))
    w = max(28, math.floor(width / scale / 28) * 28)
    h = max(28, math.floor(height / scale / 28) * 28)
    return (w // PATCH_PX) * (h // PATCH_PX)


def vit_flops_per_frame(m: Model, kept_patches: float) -> float:
    """Linear layers 2 x params per patch, plus attention within the frame (4 N^2 d per layer)."""
    linear = 2 * m.vit_layers * (4 * m.vit_width ** 2 + 2 * m.vit_width * m.vit_mlp)
    return kept_patches * linear + m.vit_layers * 4 * kept_patches ** 2 * m.vit_width


def llm_flops(m: Model, new_tokens: float, context: float) -> float:
    """Prefill of new_tokens attending to `context` tokens on average: linear + attention."""
    kv_width = m.llm_kv_heads * m.llm_head_dim
    linear = 2 * m.llm_layers * (2 * m.llm_width * m.llm_q_width + 2 * m.llm_width * kv_width
                                 + 3 * m.llm_width * m.llm_mlp)
    return new_tokens * linear + m.llm_layers * 4 * new_tokens * context * m.llm_q_width


def stream_cost(m: Model, *, width: int, height: int, kept: float, refresh: str,
                analysis_fps: float, window_s: float, stride_s: float,
                question_tokens: int, anchors: int) -> dict:
    """GPU FLOPs per stream-second (ViT, LLM) and KV bytes held, for one camera."""
    tokens_per_frame = served_patches(width, height) * kept / MERGE
    window_tokens = window_s * analysis_fps * tokens_per_frame + question_tokens
    vit = vit_flops_per_frame(m, served_patches(width, height) * kept) * analysis_fps
    if refresh == "full":
        new = window_tokens
        per_window = llm_flops(m, new, new / 2)
    else:   # selective: the stride's new frames + re-prefilled anchors + the question
        new = (stride_s * analysis_fps + anchors) * tokens_per_frame + question_tokens
        per_window = llm_flops(m, new, window_tokens - new / 2)
    kv_bytes = window_tokens * 2 * m.llm_layers * m.llm_kv_heads * m.llm_head_dim * 2  # bf16
    return {"vit": vit, "llm": per_window / stride_s, "kv_bytes": kv_bytes,
            "tokens_per_frame": tokens_per_frame, "window_tokens": window_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="dense BF16 peak of the GPU, TFLOP/s (H100/H200 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.35,
                   help="share of peak a batched ViT/prefill reaches (assumed)")
    p.add_argument("--gpu-memory-gb", type=float, default=141.0)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cores-per-node", type=int, default=96)
    p.add_argument("--cores-reserved", type=int, default=16,
                   help="cores left to Triton, the LLM/ViT Python models, nginx, the OS")
    # Measured: codec_parser ms per sampled frame on car-detection.mp4 (768x432, 12.5 fps),
    # codec policy (perf/RESULTS.md, bench), at 2 analysis fps: it decodes every frame.
    p.add_argument("--parser-ms", type=float, default=15.9)
    p.add_argument("--parser-px-per-s", type=float, default=768 * 432 * 12.5)
    # Measured: the largest stage's ms per request (window) for the demo model, codec/full,
    # 4 streams (llm_prefill, perf/RESULTS.md "Streams sustained"). A model this small is
    # bound by per-request cost (Python, Triton, kernel launches), not FLOPs: one instance
    # per model serves one window at a time. (A GPU shortens kernels, not Python: kept.)
    p.add_argument("--demo-request-ms", type=float, default=59.0)
    p.add_argument("--analysis-fps", type=float, default=2.0)
    p.add_argument("--window-seconds", type=float, default=8.0)
    p.add_argument("--stride-seconds", type=float, default=2.0)
    args = p.parse_args(argv)

    effective = args.gpu_tflops * 1e12 * args.mfu
    cameras = [("720p25", 1280, 720, 25), ("1080p25", 1920, 1080, 25)]
    # Kept shares measured by codecsight bench (perf/RESULTS.md): car-detection (a street,
    # moving traffic) and the static-camera clip; dense keeps all.
    scenes = [("dense", 1.0, "full"), ("codec, busy street (38.5% kept)", 0.385, "selective"),
              ("codec, static camera (12.2% kept)", 0.122, "selective")]
    print(f"Assumptions: {args.gpu_tflops:.0f} TFLOP/s BF16 peak x {args.mfu:.0%} MFU = "
          f"{effective / 1e12:.0f} TFLOP/s per GPU; {args.gpus_per_node} GPUs, "
          f"{args.cores_per_node} cores ({args.cores_reserved} reserved) per node; analysis "
          f"{args.analysis_fps:g} fps, window {args.window_seconds:g} s, stride "
          f"{args.stride_seconds:g} s; question 20 tokens; 1 anchor re-prefilled.\n")
    print("| model | camera | patches, refresh | tokens/frame | ViT TFLOP/s/stream | "
          "LLM TFLOP/s/stream | streams/GPU | KV GB/stream | parser cores/stream | "
          "streams/node (bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in (DEMO, QWEN2VL_2B):
        for cam, w, h, fps in cameras:
            parser_core_s = args.parser_ms / 1000 * args.analysis_fps * (w * h * fps) / \
                args.parser_px_per_s
            for scene, kept, refresh in scenes:
                c = stream_cost(m, width=w, height=h, kept=kept, refresh=refresh,
                                analysis_fps=args.analysis_fps,
                                window_s=args.window_seconds, stride_s=args.stride_seconds,
                                question_tokens=20, anchors=1)
                per_gpu_flops = effective / (c["vit"] + c["llm"])
                per_gpu_mem = args.gpu_memory_gb * 0.8e9 / c["kv_bytes"]
                per_gpu = min(per_gpu_flops, per_gpu_mem)
                note = " (KV)" if per_gpu_mem < per_gpu_flops else ""
                if m is DEMO:
                    # One instance set (codec_parser, vit_pruned, llm_prefill) per GPU.
                    per_gpu = min(per_gpu, args.stride_seconds * 1000 / args.demo_request_ms)
                    note = " (per-request cost)"
                cpu_bound = (args.cores_per_node - args.cores_reserved) / parser_core_s
                node = min(per_gpu * args.gpus_per_node, cpu_bound)
                bound = "GPU" if per_gpu * args.gpus_per_node <= cpu_bound else "CPU (decode)"
                print(f"| {m.name} | {cam} | {scene}, {refresh} | {c['tokens_per_frame']:.0f} "
                      f"| {c['vit'] / 1e12:.2f} | {c['llm'] / 1e12:.2f} | "
                      f"{per_gpu:.0f}{note} | "
                      f"{c['kv_bytes'] / 1e9:.2f} | {parser_core_s:.2f} | "
                      f"{node:.0f} ({bound}) |")
    print_spread()
    return 0


def print_spread(pods=(2, 4, 8, 16), per_pod=(8, 32, 96)) -> None:
    """How unevenly consistent hashing fills pods: the fullest pod against the mean, for
    stream IDs cam-0000... over the StatefulSet's pod names (nginx's ring, as predicted by
    cluster.nginx_chash_instance, which tests/test_cluster.py checks against nginx)."""
    from codecsight.tools.cluster import kubernetes_servers, nginx_chash_instance

    print("\nFullest pod / mean streams per pod (consistent hash, 160 points per pod):\n")
    print("| pods | " + " | ".join(f"{k} streams/pod on average" for k in per_pod) + " |")
    print("|---|" + "---|" * len(per_pod))
    for n in pods:
        servers, cells = kubernetes_servers(n), []
        for k in per_pod:
            counts = [0] * n
            for i in range(n * k):
                counts[nginx_chash_instance(servers, f"cam-{i:04d}")] += 1
            cells.append(f"{max(counts) / k:.2f} (max {max(counts)})")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
