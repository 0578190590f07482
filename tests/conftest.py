"""Shared fixtures, each built once per session: a tiny checkpoint (seeded, ~1 s), its vision
tower exported to ONNX (~4 s), a real server."""
import pytest
import torch

# The tests share 2 cores with tritonserver's model processes: more threads only contend.
torch.set_num_threads(1)

from codecsight import checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return checkpoint.build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny checkpoint."""
    return checkpoint.load(tiny_dir)


@pytest.fixture(scope="session")
def onnx_path(tiny_dir, tmp_path_factory):
    """The tiny checkpoint's pruned vision tower as one ONNX file, alone in its directory.

    Exported once per session (the export is the slowest step of the vision tests); read it,
    never write next to it.
    """
    from codecsight import vision

    return vision.export_onnx(tiny_dir, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real tritonserver (bundled with nvidia-pytriton) on the project's model repository."""
    from codecsight.serve import start_server

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with start_server(log_path=log) as srv:
        yield srv
    print(f"tritonserver log: {log}")


@pytest.fixture
def grpc(server):
    from codecsight_client.stream import connect

    return connect(server.grpc_url)
