"""Several streams prefilled in one forward and decoded together answer exactly as alone.

Library level: streams at different window fills, refresh policies, question lengths and
pruned cells step together through `llm.step_streams` (one packed forward, per-stream
attention over each stream's own cache, batched greedy decoding) and are compared, window by
window, with the same streams each stepped alone (a batch of one: the stock attention). Three
checkpoints: the committed demo model (Qwen2-VL, trained) and the tiny random Qwen2.5-VL and
Qwen3-VL (deepstack) checkpoints the family tests build. Then what one bad stream does to a
batch, the device rules, and one served run where several streams' requests reach
llm_prefill in one execution.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from codecsight import checkpoint
from codecsight.families import family_for_dir
from codecsight.llm import (KVWindow, Prefill, StreamSession, VisualLM, WindowFrame,
                            split_frames, step_streams)
from codecsight.serve import DEFAULT_MODEL_DIR

# The tolerance of the library-level exactness tests (tests/test_kv_refresh.py).
ATOL = RTOL = 1e-5
GRID_H, GRID_W = 3, 4
CELLS = np.array([[h, w] for h in range(GRID_H) for w in range(GRID_W)], np.int64)
QUESTIONS = ["is anyone in the loading bay?", "how many cars?",
             "is the gate open or closed and is anyone moving near it?", "any trucks?"]


@pytest.fixture(scope="module", params=["demo", "qwen2_5_vl", "qwen3_vl"])
def checkpoint_vlm(request, tmp_path_factory):
    """A VisualLM of one checkpoint (6 answer tokens at most)."""
    if request.param == "demo":
        model_dir = DEFAULT_MODEL_DIR
    else:
        model_dir = checkpoint.build_tiny_family(tmp_path_factory.mktemp(request.param) / "m",
                                                 request.param)
    family = family_for_dir(model_dir)
    model, tokenizer = family.load(model_dir)
    return VisualLM(model, tokenizer, max_new_tokens=6, family=family,
                    seconds_per_t=family.seconds_per_t(2.0))


def clip(vlm, count, seed, i_every=4, pruned=False):
    """Frames t = 0..count-1 at 2 fps with random visual tokens of the checkpoint's width;
    pruned: P-frames keep a seeded subset of their merge groups (I-frames stay whole)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = vlm.family.token_width
    frames = []
    for t in range(count):
        anchor = t % i_every == 0
        cells = CELLS if anchor or not pruned else CELLS[np.sort(rng.choice(
            len(CELLS), int(rng.integers(1, len(CELLS))), replace=False))]
        frames.append(WindowFrame(
            t=t, frame_index=6 * t, time_ms=500 * t, frame_type="I" if anchor else "P",
            grid_h=GRID_H, grid_w=GRID_W,
            tokens=torch.randn(len(cells), width, generator=gen), cells=cells))
    return frames


@dataclasses.dataclass
class Stream:
    """One stream's settings and its requests: (new frames, question, refresh) per round."""

    window_frames: int
    refresh: str
    requests: list


def scenario(vlm, streams: int):
    """streams streams whose windows differ: fill (first request 1..4 frames, strides 1-3),
    refresh policy (full or selective, one switching), question length, pruning, and one
    stream that has no question in its first round."""
    out = []
    for k in range(streams):
        frames = clip(vlm, 12, seed=10 + k, i_every=3 + k % 3, pruned=k % 2 == 1)
        first, stride = 1 + k % 4, 1 + k % 3
        cuts = [0, first] + list(range(first + stride, len(frames), stride)) + [len(frames)]
        chunks = [frames[a:b] for a, b in zip(cuts, cuts[1:]) if b > a][:5]
        refresh = "full" if k % 3 == 2 else "selective"
        requests = []
        for r, chunk in enumerate(chunks):
            question = "" if (k == 1 and r == 0) else QUESTIONS[k % len(QUESTIONS)] if r in (0, 1) \
                else ""
            switch = "full" if (k == 0 and r == 3) else ""
            requests.append((chunk, question, switch))
        out.append(Stream(window_frames=4 + k % 3, refresh=refresh, requests=requests))
    return out


def session_for(vlm, stream: Stream) -> StreamSession:
    return StreamSession(window_frames=stream.window_frames, refresh=stream.refresh,
                         anchor_frames=1, seconds_per_t=vlm.seconds_per_t)


def run_alone(vlm, streams):
    """Each stream's windows, every request stepped on its own: [(answer, stats)] per stream."""
    out = []
    for stream in streams:
        session = session_for(vlm, stream)
        out.append([session.step(vlm, *request) for request in stream.requests])
    return out


def run_together(vlm, streams):
    """The same requests, every round's requests of all streams in one step_streams call."""
    sessions = [session_for(vlm, s) for s in streams]
    out = [[] for _ in streams]
    for r in range(max(len(s.requests) for s in streams)):
        batch = [(k, sessions[k], *s.requests[r]) for k, s in enumerate(streams)
                 if r < len(s.requests)]
        for (k, *_), result in zip(batch, step_streams(vlm, [b[1:] for b in batch])):
            assert not isinstance(result, BaseException), result
            out[k].append(result)
    return out


def with_varied_answer_lengths(vlm, streams):
    """Make the greedy answers stop at different steps: also stop on the token most answers
    (alone) hold among those some answers lack. Returns the alone run under those stops."""
    answers = [a.token_ids for per in run_alone(vlm, streams) for a, _ in per if a is not None]
    counts = {}
    for ids in answers:
        for token in set(ids):
            counts[token] = counts.get(token, 0) + 1
    some = [t for t, n in counts.items() if n < len(answers)]
    if some:
        vlm.stop_ids = set(vlm.stop_ids) | {max(some, key=counts.get)}
    return run_alone(vlm, streams)


COUNTED = ("tokens_prefilled", "tokens_reused", "tokens_refreshed", "tokens_new",
           "anchors_refreshed", "visual_tokens", "kv_rows", "kv_bytes", "window_t_range",
           "answer_tokens")


@pytest.mark.parametrize("count", [2, 5, 8])
def test_streams_prefilled_and_decoded_together_answer_as_each_alone(checkpoint_vlm, count):
    vlm = checkpoint_vlm
    stops = set(vlm.stop_ids)
    try:
        streams = scenario(vlm, count)
        alone = with_varied_answer_lengths(vlm, streams)
        together = run_together(vlm, streams)
    finally:
        vlm.stop_ids = stops
    lengths, reused, refreshed, diffs = set(), 0, 0, []
    for k, (solo, batch) in enumerate(zip(alone, together)):
        assert len(solo) == len(batch)
        for (a, a_stats), (b, b_stats) in zip(solo, batch):
            assert (a is None) == (b is None), f"stream {k}"
            assert [getattr(a_stats, f) for f in COUNTED] == [getattr(b_stats, f) for f in COUNTED]
            if a is None:
                continue
            assert b.token_ids == a.token_ids, f"stream {k}"
            diffs.append(float((b.first_logits - a.first_logits).abs().max()))
            torch.testing.assert_close(b.first_logits, a.first_logits, atol=ATOL, rtol=RTOL)
            lengths.add(len(a.token_ids))
            reused += a.tokens_reused
            refreshed += a.anchors_refreshed
    print(f"\n{vlm.family.title} x{count}: first logits max |batched - alone| {max(diffs):.2g}, "
          f"answer lengths {sorted(lengths)}")
    # Not vacuous: the batches reused slid caches, re-prefilled anchors, and decoded answers
    # that stopped at different steps.
    assert reused > 0 and refreshed > 0
    assert len(lengths) > 1
    assert any(b[1].answer_tokens is None for b in together[1][:1])  # no question: not answered


def test_a_batch_answers_what_the_stock_forward_of_each_window_gives(checkpoint_vlm):
    """Full refresh of fresh windows, three at once: each stream's first logits are those of
    its own whole-window prefill (the reference tests/test_llm.py holds to the stock
    forward)."""
    vlm = checkpoint_vlm
    windows = [clip(vlm, n, seed=40 + n, pruned=n == 3) for n in (2, 3, 5)]
    sessions = [StreamSession(window_frames=8, refresh="full",
                              seconds_per_t=vlm.seconds_per_t) for _ in windows]
    results = step_streams(vlm, [(s, w, q, "") for s, w, q in zip(sessions, windows, QUESTIONS)])
    for window, question, (answer, _) in zip(windows, QUESTIONS, results):
        kv = KVWindow(vlm)
        kv.seconds_per_t = vlm.seconds_per_t
        reference = vlm.answer(kv, window, question, "full")
        assert answer.batch_streams == 3 and reference.batch_streams == 1
        torch.testing.assert_close(answer.first_logits, reference.first_logits,
                                   atol=ATOL, rtol=RTOL)
        assert answer.token_ids == reference.token_ids


# -- one bad stream fails only itself ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm(tiny):
    model, tokenizer = tiny
    return VisualLM(model, tokenizer, max_new_tokens=4)


def test_a_stream_that_fails_its_step_fails_alone(tiny_vlm):
    """In one batch: a stream whose new frame is older than its window, one with an unknown
    refresh policy, one without a question, and one that answers as it would alone."""
    vlm = tiny_vlm
    frames = [clip(vlm, 5, seed=s) for s in range(4)]
    sessions = [StreamSession(window_frames=4) for _ in frames]
    step_streams(vlm, [(s, f[:3], QUESTIONS[0], "") for s, f in zip(sessions, frames)])
    stale = dataclasses.replace(frames[1][3], t=-1)
    results = step_streams(vlm, [(sessions[0], frames[0][3:4], "", ""),
                                 (sessions[1], [stale], "", ""),
                                 (sessions[2], frames[2][3:4], "", "lazy"),
                                 (sessions[3], frames[3][3:4], "", "")])
    assert isinstance(results[1], ValueError) and "order" in str(results[1])
    assert isinstance(results[2], ValueError) and "'lazy'" in str(results[2])
    assert sessions[1].kv is None and sessions[2].kv is None   # rebuilt from the window
    for k in (0, 3):
        alone = StreamSession(window_frames=4)
        alone.step(vlm, frames[k][:3], QUESTIONS[0])
        expected, _ = alone.step(vlm, frames[k][3:4], "")
        answer, stats = results[k]
        assert answer.batch_streams == 2 and answer.token_ids == expected.token_ids
        torch.testing.assert_close(answer.first_logits, expected.first_logits,
                                   atol=ATOL, rtol=RTOL)
        assert stats.tokens_reused == expected.tokens_reused > 0
    quiet = StreamSession(window_frames=4)
    (none, stats), (answer, _) = step_streams(
        vlm, [(quiet, frames[0][:2], "", ""), (StreamSession(window_frames=4), frames[3][:2],
                                               QUESTIONS[1], "")])
    assert none is None and stats.window_frames == 2 and answer.batch_streams == 1


def test_a_failing_shared_forward_answers_every_stream_alone(tiny_vlm, monkeypatch):
    vlm = tiny_vlm
    frames = [clip(vlm, 4, seed=20 + s) for s in range(3)]
    alone = [StreamSession(window_frames=4).step(vlm, f, QUESTIONS[s])[0]
             for s, f in enumerate(frames)]
    run = VisualLM.run

    def packed_fails(self, jobs):
        if len(jobs) > 1:
            raise RuntimeError("out of memory in the packed forward")
        return run(self, jobs)

    monkeypatch.setattr(VisualLM, "run", packed_fails)
    sessions = [StreamSession(window_frames=4) for _ in frames]
    results = step_streams(vlm, [(s, f, QUESTIONS[k], "")
                                 for k, (s, f) in enumerate(zip(sessions, frames))])
    for (answer, stats), expected, session in zip(results, alone, sessions):
        # Answered again one by one, from a cache rebuilt from the window.
        assert answer.batch_streams == 1 and answer.token_ids == expected.token_ids
        torch.testing.assert_close(answer.first_logits, expected.first_logits,
                                   atol=ATOL, rtol=RTOL)
        assert stats.kv_rows == session.kv.rows == expected.kv_bytes // (
            answer.kv_bytes // stats.kv_rows)


# -- the device ---------------------------------------------------------------------------


def test_cuda_without_cuda_refuses_to_load_naming_the_model_and_parameter(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import triton_stub

    module = triton_stub.load_model("llm_prefill", triton_stub.pb_utils())
    with pytest.raises(ValueError, match=r"'llm_prefill'.*device.*'cuda'.*no CUDA"):
        module.TritonPythonModel().initialize(
            triton_stub.model_args("llm_prefill", model_dir=tiny_dir, device="cuda"))


class HostTensorsMeetingTheDevice(TorchDispatchMode):
    """Records every op that mixes a device tensor with a host tensor of more than one
    element (a hidden copy on a GPU), and every float tensor copied from the host."""

    def __init__(self):
        super().__init__()
        self.mixed, self.float_copies = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors)
        host = [t for t in tensors if t.device.type == "cpu" and t.numel() > 1]
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            if kwargs.get("device") == torch.device("meta") or on_meta:
                if any(t.is_floating_point() for t in host):
                    self.float_copies.append(str(func))
        elif on_meta and host:
            self.mixed.append(str(func))
        return func(*args, **kwargs)


def test_on_a_device_the_window_cache_and_masks_never_meet_host_tensors(tiny):
    """The meta device stands in for a GPU: three streams, a first window and a slid
    selective one (dropped rows, rotated keys, a re-prefilled anchor, new frames and the
    question) planned and prefilled in one packed forward. No op mixes a host tensor (other
    than a scalar) with the device's, no float tensor crosses from the host, and every
    cache tensor and the hidden states are on the device. (Decoding reads the stop flags
    back, which the meta device cannot; it runs the same ops as this forward.)"""
    import copy

    model, tokenizer = tiny
    vlm = VisualLM(copy.deepcopy(model), tokenizer, max_new_tokens=2, device="meta")
    assert vlm.device.type == "meta"
    rng = np.random.default_rng(0)
    streams = []
    for k in range(3):
        tokens = rng.standard_normal((8 * 12, 128)).astype(np.float32)
        positions = np.array([[t, 2 * h + dh, 2 * w + dw] for t in range(8) for h, w in CELLS
                              for dh in (0, 1) for dw in (0, 1)], np.int64)
        meta = np.array([[t, 6 * t, 500 * t, 1 if t % 4 == 0 else 2, GRID_H, GRID_W, 12]
                         + [0] * (len(_meta_columns()) - 7) for t in range(8)], np.int64)
        streams.append(split_frames(tokens, positions, meta, 2, device="meta"))
    assert all(f.tokens.device.type == "meta" for s in streams for f in s)
    windows = [KVWindow(vlm) for _ in streams]
    mode = HostTensorsMeetingTheDevice()
    with torch.inference_mode(), mode:
        for first, last in ((0, 6), (2, 8)):
            jobs = []
            for kv, frames in zip(windows, streams):
                _, prefill = kv.plan(vlm, frames[first:last], "selective", 1)
                q = vlm._embed_ids(vlm.question_ids(QUESTIONS[0]))
                q_pos = torch.arange(40, 40 + len(q)).expand(3, -1)
                jobs.append((kv.cache, prefill.then(q, q_pos, kv.rows)))
            hidden = vlm.run(jobs)
            for kv in windows:
                kv.cache.truncate(kv.rows)
    assert mode.mixed == [] and mode.float_copies == []
    assert hidden.device.type == "meta" and hidden.shape == (3, 128)
    for kv in windows:
        assert {t.device.type for layer in kv.cache.layers
                for t in (layer.keys, layer.values)} == {"meta"}
        assert kv.cache.rows == kv.rows == len(vlm.prefix_ids) + 6 * 12


def _meta_columns():
    from codecsight.protocol import FRAME_META_COLUMNS

    return FRAME_META_COLUMNS


def test_a_prefill_followed_by_the_question_writes_its_rows_in_place():
    embeds = torch.zeros(3, 4)
    prefill = Prefill(embeds, torch.zeros(3, 3, dtype=torch.int64), torch.tensor([2, 3, 7]), 2)
    joined = prefill.then(torch.ones(2, 4), torch.full((3, 2), 9), 8)
    assert joined.rows.tolist() == [2, 3, 7, 8, 9]
    assert joined.positions[:, 3:].tolist() == [[9, 9]] * 3
    appended = Prefill(embeds, torch.zeros(3, 3, dtype=torch.int64), None, 5).then(
        torch.ones(2, 4), torch.zeros(3, 2, dtype=torch.int64), 8)
    assert appended.rows is None and appended.keep == 5 and len(appended.embeds) == 5


# -- served: several streams' requests in one llm_prefill execution ------------------------

# llm_prefill's batcher here waits up to this long for a batch of BATCHED streams, so the
# streams sent at once reach one execute call (served default: 1 ms, preferred batch 4).
HOLD_US, BATCHED = 400_000, 4
SERVED_STREAMS = [  # (policy, refresh, question): different rows, question lengths, policies
    ("codec", "selective", QUESTIONS[0]), ("dense", "full", QUESTIONS[1]),
    ("codec", "full", QUESTIONS[2]), ("dense", "selective", QUESTIONS[3])]


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """The demo repository served with report_first_logits on and a batcher that holds
    requests long enough to batch the streams sent together."""
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.serve import TritonServer, build, render_repository

    source = build()
    dest = render_repository(source, tmp_path_factory.mktemp("batching") / "repository",
                             DEFAULT_MODEL_DIR)
    shutil.copy(source / "vit_pruned" / "1" / "model.onnx", dest / "vit_pruned" / "1")
    path = dest / "llm_prefill" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    config.parameters["report_first_logits"].string_value = "true"
    config.sequence_batching.oldest.max_queue_delay_microseconds = HOLD_US
    del config.sequence_batching.oldest.preferred_batch_size[:]
    config.sequence_batching.oldest.preferred_batch_size.append(BATCHED)
    path.write_text(text_format.MessageToString(config))
    log = tmp_path_factory.mktemp("batching-log") / "tritonserver.log"
    with TritonServer(dest, log_path=log) as server:
        yield server


@pytest.mark.server
def test_served_streams_batched_in_one_execution_answer_as_alone(batching_server):
    import itertools

    from codecsight_client.demux import iter_chunks
    from codecsight_client.stream import connect, run_stream

    from streams import CLIP, clip_settings, new_id

    chunks = list(itertools.islice(iter_chunks(CLIP, 2.0), 3))   # 6 s: 3 windows each

    def stream(name, policy, refresh, question):
        settings = clip_settings(question=question, analysis_fps=2.0, window_seconds=4.0,
                                 policy=policy, refresh=refresh)
        return run_stream(connect(batching_server.grpc_url), new_id(name), settings, chunks)

    alone = [stream(f"alone-{i}", *s) for i, s in enumerate(SERVED_STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(len(SERVED_STREAMS)) as pool:
        together = list(pool.map(lambda a: stream(f"together-{a[0]}", *a[1]),
                                 enumerate(SERVED_STREAMS)))
    sizes = [w.llm.batch_size for windows in together for w in windows]
    print(f"\nllm_prefill batch sizes, streams sent together: {sizes}; alone: "
          f"{[w.llm.batch_size for windows in alone for w in windows]}")
    assert max(sizes) > 1
    diffs = []
    for solo, batch in zip(alone, together):
        assert len(solo) == len(batch) == len(chunks)
        for a, b in zip(solo, batch):
            assert b.answer == a.answer and b.llm.answer_tokens == a.llm.answer_tokens
            assert (b.llm.tokens_prefilled, b.llm.tokens_reused, b.llm.kv_rows) == (
                a.llm.tokens_prefilled, a.llm.tokens_reused, a.llm.kv_rows)
            diffs.append(float(np.abs(np.subtract(b.llm.first_logits,
                                                  a.llm.first_logits)).max()))
    print(f"first logits max |together - alone| {max(diffs):.2g}")
    # The served exactness tolerance (tests/test_families_served.py).
    assert max(diffs) <= 1e-4


# -- the benchmark's code path (perf/bench_prefill_batch.py), on a tiny input --------------


def test_the_prefill_batch_benchmark_runs_and_compares_both_paths(tiny_dir, tmp_path):
    """Both sides in their own processes (this tree stands in for the base checkout): 6 s of
    the clip at a small pixel budget, 2 streams, a 2 s window."""
    import importlib.util
    import json

    from codecsight.serve import REPO_ROOT

    spec = importlib.util.spec_from_file_location(
        "bench_prefill_batch", REPO_ROOT / "perf" / "bench_prefill_batch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "prefill_batch"
    assert bench.main(["--model-dir", str(tiny_dir), "--base", str(REPO_ROOT), "--streams", "2",
                       "--policies", "codec", "--refresh", "selective", "--seconds", "6",
                       "--window", "2", "--rounds", "1", "--max-pixels", "65536",
                       "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    (row,) = result["rows"]
    assert row["streams"] == 2 and row["timed_windows"] == 2
    assert row["wall_ms_before"] > 0 and row["cpu_ms_after"] > 0
    # 3 requests, stream 1 one behind stream 0: 2 rounds x 2 streams, all answered alike.
    assert row["answers"] == 4 and row["same_answers"] == 4
    assert "| codec | selective | 2 |" in out.with_suffix(".md").read_text()
