"""GPU check: the library-level pipeline on a CUDA device, dense against codec, on the clip.

What runs, as the ensemble runs it but in one process and without tritonserver:
codec_parser's work on the CPU (`codecsight.parser.StreamParser` over the client's demux of
the clip: decode, motion vectors, policy, patchify), then vit_pruned's (the checkpoint
family's pruned torch tower, `vision.TorchVisionEncoder`, every frame its own batch item as
`vision.encode_patch_sets` cuts them, as vit_pruned runs with `device` cuda) and
llm_prefill's (`llm.VisualLM(device=...)`, every stream's window prefilled in one packed
forward and the answers decoded together, `llm.step_streams`, as llm_prefill runs a batch of
streams) on `--device`. Settings are the served ones, read from the repository's
config.pbtxt files (codec_parser, vit_pruned's configs/cpu.pbtxt, llm_prefill), typed and
checked by `codecsight.params.read`; window, stride, analysis fps and question are the
client's defaults (`codecsight_client.settings`).

Printed and written (--json): per policy, ms per sampled frame of each stage (parser on the
CPU; ViT and LLM on the device, timed with torch.cuda.synchronize around each stage), the
visual tokens per frame that reach the LLM, the kept share, the LLM rows computed per window,
and the codec/dense ratio of each; then a correctness check: the first --check-windows
windows run again on the CPU from the same parsed chunks, and the device's ViT tokens and
first-answer-token logits are compared with the CPU's (max |diff|) along with the answers'
token ids. With --device cpu the check compares the CPU with itself (a max |diff| of 0 and
the same answers are expected: it tests the check, not a GPU).

Needs only torch, numpy, transformers, PyAV and this checkout (codecsight/ and client/, which
is imported as codecsight_client from the checkout when the package is not installed): no
tritonserver, tritonclient, onnxruntime or pip install of the project.

On a GPU machine (the device tool's: Python 3.12, torch with CUDA, transformers 5.17,
numpy 2, no PyAV). PyAV's abi3 wheel (cp311-abi3, ~35 MB, bundles FFmpeg) installs on 3.12;
fetch it here into an ignored folder of the checkout, carry that folder, unpack it there:

    # here, once (.codecsight/ is ignored by git):
    .venv/bin/pip download av==18.1.0 --only-binary=:all: --no-deps --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .codecsight/wheels
    # the command on the GPU machine (carry: [".codecsight/wheels"]):
    python -m zipfile -e .codecsight/wheels/av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl \\
        /tmp/pyav && PYTHONPATH=/tmp/pyav python perf/gpu_check.py --device cuda \\
        --json $OUT/gpu_check.json

The demo checkpoint (models/codecsight-demo, 5 MB) and the clip (media/car-detection.mp4,
3 MB) are tracked files and travel with the checkout. The whole clip (30 s, 60 sampled
frames per stream), 4 streams, takes well under a minute on a GPU; the CPU reference of the
check adds a few seconds.

    .venv/bin/python perf/gpu_check.py --device cpu [--seconds 30] [--streams 4]
        [--check-windows 3] [--json perf/results/gpu_check-cpu.json]

Exit status 2 (and a message saying what to do) for --device cuda where torch sees no CUDA
device, or a clip/checkpoint that cannot be read.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

POLICIES = ("dense", "codec")


def import_client():
    """codecsight_client: the installed package, else client/ of this checkout registered
    under that name (pyproject maps the package to client/; a plain checkout has no install)."""
    try:
        import codecsight_client
        return codecsight_client
    except ModuleNotFoundError as e:
        if e.name != "codecsight_client":
            raise
    spec = importlib.util.spec_from_file_location(
        "codecsight_client", REPO / "client" / "__init__.py",
        submodule_search_locations=[str(REPO / "client")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["codecsight_client"] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Served settings without tritonclient

# A config.pbtxt comment runs from '#' to the end of the line, outside a quoted string.
_STRING_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|#[^\n]*')
_PARAMETER = re.compile(r'\{\s*key\s*:\s*"((?:\\.|[^"\\])*)"\s*value\s*:\s*\{\s*string_value\s*:'
                        r'\s*"((?:\\.|[^"\\])*)"\s*\}\s*\}')
_TOP_LEVEL = re.compile(r'^(platform|backend)\s*:\s*"([^"]*)"', re.M)


def served_parameters(model: str, config_name: str | None = None,
                      repository: Path | None = None) -> dict:
    """A model's served parameters from its config.pbtxt, typed and checked by params.read.

    params.served_parameters parses the file with tritonclient's ModelConfig protobuf, which
    GPU machines lack; this reads the same two things Triton passes a model (backend or
    platform, and the `parameters` block's string values) with a regular expression over the
    comment-stripped text, then hands them to params.read. tests/test_gpu_check.py holds it
    equal to params.served_parameters for every model. Raises ValueError naming the file for
    a missing, unknown or badly typed parameter.
    """
    from codecsight import params

    path = params.config_path(model, repository or REPO / "model_repository", config_name)
    text = _STRING_OR_COMMENT.sub(lambda m: m.group(0) if m.group(0)[0] == '"' else "",
                                  path.read_text())
    unescape = lambda s: re.sub(r"\\(.)", r"\1", s)   # noqa: E731
    config = {k: v for k, v in _TOP_LEVEL.findall(text)}
    config["parameters"] = {unescape(k): {"string_value": unescape(v)}
                            for k, v in _PARAMETER.findall(text)}
    try:
        return params.read(model, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class Stack:
    """The ViT and LLM of one device, loaded from the checkpoint."""

    device: "torch.device"  # noqa: F821
    encoder: object         # vision.TorchVisionEncoder
    vlm: object             # llm.VisualLM

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":   # a stage's time is its work done, not queued
            torch.cuda.synchronize(self.device)


def load_stack(family, model_dir: Path, device: str, max_new_tokens: int) -> Stack:
    import torch

    from codecsight.llm import VisualLM
    from codecsight.vision import TorchVisionEncoder

    device = torch.device(device)
    encoder = TorchVisionEncoder(family, model_dir, device=device)
    model, tokenizer = family.load(model_dir)
    vlm = VisualLM(model, tokenizer, max_new_tokens, family=family, device=device)
    return Stack(device, encoder, vlm)


def parse_clip(family, policy: str, chunks: list, served: dict, info, fps: float,
               window_s: float) -> tuple[list, float]:
    """Every chunk through one stream's StreamParser (CPU): (ParseResults, seconds)."""
    from codecsight.parser import StreamParser
    from codecsight.policy import PruningConfig

    codec = served["codec_parser"]
    parser = StreamParser(family.geometry, info.codec, info.fps, fps, policy=policy,
                          config=PruningConfig.from_params(codec),
                          skip_loop_filter=codec["skip_loop_filter"], window_seconds=window_s,
                          max_pixels=codec["max_pixels"], min_pixels=family.geometry.min_pixels,
                          stream_id=f"gpu-check-{policy}")
    results, seconds = [], 0.0
    for i, c in enumerate(chunks):
        t0 = time.perf_counter()
        results.append(parser.parse(c.data, au_bytes=c.au_sizes, au_pts=c.au_pts,
                                    final=i == len(chunks) - 1))
        seconds += time.perf_counter() - t0
    return results, seconds


def run_streams(stack: Stack, family, parsed: list, streams: int, served: dict, fps: float,
                window_s: float, question: str, keep_windows: int = 0) -> dict:
    """The parsed chunks as `streams` cameras served together: per window, every stream's
    frames encoded in one set of per-frame batches (vit_pruned's execution) and every stream's
    window answered in one step_streams (llm_prefill's). Returns stage seconds, counts, and
    stream 0's tokens, first logits and answer ids for the first keep_windows windows."""
    import numpy as np
    import torch

    from codecsight.llm import StreamSession, split_frames, step_streams
    from codecsight.vision import encode_patch_sets

    llm = served["llm_prefill"]
    max_patches = served["vit_pruned"]["max_patches"]
    merge = family.geometry.merge_size
    sessions = [StreamSession(window_s, refresh=llm["default_refresh"],
                              anchor_frames=llm["anchor_refresh_frames"],
                              seconds_per_t=family.seconds_per_t(fps)) for _ in range(streams)]
    vit_s = llm_s = 0.0
    rows_computed = answered = 0
    kept = []
    with torch.inference_mode():
        for w, result in enumerate(parsed):
            stack.sync()
            t0 = time.perf_counter()
            tokens = encode_patch_sets(stack.encoder, [(result.patches, result.positions)]
                                       * streams, max_patches, merge)
            stack.sync()
            t1 = time.perf_counter()
            steps = [(s, split_frames(t, result.positions, result.frame_meta, merge,
                                      stack.device), question, "")
                     for s, t in zip(sessions, tokens)]
            results = step_streams(stack.vlm, steps)
            stack.sync()
            t2 = time.perf_counter()
            vit_s += t1 - t0
            llm_s += t2 - t1
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            answers = [a for a, _ in results if a is not None]
            answered += len(answers)
            rows_computed += sum(a.tokens_prefilled for a in answers)
            if w < keep_windows:
                answer = results[0][0]
                kept.append({"tokens": np.asarray(tokens[0]),
                             "first_logits": None if answer is None
                             else answer.first_logits.float().cpu().numpy(),
                             "answer_ids": None if answer is None else list(answer.token_ids),
                             "answer": None if answer is None else answer.text})
    return {"vit_s": vit_s, "llm_s": llm_s, "windows_answered": answered,
            "rows_computed": rows_computed, "kept": kept}


def max_abs_diff(a, b) -> float:
    import numpy as np

    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare(device_windows: list, cpu_windows: list) -> dict:
    """The device's stream-0 windows against the CPU's: max |diff| of ViT tokens and first
    logits, and whether every answer's token ids are the same."""
    return {
        "windows": len(cpu_windows),
        "vit_tokens_max_abs_diff": max((max_abs_diff(d["tokens"], c["tokens"])
                                        for d, c in zip(device_windows, cpu_windows)),
                                       default=0.0),
        "first_logits_max_abs_diff": max((max_abs_diff(d["first_logits"], c["first_logits"])
                                          for d, c in zip(device_windows, cpu_windows)),
                                         default=0.0),
        "same_answers": all(d["answer_ids"] == c["answer_ids"]
                            for d, c in zip(device_windows, cpu_windows)),
        "answers": [d["answer"] for d in device_windows],
    }


def ms(seconds: float, frames: int) -> float:
    return round(1000.0 * seconds / max(frames, 1), 3)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def environment(device) -> dict:
    import numpy
    import torch
    import transformers

    import av

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "numpy": numpy.__version__, "av": av.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device),
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_tf32=torch.backends.cudnn.allow_tf32)
    return out


def main(argv=None) -> int:
    import_client()
    from codecsight_client import settings as defaults

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="where the ViT and the LLM run (default: cuda); the parser runs on "
                    "the CPU either way")
    ap.add_argument("--clip", default=str(REPO / "media" / "car-detection.mp4"))
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="checkpoint (default: the served model_dir, the demo model)")
    ap.add_argument("--seconds", type=float, default=30.0, help="video per stream, s")
    ap.add_argument("--streams", type=int, default=4,
                    help="cameras served together, each with its own state (default: 4)")
    ap.add_argument("--check-windows", type=int, default=3,
                    help="windows run again on the CPU for the check (default: 3)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default)")
    defaults.add_window_arguments(ap)
    defaults.add_question_argument(ap)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    stride = defaults.stride_seconds(args.window_seconds, args.stride_seconds)
    if args.streams < 1 or args.check_windows < 0 or args.seconds <= 0:
        ap.error("--streams must be >= 1, --check-windows >= 0 and --seconds > 0")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check.py: --device cuda, but torch finds no CUDA device here (torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): run it on "
              "a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from codecsight import params
    from codecsight.families import family_for_dir
    from codecsight_client.demux import iter_chunks, probe

    served = {"codec_parser": served_parameters("codec_parser"),
              "vit_pruned": served_parameters("vit_pruned", config_name="cpu"),
              "llm_prefill": served_parameters("llm_prefill")}
    model_dir = args.model_dir or params.resolve_model_dir(
        str(REPO / "model_repository" / "llm_prefill"), served["llm_prefill"]["model_dir"])
    try:
        family = family_for_dir(model_dir)
        info = probe(args.clip)
    except (OSError, ValueError) as e:
        print(f"gpu_check.py: {e}", file=sys.stderr)
        return 2
    chunks = list(itertools.islice(iter_chunks(args.clip, stride),
                                   max(1, int(round(args.seconds / stride)))))
    started = time.perf_counter()
    max_new = served["llm_prefill"]["max_new_tokens"]
    stack = load_stack(family, model_dir, args.device, max_new)
    reference = load_stack(family, model_dir, "cpu", max_new) if args.check_windows else None

    def serve(on: Stack, parsed: list, keep_windows: int = 0) -> dict:
        return run_streams(on, family, parsed, args.streams, served, args.fps,
                           args.window_seconds, args.question, keep_windows)

    results, check = {}, {}
    for policy in POLICIES:
        parsed, parse_s = parse_clip(family, policy, chunks, served, info, args.fps,
                                     args.window_seconds)
        # Warm-up (CUDA context, kernels, allocator): two windows on throwaway sessions.
        serve(stack, parsed[:2])
        run = serve(stack, parsed, args.check_windows)
        frames = sum(r.stats.frames_sampled for r in parsed)
        stream_frames = frames * args.streams
        kept = sum(r.stats.groups_kept for r in parsed)
        total = sum(r.stats.groups_total for r in parsed)
        results[policy] = {
            "chunks": len(parsed), "sampled_frames_per_stream": frames,
            "streams": args.streams,
            "kept_share": round(kept / max(total, 1), 4),
            "visual_tokens_per_frame": round(kept / max(frames, 1), 2),
            "llm_rows_per_window": round(run["rows_computed"]
                                         / max(run["windows_answered"], 1), 1),
            "windows_answered": run["windows_answered"],
            "parser_ms_per_frame": ms(parse_s, frames),
            "vit_ms_per_frame": ms(run["vit_s"], stream_frames),
            "llm_ms_per_frame": ms(run["llm_s"], stream_frames),
        }
        row = results[policy]
        row["total_ms_per_frame"] = round(row["parser_ms_per_frame"] + row["vit_ms_per_frame"]
                                          + row["llm_ms_per_frame"], 3)
        if reference is not None:
            windows = parsed[:args.check_windows]
            cpu = serve(reference, windows, args.check_windows)
            check[policy] = compare(run["kept"], cpu["kept"])
    wall = time.perf_counter() - started
    dense, codec = results["dense"], results["codec"]
    ratios = {key: ratio(codec[key], dense[key]) for key in (
        "parser_ms_per_frame", "vit_ms_per_frame", "llm_ms_per_frame", "total_ms_per_frame",
        "visual_tokens_per_frame", "llm_rows_per_window")}
    load = os.getloadavg()
    out = {"kind": "codecsight-gpu-check", "device": args.device,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "environment": environment(stack.device),
           "settings": {"clip": os.path.relpath(args.clip, REPO), "model_dir": os.path.relpath(
               model_dir, REPO), "seconds": args.seconds, "stride_seconds": stride,
               "fps": args.fps, "window_seconds": args.window_seconds,
               "question": args.question, "streams": args.streams,
               "max_patches": served["vit_pruned"]["max_patches"],
               "refresh": served["llm_prefill"]["default_refresh"],
               "check_windows": args.check_windows},
           "policies": results, "codec_over_dense": ratios, "check": check,
           "wall_s": round(wall, 1), "loadavg": [round(x, 2) for x in load]}

    where = out["environment"].get("gpu", f"CPU ({os.cpu_count()} cores)")
    print(f"device {args.device}: {where}; parser on the CPU; {args.streams} stream(s), "
          f"{dense['sampled_frames_per_stream']} sampled frames each, {stride:g} s chunks")
    print(f"{'policy':8s} {'parser':>9s} {'ViT':>9s} {'LLM':>9s} {'total':>9s}  ms/frame   "
          f"{'tokens/frame':>12s} {'kept':>6s} {'LLM rows/window':>15s}")
    for policy, r in results.items():
        print(f"{policy:8s} {r['parser_ms_per_frame']:9.2f} {r['vit_ms_per_frame']:9.2f} "
              f"{r['llm_ms_per_frame']:9.2f} {r['total_ms_per_frame']:9.2f}             "
              f"{r['visual_tokens_per_frame']:12.1f} {r['kept_share']:6.1%} "
              f"{r['llm_rows_per_window']:15.1f}")
    print("codec/dense: " + ", ".join(f"{k.replace('_ms_per_frame', '')} {v:.3f}"
                                      for k, v in ratios.items() if v is not None))
    for policy, c in check.items():
        print(f"check {policy}, {args.device} vs cpu over {c['windows']} window(s): ViT tokens "
              f"max |diff| {c['vit_tokens_max_abs_diff']:.3g}, first logits max |diff| "
              f"{c['first_logits_max_abs_diff']:.3g}, same answers: {c['same_answers']}")
    print(f"wall {wall:.1f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
