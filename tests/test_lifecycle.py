"""State lifecycle on the real server: END frees everything, so memory returns."""
import uuid

import psutil
import pytest

from codecsight_client.stream import StreamClient, StreamSettings
from codecsight_client.demux import iter_chunks, probe
from codecsight.serve import REPO_ROOT

pytestmark = pytest.mark.server

CLIP = str(REPO_ROOT / "media" / "car-detection.mp4")


def server_rss_mb(server) -> float:
    """Resident memory of tritonserver and its Python-backend stubs, in MB."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2 ** 20


STREAMS = 8
# Measured here: an open stream of this clip holds ~19 MB of server memory (mostly the
# decoder's picture pool; its LLM window ~1 MB). The test asks for far less, only so that a
# check which cannot see open streams at all fails instead of passing.
MIN_HELD_MB_PER_STREAM = 5


def open_streams(grpc, count, chunk):
    """count streams, each STARTed with one chunk and left open: (clients, first windows)."""
    info = probe(CLIP)
    settings = StreamSettings(question="is anyone moving?", codec=info.codec,
                              source_fps=info.fps, analysis_fps=2.0, window_seconds=2.0)
    streams = [StreamClient(grpc, f"life-{uuid.uuid4().hex[:8]}", settings)
               for _ in range(count)]
    return streams, [stream.send(chunk) for stream in streams]


def test_memory_returns_after_many_streams_start_and_end(server, grpc):
    """Streams that END give back all they held: STREAMS streams are opened together, so
    the server's RSS rises by their state, then all end; RSS falls back to where it was and
    neither stateful model holds any of them.

    Opening them together is what lets the check fail: a stream whose state outlived END
    would keep its share of the rise, and the RSS must give back at least 3/4 of it.
    """
    chunk = next(iter_chunks(CLIP, 2.0)).data
    warm, _ = open_streams(grpc, 2, chunk)   # warm up allocators and caches
    for stream in warm:
        stream.send(chunk, last=True)
    before = server_rss_mb(server)
    streams, opened = open_streams(grpc, STREAMS, chunk)
    held = server_rss_mb(server)
    ended = [stream.send(chunk, last=True) for stream in streams]
    after = server_rss_mb(server)
    print(f"server RSS {before:.0f} MB -> {held:.0f} MB with {STREAMS} streams open "
          f"-> {after:.0f} MB after END")
    # Counted after each request: none of ours is left in either stateful model (earlier
    # tests' refused requests may still hold state until their TTL: those can only go).
    assert ended[-1].parse.active_streams <= opened[0].parse.active_streams - 1
    assert ended[-1].llm.active_streams <= opened[0].llm.active_streams - 1
    assert held - before >= STREAMS * MIN_HELD_MB_PER_STREAM, (
        f"{STREAMS} open streams raised the server's RSS by only {held - before:.0f} MB")
    assert after - before < (held - before) / 4, (
        f"END gave back {held - after:.0f} of the {held - before:.0f} MB that "
        f"{STREAMS} open streams took")
