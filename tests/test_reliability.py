"""Reliability on a real tritonserver of its own (these tests restart it)."""
import uuid
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from codecsight_client.stream import StreamClient, connect
from codecsight_client.demux import iter_chunks
from codecsight.serve import TritonServer, free_port
from streams import CLIP, clip_settings

pytestmark = pytest.mark.server



@pytest.fixture(scope="module")
def repository():
    from codecsight.serve import build

    return build()


def test_after_a_server_restart_the_client_resumes_its_stream_with_start(repository, tmp_path):
    """A server restarted under a live stream loses its state: a client that does not resume
    is refused with the stream named and START asked for; the StreamClient resumes once,
    re-sending the video since its last keyframe, and answers every window.

    Four 4 s chunks: two before the restart (so the last keyframe, at 4.8 s, is not the
    stream's first), one resumed, one ending the stream.
    """
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    chunks = list(iter_chunks(CLIP, 4.0))[:4]
    notices = []
    sid = f"cam-{uuid.uuid4().hex[:6]}"
    # Triton counts a live sequence as in flight and on SIGTERM waits --exit-timeout-secs
    # (serve.EXIT_TIMEOUT_S) for it to end, which this one never does: shut down after 1 s.
    with TritonServer(repository, log_path=tmp_path / "first.log",
                      extra_args=("--exit-timeout-secs=1",), **ports) as server:
        stream = StreamClient(connect(server.grpc_url), sid, clip_settings(), reconnect_s=30,
                              notice=notices.append)
        before = [stream.send(c) for c in chunks[:2]]
        first_regions = server.shm_prefix + "*"
        assert list(Path("/dev/shm").glob(first_regions))   # the stub's shared memory
    # Shut down with the stream open, the stub leaves its regions behind: stop() removes them.
    assert not list(Path("/dev/shm").glob(first_regions))
    with TritonServer(repository, log_path=tmp_path / "second.log", **ports) as server:
        # A client that does not resume gets an error naming the stream and the fix.
        naive = StreamClient(connect(server.grpc_url), sid, clip_settings())
        naive.started = True   # a continuation, with no resume or retry
        with pytest.raises(InferenceServerException, match=rf"sequence {sid}.*START"):
            naive.send_once(chunks[2])
        after = [stream.send(chunks[2]), stream.send(chunks[3], last=True)]
    assert stream.resumes == 1
    resumed = [n for n in notices if "lost its state; resuming it with START" in n]
    assert resumed and "from its last keyframe" in resumed[0]
    assert all(w.answer for w in before + after)
    # The video since the last keyframe was re-sent, so the new decoder had frames at once.
    assert after[0].parse.frames_decoded > after[1].parse.frames_decoded > 0
    assert after[0].parse.decode_errors == 0
    assert after[1].llm.window_frames > 0


def test_admin_apis_need_the_key_and_inference_does_not(server):
    client = connect(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_system_shared_memory_status()
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("ensemble")
    wrong = {"triton-grpc-protocol-admin-key": server.admin_key + "x"}
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_system_shared_memory_status(headers=wrong)
    right = {"triton-grpc-protocol-admin-key": server.admin_key}
    # Allowed: the API answers (it would raise if refused), with no region registered.
    assert len(client.get_system_shared_memory_status(headers=right).regions) == 0
    assert client.is_model_ready("ensemble")
