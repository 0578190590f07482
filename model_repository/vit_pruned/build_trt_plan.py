"""Build vit_pruned's TensorRT plan (1/model.plan) from its ONNX export (1/model.onnx).

Run it on the GPU that will serve the plan, with the TensorRT version of the Triton release
that will load it (plans are specific to both), e.g. inside NVIDIA's Triton container:

    python model_repository/vit_pruned/build_trt_plan.py [--fp16]

The ONNX graph (codecsight.vision.export_onnx) takes PATCHES float32 [B, N, patch_dim] and
POSITIONS int64 [B, N, 3] and returns TOKENS float32 [B, N/4, hidden]. The plan gets one
optimisation profile: B from 1 to config.pbtxt's max_batch_size (Triton reads its batch limit
from there) and N from --min-patches to --max-patches, tuned for --opt-patches. Defaults come
from config.pbtxt (max_batch_size, parameter max_patches), its one source of configuration.
Needs TensorRT >= 10 (INT64 inputs). Exits with status 2 when TensorRT is missing.

Served by Triton's TensorRT backend, each request (one stream's patch set, all its frames)
is one batch item attending under the graph's frame mask; the Python model
(configs/cpu.pbtxt) batches the same graph frame by frame instead (one frame per item), so
there N is one frame's patches. Never run on the CPU-only development machines.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXIT_NO_TENSORRT = 2


def config_defaults(config_path: Path) -> dict[str, int]:
    """max_batch_size and the max_patches parameter of a config.pbtxt.

    Read with two patterns rather than protobuf: the build container need not have
    tritonclient installed; tests check the result against a real protobuf parse.
    """
    text = config_path.read_text()
    batch = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", text, re.MULTILINE)
    patches = re.search(
        r'key\s*:\s*"max_patches"\s*value\s*:?\s*\{\s*string_value\s*:\s*"(\d+)"', text)
    if not batch or not patches:
        raise SystemExit(f"{config_path}: cannot find max_batch_size and the max_patches "
                         "parameter; pass --max-batch-size and --max-patches")
    return {"max_batch_size": int(batch.group(1)), "max_patches": int(patches.group(1))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = config_defaults(HERE / "config.pbtxt")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, default=HERE / "1" / "model.onnx",
                        help="ONNX export to build from (default: %(default)s)")
    parser.add_argument("--plan", type=Path, default=HERE / "1" / "model.plan",
                        help="plan file to write (default: %(default)s)")
    parser.add_argument("--min-patches", type=int, default=4,
                        help="smallest N per request (default: %(default)s, one merge group)")
    parser.add_argument("--opt-patches", type=int, default=2048,
                        help="N the kernels are tuned for (default: %(default)s)")
    parser.add_argument("--max-patches", type=int, default=defaults["max_patches"],
                        help="largest N per request (default: config.pbtxt max_patches, "
                             "%(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"],
                        help="largest B (default: config.pbtxt max_batch_size, %(default)s)")
    parser.add_argument("--fp16", action="store_true",
                        help="allow FP16 kernels (check the tokens against FP32 before serving)")
    parser.add_argument("--workspace-gib", type=float, default=4.0,
                        help="builder scratch memory limit in GiB (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.min_patches <= args.opt_patches <= args.max_patches:
        parser.error("need 0 < --min-patches <= --opt-patches <= --max-patches, got "
                     f"{args.min_patches}, {args.opt_patches}, {args.max_patches}")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    return args


def build(args: argparse.Namespace, trt) -> None:
    if not args.onnx.is_file():
        raise SystemExit(f"{args.onnx} is missing: run `codecsight build` to export it first")
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise SystemExit(f"TensorRT {trt.__version__} is too old: POSITIONS is INT64, which "
                         "engine inputs support from TensorRT 10")
    logger = trt.Logger(trt.Logger.INFO)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(args.onnx)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"TensorRT cannot parse {args.onnx}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_gib * 2 ** 30))
    if args.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        width = tensor.shape[2]  # static: patch_dim for PATCHES, 3 for POSITIONS
        profile.set_shape(tensor.name, (1, args.min_patches, width),
                          (1, args.opt_patches, width),
                          (args.max_batch_size, args.max_patches, width))
        print(f"[plan] {tensor.name}: B 1..{args.max_batch_size}, N {args.min_patches}.."
              f"{args.max_patches} (opt {args.opt_patches}), width {width}", flush=True)
    config.add_optimization_profile(profile)

    started = time.perf_counter()
    print(f"[plan] building from {args.onnx} ({'FP16' if args.fp16 else 'FP32'}) ...", flush=True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit("TensorRT could not build the engine; see its log above")
    args.plan.parent.mkdir(parents=True, exist_ok=True)
    args.plan.write_bytes(bytes(plan))
    print(f"[plan] wrote {args.plan} ({args.plan.stat().st_size / 2 ** 20:.1f} MiB) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import tensorrt as trt
    except ImportError as e:
        print(f"build_trt_plan: TensorRT is needed to build {args.plan.name}, and its Python "
              f"package cannot be imported ({e}). Run this script on the GPU that will serve "
              "the plan, with the TensorRT version of your Triton release (>= 10): e.g. inside "
              "NVIDIA's Triton container after `pip install tensorrt==<that version>`, or in "
              "NVIDIA's TensorRT container of the same release (nvcr.io/nvidia/tensorrt).",
              file=sys.stderr)
        return EXIT_NO_TENSORRT
    build(args, trt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
