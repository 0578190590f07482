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


def run_streams(grpc, count, chunk):
    info = probe(CLIP)
    settings = StreamSettings(question="is anyone moving?", codec=info.codec,
                              source_fps=info.fps, analysis_fps=2.0, window_seconds=2.0)
    last = None
    for _ in range(count):
        stream = StreamClient(grpc, f"life-{uuid.uuid4().hex[:8]}", settings)
        stream.send(chunk)
        last = stream.send(chunk, last=True)
    return last


def test_memory_returns_after_many_streams_start_and_end(server, grpc):
    chunk = next(iter_chunks(CLIP, 2.0)).data
    warm = run_streams(grpc, 5, chunk)  # warm up allocators and caches
    before = server_rss_mb(server)
    last = run_streams(grpc, 30, chunk)
    after = server_rss_mb(server)
    print(f"server RSS {before:.0f} MB -> {after:.0f} MB over 30 streams")
    # Every stream ended: none of the 30 left state in either stateful model (earlier tests'
    # refused requests may still hold some until their TTL, so compare with before).
    assert last.parse.active_streams <= warm.parse.active_streams
    assert last.llm.active_streams <= warm.llm.active_streams
    # 30 streams each held a decoder and a window (~10 MB at 768x432); none of it stays.
    assert after - before < 60, f"server grew {after - before:.0f} MB over 30 streams"
