"""codecsight.params: each model's parameters declared once, values only from config.pbtxt."""
import json

import pytest

from codecsight import params
from codecsight.policy import PruningConfig
from codecsight.serve import DEFAULT_REPOSITORY


def config(model="vit_pruned", backend="python", **values):
    return json.dumps({"name": model, "backend": backend, "parameters": {
        k: {"string_value": v} for k, v in values.items()}})


VIT = dict(model_dir="../models/x", onnx_file="model.onnx", max_patches="4096",
           intra_op_threads="0", device="cpu")


def test_parameters_take_their_declared_types():
    out = params.read("vit_pruned", config(**VIT))
    assert out == {"model_dir": "../models/x", "onnx_file": "model.onnx", "max_patches": 4096,
                   "intra_op_threads": 0, "device": "cpu"}
    assert isinstance(out["max_patches"], int)


def test_an_unknown_parameter_is_an_error_naming_model_and_key():
    with pytest.raises(ValueError,
                       match=r"model 'vit_pruned': unknown parameter\(s\) \['model_dri'\]"):
        params.read("vit_pruned", config(**VIT, model_dri="../models/x"))


def test_a_missing_parameter_is_an_error_naming_model_and_key():
    values = dict(VIT)
    del values["max_patches"]
    with pytest.raises(ValueError, match=r"model 'vit_pruned': .*lacks .*\['max_patches'\]"):
        params.read("vit_pruned", config(**values))


def test_a_badly_typed_parameter_names_itself():
    with pytest.raises(ValueError,
                       match=r"'vit_pruned': parameter max_patches 'many' is not a int"):
        params.read("vit_pruned", config(**dict(VIT, max_patches="many")))


def test_a_count_below_its_minimum_is_an_error():
    with pytest.raises(ValueError, match=r"max_patches '0' is not >= 1"):
        params.read("vit_pruned", config(**dict(VIT, max_patches="0")))


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True),
                                         ("0", False), ("yes", True), (" no ", False)])
def test_bools_accept_true_false_1_0_yes_no(text, value):
    raw = {k: {"string_value": v} for k, v in served_raw("codec_parser").items()}
    raw["pixel_check"] = {"string_value": text}
    assert params.read("codec_parser", {"parameters": raw})["pixel_check"] is value


@pytest.mark.parametrize("text", ["on", "maybe", ""])
def test_any_other_bool_is_an_error(text):
    raw = {k: {"string_value": v} for k, v in served_raw("codec_parser").items()}
    raw["temporal_support"] = {"string_value": text}
    with pytest.raises(ValueError, match=r"temporal_support .* is not a bool"):
        params.read("codec_parser", {"parameters": raw})


def test_a_choice_outside_its_names_is_an_error():
    raw = {k: {"string_value": v} for k, v in served_raw("llm_prefill").items()}
    raw["default_refresh"] = {"string_value": "fast"}
    with pytest.raises(ValueError, match=r"default_refresh 'fast' is not one of full, selective"):
        params.read("llm_prefill", {"parameters": raw})


def test_an_undeclared_model_is_an_error():
    with pytest.raises(ValueError, match="no parameters are declared for model 'nope'"):
        params.read("nope", config("nope"))


def served_raw(model, config_name=None):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = params.config_path(model, DEFAULT_REPOSITORY, config_name)
    parsed = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in parsed.parameters.items()}


@pytest.mark.parametrize("model, config_name", [("codec_parser", None), ("llm_prefill", None),
                                                ("vit_pruned", "cpu"), ("vit_pruned", None)])
def test_every_served_config_sets_exactly_the_declared_parameters(model, config_name):
    tensorrt = model == "vit_pruned" and config_name is None
    assert set(served_raw(model, config_name)) == set(params.declared(model, tensorrt))


def test_codec_parser_declares_every_pruning_setting_with_its_type():
    declared = params.declared("codec_parser")
    assert declared["whole_frame_seconds"] is float and declared["motion_support"] is int
    assert declared["pixel_check"] is bool
    assert {f for f in PruningConfig.__dataclass_fields__} <= set(declared)


def test_served_parameters_are_the_typed_values_of_the_served_config():
    served = params.served_parameters("codec_parser")
    raw = served_raw("codec_parser")
    assert served["whole_frame_seconds"] == float(raw["whole_frame_seconds"])
    assert served["max_chunk_bytes"] == int(raw["max_chunk_bytes"])
    assert served["default_policy"] == raw["default_policy"]


def test_a_config_name_selects_configs_name_pbtxt_where_it_exists():
    assert params.served_parameters("vit_pruned", config_name="cpu")["max_patches"] == int(
        served_raw("vit_pruned", "cpu")["max_patches"])
    assert params.served_parameters("vit_pruned")["max_patches"] == int(
        served_raw("vit_pruned")["max_patches"])
    # no configs/cpu.pbtxt for codec_parser: its config.pbtxt serves both
    assert params.served_parameters("codec_parser", config_name="cpu") == \
        params.served_parameters("codec_parser")


def test_a_served_config_with_a_stray_parameter_names_the_file(tmp_path):
    import shutil

    shutil.copytree(DEFAULT_REPOSITORY / "llm_prefill", tmp_path / "llm_prefill",
                    ignore=shutil.ignore_patterns("1"))
    path = tmp_path / "llm_prefill" / "config.pbtxt"
    path.write_text(path.read_text().replace(
        "parameters [", 'parameters [\n  { key: "max_tokens" value: { string_value: "8" } },'))
    with pytest.raises(ValueError, match=rf"{path}.*unknown parameter\(s\) \['max_tokens'\]"):
        params.served_parameters("llm_prefill", repository=tmp_path)


def test_pruning_config_served_reads_codec_parser_and_takes_overrides():
    served = params.served_parameters("codec_parser")
    config = PruningConfig.served(whole_frame_seconds=0)
    assert config.whole_frame_seconds == 0
    assert config.motion_support == served["motion_support"]
    assert PruningConfig.served() == PruningConfig.from_params(served)


def test_the_whole_frame_timer_is_bounded_by_the_window():
    config = PruningConfig.served(whole_frame_seconds=8.0)
    assert config.for_window(4.0).whole_frame_seconds == 4.0
    assert config.for_window(8.0) == config and config.for_window(30.0) == config
    assert config.for_window(None) == config
    assert PruningConfig.served(whole_frame_seconds=0).for_window(4.0).whole_frame_seconds == 0


def test_relative_model_dir_is_taken_from_the_repository_root(tmp_path):
    model_folder = tmp_path / "repo" / "llm_prefill"
    assert params.resolve_model_dir(str(model_folder), "../models/x") == \
        (tmp_path / "models/x").resolve()
    assert params.resolve_model_dir(str(model_folder), "/abs/x").as_posix() == "/abs/x"
