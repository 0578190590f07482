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


# A second server whose codec_parser admits CAPPED_STREAMS streams, with one spare sequence
# slot per batcher (CAPPED_SLOTS): for the admission tests of the client and the server.
CAPPED_STREAMS, CAPPED_SLOTS = 2, 3


@pytest.fixture(scope="session")
def capped_server(tmp_path_factory):
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.serve import DEFAULT_MODEL_DIR, TritonServer, build, render_repository

    source = build()
    dest = render_repository(source, tmp_path_factory.mktemp("capped") / "repository",
                             DEFAULT_MODEL_DIR)
    shutil.copy(source / "vit_pruned" / "1" / "model.onnx", dest / "vit_pruned" / "1")
    for model in ("codec_parser", "llm_prefill"):
        path = dest / model / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.sequence_batching.oldest.max_candidate_sequences = CAPPED_SLOTS
        if model == "codec_parser":
            config.parameters["max_streams"].string_value = str(CAPPED_STREAMS)
        path.write_text(text_format.MessageToString(config))
    log = tmp_path_factory.mktemp("capped-log") / "tritonserver.log"
    with TritonServer(dest, log_path=log) as server:
        yield server
