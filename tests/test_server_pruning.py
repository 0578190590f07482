"""Patch policies on a real tritonserver: side by side, switched per request, with fallback."""
import concurrent.futures
import uuid

import pytest

from codecsight_client.stream import StreamClient, StreamSettings, run_stream
from codecsight_client.demux import iter_chunks, probe
from codecsight.tools.synth import Box, encode_h264, moving_boxes

pytestmark = pytest.mark.server

FPS = 12.5
# One small box crossing a static textured scene: a static camera with sparse motion.
SPARSE = (Box(x=20, y=60, width=40, height=32, vx=3.0, vy=0.0),)


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def sparse_clip(tmp_path_factory):
    """12 s of 320x240 H.264 at 12.5 fps, keyframe every 2 s, one moving box."""
    frames, _ = moving_boxes(150, 320, 240, boxes=SPARSE, noise_sigma=2.0, seed=5)
    path = tmp_path_factory.mktemp("clips") / "sparse.mp4"
    return str(encode_h264(frames, FPS, gop=25, path=path))


@pytest.fixture(scope="module")
def hevc_clip(tmp_path_factory):
    frames, _ = moving_boxes(50, 320, 240, boxes=SPARSE, noise_sigma=2.0, seed=5)
    path = tmp_path_factory.mktemp("clips") / "sparse-hevc.mp4"
    return str(encode_h264(frames, FPS, gop=25, path=path, codec="libx265"))


def settings(path, **overrides):
    info = probe(path)
    values = dict(question="is anyone moving in the scene?", codec=info.codec,
                  source_fps=info.fps, analysis_fps=2.0, window_seconds=4.0,
                  policy="dense", refresh="full")
    values.update(overrides)
    return StreamSettings(**values)


def stream(grpc, path, stride_s=4.0, **overrides):
    return run_stream(grpc, unique(overrides.get("policy", "dense")), settings(path, **overrides),
                      iter_chunks(path, stride_s))


def total(windows, key):
    return sum(getattr(w.parse, key) for w in windows)


def test_three_policies_run_side_by_side_on_one_server(server, sparse_clip):
    from codecsight_client.stream import connect

    policies = ("dense", "evs", "codec")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = dict(zip(policies, pool.map(
            lambda p: stream(connect(server.grpc_url), sparse_clip, policy=p), policies)))
    for policy, windows in runs.items():
        assert [w.parse.policy for w in windows] == [policy] * 3
        assert all(w.answer for w in windows)
    dense, evs, codec = (total(runs[p], "patches_kept") for p in policies)
    groups = 9 * 12   # 320x240 pads to 336x252: 9 x 12 merge groups of 28 px
    assert dense == total(runs["dense"], "patches_total") == (
        total(runs["dense"], "frames_sampled") * groups * 4)
    # evs keeps a fixed 40% of every frame after its whole ones (start, 8 s whole-frame timer);
    # codec keeps what the box touched plus those whole frames.
    assert evs < 0.6 * dense
    assert codec < 0.5 * evs
    # Pruned tokens are dropped from the LLM input: one token per kept group (each 4 s
    # window holds exactly the frames of its own 4 s chunk).
    for policy in policies:
        assert [w.llm.visual_tokens for w in runs[policy]] == [
            w.parse.groups_kept for w in runs[policy]]


def test_codec_window_reaches_the_llm_with_fewer_tokens(grpc, sparse_clip):
    dense = stream(grpc, sparse_clip, policy="dense")
    codec = stream(grpc, sparse_clip, policy="codec")
    # Window w holds the frames of its own chunk (4 s window, 4 s stride).
    for d, c in zip(dense, codec):
        assert c.llm.window_frames == d.llm.window_frames
        assert c.llm.visual_tokens == c.parse.groups_kept < d.llm.visual_tokens
        assert c.llm.tokens_prefilled < d.llm.tokens_prefilled


def test_a_stream_switches_policy_from_one_request_to_the_next(grpc, sparse_clip):
    client = StreamClient(grpc, unique("switch"), settings(sparse_clip))
    chunks = list(iter_chunks(sparse_clip, 2.0))
    seen = []
    for i, (chunk, policy) in enumerate(zip(chunks, ["dense", "codec", "evs", "codec", "dense",
                                                      "codec"])):
        client.settings.policy = policy
        window = client.send(chunk, last=i == len(chunks) - 1)
        seen.append((window.parse.policy, window.parse.whole_frames, window.parse.kept_share))
    assert [p for p, _, _ in seen] == ["dense", "codec", "evs", "codec", "dense", "codec"]
    # The codec state kept up during the dense request: its first codec request prunes at
    # once instead of starting over with a whole frame.
    assert "start" not in seen[1][1] and seen[1][2] < 0.5


def test_policy_named_at_start_holds_for_requests_that_name_none(grpc, sparse_clip):
    client = StreamClient(grpc, unique("at-start"), settings(sparse_clip, policy="codec"))
    chunks = list(iter_chunks(sparse_clip, 4.0))
    first = client.send(chunks[0])
    client.settings.policy = ""
    rest = [client.send(c, last=i == len(chunks) - 2) for i, c in enumerate(chunks[1:])]
    assert first.parse.policy == "codec"
    assert [w.parse.policy for w in rest] == ["codec", "codec"]
    assert all(w.parse.policy_requested == "codec" for w in rest)


def test_requests_whose_frames_keep_nothing_still_answer(grpc, tmp_path):
    # A still scene in 1 s chunks: after the whole first frame nothing changes before the
    # whole-frame timer, which the 4 s window bounds (served: 8 s), keeps the frame at 4 s;
    # the chunks between send zero patches through the ViT and zero visual tokens to the
    # LLM, and must still get their answer.
    frames, _ = moving_boxes(60, 320, 240, boxes=(), seed=5)
    path = str(encode_h264(frames, FPS, gop=25, path=tmp_path / "still.mp4"))
    windows = stream(grpc, path, stride_s=1.0, policy="codec")
    assert windows[0].parse.groups_kept_per_frame[0] == 9 * 12
    assert [w.parse.whole_frame_seconds for w in windows] == [4.0] * len(windows)
    assert [w.parse.groups_kept for w in windows[1:]] == [0, 0, 0, 9 * 12]
    assert windows[4].parse.whole_frames == {"timer": 1}
    assert all(w.parse.frames_sampled > 0 for w in windows)
    assert all(w.llm.frames_added == w.parse.frames_sampled for w in windows)
    assert all(w.answer for w in windows)


def test_hevc_stream_asking_for_codec_falls_back_to_evs_and_says_so(grpc, hevc_clip):
    windows = stream(grpc, hevc_clip, policy="codec")
    assert probe(hevc_clip).codec == "hevc"
    for w in windows:
        assert w.parse.policy == "evs" and w.parse.policy_requested == "codec"
        assert "hevc" in w.parse.policy_fallback and "evs" in w.parse.policy_fallback
    assert total(windows, "patches_kept") < total(windows, "patches_total")
