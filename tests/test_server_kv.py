"""Selective KV refresh on a real tritonserver: reuse across windows, and several streams
handed to llm_prefill together by the sequence batcher, each served from its own state."""
import concurrent.futures
import uuid

import pytest

from codecsight_client.stream import StreamSettings, connect, run_stream
from codecsight import protocol as P
from codecsight.tools import synth
from codecsight_client.demux import iter_chunks

pytestmark = pytest.mark.server

FPS = 10.0
WINDOW_S = 4.0      # 8 sampled frames at 2 fps
STRIDE_S = 1.0      # W/4: one chunk per stride, as the client sends them
GROUPS = 8 * 12     # 224x336 frames are 8x12 merge groups
QUESTION = "is anyone moving in the scene?"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two generated static-camera clips (7 s, 10 fps, an I-frame every 2 s), different scenes."""
    out = tmp_path_factory.mktemp("kv-clips")
    paths = {}
    for name, seed in (("a", 11), ("b", 12)):
        frames, _ = synth.moving_boxes(70, 336, 224, seed=seed, noise_sigma=1.0)
        paths[name] = str(synth.encode_h264(frames, FPS, gop=20, path=out / f"{name}.mp4"))
    return paths


def settings(**overrides):
    values = dict(question=QUESTION, codec="h264", source_fps=FPS, analysis_fps=2.0,
                  window_seconds=WINDOW_S, policy="dense", refresh="selective")
    values.update(overrides)
    return StreamSettings(**values)


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def stream(server, clip, stream_id, **overrides):
    return run_stream(connect(server.grpc_url), stream_id, settings(**overrides),
                      iter_chunks(clip, STRIDE_S))


def test_selective_reuses_the_window_and_prefills_only_new_frames(server, clips):
    full = stream(server, clips["a"], unique("full"), refresh="full")
    selective = stream(server, clips["a"], unique("selective"))
    assert [w.llm.window_frame_range for w in selective] == [
        w.llm.window_frame_range for w in full]
    slid = [i for i, w in enumerate(full) if w.llm.frames_dropped]
    assert slid, "the clip is longer than the window, so the window must slide"
    # Before the first slide selective is exact: the same answers as the dense reference.
    assert [w.answer for w in selective[:slid[0]]] == [w.answer for w in full[:slid[0]]]
    for i in slid:
        s, f = selective[i].llm, full[i].llm
        assert s.refresh == "selective" and f.refresh == "full"
        assert f.tokens_reused == 0 and s.tokens_reused > 0
        assert s.tokens_new == s.frames_added * GROUPS  # dense: whole new frames
        assert s.tokens_prefilled == s.tokens_new + s.tokens_refreshed + (
            f.tokens_prefilled - f.tokens_new - f.tokens_refreshed)  # + question
        assert s.tokens_prefilled < f.tokens_prefilled / 2
        assert s.kv_bytes == f.kv_bytes > 0  # the same rows, held for the stream
        assert selective[i].answer


def test_interleaved_streams_batched_together_answer_exactly_as_alone(server, clips):
    """Three streams of different scenes, patch and refresh policies, sent concurrently: the
    oldest-strategy batcher hands llm_prefill several at once, and each answers as alone."""
    pruned = "codec" if "codec" in P.PATCH_POLICIES else "dense"
    runs = {"a-sel": (clips["a"], {}),
            "b-sel": (clips["b"], {"policy": pruned}),
            "a-full": (clips["a"], {"refresh": "full", "question": "how many cars?"})}
    solo = {name: stream(server, clip, unique(name), **kw) for name, (clip, kw) in runs.items()}
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(stream, server, clip, unique(name), **kw)
                   for name, (clip, kw) in runs.items()}
        together = {name: f.result() for name, f in futures.items()}
    keys = ("tokens_prefilled", "tokens_reused", "tokens_refreshed", "kv_bytes",
            "window_frame_range")
    for name in runs:
        assert [w.answer for w in together[name]] == [w.answer for w in solo[name]], name
        assert [[getattr(w.llm, k) for k in keys] for w in together[name]] == [
            [getattr(w.llm, k) for k in keys] for w in solo[name]], name
    batched = max(w.llm.batch_size for run in together.values() for w in run)
    assert batched > 1, "llm_prefill never got requests of several streams in one execution"
