"""The three model.py adapters without a server, against tests/triton_stub.py.

Each model is imported by path and driven as Triton drives it: initialize with the served
config.pbtxt's parameters (the tiny checkpoint's model_dir), execute with requests that carry
a correlation ID and START/END flags. codec_parser's outputs feed vit_pruned and those feed
llm_prefill, as the ensemble wires them.
"""
import numpy as np
import pytest

import triton_stub
from codecsight.protocol import (CHUNK, FRAME_META, MODEL_TENSORS, PATCHES, POSITIONS,
                                 QUESTION, REFRESH, TOKENS, WINDOW_SECONDS, bytes_scalar)
from codecsight_client.demux import Chunk
from codecsight_client.stream import StreamSettings, request_arrays

FPS = 12.5


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    """Two 2 s Annex-B chunks of a 160x128 H.264 clip with one moving box."""
    from codecsight.tools.synth import Box, encode_h264, moving_boxes
    from codecsight_client.demux import iter_chunks

    frames, _ = moving_boxes(50, 160, 128, boxes=(Box(x=10, y=40, width=30, height=30,
                                                      vx=3.0, vy=0.0),), seed=3)
    path = encode_h264(frames, FPS, gop=25, path=tmp_path_factory.mktemp("clip") / "box.mp4")
    return list(iter_chunks(str(path), 2.0))


@pytest.fixture
def stub():
    return triton_stub.pb_utils()


@pytest.fixture
def parser(stub, tiny_dir):
    """codec_parser's TritonPythonModel, initialized; call with parameter overrides."""
    def make(**parameters):
        model = triton_stub.load_model("codec_parser", stub).TritonPythonModel()
        model.initialize(triton_stub.model_args("codec_parser", model_dir=tiny_dir, **parameters))
        return model
    return make


def parse_request(stream_id, chunk, start=False, end=False, policy="codec", codec="h264",
                  window_seconds=4.0, chunk_array=None, chunk_seq=0, token="owner-secret"):
    """A codec_parser request as the ensemble forwards it: the client's wire arrays."""
    units = chunk.access_units() if isinstance(chunk, Chunk) else [(chunk, 0.0)] if chunk else []
    settings = StreamSettings(codec=codec, source_fps=FPS, analysis_fps=2.0,
                              window_seconds=window_seconds, policy=policy)
    arrays = request_arrays(units, settings, chunk_seq=chunk_seq, token=token)
    if chunk_array is not None:
        arrays[CHUNK] = chunk_array
    model_inputs = {t.name for t in MODEL_TENSORS["codec_parser"]["input"]}
    return triton_stub.InferenceRequest({k: v for k, v in arrays.items() if k in model_inputs},
                                        correlation_id=stream_id, start=start, end=end)


def one(model, request):
    return model.execute([request])[0]


def refused(response, code, *texts):
    """Assert an error response with this Triton code whose message holds every text."""
    assert response.error is not None, "expected an error response"
    assert response.error.code == code, response.error
    for text in texts:
        assert text in response.error.message, response.error.message
    return response.error.message


# --- codec_parser ----------------------------------------------------------------------------

def test_codec_parser_answers_a_start_with_patches_and_its_stats(parser, chunks, tiny_dir):
    from codecsight.checkpoint import Geometry

    geometry = Geometry.from_model_dir(tiny_dir)
    model = parser()
    response = one(model, parse_request("cam-1", chunks[0], start=True))
    assert response.error is None, response.error
    patches, positions = response.outputs[PATCHES], response.outputs[POSITIONS]
    meta = response.outputs[FRAME_META]
    n = patches.shape[1]
    assert patches.shape == (1, n, geometry.patch_dim) and patches.dtype == np.float32
    assert positions.shape == (1, n, 3) and meta.shape[0] == 1 and meta.shape[2] == 8
    stats = response.json("PARSE_STATS")
    assert stats["stream"] == "cam-1" and stats["active_streams"] == 1
    assert stats["policy"] == "codec" and stats["frames_decoded"] == 25
    assert stats["patches_kept"] == n == 4 * stats["groups_kept"] > 0
    assert "cam-1" in model.streams


def test_the_whole_frame_timer_runs_at_most_the_streams_window(parser, chunks):
    model = parser()
    short = one(model, parse_request("short", chunks[0], start=True, window_seconds=1.0))
    long = one(model, parse_request("long", chunks[0], start=True, window_seconds=30.0))
    assert short.json("PARSE_STATS")["whole_frame_seconds"] == 1.0
    assert long.json("PARSE_STATS")["whole_frame_seconds"] == 8.0
    # 2 fps for 2 s: frames at 0, 0.56, 1.04, 1.52 s. A 1 s window keeps a whole frame at
    # the start and again once 1 s has passed; the served 8 s timer only at the start.
    assert short.json("PARSE_STATS")["whole_frames"] == {"start": 1, "timer": 1}
    assert long.json("PARSE_STATS")["whole_frames"] == {"start": 1}


def test_a_timer_of_zero_stays_zero_whatever_the_window(parser, chunks):
    model = parser(whole_frame_seconds=0)
    stats = one(model, parse_request("cam-0", chunks[0], start=True, window_seconds=1.0))
    assert stats.json("PARSE_STATS")["whole_frame_seconds"] == 0.0
    assert stats.json("PARSE_STATS")["whole_frames"] == {"start": 1}


def test_codec_parser_follows_start_continuation_and_end(parser, chunks):
    model = parser()
    assert one(model, parse_request("cam-2", chunks[0], start=True)).error is None
    middle = one(model, parse_request("cam-2", chunks[1], chunk_seq=1))
    assert middle.error is None and middle.json("PARSE_STATS")["frames_decoded"] > 0
    end = one(model, parse_request("cam-2", b"", end=True, chunk_seq=2))
    assert end.error is None and "cam-2" not in model.streams
    refused(one(model, parse_request("cam-2", chunks[1], chunk_seq=3)), "NOT_FOUND", "'cam-2'",
            "START")


def test_another_clients_start_is_already_exists_and_keeps_the_first_stream(parser, chunks):
    model = parser()
    one(model, parse_request("cam-3", chunks[0], start=True))
    refused(one(model, parse_request("cam-3", chunks[0], start=True, token="intruder")),
            "ALREADY_EXISTS", "'cam-3'", "already active")
    after = one(model, parse_request("cam-3", chunks[1], end=True, chunk_seq=1))
    assert after.error is None and after.json("PARSE_STATS")["decode_errors"] == 0


def test_warmup_is_a_dry_run_that_keeps_no_state(parser, chunks, stub):
    model = parser()
    response = one(model, parse_request(0, chunks[0]))   # CORRID 0, no flags: Triton's warmup
    assert response.error is None and response.json("PARSE_STATS")["frames_decoded"] == 25
    assert len(model.streams) == 0
    families = model.metrics._families["codecsight_frames_sampled_total"]
    assert families.metrics == {}   # a dry run is not counted


@pytest.mark.parametrize("make, texts", [
    (lambda c: parse_request("cam-x", c, start=True, policy="fast"), ("unknown policy 'fast'",)),
    (lambda c: parse_request("cam-x", b"", start=True), ("empty CHUNK",)),
    (lambda c: parse_request("cam-x", c, start=True, chunk_array=np.zeros((1, 8), np.int32)),
     ("CHUNK must be a uint8 tensor", "int32")),
    (lambda c: parse_request("cam-x", c, start=True, window_seconds=0.0),
     ("WINDOW_SECONDS must be positive",)),
    (lambda c: parse_request("cam-x", c, start=True, codec="bogus"), ("unknown codec 'bogus'",)),
    (lambda c: parse_request("../etc", c, start=True), ("invalid stream ID",)),
], ids=["policy", "empty", "dtype", "window", "codec", "stream-id"])
def test_codec_parser_refuses_bad_input_as_invalid_arg(parser, chunks, make, texts):
    model = parser()
    refused(one(model, make(chunks[0])), "INVALID_ARG", *texts)
    assert len(model.streams) == 0


def test_a_chunk_over_the_configured_cap_is_invalid_arg(parser, chunks):
    model = parser(max_chunk_bytes=1000)
    refused(one(model, parse_request("cam-big", chunks[0], start=True)), "INVALID_ARG",
            "'cam-big'", f"chunk of {len(chunks[0].data)} bytes is over the 1000-byte cap")


def test_an_unexpected_error_is_internal_logged_with_its_traceback_and_the_model_goes_on(
        parser, chunks, stub, monkeypatch):
    from codecsight.parser import StreamParser

    model = parser()

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    with monkeypatch.context() as patch:
        patch.setattr(StreamParser, "parse", broken)
        message = refused(one(model, parse_request("cam-bug", chunks[0], start=True)),
                          "INTERNAL", "'cam-bug'", "RuntimeError: decoder exploded")
    assert "Traceback" not in message   # the client gets the cause, the log the traceback
    errors = [m for level, m in stub.Logger.records if level == "error"]
    assert len(errors) == 1 and "cam-bug" in errors[0] and "Traceback" in errors[0]
    assert one(model, parse_request("cam-ok", chunks[0], start=True)).error is None


# --- codec_parser: ownership, chunk order, admission ----------------------------------------

def outputs_of(response):
    assert response.error is None, response.error
    return response.outputs[PATCHES], response.outputs[FRAME_META]


def test_an_intruders_continuation_and_end_are_refused_and_the_owner_goes_on_untouched(
        parser, chunks):
    model, control = parser(), parser()
    for m in (model, control):
        one(m, parse_request("cam-o", chunks[0], start=True, token="alice"))
    refused(one(model, parse_request("cam-o", chunks[1], chunk_seq=1, token="mallory")),
            "INVALID_ARG", "'cam-o'", "STREAM_TOKEN")
    refused(one(model, parse_request("cam-o", b"", end=True, chunk_seq=1, token="mallory")),
            "INVALID_ARG", "'cam-o'", "STREAM_TOKEN")
    assert "cam-o" in model.streams
    patches, meta = outputs_of(one(model, parse_request("cam-o", chunks[1], chunk_seq=1,
                                                        token="alice")))
    want_patches, want_meta = outputs_of(one(control, parse_request("cam-o", chunks[1],
                                                                    chunk_seq=1, token="alice")))
    assert len(meta[0]) > 0
    np.testing.assert_array_equal(meta, want_meta)
    np.testing.assert_array_equal(patches, want_patches)


def test_the_owners_start_replaces_its_active_stream_at_once(parser, chunks):
    model = parser()
    one(model, parse_request("cam-r", chunks[0], start=True, token="alice"))
    one(model, parse_request("cam-r", chunks[1], chunk_seq=1, token="alice"))
    again = one(model, parse_request("cam-r", chunks[0], start=True, chunk_seq=7, token="alice"))
    stats = again.json("PARSE_STATS")
    assert again.error is None and stats["owner_restart"] is True
    # A fresh decoder and timeline: the same frames as the stream's first START gave.
    assert stats["frames_decoded"] == 25 and again.outputs[FRAME_META][0][0][1] == 0
    assert one(model, parse_request("cam-r", chunks[1], chunk_seq=8, token="alice")).error is None


def test_an_exact_duplicate_chunk_is_dropped_and_the_stream_time_does_not_move(parser, chunks):
    model, control = parser(), parser()
    for m in (model, control):
        one(m, parse_request("cam-d", chunks[0], start=True))
    again = one(model, parse_request("cam-d", chunks[0], chunk_seq=0))
    stats = again.json("PARSE_STATS")
    assert again.error is None and stats["duplicate_chunk"] is True and stats["chunk_seq"] == 0
    assert stats["frames_decoded"] == 0 and again.outputs[PATCHES].shape[1] == 0
    assert again.outputs[FRAME_META].shape == (1, 0, 8)
    patches, meta = outputs_of(one(model, parse_request("cam-d", chunks[1], chunk_seq=1)))
    want_patches, want_meta = outputs_of(one(control, parse_request("cam-d", chunks[1],
                                                                    chunk_seq=1)))
    np.testing.assert_array_equal(meta, want_meta)      # same frame indices and times
    np.testing.assert_array_equal(patches, want_patches)


@pytest.mark.parametrize("seq, texts", [(2, ("chunk 2 is a gap", "expected chunk 1")),
                                        (-1, ("chunk -1 is out of order", "expected chunk 1"))],
                         ids=["gap", "reorder"])
def test_a_gap_or_reorder_is_invalid_arg_and_the_stream_goes_on(parser, chunks, seq, texts):
    model = parser()
    one(model, parse_request("cam-g", chunks[0], start=True))
    refused(one(model, parse_request("cam-g", chunks[1], chunk_seq=seq)), "INVALID_ARG",
            "'cam-g'", *texts)
    after = one(model, parse_request("cam-g", chunks[1], chunk_seq=1))
    assert after.error is None and after.json("PARSE_STATS")["frames_decoded"] == 25


def test_stats_echo_the_chunk_number_and_count_time_jumps(parser, chunks):
    from codecsight.protocol import TIME_JUMP

    model = parser()
    one(model, parse_request("cam-j", chunks[0], start=True))
    request = parse_request("cam-j", chunks[1], chunk_seq=1)
    request.inputs[TIME_JUMP] = triton_stub.Tensor(TIME_JUMP, np.array([[-7.5]], np.float64))
    stats = one(model, request).json("PARSE_STATS")
    assert (stats["chunk_seq"], stats["time_jump"], stats["time_jumps"]) == (1, -7.5, 1)
    stats = one(model, parse_request("cam-j", b"", end=True, chunk_seq=2)).json("PARSE_STATS")
    assert (stats["chunk_seq"], stats["time_jump"], stats["time_jumps"]) == (2, 0.0, 1)


def test_a_start_beyond_max_streams_is_unavailable_and_admitted_after_an_end(parser, chunks):
    model = parser(max_streams=2)
    for sid in ("cam-1", "cam-2"):
        assert one(model, parse_request(sid, chunks[0], start=True)).error is None
    refused(one(model, parse_request("cam-3", chunks[0], start=True)), "UNAVAILABLE",
            "'cam-3'", "max_streams=2")
    assert "cam-3" not in model.streams
    one(model, parse_request("cam-1", b"", end=True, chunk_seq=1))
    assert one(model, parse_request("cam-3", chunks[0], start=True)).error is None


def test_a_failed_start_leaves_no_state_and_the_retry_is_accepted(parser, chunks, monkeypatch):
    from codecsight.parser import StreamParser
    from codecsight.protocol import InvalidRequest

    model = parser()
    real = StreamParser.parse

    def too_large(self, *args, **kwargs):
        raise InvalidRequest("cam-f", "frame too large")

    monkeypatch.setattr(StreamParser, "parse", too_large)
    refused(one(model, parse_request("cam-f", chunks[0], start=True)), "INVALID_ARG",
            "frame too large")
    assert "cam-f" not in model.streams and len(model.streams) == 0
    monkeypatch.setattr(StreamParser, "parse", real)
    # Even another client's START: nothing of the failed one is left to refuse it.
    assert one(model, parse_request("cam-f", chunks[0], start=True, token="other")).error is None


def sequence_config(model, tiny_dir, **batching):
    """initialize()'s args for a model, its sequence_batching fields replaced."""
    import json

    args = triton_stub.model_args(model, model_dir=tiny_dir)
    config = json.loads(args["model_config"])
    for key, value in batching.items():
        if key == "max_candidate_sequences":
            config["sequence_batching"]["oldest"][key] = value
        else:
            config["sequence_batching"][key] = value
    args["model_config"] = json.dumps(config)
    return args


@pytest.mark.parametrize("model", ["codec_parser", "llm_prefill"])
def test_a_ttl_shorter_than_the_batchers_idle_timeout_refuses_to_load(stub, tiny_dir, model):
    args = sequence_config(model, tiny_dir, max_sequence_idle_microseconds="120000000")
    instance = triton_stub.load_model(model, stub).TritonPythonModel()
    with pytest.raises(ValueError, match=rf"'{model}'.*state_ttl_seconds=60 .*"
                                         r"max_sequence_idle_microseconds=120000000"):
        instance.initialize(args)


def test_max_streams_not_below_the_batchers_candidates_refuses_to_load(stub, tiny_dir):
    args = sequence_config("codec_parser", tiny_dir, max_candidate_sequences=96)
    instance = triton_stub.load_model("codec_parser", stub).TritonPythonModel()
    with pytest.raises(ValueError, match=r"max_streams=96 must be below.*"
                                         r"max_candidate_sequences=96"):
        instance.initialize(args)


def test_the_served_cap_is_below_both_batchers_candidates():
    """codec_parser checks its own batcher at load; llm_prefill serves the same streams, so
    its batcher must leave a START over the cap a slot too (it cannot see max_streams)."""
    import json

    from codecsight import backend
    from codecsight.params import served_parameters

    cap = served_parameters("codec_parser")["max_streams"]
    for model in ("codec_parser", "llm_prefill"):
        config = json.loads(triton_stub.model_args(model)["model_config"])
        _, candidates = backend.sequence_batching(model, config)
        assert cap < candidates, (model, cap, candidates)


# --- vit_pruned ------------------------------------------------------------------------------

@pytest.fixture
def vit(stub, onnx_path, tiny_dir):
    def make(**parameters):
        model = triton_stub.load_model("vit_pruned", stub).TritonPythonModel()
        # model_dir: the checkpoint the ONNX file was exported from (it names the family);
        # the repository moves to onnx_path's directory, where no ../models lies.
        parameters.setdefault("model_dir", tiny_dir)
        args = triton_stub.model_args("vit_pruned", config_name="cpu", **parameters)
        # onnx_path is <dir>/<name>/model.onnx: the adapter looks in <repository>/<version>.
        args.update(model_repository=str(onnx_path.parent.parent),
                    model_version=onnx_path.parent.name)
        model.initialize(args)
        return model
    return make


def vit_request(stream_id, patches, positions):
    return triton_stub.InferenceRequest({PATCHES: patches[None], POSITIONS: positions[None]},
                                        correlation_id=stream_id)


@pytest.fixture
def parsed(parser, chunks):
    """codec_parser's first response of a stream: (patches [N, D], positions [N, 3], meta)."""
    response = one(parser(), parse_request("cam-v", chunks[0], start=True, policy="dense"))
    return (response.outputs[PATCHES][0], response.outputs[POSITIONS][0],
            response.outputs[FRAME_META][0])


def test_vit_pruned_turns_patches_into_one_token_per_merge_group(vit, parsed):
    patches, positions, _ = parsed
    response = one(vit(), vit_request("cam-v", patches, positions))
    assert response.error is None, response.error
    tokens = response.outputs[TOKENS]
    assert tokens.shape[:2] == (1, len(patches) // 4) and tokens.dtype == np.float32


def test_vit_pruned_refuses_a_bad_set_alone_and_encodes_the_others(vit, parsed):
    patches, positions, _ = parsed
    model = vit()
    alone = one(model, vit_request("good", patches, positions)).outputs[TOKENS]
    bad = vit_request("bad", patches[:3], positions[:3])
    responses = model.execute([vit_request("good", patches, positions), bad])
    np.testing.assert_allclose(responses[0].outputs[TOKENS], alone, rtol=1e-5, atol=1e-6)
    refused(responses[1], "INVALID_ARG", "'bad'", "3 patches is not a whole number")


@pytest.mark.parametrize("cut, texts", [
    (lambda p, q: (p.astype(np.float64), q), ("PATCHES must be a float32 tensor",)),
    (lambda p, q: (p[:, :-1], q), ("PATCHES rows must be",)),
    (lambda p, q: (p, q[:-4]), ("POSITIONS has",)),
], ids=["dtype", "patch-width", "positions-rows"])
def test_vit_pruned_refuses_bad_tensors_as_invalid_arg(vit, parsed, cut, texts):
    patches, positions, _ = parsed
    refused(one(vit(), vit_request("cam-t", *cut(patches, positions))), "INVALID_ARG",
            "'cam-t'", *texts)


def test_a_frame_over_max_patches_is_invalid_arg_naming_the_limit(vit, parsed):
    patches, positions, meta = parsed
    first = positions[:, 0] == positions[0, 0]
    refused(one(vit(max_patches=8), vit_request("cam-m", patches[first], positions[first])),
            "INVALID_ARG", f"a frame of {int(first.sum())} patches", "max_patches=8")


# --- llm_prefill -----------------------------------------------------------------------------

@pytest.fixture
def llm(stub, tiny_dir):
    def make(**parameters):
        model = triton_stub.load_model("llm_prefill", stub).TritonPythonModel()
        model.initialize(triton_stub.model_args("llm_prefill", model_dir=tiny_dir,
                                                max_new_tokens=2, **parameters))
        return model
    return make


@pytest.fixture
def visual(vit, parsed):
    """(tokens, positions, meta) of one request, as the ensemble hands them to llm_prefill."""
    patches, positions, meta = parsed
    tokens = one(vit(), vit_request("cam-v", patches, positions)).outputs[TOKENS][0]
    return tokens, positions, meta


def llm_request(stream_id, visual, start=False, end=False, question="is anything moving?",
                refresh="", window_seconds=4.0, tokens=None):
    tokens_, positions, meta = visual
    return triton_stub.InferenceRequest({
        TOKENS: (tokens_ if tokens is None else tokens)[None], POSITIONS: positions[None],
        FRAME_META: meta[None], QUESTION: bytes_scalar(question),
        REFRESH: bytes_scalar(refresh), WINDOW_SECONDS: np.array([[window_seconds]], np.float32),
    }, correlation_id=stream_id, start=start, end=end)


def test_llm_prefill_answers_a_window_and_follows_the_stream_to_its_end(llm, visual):
    model = llm()
    first = one(model, llm_request("cam-l", visual, start=True))
    assert first.error is None, first.error
    stats = first.json("LLM_STATS")
    assert stats["stream"] == "cam-l" and stats["refresh"] == "selective"
    assert stats["visual_tokens"] == len(visual[0]) and stats["batch_size"] == 1
    assert first.string("ANSWER")
    empty = (visual[0][:0], visual[1][:0], visual[2][:0])
    assert one(model, llm_request("cam-l", empty, end=True)).error is None
    assert len(model.streams) == 0
    refused(one(model, llm_request("cam-l", empty)), "NOT_FOUND", "'cam-l'", "START")


def test_llm_prefill_warmup_is_a_dry_run(llm, visual):
    model = llm()
    response = one(model, llm_request(0, visual))
    assert response.error is None and len(model.streams) == 0


@pytest.mark.parametrize("overrides, texts", [
    (dict(refresh="lazy"), ("unknown refresh policy 'lazy'",)),
    (dict(question=" ".join(["is"] * 200)), ("question is", "tokens, over the limit of 64")),
    (dict(window_seconds=-1.0), ("WINDOW_SECONDS must be positive",)),
    (dict(tokens=np.zeros((4, 8), np.float64)), ("TOKENS must be a float32 tensor",)),
], ids=["refresh", "question", "window", "dtype"])
def test_llm_prefill_refuses_bad_input_as_invalid_arg(llm, visual, overrides, texts):
    model = llm()
    refused(one(model, llm_request("cam-q", visual, start=True, **overrides)), "INVALID_ARG",
            "'cam-q'", *texts)
    assert len(model.streams) == 0


def test_llm_prefill_keeps_no_state_of_a_start_that_failed(llm, visual, monkeypatch):
    from codecsight.llm import VisualLM

    model = llm()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(VisualLM, "answer_batch", broken)   # the (batched) forward fails
        refused(one(model, llm_request("cam-s", visual, start=True)), "INTERNAL", "'cam-s'")
    assert len(model.streams) == 0
    empty = (visual[0][:0], visual[1][:0], visual[2][:0])
    refused(one(model, llm_request("cam-s", empty)), "NOT_FOUND", "'cam-s'", "START")


def test_a_missing_config_parameter_fails_initialize_naming_model_and_key(stub, tiny_dir):
    import json

    args = triton_stub.model_args("llm_prefill", model_dir=tiny_dir)
    config = json.loads(args["model_config"])
    del config["parameters"]["max_new_tokens"]
    args["model_config"] = json.dumps(config)
    model = triton_stub.load_model("llm_prefill", stub).TritonPythonModel()
    with pytest.raises(ValueError, match=r"'llm_prefill'.*lacks.*\['max_new_tokens'\]"):
        model.initialize(args)


def test_a_late_chunk_of_a_session_its_owner_restarted_says_why_it_is_refused(parser, chunks):
    """Two processes with one stream ID and one client secret: the second's START takes the
    stream over; the first's next chunk is refused as out of order, saying so."""
    model = parser()
    assert one(model, parse_request("cam-twice", chunks[0], start=True)).error is None
    assert one(model, parse_request("cam-twice", chunks[1], chunk_seq=1)).error is None
    restarted = one(model, parse_request("cam-twice", chunks[0], start=True))
    assert restarted.error is None and restarted.json("PARSE_STATS")["owner_restart"]
    refused(one(model, parse_request("cam-twice", chunks[1], chunk_seq=2)), "INVALID_ARG",
            "expected chunk 1", "restarted", "same stream ID and client secret")


def test_a_refusal_leaves_a_warning_in_the_log_naming_the_stream(parser, chunks, stub):
    model = parser()
    one(model, parse_request("cam-logged", chunks[0], start=True))
    one(model, parse_request("cam-logged", chunks[1], chunk_seq=1, token="not the owner"))
    warnings = [m for level, m in stub.Logger.records if level == "warn"]
    assert any("refused (INVALID_ARG)" in m and "'cam-logged'" in m and "STREAM_TOKEN" in m
               for m in warnings), warnings
