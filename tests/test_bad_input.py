"""Bad input against the real server: each gets a clear error naming the stream and the
problem (or, for damaged video, a report in the metadata), and nothing reaches another stream.
"""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from codecsight_client.stream import StreamClient, run_stream
from codecsight import protocol as P
from codecsight_client.demux import iter_chunks
from streams import CLIP, clip_settings, new_id

pytestmark = pytest.mark.server

STRIDE_S = 4.0


@pytest.fixture(scope="module")
def chunks():
    return list(iter_chunks(CLIP, STRIDE_S))


def raw_infer(grpc, stream_id, inputs, start=True, end=True):
    return grpc.infer("ensemble", inputs, request_id=stream_id, sequence_id=stream_id,
                      sequence_start=start, sequence_end=end)


def refused(grpc, stream_id, chunk, match, start=True, end=False, **overrides):
    stream = StreamClient(grpc, stream_id, clip_settings(**overrides), reconnect_s=0)
    stream.started = not start
    with pytest.raises(InferenceServerException, match=match) as info:
        stream.send_once(chunk, end)
    assert stream_id in str(info.value)
    return str(info.value)


def test_a_truncated_chunk_is_reported_and_the_stream_carries_on(grpc, chunks):
    stream = StreamClient(grpc, new_id("truncated"), clip_settings())
    stream.send(chunks[0])
    cut = chunks[1].data[: len(chunks[1].data) // 2 + 7]  # ends inside an access unit
    damaged = stream.send(cut)
    assert damaged.parse.decode_errors >= 1 and damaged.parse.decode_error is not None
    after = stream.send(chunks[2], last=True)
    assert after.parse.frames_decoded > 0 and after.answer


def test_flipped_bytes_are_reported_and_the_stream_carries_on(grpc, chunks):
    stream = StreamClient(grpc, new_id("corrupt"), clip_settings())
    stream.send(chunks[0])
    data = bytearray(chunks[1].data)
    rng = np.random.default_rng(0)
    for i in rng.integers(1000, len(data) - 1000, 200):
        data[i] ^= 0xFF
    damaged = stream.send(bytes(data))
    assert damaged.parse.decode_errors >= 1
    after = stream.send(chunks[2], last=True)
    assert after.parse.frames_decoded > 0


def test_random_bytes_decode_to_nothing_and_say_so(grpc):
    noise = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    window = StreamClient(grpc, new_id("noise"), clip_settings()).send(noise, last=True)
    assert window.parse.frames_decoded == 0 and window.parse.decode_errors >= 1


def test_an_empty_chunk_is_refused_unless_it_ends_the_stream(grpc, chunks):
    refused(grpc, new_id("empty"), b"", r"empty CHUNK")
    stream = StreamClient(grpc, new_id("empty-end"), clip_settings())
    opened = stream.send(chunks[0])
    closed = stream.send(b"", last=True)
    # Accepted: the stream ends cleanly, its window answered and its state freed.
    assert closed.parse.decode_errors == 0 and closed.answer
    assert closed.parse.active_streams == opened.parse.active_streams - 1
    assert closed.llm.active_streams == opened.llm.active_streams - 1


def test_a_chunk_over_the_size_cap_is_refused(grpc):
    refused(grpc, new_id("huge"), bytes(33 * 1024 * 1024), r"over the \d+-byte cap")


def test_an_unknown_codec_is_refused(grpc, chunks):
    refused(grpc, new_id("codec"), chunks[0].data, r"codec 'bogus'", codec="bogus")


def test_wrong_dtype_and_shape_are_refused_naming_the_stream(grpc, chunks):
    sid = new_id("dtype")
    inputs = StreamClient(grpc, sid, clip_settings()).inputs(chunks[0].data)
    inputs[0] = grpcclient.InferInput(P.CHUNK, [1, 4], "INT32")
    inputs[0].set_data_from_numpy(np.zeros((1, 4), np.int32))
    with pytest.raises(InferenceServerException, match=rf"{sid}.*CHUNK.*INT32.*UINT8"):
        raw_infer(grpc, sid, inputs)
    inputs = StreamClient(grpc, sid, clip_settings()).inputs(chunks[0].data)
    inputs[2] = grpcclient.InferInput(P.SOURCE_FPS, [1, 2], "FP32")
    inputs[2].set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException, match=rf"{sid}.*shape.*SOURCE_FPS"):
        raw_infer(grpc, sid, inputs)


def test_a_request_without_a_stream_id_is_refused(grpc, chunks):
    inputs = StreamClient(grpc, "x", clip_settings()).inputs(chunks[0].data)
    with pytest.raises(InferenceServerException, match=r"correlation ID"):
        grpc.infer("ensemble", inputs)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a" * 200, "cam 1", "-dash"])
def test_stream_ids_are_validated(grpc, chunks, bad_id):
    inputs = StreamClient(grpc, "x", clip_settings()).inputs(chunks[0].data)
    # Triton itself refuses IDs over 128 characters; codec_parser refuses the rest.
    with pytest.raises(InferenceServerException,
                       match=r"invalid stream ID|correlation ID cannot be longer than 128"):
        raw_infer(grpc, bad_id, inputs)


def test_a_duplicate_start_is_refused_and_leaves_the_first_stream_intact(grpc, chunks):
    sid = new_id("dup")
    first = StreamClient(grpc, sid, clip_settings())
    first.send(chunks[0])
    refused(grpc, sid, chunks[0].data, r"already active")
    # The first client's stream goes on: its decoder continues mid-GOP without a keyframe,
    # which a fresh decoder could not do (it would drop frames until the next IDR).
    after = first.send(chunks[1], last=True)
    assert after.parse.frames_decoded == 50 and after.parse.decode_errors == 0


def test_a_question_over_the_token_limit_is_refused(grpc, chunks):
    refused(grpc, new_id("long-q"), chunks[0].data, r"question is \d+ tokens, over the limit",
            question=" ".join(["is"] * 200))


def test_an_unknown_policy_is_refused(grpc, chunks):
    refused(grpc, new_id("policy"), chunks[0].data, r"unknown policy 'fast'", policy="fast")


def test_a_good_stream_beside_bad_ones_answers_as_alone(server, grpc, chunks):
    import concurrent.futures

    from codecsight_client.stream import connect

    solo = run_stream(grpc, new_id("solo"), clip_settings(), iter(chunks[:4]))

    def bad(i):
        noise = np.random.default_rng(i).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
        client = connect(server.grpc_url)
        for attempt in (lambda: StreamClient(client, new_id("bad"), clip_settings()).send(noise),
                        lambda: refused(client, new_id("bad"), b"", "empty CHUNK"),
                        lambda: refused(client, new_id("bad"), chunks[0].data, "unknown policy",
                                        policy="x")):
            attempt()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        good = pool.submit(run_stream, connect(server.grpc_url), new_id("good"), clip_settings(),
                           iter(chunks[:4]))
        for f in [pool.submit(bad, i) for i in range(4)]:
            f.result()
        beside = good.result()
    assert [w.answer for w in beside] == [w.answer for w in solo]
    assert grpc.is_server_live() and grpc.is_model_ready("ensemble")
