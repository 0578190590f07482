"""vllm_evs: vLLM's Efficient Video Sampling after the ViT (codecsight/token_pruning.py).

The retention mask is held to an independent, straightforward reference of vLLM's
compute_retention_mask (vllm/multimodal/evs.py): loops, float64, a sort by (-score, index).
Then the policy end to end: codec_parser sends every patch and marks whole frames, llm_prefill
(its real model.py) drops tokens at video_pruning_rate, a real tritonserver serves it.
"""
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import triton_stub
from codecsight.checkpoint import Geometry, load
from codecsight.llm import split_frames
from codecsight.params import read
from codecsight.parser import StreamParser
from codecsight.policy import PruningConfig
from codecsight.protocol import META, TOKEN_PRUNING, LlmStats
from codecsight.token_pruning import (StreamTokenPruner, check_rate, retained_tokens_count,
                                      retention_mask)
from codecsight.vision import PrunedVisionEncoder

CLIP = str(Path(__file__).resolve().parent.parent / "media" / "car-detection.mp4")
NONE, PRUNE, WHOLE = (TOKEN_PRUNING.index(n) for n in ("none", "vllm_evs", "vllm_evs_whole"))


def reference_mask(tokens, grid, q, previous=None, forced=()):
    """vLLM's rule written out plainly: bool [T*h*w]."""
    frames, h, w = grid
    video = np.asarray(tokens, np.float64).reshape(frames, h * w, -1)
    scores, n_forced = [], 0
    for t in range(frames):
        whole = t in forced or (t == 0 and previous is None)
        n_forced += whole * h * w
        for c in range(h * w):
            if whole:
                scores.append(255.0)
                continue
            a = video[t, c]
            b = video[t - 1, c] if t else np.asarray(previous, np.float64)[c]
            scores.append(1.0 - a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-8))
    keep = max(n_forced, int(frames * h * w * (1 - q)))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    mask = np.zeros(len(scores), bool)
    mask[order[:keep]] = True
    return mask


# -- the retention mask ---------------------------------------------------------------------


@pytest.mark.parametrize("grid, q", [((4, 3, 5), 0.6), ((1, 2, 2), 0.75), ((8, 4, 4), 0.3),
                                     ((5, 2, 3), 0.9), ((3, 16, 28), 0.6)])
def test_mask_is_vllms_on_random_tokens(grid, q):
    frames, h, w = grid
    tokens = np.random.default_rng(sum(grid)).standard_normal((frames * h * w, 16))
    mask = retention_mask(torch.from_numpy(tokens).float(), grid, q)
    assert mask.dtype == torch.bool and mask.shape == (frames * h * w,)
    assert mask.numpy().tolist() == reference_mask(tokens, grid, q).tolist()
    assert mask[:h * w].all()                               # the first frame, always
    assert int(mask.sum()) == max(h * w, int(frames * h * w * (1 - q)))


def test_retained_count_is_vllms_formula():
    assert retained_tokens_count(448, 8, 0.6) == int(448 * 8 * 0.4) == 1433
    assert retained_tokens_count(448, 2, 0.75) == 448       # never below the first frame
    assert retained_tokens_count(448, 3, 0.6, forced_tokens=0) == int(448 * 3 * 0.4)


def test_rate_zero_keeps_every_token():
    tokens = np.random.default_rng(0).standard_normal((6 * 12, 8))
    assert retention_mask(tokens, (6, 3, 4), 0.0).all()


def test_ties_keep_the_earliest_tokens_in_t_h_w_order():
    # Frames 1..3 repeat frame 0 exactly (one-hot rows: cosine exactly 1, dissimilarity 0).
    frame = np.eye(6, dtype=np.float32)
    tokens = np.concatenate([frame, frame, frame, frame])
    mask = retention_mask(tokens, (4, 2, 3), 0.5).numpy()
    # 12 of 24 kept: the forced first frame, then the next 6 in order: frame 1 whole.
    assert mask.tolist() == [True] * 12 + [False] * 12
    assert mask.tolist() == reference_mask(tokens, (4, 2, 3), 0.5).tolist()


def test_a_previous_frame_replaces_the_forced_first_frame():
    rng = np.random.default_rng(3)
    tokens, previous = rng.standard_normal((3 * 6, 8)), rng.standard_normal((6, 8))
    mask = retention_mask(tokens, (3, 2, 3), 0.6, previous=previous).numpy()
    assert mask.tolist() == reference_mask(tokens, (3, 2, 3), 0.6, previous=previous).tolist()
    assert mask.sum() == int(18 * 0.4) == 7                 # no frame forced: no floor
    # The first frame is scored against `previous`: one close to it drops first.
    near = np.concatenate([previous + 1e-3, rng.standard_normal((12, 8))])
    assert not retention_mask(near, (3, 2, 3), 0.6, previous=previous)[:6].any()


def test_forced_frames_are_kept_whole_and_count_toward_the_budget():
    rng = np.random.default_rng(4)
    tokens, previous = rng.standard_normal((4 * 6, 8)), rng.standard_normal((6, 8))
    forced = np.array([False, False, True, False])
    mask = retention_mask(tokens, (4, 2, 3), 0.6, previous=previous, forced=forced).numpy()
    assert mask.tolist() == reference_mask(tokens, (4, 2, 3), 0.6, previous, forced=(2,)).tolist()
    assert mask[12:18].all() and mask.sum() == max(6, int(24 * 0.4))


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), 1.5])
def test_a_rate_outside_vllms_range_is_refused(rate):
    with pytest.raises(ValueError, match=r"video_pruning_rate must be in \[0, 1\)"):
        check_rate(rate)
    with pytest.raises(ValueError, match="video_pruning_rate"):
        retention_mask(np.ones((4, 2)), (1, 2, 2), rate)


def test_shapes_that_disagree_with_the_grid_are_refused():
    with pytest.raises(ValueError, match=r"not \[T\*h\*w, D\] for grid"):
        retention_mask(np.ones((5, 2)), (1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="previous frame"):
        retention_mask(np.ones((4, 2)), (1, 2, 2), 0.5, previous=np.ones((3, 2)))


# -- real tokens: the clip's frames through the tiny checkpoint's tower ----------------------


@pytest.fixture(scope="module")
def real_requests(tiny_dir):
    """car-detection.mp4's first 6 s under vllm_evs, 2 s per request: (ParseResult, tokens)."""
    from codecsight_client.demux import iter_chunks

    geometry = Geometry.from_model_dir(tiny_dir)
    model, _ = load(tiny_dir)
    tower = PrunedVisionEncoder(model.model.visual).eval()
    parser = StreamParser(geometry, "h264", 12.5, 2.0, policy="vllm_evs",
                          config=PruningConfig.served(), window_seconds=4.0)
    out = []
    for chunk in iter_chunks(CLIP, 2.0):
        if chunk.start_s >= 6.0:
            break
        result = parser.parse(chunk.data, au_bytes=chunk.au_sizes, au_pts=chunk.au_pts)
        out.append((result, tower.encode(result.patches, result.positions)))
    return out


def test_vllm_evs_sends_every_patch_and_marks_the_whole_frames(real_requests):
    codes = [r.frame_meta[:, META["token_pruning"]].tolist() for r, _ in real_requests]
    for result, _ in real_requests:
        assert result.stats.policy == "vllm_evs"
        assert result.stats.patches_kept == result.stats.patches_total > 0
    # The stream's start, then the whole-frame timer at the 4 s window (8 frames at 2 fps).
    assert codes[0][0] == WHOLE and set(codes[0][1:]) == {PRUNE}
    assert sum(c == WHOLE for cs in codes for c in cs) == 2 and codes[2][0] == WHOLE
    assert real_requests[0][0].stats.whole_frames == {"start": 1}
    assert real_requests[2][0].stats.whole_frames == {"timer": 1}


def test_mask_is_vllms_on_real_tokens(real_requests):
    result, tokens = real_requests[0]
    meta = result.frame_meta
    grid = (len(meta), int(meta[0, META["grid_h"]]), int(meta[0, META["grid_w"]]))
    assert grid[1:] == (16, 28)                              # 768x432: 16 x 28 groups
    mask = retention_mask(torch.from_numpy(tokens), grid, 0.6)
    assert mask.numpy().tolist() == reference_mask(tokens, grid, 0.6).tolist()


def test_the_stream_pruner_carries_the_previous_frame_across_requests(real_requests, tiny_dir):
    merge = Geometry.from_model_dir(tiny_dir).merge_size
    pruner, previous = StreamTokenPruner(), None
    for result, tokens in real_requests:
        frames = split_frames(tokens, result.positions, result.frame_meta, merge)
        pruned, dropped = pruner.prune(frames, result.frame_meta, 0.6)
        meta = result.frame_meta
        gh, gw = int(meta[0, META["grid_h"]]), int(meta[0, META["grid_w"]])
        forced = tuple(np.flatnonzero(meta[:, META["token_pruning"]] == WHOLE))
        want = reference_mask(tokens, (len(meta), gh, gw), 0.6, previous, forced).reshape(
            len(meta), gh * gw)
        assert dropped == int((~want).sum()) == len(tokens) - sum(len(f.tokens) for f in pruned)
        all_cells = np.stack(np.divmod(np.arange(gh * gw), gw), axis=1)
        for frame, full, keep in zip(pruned, frames, want):
            # Kept tokens keep their own (h, w): the true position in the dense grid.
            assert frame.cells.tolist() == all_cells[keep].tolist()
            assert torch.equal(frame.tokens, full.tokens[torch.from_numpy(keep)])
            assert (frame.t, frame.grid_h, frame.grid_w) == (full.t, gh, gw)
        previous = tokens[-gh * gw:]
    # It holds the last frame's full tokens (float32), its window copy is the pruned one.
    assert pruner.nbytes == gh * gw * tokens.shape[1] * 4


def test_another_policys_frames_pass_untouched_and_restart_vllm_evs(real_requests, tiny_dir):
    merge = Geometry.from_model_dir(tiny_dir).merge_size
    result, tokens = real_requests[1]
    frames = split_frames(tokens, result.positions, result.frame_meta, merge)
    meta = result.frame_meta.copy()
    meta[:, META["token_pruning"]] = NONE
    pruner = StreamTokenPruner()
    same, dropped = pruner.prune(frames, meta, 0.6)
    assert dropped == 0 and same == frames and pruner.previous is None
    # The next vllm_evs request has no reference: its first frame is kept whole, as vLLM's.
    _, dropped = pruner.prune(frames, result.frame_meta, 0.6)
    kept = max(448, int(len(tokens) * 0.4))
    assert dropped == len(tokens) - kept


def test_a_vllm_evs_frame_missing_tokens_is_an_error_naming_the_stream(real_requests, tiny_dir):
    merge = Geometry.from_model_dir(tiny_dir).merge_size
    result, tokens = real_requests[0]
    frames = split_frames(tokens, result.positions, result.frame_meta, merge)
    frames[1].cells, frames[1].tokens = frames[1].cells[1:], frames[1].tokens[1:]
    with pytest.raises(ValueError, match="stream 'cam-x': vllm_evs frame t=1 holds 447"):
        StreamTokenPruner().prune(frames, result.frame_meta, 0.6, "cam-x")


# -- llm_prefill's model.py: the seam, with a stand-in triton_python_backend_utils -----------


class Response(triton_stub.InferenceResponse):
    def stats(self):
        assert self.error is None, self.error.message
        return LlmStats.from_json(self.string("LLM_STATS"))


def prefill_request(stream_id, result, tokens, start=False):
    return triton_stub.InferenceRequest({
        "TOKENS": tokens[None], "POSITIONS": result.positions[None],
        "FRAME_META": result.frame_meta[None],
        "QUESTION": np.array([[b"how many cars?"]], dtype=object),
        "REFRESH": np.array([[b"selective"]], dtype=object),
        "WINDOW_SECONDS": np.array([[4.0]], np.float32),
    }, correlation_id=stream_id, start=start)


@pytest.fixture(scope="module")
def llm_prefill():
    pb = triton_stub.pb_utils()
    pb.InferenceResponse = Response
    return triton_stub.load_model("llm_prefill", pb)


def test_llm_prefill_drops_tokens_at_the_served_rate_and_keeps_true_cells(
        llm_prefill, real_requests, tiny_dir):
    model = llm_prefill.TritonPythonModel()
    model.initialize(triton_stub.model_args("llm_prefill", model_dir=tiny_dir, max_new_tokens=2))
    rate = model.params["video_pruning_rate"]
    assert rate == PruningConfig.served().evs_pruning_rate == 0.6
    previous = None
    for i, (result, tokens) in enumerate(real_requests):
        (response,) = model.execute([prefill_request("cam-v", result, tokens, start=i == 0)])
        stats, meta = response.stats(), result.frame_meta
        gh, gw = int(meta[0, META["grid_h"]]), int(meta[0, META["grid_w"]])
        forced = tuple(np.flatnonzero(meta[:, META["token_pruning"]] == WHOLE))
        want = reference_mask(tokens, (len(meta), gh, gw), rate, previous, forced)
        assert stats.visual_tokens_pruned == int((~want).sum())
        assert response.string("ANSWER") != "" and stats.answer_tokens > 0
        window = model.streams.get("cam-v").window.frames[-len(meta):]
        cells = np.stack(np.divmod(np.arange(gh * gw), gw), axis=1)
        for frame, keep in zip(window, want.reshape(len(meta), -1)):
            assert frame.cells.tolist() == cells[keep].tolist()
        previous = tokens[-gh * gw:]


def test_a_bad_video_pruning_rate_is_refused_at_load(llm_prefill, tiny_dir):
    model = llm_prefill.TritonPythonModel()
    with pytest.raises(ValueError, match=r"model 'llm_prefill': parameter video_pruning_rate "
                                         r"'1.0' is not in \[0.0, 1.0\)"):
        model.initialize(triton_stub.model_args("llm_prefill", model_dir=tiny_dir,
                                                video_pruning_rate=1.0))


def test_the_served_rate_is_the_pixel_evs_rate():
    from codecsight.params import served_parameters

    assert served_parameters("llm_prefill")["video_pruning_rate"] == \
        served_parameters("codec_parser")["evs_pruning_rate"]
    assert math.isclose(read("llm_prefill", {"parameters": {
        **{k: {"string_value": str(v)} for k, v in served_parameters("llm_prefill").items()},
        "video_pruning_rate": {"string_value": "0"}}})["video_pruning_rate"], 0.0)


# -- a real tritonserver ---------------------------------------------------------------------


@pytest.mark.server
def test_served_vllm_evs_keeps_the_rate_of_tokens_after_a_dense_vit(server):
    from codecsight_client.demux import iter_chunks, probe
    from codecsight_client.stream import StreamSettings, connect, run_stream

    info = probe(CLIP)
    chunks = [c for c in iter_chunks(CLIP, 4.0) if c.start_s < 12.0]
    settings = StreamSettings(question="how many cars?", codec=info.codec, source_fps=info.fps,
                              analysis_fps=2.0, window_seconds=4.0, policy="vllm_evs",
                              refresh="selective")
    windows = run_stream(connect(server.grpc_url), f"vevs-{uuid.uuid4().hex[:8]}", settings,
                         chunks)
    assert len(windows) == 3
    q = 0.6   # the served video_pruning_rate
    for w in windows:
        parse, llm = w.parse, w.llm
        # Every patch went to the ViT; the LLM got max(whole frames, int(total * (1 - q))).
        assert parse.policy == "vllm_evs" and parse.patches_kept == parse.patches_total
        groups = parse.groups_total // parse.frames_sampled
        whole = sum(parse.whole_frames.values())
        kept = max(whole * groups, int(parse.groups_total * (1 - q)))
        assert llm.visual_tokens_pruned == parse.groups_total - kept
        # A 4 s window over 4 s chunks holds exactly this request's frames.
        assert llm.visual_tokens == kept
        assert w.answer
    assert windows[0].parse.whole_frames == {"start": 1}
    assert windows[1].parse.whole_frames == {"timer": 1}
    share = 1 - sum(w.llm.visual_tokens_pruned for w in windows) / sum(
        w.parse.groups_total for w in windows)
    assert abs(share - (1 - q)) < 0.01


# -- the benchmarks report what reached the LLM ----------------------------------------------


def test_bench_reports_vit_patches_and_llm_tokens_apart():
    import argparse

    from codecsight import protocol as P
    from codecsight.tools import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([CLIP])

    def window(policy, pruned):
        return bench.AnsweredWindow(
            latency_s=0.5, bytes_sent=1000,
            parse=P.ParseStats.empty(policy=policy, frames_sampled=4, patches_kept=4 * 1792,
                                     patches_total=4 * 1792, groups_kept=1792,
                                     groups_total=1792),
            llm=P.LlmStats.empty(tokens_prefilled=800, prefill_ms=10.0,
                                 visual_tokens_pruned=pruned))

    info = argparse.Namespace(width=768, height=432)
    stages = {name: {} for name in bench.STAGES}
    records = [bench.make_record(CLIP, info, p, "full",
                                 [bench.Run([window(p, n)], 1.0, stages, None)], args)
               for p, n in (("dense", 0), ("vllm_evs", 1075))]
    assert records[1]["patches_kept"] == records[0]["patches_kept"]     # the ViT sees it all
    assert (records[1]["llm_tokens_kept"], records[1]["llm_tokens_total"]) == (717, 1792)
    ratios = bench.make_ratios(records)
    assert ratios[1]["llm_tokens_kept"] == pytest.approx(717 / 1792)
    table = bench.format_table(records, ratios)
    assert "LLM tok %" in table and "40.0" in table


@pytest.mark.server
def test_a_server_with_a_bad_video_pruning_rate_refuses_to_start_saying_why(tmp_path):
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.serve import (DEFAULT_MODEL_DIR, ServerError, TritonServer, build,
                                  render_repository)

    source = build()
    dest = render_repository(source, tmp_path / "repository", DEFAULT_MODEL_DIR)
    shutil.copy(source / "vit_pruned" / "1" / "model.onnx", dest / "vit_pruned" / "1")
    path = dest / "llm_prefill" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.parameters["video_pruning_rate"].string_value = "1.0"   # vLLM's range is [0, 1)
    path.write_text(text_format.MessageToString(config))
    with pytest.raises(ServerError, match=r"(?s)failed to load 'llm_prefill'.*parameter "
                                          r"video_pruning_rate '1\.0' is not in \[0\.0, 1\.0\)"):
        with TritonServer(dest, log_path=tmp_path / "tritonserver.log"):
            pass
