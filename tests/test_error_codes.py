"""Error codes on the wire: what a gRPC client gets through the ensemble from a real server.

A program acts on `InferenceServerException.status()`, never on message text; the one
exception is the sequence batcher's own answer to a sequence it does not know (it answers
before any model runs, with INVALID_ARGUMENT and "must specify the START flag").
"""

import pytest
from tritonclient.utils import InferenceServerException

from codecsight_client.demux import iter_chunks
from codecsight_client.stream import StreamClient, state_lost
from streams import CLIP, clip_settings, new_id

pytestmark = pytest.mark.server



@pytest.fixture(scope="module")
def chunks():
    return [c.data for c in iter_chunks(CLIP, 4.0)][:2]


def error_of(grpc, stream_id, chunk, start, end=False, **overrides) -> InferenceServerException:
    """The error the ensemble answers one raw request with (no resume, no retry)."""
    stream = StreamClient(grpc, stream_id, clip_settings(**overrides), reconnect_s=0)
    stream.started = not start
    with pytest.raises(InferenceServerException) as info:
        stream.send_once(chunk, end)
    assert stream_id in info.value.message()   # the models name the stream
    return info.value


def test_a_duplicate_start_is_already_exists(grpc, chunks):
    sid = new_id("dup")
    StreamClient(grpc, sid, clip_settings()).send(chunks[0])
    error = error_of(grpc, sid, chunks[0], start=True)
    assert error.status() == "StatusCode.ALREADY_EXISTS"
    assert not state_lost(error)


def test_a_stream_whose_state_is_gone_is_not_found_and_counts_as_lost(grpc, chunks):
    # A refused START leaves the sequence known to the batcher but without state in
    # codec_parser: the next request reaches the model, which answers NOT_FOUND.
    sid = new_id("gone")
    assert error_of(grpc, sid, b"", start=True).status() == "StatusCode.INVALID_ARGUMENT"
    error = error_of(grpc, sid, chunks[0], start=False)
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "START" in error.message() and state_lost(error)


def test_a_sequence_the_batcher_does_not_know_is_its_own_invalid_argument(grpc, chunks):
    error = error_of(grpc, new_id("unknown"), chunks[0], start=False)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify the START flag" in error.message() and state_lost(error)


@pytest.mark.parametrize("chunk, overrides", [
    (b"", {}),                                   # empty without END
    (bytes(33 * 1024 * 1024), {}),               # over max_chunk_bytes (32 MiB)
    (None, {"policy": "fast"}),                  # an unknown patch policy
    (None, {"refresh": "lazy"}),                 # an unknown KV refresh policy
    (None, {"codec": "bogus"}),                  # a codec FFmpeg cannot decode
], ids=["empty-chunk", "oversized-chunk", "bad-policy", "bad-refresh", "bad-codec"])
def test_bad_input_is_invalid_argument_and_not_a_lost_stream(grpc, chunks, chunk, overrides):
    error = error_of(grpc, new_id("bad"), chunks[0] if chunk is None else chunk, start=True,
                     **overrides)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert not state_lost(error)


def test_the_client_resumes_a_stream_the_server_lost_from_its_code(grpc, chunks):
    notices = []
    sid = new_id("resume")
    # Its START was refused before codec_parser kept anything: the next request is a
    # NOT_FOUND, and the client restarts the stream with START.
    assert error_of(grpc, sid, b"", start=True).status() == "StatusCode.INVALID_ARGUMENT"
    stream = StreamClient(grpc, sid, clip_settings(), notice=notices.append)
    stream.started = True
    window = stream.send(chunks[1], last=True)
    assert stream.resumes == 1 and window.answer
    assert any("lost its state" in n for n in notices)
