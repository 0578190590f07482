"""The wire contract in codecsight/protocol.py against every config.pbtxt, and the stats schema."""
import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from codecsight import protocol as P
from codecsight.checkpoint import Geometry
from codecsight.serve import DEFAULT_MODEL_DIR, DEFAULT_REPOSITORY

CONFIGS = [DEFAULT_REPOSITORY / model / "config.pbtxt" for model in P.MODEL_TENSORS] + [
    DEFAULT_REPOSITORY / "vit_pruned" / "configs" / "cpu.pbtxt"]


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def declared(tensors) -> list[tuple[str, str, tuple]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims))
            for t in tensors]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEFAULT_REPOSITORY)))
def test_every_config_declares_exactly_the_protocols_tensors(path):
    config = read_config(path)
    geometry = Geometry.from_model_dir(DEFAULT_MODEL_DIR)
    widths = {P.PATCH_DIM: geometry.patch_dim, P.VISION_HIDDEN: geometry.vision_hidden}
    for kind, tensors in (("input", config.input), ("output", config.output)):
        specs = P.MODEL_TENSORS[config.name][kind]
        got = declared(tensors)
        assert [name for name, _, _ in got] == [s.name for s in specs], (path, kind)
        for (name, dtype, dims), spec in zip(got, specs):
            assert dtype == spec.dtype, (path, name)
            assert len(dims) == len(spec.dims), (path, name, dims)
            for dim, want in zip(dims, spec.dims):
                # A checkpoint width: -1 in the Python-backend configs, the number in TensorRT's.
                allowed = {-1, widths[want]} if isinstance(want, str) else {want}
                assert dim in allowed, (path, name, dims, spec.dims)


def test_the_ensemble_wires_each_models_declared_tensors():
    ensemble = read_config(DEFAULT_REPOSITORY / "ensemble" / "config.pbtxt")
    produced = set(P.ENSEMBLE_INPUTS)
    for step in ensemble.ensemble_scheduling.step:
        specs = P.MODEL_TENSORS[step.model_name]
        assert set(step.input_map) == {s.name for s in specs["input"]}, step.model_name
        assert set(step.output_map) == {s.name for s in specs["output"]}, step.model_name
        assert set(step.input_map.values()) <= produced, step.model_name   # in step order
        produced |= set(step.output_map.values())
    assert set(P.ENSEMBLE_OUTPUTS) <= produced


def test_stats_round_trip_through_json_and_refuse_unknown_keys():
    stats = P.LlmStats(refresh="selective", frames_added=2, frames_dropped=0, window_frames=2,
                       window_frame_range=[0, 7], window_t_range=[0, 1], tokens_prefilled=40,
                       tokens_reused=0, tokens_refreshed=0, kv_bytes=1024, prefill_ms=3.5,
                       stream="cam-1")
    again = P.LlmStats.from_json(stats.to_json())
    assert again == stats and again.answered
    assert not dataclasses.replace(stats, prefill_ms=None).answered
    with pytest.raises(TypeError, match="renamed_key"):
        P.LlmStats.from_json(stats.to_json()[:-1] + ', "renamed_key": 1}')
    with pytest.raises(TypeError, match="refresh"):
        P.LlmStats.from_json('{"frames_added": 1}')
