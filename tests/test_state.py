import pytest

from codecsight.protocol import StreamAlreadyActive, StreamError, StreamNotFound
from codecsight.state import StreamStates


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(ttl=10.0, cap=1000, clock=None):
    return StreamStates(ttl, cap, size_of=lambda s: s, clock=clock or Clock())


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
