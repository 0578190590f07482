"""The ensemble on a real tritonserver, driven over gRPC with tritonclient."""
import concurrent.futures
import uuid

import pytest
from tritonclient.utils import InferenceServerException

from codecsight_client.stream import StreamClient, StreamSettings, run_stream
from codecsight_client.demux import iter_chunks, probe
from codecsight.serve import REPO_ROOT

pytestmark = pytest.mark.server

CLIP = str(REPO_ROOT / "media" / "car-detection.mp4")
WINDOW_S = 8.0


def settings(**overrides):
    info = probe(CLIP)
    values = dict(question="is anyone in the loading bay?", codec=info.codec,
                  source_fps=info.fps, analysis_fps=2.0, window_seconds=WINDOW_S,
                  policy="dense", refresh="full")
    values.update(overrides)
    return StreamSettings(**values)


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def stream_clip(grpc, stream_id, **overrides):
    return run_stream(grpc, stream_id, settings(**overrides), iter_chunks(CLIP, WINDOW_S))


@pytest.fixture(scope="module")
def solo(server):
    """One stream of the clip on its own: the reference for isolation."""
    from codecsight_client.stream import connect

    return stream_clip(connect(server.grpc_url), unique("solo"))


def test_each_window_gets_one_answer(solo):
    chunks = list(iter_chunks(CLIP, WINDOW_S))
    assert len(solo) == len(chunks) == 4
    assert all(w.answer for w in solo)
    # Every sampled frame of the 30 s clip at 2 fps reached the LLM, in order.
    sampled = [w.parse.frames_sampled for w in solo]
    assert sum(sampled) == 61
    assert [w.llm.frames_added for w in solo] == sampled


def test_dense_sends_every_patch_to_the_vit_and_prefills_the_whole_window(solo):
    for w in solo:
        assert w.parse.policy == "dense"
        assert w.parse.patches_kept == w.parse.patches_total > 0
        assert w.llm.tokens_prefilled > w.llm.visual_tokens == (
            w.llm.window_frames * 16 * 28)  # 448x784 padded frame = 16x28 merge groups
        assert w.llm.tokens_reused == 0


def test_concurrent_streams_answer_exactly_as_alone(server, solo):
    """Two streams sent at the same time get exactly the answers and windows of the stream
    sent alone: no state crosses streams. The clip's first two chunks show it (the second
    starts at frame 100, mid-GOP, so it decodes only on its own stream's decoder state)."""
    from codecsight_client.stream import connect

    chunks = list(iter_chunks(CLIP, WINDOW_S))[:2]
    ids = [unique("cam-a"), unique("cam-b")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda sid: run_stream(connect(server.grpc_url), sid, settings(),
                                                    iter(chunks)), ids))
    alone = solo[:len(chunks)]
    for run in runs:
        assert [w.answer for w in run] == [w.answer for w in alone]
        assert [w.llm.window_frame_range for w in run] == [
            w.llm.window_frame_range for w in alone]


def test_end_frees_the_streams_state(grpc, solo):
    stream = StreamClient(grpc, unique("probe"), settings())
    chunks = iter_chunks(CLIP, 2.0)
    opened = stream.send(next(chunks))
    closed = stream.send(next(chunks), last=True)
    # Counted after each request: END took this stream out of both stateful models.
    assert closed.parse.active_streams == opened.parse.active_streams - 1
    assert closed.llm.active_streams == opened.llm.active_streams - 1
    # After END the sequence batcher itself refuses a continuation, naming stream and fix.
    naive = StreamClient(grpc, stream.stream_id, settings())
    naive.started = True   # a continuation, with no resume or retry
    with pytest.raises(InferenceServerException,
                       match=rf"sequence {stream.stream_id}.*must specify the START"):
        naive.send_once(next(chunks))


def test_unknown_policy_is_refused_naming_the_stream_and_the_server_stays_up(grpc):
    sid = unique("bad-policy")
    with pytest.raises(InferenceServerException, match=rf"{sid}.*unknown policy 'fast'.*dense"):
        StreamClient(grpc, sid, settings(policy="fast")).send(b"\x00\x00\x00\x01", last=True)
    assert grpc.is_server_live() and grpc.is_model_ready("ensemble")


def test_a_chunk_without_start_for_an_unknown_stream_gets_a_clear_error(grpc):
    sid = unique("never-started")
    chunk = next(iter_chunks(CLIP, 2.0))
    naive = StreamClient(grpc, sid, settings())
    naive.started = True   # a continuation, with no resume or retry
    with pytest.raises(InferenceServerException, match=rf"sequence {sid}.*must specify the START"):
        naive.send_once(chunk)
