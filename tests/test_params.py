import json

import pytest

from codecsight.params import model_params, resolve_model_dir


def config(**params):
    return json.dumps({"name": "m", "parameters": {
        k: {"string_value": v} for k, v in params.items()}})


def test_parameters_take_the_type_of_their_default():
    out = model_params(config(ttl="2.5", n="7", flag="true"),
                       {"ttl": 1.0, "n": 1, "flag": False, "name": "x"})
    assert out == {"ttl": 2.5, "n": 7, "flag": True, "name": "x"}


def test_an_unknown_parameter_is_an_error():
    with pytest.raises(ValueError, match="unknown parameters.*'tll'"):
        model_params(config(tll="2"), {"ttl": 1.0})


def test_a_badly_typed_parameter_names_itself():
    with pytest.raises(ValueError, match="n='seven' is not a int"):
        model_params(config(n="seven"), {"n": 1})


def test_relative_model_dir_is_taken_from_the_repository_root(tmp_path):
    model_folder = tmp_path / "repo" / "llm_prefill"
    assert resolve_model_dir(str(model_folder), "../models/x") == (tmp_path / "models/x").resolve()
    assert resolve_model_dir(str(model_folder), "/abs/x").as_posix() == "/abs/x"
