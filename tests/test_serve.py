"""Server set-up that needs no running server: backend dir, environment, rendering."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from codecsight.checkpoint import Geometry
from codecsight.serve import (DEFAULT_REPOSITORY, REPO_ROOT, TritonServer, make_backend_dir,
                              render_repository, server_env)


def read_config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_backend_dir_holds_the_python_backend_and_the_matching_stub(tmp_path):
    import sys

    from codecsight.serve import _bundled_server

    binary, python_backend, stub = _bundled_server()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(stub)
    backend = make_backend_dir(python_backend, stub, tmp_path) / "python"
    assert (backend / "libtriton_python.so").is_file()
    assert (backend / "triton_python_backend_stub").is_file()


def test_server_environment_reaches_this_repository_and_the_bundled_libraries():
    env = server_env()
    assert str(REPO_ROOT) in env["PYTHONPATH"].split(":")
    assert any(p.endswith("nvidia_pytriton.libs") for p in env["LD_LIBRARY_PATH"].split(":"))


def test_server_binds_loopback_with_model_control_off_by_default():
    server = TritonServer()
    args = server.command()
    server.stop()  # removes the temporary backend directory
    assert "--grpc-address=127.0.0.1" in args and "--http-address=127.0.0.1" in args
    assert "--metrics-address=127.0.0.1" in args
    assert "--model-control-mode=none" in args


def test_rendered_repository_points_every_model_at_the_checkpoint(tmp_path, tiny_dir):
    out = render_repository(DEFAULT_REPOSITORY, tmp_path / "repo", tiny_dir)
    for name in ("codec_parser", "llm_prefill"):  # the TensorRT plan needs no checkpoint
        config = read_config(out / name / "config.pbtxt")
        assert config.parameters["model_dir"].string_value == str(tiny_dir.resolve())
    # Any other config with a model_dir is pointed there too (vit_pruned's ONNX file holds
    # its weights, so it needs none).
    for path in [*out.glob("*/config.pbtxt"), *out.glob("*/configs/*.pbtxt")]:
        config = read_config(path)
        if "model_dir" in config.parameters:
            assert config.parameters["model_dir"].string_value == str(tiny_dir.resolve()), path
    assert not list(out.rglob("*.onnx"))  # exports are rebuilt for the new checkpoint


def test_rendering_sets_the_tensorrt_token_width_to_the_checkpoints(tmp_path, tiny_dir):
    import json

    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 1536
    (wide / "config.json").write_text(json.dumps(config))
    out = render_repository(DEFAULT_REPOSITORY, tmp_path / "repo", wide)
    trt = read_config(out / "vit_pruned" / "config.pbtxt")
    tokens = [o for o in trt.output if o.name == "TOKENS"][0]
    assert list(tokens.dims) == [-1, 1536]
    assert Geometry.from_model_dir(wide).vision_hidden == 1536


def test_a_missing_checkpoint_is_named_before_anything_is_built_or_started(tmp_path):
    import pytest

    from codecsight.serve import ServerError, start_server

    with pytest.raises(ServerError, match=f"no model checkpoint in {tmp_path} .*Qwen2-VL"):
        start_server(tmp_path, repository_dest=tmp_path / "repository")
    assert not (tmp_path / "repository").exists()


def test_the_committed_checkpoint_is_served_from_the_committed_repository():
    from codecsight.serve import DEFAULT_MODEL_DIR, prepared_repository

    assert prepared_repository(DEFAULT_MODEL_DIR) == prepared_repository() == DEFAULT_REPOSITORY
    assert (DEFAULT_REPOSITORY / "vit_pruned" / "1" / "model.onnx").is_file()


def test_another_checkpoint_gets_a_rendered_repository_with_its_own_export(tmp_path, tiny_dir):
    from codecsight.serve import prepared_repository

    lines = []
    out = prepared_repository(tiny_dir, tmp_path / "repo", progress=lines.append)
    assert out == tmp_path / "repo"
    config = read_config(out / "llm_prefill" / "config.pbtxt")
    assert config.parameters["model_dir"].string_value == str(tiny_dir.resolve())
    assert (out / "vit_pruned" / "1" / "model.onnx").is_file()
    assert lines[0].startswith(f"rendering the model repository for {tiny_dir}")
    assert any(line.startswith("exported in") for line in lines)


def test_a_failed_start_shows_the_models_error_lines_not_only_the_log_tail(tmp_path):
    """A model that fails to load says why near the top of Triton's log; the error a user
    sees must carry that line even when the log goes on for pages after it."""
    log = tmp_path / "tritonserver.log"
    cause = ("E1130 05:10:00.123 1 model_lifecycle.cc:654] failed to load 'codec_parser': "
             "model 'codec_parser': unknown parameter(s) ['motion_treshold_px']")
    log.write_text("\n".join(["I1130 05:09:59.000 1 server.cc:1] starting", cause]
                             + [f"I1130 05:10:01.{i:03d} 1 server.cc:2] option {i}"
                                for i in range(60)]))
    server = TritonServer(log_path=log)
    tail = server.log_tail(lines=30)
    assert cause in tail and "motion_treshold_px" in tail
    assert "option 59" in tail and "option 29" not in tail
    assert "starting" not in tail   # an info line above the tail stays out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_server_children_die_with_the_process_that_started_them():
    """A SIGKILLed parent (a killed test run, `codecsight serve` under kill -9) must not leave
    its tritonservers running: die_with_parent makes the child get SIGTERM."""
    code = ("import subprocess, sys, time; from codecsight.serve import die_with_parent; "
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent, "
            "start_new_session=True); print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    state = None
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            state = "gone"
        if state in ("gone", "Z"):   # reaped, or dead and waiting for init to reap it
            break
        time.sleep(0.05)
    assert state in ("gone", "Z"), f"child {child} still running (state {state})"


def test_a_child_started_off_the_main_thread_is_not_tied_to_that_thread():
    """PR_SET_PDEATHSIG follows the forking thread: a server launched from a worker thread
    must not get it, or it would die when that thread ends."""
    import threading

    from codecsight.serve import child_preexec, die_with_parent

    assert child_preexec() is die_with_parent
    seen = []
    worker = threading.Thread(target=lambda: seen.append(child_preexec()))
    worker.start()
    worker.join()
    assert seen == [None]
