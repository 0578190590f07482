"""vit_pruned's production TensorRT config and plan build script against the exported ONNX graph.

TensorRT itself cannot run here: these tests check what can be checked without it (the
config's contract with the graph and with the ensemble, the build script's profile and its
failure without TensorRT).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from codecsight import vision

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
VIT = REPOSITORY / "vit_pruned"
BUILD_SCRIPT = VIT / "build_trt_plan.py"

# Model-config data types and the ONNX element types they must be.
ONNX_TYPES = {model_config_pb2.TYPE_FP32: onnx.TensorProto.FLOAT,
              model_config_pb2.TYPE_INT64: onnx.TensorProto.INT64}


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def config():
    return read_config(VIT / "config.pbtxt")


@pytest.fixture(scope="module")
def graph(onnx_path):
    # onnx_path: conftest exports the tiny checkpoint's vision tower once per session.
    return onnx.load(onnx_path).graph


@pytest.fixture(scope="module")
def build_script():
    spec = importlib.util.spec_from_file_location("build_trt_plan", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onnx_dims(value) -> list[int]:
    """A graph tensor's dims, symbolic ones as -1 (how a model config writes them)."""
    return [d.dim_value if d.HasField("dim_value") else -1
            for d in value.type.tensor_type.shape.dim]


def assert_tensors_match(config_tensors, graph_tensors, max_batch_size):
    by_name = {v.name: v for v in graph_tensors}
    assert sorted(t.name for t in config_tensors) == sorted(by_name)
    for tensor in config_tensors:
        value = by_name[tensor.name]
        assert ONNX_TYPES[tensor.data_type] == value.type.tensor_type.elem_type, tensor.name
        dims = onnx_dims(value)
        # With max_batch_size > 0 Triton adds the batch axis in front of `dims`.
        batch_axes = 1 if max_batch_size > 0 else 0
        assert len(dims) == len(tensor.dims) + batch_axes, tensor.name
        assert dims[batch_axes:] == list(tensor.dims), tensor.name


def test_config_serves_a_tensorrt_plan_on_the_gpu(config):
    assert config.name == "vit_pruned"
    assert config.platform == "tensorrt_plan"
    assert config.default_model_filename == "model.plan"
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]


def test_config_allows_every_batch_size_the_ensemble_sends(config):
    # Triton refuses to load an ensemble whose composing model allows a smaller batch.
    ensemble = read_config(REPOSITORY / "ensemble" / "config.pbtxt")
    assert "vit_pruned" in [step.model_name for step in ensemble.ensemble_scheduling.step]
    assert config.max_batch_size == 8
    assert config.max_batch_size >= ensemble.max_batch_size


def test_config_inputs_match_the_onnx_graph(config, graph):
    assert [(t.name, list(t.dims)) for t in config.input] == [
        ("PATCHES", [-1, 1176]), ("POSITIONS", [-1, 3])]
    assert not any(t.allow_ragged_batch for t in config.input)
    assert_tensors_match(config.input, graph.input, config.max_batch_size)


def test_config_outputs_match_the_onnx_graph(config, graph):
    assert [(t.name, list(t.dims)) for t in config.output] == [("TOKENS", [-1, 128])]
    assert_tensors_match(config.output, graph.output, config.max_batch_size)


def test_config_max_patches_is_a_whole_number_of_merge_groups(config, onnx_path):
    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    max_patches = int(config.parameters["max_patches"].string_value)
    assert max_patches > 0
    assert max_patches % int(meta[vision.META_PATCHES_PER_GROUP]) == 0


def test_build_script_defaults_come_from_the_config(config, build_script):
    args = build_script.parse_args([])
    assert args.max_batch_size == config.max_batch_size
    assert args.max_patches == int(config.parameters["max_patches"].string_value)
    assert args.onnx == VIT / "1" / "model.onnx" and args.plan == VIT / "1" / "model.plan"


def test_build_script_rejects_an_inconsistent_profile(build_script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_script.parse_args(["--min-patches", "64", "--opt-patches", "32"])
    assert exit_info.value.code == 2
    assert "--min-patches <= --opt-patches <= --max-patches, got 64, 32" in capsys.readouterr().err


def test_build_script_exits_2_with_a_clear_message_without_tensorrt(tmp_path):
    # Shadow any installed tensorrt with one that fails to import, as on a machine without it.
    (tmp_path / "tensorrt.py").write_text("raise ImportError('No module named tensorrt')\n")
    result = subprocess.run([sys.executable, str(BUILD_SCRIPT)], capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                            timeout=60)
    assert result.returncode == 2
    assert "TensorRT is needed to build model.plan" in result.stderr
    assert "Triton" in result.stderr


class StandInTensorRT:
    """Records what the build script asks of TensorRT; its network has the ONNX graph's inputs."""

    __version__ = "10.3.0"
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(FP16="fp16")

    class Logger:
        INFO = "info"

        def __init__(self, level):
            pass

    def __init__(self):
        self.shapes = {}
        self.flags = []
        trt = self

        class Network:
            inputs = []
            num_inputs = property(lambda self: len(self.inputs))

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                self.network.inputs = [SimpleNamespace(name=v.name, shape=tuple(onnx_dims(v)))
                                       for v in onnx.load(path).graph.input]
                return True

        class Profile:
            def set_shape(self, name, low, opt, high):
                trt.shapes[name] = (low, opt, high)

        class BuilderConfig:
            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                trt.flags.append(flag)

            def add_optimization_profile(self, profile):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"stand-in plan"

        self.OnnxParser, self.Builder = OnnxParser, Builder


def test_build_script_profile_spans_the_config_batch_and_patch_range(
        build_script, onnx_path, tmp_path):
    trt = StandInTensorRT()
    plan = tmp_path / "model.plan"
    args = build_script.parse_args(["--onnx", str(onnx_path), "--plan", str(plan), "--fp16"])
    build_script.build(args, trt)
    assert trt.shapes == {
        "PATCHES": ((1, 4, 1176), (1, 2048, 1176), (8, 8192, 1176)),
        "POSITIONS": ((1, 4, 3), (1, 2048, 3), (8, 8192, 3)),
    }
    assert trt.flags == ["fp16"]
    assert plan.read_bytes() == b"stand-in plan"
