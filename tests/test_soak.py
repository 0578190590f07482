"""Soak (opt-in: `bash scripts/test.sh -m soak`): good streams run for minutes while faults are
injected (bad chunks, abandoned streams, refused requests) and the server restarts once.

Settings: SOAK_STREAMS (good streams, default 3), SOAK_MINUTES (default 4). It writes
perf/out/soak.json: requests, errors by kind, and server memory over time.
"""
import collections
import json
import os
import random
import threading
import time
import uuid

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from codecsight_client.stream import StreamClient, StreamSettings, connect, unreachable
from codecsight_client.demux import iter_chunks, probe
from codecsight.serve import REPO_ROOT, TritonServer, free_port

pytestmark = [pytest.mark.soak, pytest.mark.server]

CLIP = str(REPO_ROOT / "media" / "car-detection.mp4")
STRIDE_S = 2.0


def rss_mb(server) -> float:
    import psutil

    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2 ** 20


def test_soak_with_faults_and_a_restart(tmp_path):
    from codecsight.serve import build

    streams = int(os.environ.get("SOAK_STREAMS", 3))
    duration = float(os.environ.get("SOAK_MINUTES", 4)) * 60
    info = probe(CLIP)
    settings = StreamSettings(question="is anyone moving?", codec=info.codec,
                              source_fps=info.fps, analysis_fps=2.0, window_seconds=4.0,
                              policy="codec", refresh="selective")
    chunks = [c.data for c in iter_chunks(CLIP, STRIDE_S)]
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    repository = build()
    lock = threading.Lock()
    counts = collections.Counter()
    memory = []
    stop = threading.Event()
    server = TritonServer(repository, log_path=tmp_path / "soak-0.log", **ports).start()
    url = server.grpc_url

    def count(kind):
        with lock:
            counts[kind] += 1

    def good(i):
        """Loops the clip as consecutive streams; every chunk must come back answered."""
        client = connect(url)
        while not stop.is_set():
            stream = StreamClient(client, f"good-{i}-{uuid.uuid4().hex[:6]}", settings,
                                  reconnect_s=120, notice=lambda m: count("resume notices"))
            for n, chunk in enumerate(chunks):
                window = stream.send(chunk, last=n == len(chunks) - 1)
                count("good windows")
                count("good answers" if window.answer else "good windows WITHOUT answer")
                if stop.is_set():
                    break
            if stream.resumes:
                count("good streams resumed")

    def faults(seed):
        """Random faults on their own streams; each must be refused or reported, never crash."""
        rng = random.Random(seed)
        client = connect(url)
        while not stop.is_set():
            kind = rng.choice(["corrupt", "noise", "abandon", "bad policy", "empty"])
            stream = StreamClient(client, f"fault-{uuid.uuid4().hex[:8]}", settings,
                                  reconnect_s=0, notice=lambda m: None)
            try:
                if kind == "corrupt":
                    data = bytearray(rng.choice(chunks))
                    for j in rng.sample(range(len(data)), 100):
                        data[j] ^= 0xFF
                    window = stream.send(bytes(data), last=True)
                    count("corrupt chunks reported" if window.parse.decode_errors
                          else "corrupt chunks decoded clean")
                elif kind == "noise":
                    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(
                        0, 256, 30_000, dtype=np.uint8).tobytes()
                    stream.send(noise, last=True)
                    count("random-byte chunks reported")
                elif kind == "abandon":
                    stream.send(chunks[0])  # START and never END: the TTL must clean it up
                    count("streams abandoned")
                elif kind == "bad policy":
                    stream.settings = StreamSettings(**{**vars(settings), "policy": "nope"})
                    stream.send(chunks[0], last=True)
                    count("bad policy ACCEPTED")
                else:
                    stream.send_once(b"", last=False)
                    count("empty chunk ACCEPTED")
            except InferenceServerException as e:
                if unreachable(e):
                    count("fault requests while the server restarted")
                else:
                    count(f"refused: {kind}" if stream.stream_id in str(e)
                          else f"refused without naming the stream: {kind}")
            time.sleep(rng.uniform(0.2, 1.0))

    def sample_memory(t0):
        while not stop.is_set():
            with lock:
                current = server
            try:
                memory.append((round(time.monotonic() - t0, 1), round(rss_mb(current))))
            except Exception:
                pass  # restarting
            time.sleep(5)

    t0 = time.monotonic()
    threads = [threading.Thread(target=good, args=(i,)) for i in range(streams)]
    threads += [threading.Thread(target=faults, args=(s,)) for s in range(2)]
    threads.append(threading.Thread(target=sample_memory, args=(t0,)))
    for t in threads:
        t.start()
    try:
        time.sleep(duration / 2)
        old = server
        old.stop()
        count("server restarts")
        with lock:
            server = TritonServer(repository, log_path=tmp_path / "soak-1.log", **ports).start()
        time.sleep(duration / 2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    # Abandoned streams stay until their TTL: measure memory once it has passed.
    time.sleep(65)
    # Models evict on their next request: one short stream lets them notice the TTL.
    probe_stream = StreamClient(connect(url), f"probe-{uuid.uuid4().hex[:6]}", settings)
    assert probe_stream.send(chunks[0], last=True).parse.active_streams == 0
    settled = rss_mb(server)
    first_phase = [m for t, m in memory if t < duration / 2]
    report = {"good_streams": streams, "minutes": duration / 60, "counts": dict(counts),
              "memory_mb": memory, "settled_mb": round(settled)}
    server.stop()
    out = REPO_ROOT / "perf" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "memory_mb"}, indent=1))

    assert counts["good windows"] > 0 and counts["good windows WITHOUT answer"] == 0
    assert counts["good answers"] == counts["good windows"]
    assert counts["server restarts"] == 1 and counts["good streams resumed"] >= 1
    assert not [k for k in counts if "ACCEPTED" in k or "without naming" in k], counts
    # Memory ends flat: once the TTL has cleared abandoned streams, the server holds no more
    # than the plateau the same workload reached before the restart.
    assert first_phase and settled <= max(first_phase) + 100, (settled, max(first_phase))
