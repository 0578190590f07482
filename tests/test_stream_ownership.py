"""Stream ownership, chunk order and admission, with real clients against a real server.

What Triton's sequence batcher does (tritonserver 2.51, checked here):
- An END ends the sequence's slot in the batcher whatever the model answers: after an
  intruder's refused END, the owner's next request is refused by the batcher itself
  ("must specify the START flag"), and the owner resumes with START and its own token,
  which codec_parser accepts at once (the owner's START replaces its stream).
- Another client's START for an active ID is refused by codec_parser (ALREADY_EXISTS) and
  does not disturb the owner's slot: the owner's continuations go on.
- A refused START keeps its sequence slot until its client sends END or the idle timeout
  passes; with every slot taken a further START waits in the backlog. A START its client
  gave up on while queued there still runs later (the ensemble does not pass the
  cancellation on); the END the client sends after giving up queues behind it and frees
  whatever it made.
"""
import threading
import time

import pytest
from tritonclient.utils import InferenceServerException

from codecsight_client.demux import iter_chunks
from codecsight_client.stream import StreamClient, connect, state_lost
from streams import CLIP, clip_settings, new_id

pytestmark = pytest.mark.server



@pytest.fixture(scope="module")
def chunks():
    """The clip's first four 2 s chunks, as demux.Chunk (each starts at a keyframe or not)."""
    return list(iter_chunks(CLIP, 2.0))[:4]


def camera(grpc, stream_id, token, notices=None, **overrides):
    return StreamClient(grpc, stream_id, clip_settings(**overrides), reconnect_s=0, token=token,
                        notice=(notices.append if notices is not None else lambda m: None))


def refusal(send) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        send()
    return info.value


def intruder(grpc, stream_id, next_seq):
    """A second client that claims a running stream: continuation, no START."""
    other = camera(grpc, stream_id, token="mallory")
    other.started, other.next_seq = True, next_seq
    return other


# --- ownership ------------------------------------------------------------------------------

def test_another_clients_chunk_is_refused_and_the_owners_next_window_is_unchanged(
        grpc, chunks):
    sid, control_id = new_id("owned"), new_id("control")
    owner, control = camera(grpc, sid, "alice"), camera(grpc, control_id, "carol")
    owner.send(chunks[0])
    control.send(chunks[0])
    error = refusal(lambda: intruder(grpc, sid, 1).send_once(chunks[1]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and not state_lost(error)
    assert sid in error.message() and "STREAM_TOKEN" in error.message()
    got, want = owner.send(chunks[1]), control.send(chunks[1])
    assert owner.resumes == 0 and got.parse.chunk_seq == 1
    assert got.parse.frames_decoded == want.parse.frames_decoded > 0
    assert got.parse.groups_kept_per_frame == want.parse.groups_kept_per_frame
    assert got.llm.window_frame_range == want.llm.window_frame_range
    assert got.answer == want.answer != ""
    owner.send(chunks[2], last=True)
    control.send(chunks[2], last=True)


def test_another_clients_end_is_refused_and_the_owner_takes_its_stream_back(grpc, chunks):
    sid, notices = new_id("ended"), []
    owner = camera(grpc, sid, "alice", notices)
    owner.send(chunks[0])
    error = refusal(lambda: intruder(grpc, sid, 1).send_once(b"", last=True))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "STREAM_TOKEN" in error.message()
    # The batcher ended the slot on that END anyway: the owner's next request is refused
    # by the batcher, the client resumes with START and its token, codec_parser replaces
    # the stream it still holds for that token.
    window = owner.send(chunks[1])
    assert owner.resumes == 1 and any("lost its state" in n for n in notices)
    assert window.parse.owner_restart and window.parse.frames_decoded > 0 and window.answer
    last = owner.send(chunks[2], last=True)
    assert last.parse.chunk_seq == window.parse.chunk_seq + 1 and not last.parse.owner_restart


def test_another_clients_start_is_already_exists_and_the_owner_goes_on(grpc, chunks):
    sid = new_id("claimed")
    owner = camera(grpc, sid, "alice")
    owner.send(chunks[0])
    error = refusal(lambda: camera(grpc, sid, "mallory").send_once(chunks[0]))
    assert error.status() == "StatusCode.ALREADY_EXISTS" and sid in error.message()
    window = owner.send(chunks[1], last=True)
    assert owner.resumes == 0 and window.parse.chunk_seq == 1 and window.parse.frames_decoded


def test_a_start_refused_by_llm_prefill_is_retried_at_once_by_its_owner(grpc, chunks):
    sid = new_id("retry")
    client = camera(grpc, sid, "alice", refresh="lazy")
    error = refusal(lambda: client.send_once(chunks[0]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "llm_prefill" in error.message()
    client.settings.refresh = ""            # corrected; same client, same token, START again
    client.next_seq = 0
    window = client.send_once(chunks[0])
    # codec_parser had kept the first START (the ensemble failed after it): replaced at once.
    assert window.parse.owner_restart and window.answer
    client.send_once(chunks[1], last=True)


# --- chunk order ----------------------------------------------------------------------------

def test_a_resent_chunk_is_dropped_and_its_window_answered_again(grpc, chunks):
    sid = new_id("dup")
    client = camera(grpc, sid, "alice")
    client.send(chunks[0])
    first = client.send(chunks[1])
    client.next_seq -= 1                    # a proxy re-sends the request it timed out on
    again = client.send_once(chunks[1])
    assert again.parse.duplicate_chunk and again.parse.chunk_seq == 1
    assert again.parse.frames_decoded == 0 and again.llm.frames_added == 0
    assert again.llm.window_frame_range == first.llm.window_frame_range and again.answer
    after = client.send(chunks[2], last=True)
    assert not after.parse.duplicate_chunk and after.parse.frames_decoded > 0
    assert after.llm.window_frame_range[1] > first.llm.window_frame_range[1]


def test_a_gap_is_refused_naming_the_chunk_expected(grpc, chunks):
    sid = new_id("gap")
    client = camera(grpc, sid, "alice")
    client.send(chunks[0])
    client.next_seq = 2                     # chunk 1 lost on the way
    error = refusal(lambda: client.send_once(chunks[2]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and not state_lost(error)
    assert sid in error.message() and "expected chunk 1" in error.message()
    client.next_seq = 1
    assert client.send(chunks[1], last=True).parse.frames_decoded > 0


# --- admission ------------------------------------------------------------------------------

MAX_STREAMS = 2   # conftest.CAPPED_STREAMS: the capped_server fixture's cap


@pytest.fixture(scope="module")
def capped(capped_server):
    """A gRPC client of the session's second server, whose codec_parser admits MAX_STREAMS
    streams with one spare sequence slot per batcher."""
    return connect(capped_server.grpc_url)


def test_a_camera_over_the_cap_is_refused_at_once_and_admitted_after_one_ends(capped, chunks):
    first, second = (camera(capped, new_id(f"cam{i}"), "t") for i in (1, 2))
    first.send(chunks[0])
    second.send(chunks[0])
    third = camera(capped, new_id("cam3"), "t")
    t0 = time.monotonic()
    error = refusal(lambda: third.send_once(chunks[0]))
    assert time.monotonic() - t0 < 5.0
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert third.stream_id in error.message() and f"max_streams={MAX_STREAMS}" in error.message()
    # The refused START holds a sequence slot until its END (which finds no state).
    third.started = True
    assert refusal(lambda: third.send_once(b"", last=True)).status() == "StatusCode.NOT_FOUND"
    first.send(chunks[1], last=True)
    third.started, third.next_seq = False, 0
    assert third.send(chunks[0]).parse.frames_decoded > 0
    second.send(chunks[1], last=True)
    third.send(chunks[1], last=True)


def test_a_start_its_client_gave_up_on_leaves_nothing_once_its_end_follows(capped, chunks):
    first, second = (camera(capped, new_id(f"busy{i}"), "t") for i in (1, 2))
    first.send(chunks[0])
    second.send(chunks[0])
    refused_id = new_id("refused")
    refused = camera(capped, refused_id, "t")
    refusal(lambda: refused.send_once(chunks[0]))          # over the cap: holds the spare slot
    late = camera(capped, new_id("late"), "mine")
    late.timeout_s = 2
    assert refusal(lambda: late.send_once(chunks[0])).status() == "StatusCode.DEADLINE_EXCEEDED"
    # The client gives up and sends END; it queues behind its own START.
    late.started, late.timeout_s = True, 60
    ended = []

    def close():
        try:
            late.send_once(b"", last=True)
        except InferenceServerException as e:
            ended.append(e)

    closer = threading.Thread(target=close)
    closer.start()
    first.send(chunks[1], last=True)        # frees a slot and a place: the late START runs
    closer.join(60)
    # The late START ran in codec_parser only (the ensemble had given it up), so the END
    # closed codec_parser's state and then met llm_prefill's batcher, which never saw START.
    assert not closer.is_alive() and len(ended) == 1
    assert "llm_prefill" in ended[0].message() and "START" in ended[0].message()
    # Nothing is left under the late ID: another client may start it at once.
    fresh = camera(capped, late.stream_id, "someone-else")
    assert fresh.send(chunks[0]).parse.frames_decoded > 0
    refused.started = True
    refusal(lambda: refused.send_once(b"", last=True))
    second.send(chunks[1], last=True)
    fresh.send(chunks[1], last=True)
