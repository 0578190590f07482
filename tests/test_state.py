import pytest

from codecsight.protocol import (InvalidRequest, StreamAlreadyActive, StreamError,
                                 StreamNotFound, StreamNotOwned, StreamsFull)
from codecsight.state import ChunkOrder, StreamStates


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(ttl=10.0, cap=1000, clock=None, max_streams=None):
    return StreamStates(ttl, cap, size_of=lambda s: s, clock=clock or Clock(),
                        max_streams=max_streams)


def test_start_then_get_returns_the_state():
    states = make()
    states.start("cam-1", 5)
    assert states.get("cam-1") == 5
    assert len(states) == 1


def test_end_frees_the_state_and_a_later_request_must_restart():
    states = make()
    states.start("cam-1", 5)
    states.end("cam-1")
    assert len(states) == 0 and "cam-1" not in states
    with pytest.raises(StreamNotFound, match="'cam-1'.*no state.*START") as info:
        states.get("cam-1")
    assert info.value.code == "NOT_FOUND" and isinstance(info.value, StreamError)


def test_idle_streams_are_evicted_after_the_ttl_and_told_why():
    clock = Clock()
    states = make(ttl=10.0, clock=clock)
    states.start("idle", 1)
    states.start("busy", 1)
    clock.now = 8.0
    states.get("busy")
    clock.now = 12.0
    assert states.expire() == ["idle"]
    assert "busy" in states
    with pytest.raises(StreamNotFound, match=r"'idle'.*evicted after 10 s idle.*START"):
        states.get("idle")


def test_least_recently_used_streams_go_first_when_over_the_byte_cap():
    states = make(cap=250)
    states.start("a", 100)
    states.start("b", 100)
    states.get("a")                 # b is now the least recently used
    states.start("c", 100)          # 300 bytes > 250
    assert "b" not in states and "a" in states and "c" in states
    with pytest.raises(StreamNotFound, match="'b'.*under 250 bytes"):
        states.get("b")


def test_a_start_for_an_active_stream_is_refused_and_keeps_its_state():
    states = make()
    states.start("cam-1", 1)
    with pytest.raises(StreamAlreadyActive, match="'cam-1'.*already active.*END") as info:
        states.start("cam-1", 2)
    assert info.value.code == "ALREADY_EXISTS"
    assert states.get("cam-1") == 1


def test_replace_installs_fresh_state_over_an_active_stream():
    states = make()
    states.start("cam-1", 1)
    states.start("cam-1", 2, replace=True)
    assert states.get("cam-1") == 2 and len(states) == 1


def test_a_stream_can_start_again_after_it_expired():
    clock = Clock()
    states = make(ttl=10.0, clock=clock)
    states.start("cam-1", 1)
    clock.now = 11.0
    assert states.start("cam-1", 2) == 2


# --- ownership: the token bound at START ----------------------------------------------------

def test_only_the_token_bound_at_start_may_use_the_stream():
    states = make()
    states.start("cam-1", 1, owner="alice")
    assert states.get("cam-1", owner="alice") == 1
    with pytest.raises(StreamNotOwned, match="'cam-1'.*STREAM_TOKEN.*another client") as info:
        states.get("cam-1", owner="mallory")
    assert info.value.code == "INVALID_ARG"
    assert states.get("cam-1", owner="alice") == 1


def test_a_refused_intruder_does_not_keep_the_owners_stream_alive():
    clock = Clock()
    states = make(ttl=10.0, clock=clock)
    states.start("cam-1", 1, owner="alice")
    clock.now = 8.0
    with pytest.raises(StreamNotOwned):
        states.get("cam-1", owner="mallory")
    clock.now = 12.0               # 12 s after the owner's last request, not 4 s
    assert states.expire() == ["cam-1"]


def test_the_owners_start_replaces_its_active_stream_at_once():
    states = make()
    states.start("cam-1", 1, owner="alice")
    assert states.start("cam-1", 2, owner="alice") == 2
    assert states.get("cam-1", owner="alice") == 2 and len(states) == 1


def test_another_tokens_start_is_already_exists_and_keeps_the_owner():
    states = make()
    states.start("cam-1", 1, owner="alice")
    with pytest.raises(StreamAlreadyActive, match="'cam-1'.*another owner"):
        states.start("cam-1", 2, owner="mallory")
    assert states.get("cam-1", owner="alice") == 1
    assert states.is_owner("cam-1", "alice") and not states.is_owner("cam-1", "mallory")


def test_an_ended_stream_forgets_its_owner():
    states = make()
    states.start("cam-1", 1, owner="alice")
    states.end("cam-1")
    assert states.start("cam-1", 2, owner="bob") == 2
    assert states.get("cam-1", owner="bob") == 2


# --- admission: max_streams -----------------------------------------------------------------

def test_a_start_beyond_max_streams_is_unavailable_naming_the_cap_and_keeps_nothing():
    states = make(max_streams=2)
    states.start("a", 1, owner="t")
    states.start("b", 1, owner="t")
    with pytest.raises(StreamsFull, match="'c'.*max_streams=2") as info:
        states.start("c", 1, owner="t")
    assert info.value.code == "UNAVAILABLE"
    assert "c" not in states and len(states) == 2


def test_a_stream_is_admitted_once_another_ends_or_expires():
    clock = Clock()
    states = make(ttl=10.0, clock=clock, max_streams=2)
    states.start("a", 1)
    states.start("b", 1)
    states.end("a")
    assert states.start("c", 1) == 1
    clock.now = 11.0               # b and c idle past the TTL: both expire on the next START
    assert states.start("d", 1) == 1 and states.start("e", 1) == 1


def test_the_owners_restart_at_the_cap_is_not_a_new_stream():
    states = make(max_streams=1)
    states.start("a", 1, owner="t")
    assert states.start("a", 2, owner="t") == 2


# --- chunk order: CHUNK_SEQ -----------------------------------------------------------------

def test_the_next_chunk_is_new_and_moves_the_order_on():
    order = ChunkOrder(first=5)
    assert order.is_duplicate("cam-1", 5, b"abc") is False
    order.processed(5, b"abc")
    assert order.next == 6 and order.is_duplicate("cam-1", 6, b"def") is False


def test_an_exact_resend_of_the_last_chunk_is_a_duplicate():
    order = ChunkOrder(first=0)
    order.processed(0, b"abc")
    assert order.is_duplicate("cam-1", 0, b"abc") is True
    assert order.next == 1


def test_the_last_number_with_other_bytes_is_refused_naming_the_next():
    order = ChunkOrder(first=0)
    order.processed(0, b"abc")
    with pytest.raises(InvalidRequest, match="'cam-1'.*chunk 0.*other bytes.*number 1"):
        order.is_duplicate("cam-1", 0, b"abd")


@pytest.mark.parametrize("seq, what", [(3, "a gap"), (0, "out of order")])
def test_a_gap_or_a_reorder_is_refused_naming_the_expected_chunk(seq, what):
    order = ChunkOrder(first=0)
    order.processed(0, b"a")
    order.processed(1, b"b")
    with pytest.raises(InvalidRequest, match=f"'cam-1'.*chunk {seq} is {what}.*expected chunk 2"):
        order.is_duplicate("cam-1", seq, b"x")


def test_an_empty_end_closes_the_stream_whatever_its_number():
    order = ChunkOrder(first=0)
    order.processed(0, b"a")
    assert order.is_duplicate("cam-1", 0, b"", end=True) is False
    with pytest.raises(InvalidRequest):
        order.is_duplicate("cam-1", 0, b"", end=False)
