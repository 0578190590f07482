"""Selective KV-cache refresh: what is exact, what is reused, and per-stream state in llm_prefill.

The library half (KVWindow, rotate_temporal) runs on the tiny checkpoint with made-up visual
tokens; the model.py half runs llm_prefill's model.py against a stand-in
triton_python_backend_utils, with no server.
"""
import dataclasses
import time

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VLRotaryEmbedding,
                                                            apply_rotary_pos_emb)

from codecsight.llm import KVWindow, StreamSession, VisualLM, WindowFrame, rotate_temporal
from codecsight.protocol import FRAME_TYPES, LlmStats

import triton_stub

GRID_H, GRID_W = 3, 4
QUESTION = "is anyone in the loading bay?"
CELLS = np.array([[h, w] for h in range(GRID_H) for w in range(GRID_W)], np.int64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's ops are too small to split; on a busy shared machine a second intra-op
    # thread mostly waits for a core (measured 100x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm(tiny):
    model, tokenizer = tiny
    return VisualLM(model, tokenizer, max_new_tokens=4)


def clip_frames(count, hidden=128, seed=0, i_every=4, keep=None):
    """Frames t = 0..count-1 (2 fps), an I-frame every i_every, random visual tokens."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for t in range(count):
        cells = CELLS if keep is None else CELLS[keep(t)]
        frames.append(WindowFrame(
            t=t, frame_index=6 * t, time_ms=500 * t, frame_type="I" if t % i_every == 0 else "P",
            grid_h=GRID_H, grid_w=GRID_W, tokens=torch.randn(len(cells), hidden, generator=gen),
            cells=cells))
    return frames


def layer_kv(kv, layer):
    return kv.cache.layers[layer].keys[0], kv.cache.layers[layer].values[0]  # [heads, rows, d]


def fresh(vlm, frames):
    kv = KVWindow(vlm)
    kv.sync(vlm, frames, "full", 0)
    return kv


# -- exactness ------------------------------------------------------------------------------


def test_selective_equals_full_on_a_first_window(vlm):
    frames = clip_frames(6)
    selective = vlm.answer(KVWindow(vlm), frames, QUESTION, "selective")
    full = vlm.answer_full(frames, QUESTION)
    torch.testing.assert_close(selective.first_logits, full.first_logits, atol=1e-5, rtol=1e-5)
    assert selective.token_ids == full.token_ids


def test_with_nothing_new_selective_reuses_every_row_and_matches_full(vlm):
    frames = clip_frames(6)
    kv = KVWindow(vlm)
    vlm.answer(kv, frames, QUESTION, "selective")
    again = vlm.answer(kv, frames, QUESTION, "selective")
    full = vlm.answer_full(frames, QUESTION)
    torch.testing.assert_close(again.first_logits, full.first_logits, atol=1e-5, rtol=1e-5)
    assert again.tokens_reused == len(vlm.prefix_ids) + 6 * 12
    assert again.tokens_prefilled == len(vlm.question_ids(QUESTION))  # the question only
    assert again.tokens_refreshed == 0


def test_appending_frames_without_a_slide_is_exact(vlm):
    frames = clip_frames(8)
    kv = KVWindow(vlm)
    vlm.answer(kv, frames[:5], QUESTION, "selective")
    grown = vlm.answer(kv, frames, QUESTION, "selective")
    full = vlm.answer_full(frames, QUESTION)
    torch.testing.assert_close(grown.first_logits, full.first_logits, atol=1e-5, rtol=1e-5)
    assert grown.tokens_new == 3 * 12
    assert grown.tokens_reused == len(vlm.prefix_ids) + 5 * 12


def test_rotate_temporal_equals_encoding_at_the_shifted_position(tiny):
    """Checked against Qwen2-VL's own M-RoPE: keys at (t, h, w) rotated by delta equal keys
    encoded at (t + delta, h, w)."""
    model, _ = tiny
    rotary = Qwen2VLRotaryEmbedding(model.config.text_config)
    keys = torch.randn(1, 2, 5, 32)
    pos = torch.tensor([[40, 41, 42, 43, 44], [3, 4, 5, 6, 7], [9, 8, 7, 6, 5]])
    delta = -7
    shifted = pos.clone()
    shifted[0] += delta

    def encode(p):
        cos, sin = rotary(keys, p[:, None, :])
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    moved = rotate_temporal(encode(pos), delta, rotary.inv_freq, rotary.mrope_section)
    torch.testing.assert_close(moved, encode(shifted), atol=1e-5, rtol=1e-5)
    assert (encode(pos) - encode(shifted)).abs().max() > 1e-2  # the shift is not a no-op


def test_after_a_slide_layer0_keys_and_values_equal_a_fresh_prefill(vlm):
    frames = clip_frames(10)
    kv = KVWindow(vlm)
    kv.sync(vlm, frames[:6], "selective", 0)
    prefix = len(vlm.prefix_ids)
    kept_before = layer_kv(kv, 0)[0][:, prefix + 2 * 12:].clone()  # frames 2..5, origin t=0
    kv.sync(vlm, frames[2:10], "selective", 0)
    ref = fresh(vlm, frames[2:10])
    keys, values = layer_kv(kv, 0)
    ref_keys, ref_values = layer_kv(ref, 0)
    torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, ref_values, atol=1e-6, rtol=1e-6)
    # Without the RoPE correction the reused keys would be off: the check has teeth.
    assert (kept_before - ref_keys[:, prefix:prefix + 4 * 12]).abs().max() > 1e-2


def test_above_layer0_reused_rows_are_approximate_and_a_refreshed_anchor_is_exact(vlm):
    """Reused rows keep what they attended to before the slide; a re-prefilled anchor
    attends to the current window, so its layer-1 rows are exact (their input only depends
    on layer-0 rows, which are exact); deeper layers see stale rows again."""
    frames = clip_frames(10, i_every=4)  # I-frames t = 0, 4, 8
    kv = KVWindow(vlm)
    kv.sync(vlm, frames[:6], "selective", 1)
    stats = kv.sync(vlm, frames[2:10], "selective", 1)
    assert stats.anchors_refreshed == 1 and stats.refreshed == 12  # t = 4, the one kept anchor
    ref = fresh(vlm, frames[2:10])
    prefix = len(vlm.prefix_ids)
    anchor = slice(prefix + 2 * 12, prefix + 3 * 12)   # t = 4 is the third frame of 2..9
    reused = slice(prefix, prefix + 12)                 # t = 2
    keys, _ = layer_kv(kv, 1)
    ref_keys, _ = layer_kv(ref, 1)
    torch.testing.assert_close(keys[:, anchor], ref_keys[:, anchor], atol=1e-5, rtol=1e-5)
    assert (keys[:, reused] - ref_keys[:, reused]).abs().max() > 1e-4


# -- what a slide does to the cache ----------------------------------------------------------


def test_a_slide_drops_the_rows_of_frames_that_left_and_counts_reuse(vlm):
    frames = clip_frames(12)
    kv = KVWindow(vlm)
    vlm.answer(kv, frames[:8], QUESTION, "selective", anchor_frames=1)
    slid = vlm.answer(kv, frames[4:12], QUESTION, "selective", anchor_frames=1)
    table = kv.token_table()
    assert np.unique(table["t"]).tolist() == list(range(4, 12))
    assert kv.rows == len(vlm.prefix_ids) + 8 * 12
    assert table["anchor"].sum() == 2 * 12 and set(table["frame_type"][table["anchor"]]) == {"I"}
    assert table["frame_index"][0] == 24 and table["h"].max() == GRID_H - 1
    # Frames 4..7 stay (frame 4 an anchor, re-prefilled), 8..11 are new.
    assert slid.tokens_new == 4 * 12
    assert slid.tokens_refreshed == 12 and slid.anchors_refreshed == 1
    assert slid.tokens_reused == len(vlm.prefix_ids) + 3 * 12
    assert slid.tokens_prefilled == 5 * 12 + len(vlm.question_ids(QUESTION))


def test_full_recomputes_every_row_and_reuses_none(vlm):
    frames = clip_frames(12)
    kv = KVWindow(vlm)
    vlm.answer(kv, frames[:8], QUESTION, "full")
    slid = vlm.answer(kv, frames[4:12], QUESTION, "full")
    assert slid.tokens_reused == 0
    assert slid.tokens_refreshed == len(vlm.prefix_ids) + 4 * 12
    assert slid.tokens_prefilled == len(vlm.prefix_ids) + 8 * 12 + len(
        vlm.question_ids(QUESTION))
    assert torch.equal(slid.first_logits, vlm.answer_full(frames[4:12], QUESTION).first_logits)


def test_pruned_frames_keep_their_cells_across_a_slide(vlm):
    """With patch pruning a P-frame brings only its changed groups; reuse keeps them at their
    grid cells, and layer 0 stays exact."""
    frames = clip_frames(8, keep=lambda t: slice(None) if t % 4 == 0 else [1, 6, 11])
    kv = KVWindow(vlm)
    vlm.answer(kv, frames[:6], QUESTION, "selective", anchor_frames=0)
    vlm.answer(kv, frames[2:8], QUESTION, "selective", anchor_frames=0)
    table = kv.token_table()
    assert table["h"][table["t"] == 3].tolist() == [0, 1, 2]
    assert table["w"][table["t"] == 3].tolist() == [1, 2, 3]
    torch.testing.assert_close(layer_kv(kv, 0)[0], layer_kv(fresh(vlm, frames[2:8]), 0)[0],
                               atol=1e-5, rtol=1e-5)


def test_the_question_and_answer_are_cropped_off_and_kv_bytes_are_what_the_rows_hold(vlm):
    frames = clip_frames(4)
    kv = KVWindow(vlm)
    answer = vlm.answer(kv, frames, QUESTION, "selective")
    assert kv.cache.get_seq_length() == kv.rows == len(vlm.prefix_ids) + 4 * 12
    config = vlm.text_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_row = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    assert answer.kv_bytes == kv.nbytes == kv.rows * per_row


def test_session_switches_policy_per_request_and_empty_keeps_it(vlm):
    frames = clip_frames(12)
    session = StreamSession(window_frames=8, refresh="selective")
    session.step(vlm, frames[:8], QUESTION)
    _, stats = session.step(vlm, frames[8:10], "", "full")
    assert stats.refresh == "full" and stats.tokens_reused == 0
    _, stats = session.step(vlm, frames[10:12], "")
    assert stats.refresh == "full"
    _, stats = session.step(vlm, [], "", "selective")
    assert stats.refresh == "selective" and stats.tokens_reused == stats.kv_rows


# -- llm_prefill's model.py, against a stand-in triton_python_backend_utils ------------------


class FakeResponse(triton_stub.InferenceResponse):
    def stats(self):
        assert self.error is None, self.error.message
        return LlmStats.from_json(self.string("LLM_STATS"))

    def answer(self):
        return self.string("ANSWER")


class FakeRequest(triton_stub.InferenceRequest):
    def __init__(self, stream_id, frames, question=QUESTION, refresh="", start=False,
                 end=False, window_seconds=4.0):
        self.stream_id = stream_id
        tokens = torch.cat([f.tokens for f in frames]) if frames else torch.zeros(0, 128)
        positions = [[f.t, 2 * h + dh, 2 * w + dw] for f in frames for h, w in f.cells
                     for dh in (0, 1) for dw in (0, 1)]
        meta = [[f.t, f.frame_index, f.time_ms, FRAME_TYPES[f.frame_type], f.grid_h, f.grid_w,
                 len(f.tokens), 0] for f in frames]   # token_pruning 0: tokens as sent
        super().__init__({
            "TOKENS": tokens.numpy()[None],
            "POSITIONS": np.array(positions, np.int64).reshape(1, -1, 3),
            "FRAME_META": np.array(meta, np.int64).reshape(1, -1, 8),
            "QUESTION": np.array([[question.encode()]], dtype=object),
            "REFRESH": np.array([[refresh.encode()]], dtype=object),
            "WINDOW_SECONDS": np.array([[window_seconds]], np.float32),
        }, correlation_id=stream_id, start=start, end=end)


@pytest.fixture
def load_model(tiny_dir):
    """Instantiate llm_prefill's TritonPythonModel with the served config's parameters, the
    given ones replaced."""
    pb = triton_stub.pb_utils()
    pb.InferenceResponse = FakeResponse
    module = triton_stub.load_model("llm_prefill", pb)

    def load(sequence_idle_s=None, **params):
        model = module.TritonPythonModel()
        model.initialize(triton_stub.model_args("llm_prefill", model_dir=tiny_dir,
                                                sequence_idle_s=sequence_idle_s,
                                                max_new_tokens=4, **params))
        return model

    return load


def run(model, requests):
    return model.execute(requests)


def stream_requests(stream_id, frames, stride, **kwargs):
    chunks = [frames[i:i + stride] for i in range(0, len(frames), stride)]
    return [FakeRequest(stream_id, c, start=(i == 0), end=(i == len(chunks) - 1), **kwargs)
            for i, c in enumerate(chunks)]


def test_interleaved_streams_in_one_execution_answer_as_alone(load_model):
    """Requests of different streams handed over together are each served from their own
    state: the same answers and counts as each stream run on its own."""
    model = load_model(anchor_refresh_frames=1)
    clips = {"cam-a": clip_frames(12, seed=1), "cam-b": clip_frames(12, seed=2, i_every=5)}
    solo = {sid: [dataclasses.asdict(r.stats()) | {"answer": r.answer()} for r in
                  (run(model, [q])[0] for q in stream_requests(sid, frames, 2))]
            for sid, frames in clips.items()}
    together = {sid: [] for sid in clips}
    for pair in zip(*(stream_requests(sid, f, 2) for sid, f in clips.items())):
        for request, response in zip(pair, run(model, list(pair))):
            together[request.stream_id].append(
                dataclasses.asdict(response.stats()) | {"answer": response.answer()})
    keys = ("answer", "tokens_prefilled", "tokens_reused", "tokens_refreshed", "kv_bytes",
            "window_frame_range")
    for sid in clips:
        assert [[w[k] for k in keys] for w in together[sid]] == [
            [w[k] for k in keys] for w in solo[sid]]
        assert all(w["batch_size"] == 2 for w in together[sid])
    assert solo["cam-a"][-1]["tokens_reused"] > 0  # the window slid and was reused


def test_an_evicted_stream_gets_an_error_naming_it_and_saying_to_restart(load_model):
    frames = clip_frames(8)
    one = run(load_model(), [FakeRequest("cam-probe", frames, start=True)])[0].stats()
    model = load_model(max_state_bytes=int(1.5 * one.state_bytes))  # one fits, two do not
    run(model, [FakeRequest("cam-old", frames, start=True)])
    run(model, [FakeRequest("cam-new", frames, start=True)])
    gone = run(model, [FakeRequest("cam-old", frames[:0])])[0]
    assert gone.error is not None
    assert "'cam-old'" in gone.error.message and "START" in gone.error.message
    assert "bytes" in gone.error.message
    assert run(model, [FakeRequest("cam-new", frames[:0])])[0].error is None


def test_an_idle_stream_is_evicted_after_the_ttl(load_model):
    # The TTL may not be shorter than the batcher's idle timeout: shorten both.
    model = load_model(state_ttl_seconds=0.05, sequence_idle_s=0.05)
    run(model, [FakeRequest("cam-idle", clip_frames(2), start=True)])
    time.sleep(0.1)
    gone = run(model, [FakeRequest("cam-idle", [])])[0]
    assert "'cam-idle'" in gone.error.message and "0.05 s idle" in gone.error.message
    assert "START" in gone.error.message


def test_state_bytes_count_the_kv_cache_and_end_frees_them(load_model):
    model = load_model()
    frames = clip_frames(4)
    stats = run(model, [FakeRequest("cam-1", frames, start=True)])[0].stats()
    token_bytes = sum(f.nbytes for f in frames)
    assert stats.kv_bytes > 0 and stats.state_bytes == stats.kv_bytes + token_bytes
    assert model.streams.nbytes() == stats.state_bytes
    run(model, [FakeRequest("cam-1", [], end=True)])
    assert model.streams.nbytes() == 0 and len(model.streams) == 0


def test_an_unknown_refresh_policy_is_refused_naming_the_stream(load_model):
    model = load_model()
    response = run(model, [FakeRequest("cam-9", clip_frames(1), refresh="lazy", start=True)])[0]
    assert "'cam-9'" in response.error.message and "selective" in response.error.message


def test_a_stream_without_refresh_at_start_gets_the_configured_default(load_model):
    model = load_model(default_refresh="full")
    stats = run(model, [FakeRequest("cam-2", clip_frames(2), start=True)])[0].stats()
    assert stats.refresh == "full"
    with pytest.raises(ValueError, match="default_refresh 'fast'"):
        load_model(default_refresh="fast")

