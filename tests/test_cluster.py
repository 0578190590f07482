"""Scale-out: real tritonservers behind a real nginx with stream affinity (issue 15).

The routing tests run nginx (rendered from deploy/nginx.conf.j2) in front of stand-in gRPC
servers that only say who they are; the cluster tests start two real tritonservers whose
codec_parser admits CAP streams each, behind nginx, and kill one of them last.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from tritonclient.utils import InferenceServerException

from codecsight.serve import REPO_ROOT
from codecsight.tools import cluster as C
from codecsight_client.demux import iter_chunks
from codecsight_client.stream import (PROXY_ERROR_PREFIX, StreamClient, StreamRefused,
                                      StreamSettings, connect)
from streams import CLIP, clip_settings, new_id

sys.path.insert(0, str(REPO_ROOT / "perf"))
from bench_proxy import StandIn, StandInProxy  # noqa: E402

# Each instance admits CAP streams. Four streams must fit on one survivor after failover.
CAP = 4
# 2 s chunks: short windows keep the four-stream runs to seconds on 2 loaded cores.
STRIDE_S = 2.0


# -- configuration and routing, no model --------------------------------------------------

def test_the_rendered_local_config_passes_nginx_t(tmp_path):
    conf = C.render_nginx_conf(["127.0.0.1:1", "127.0.0.1:2"], "127.0.0.1:3", run_dir=tmp_path)
    C.Nginx(conf, tmp_path, "127.0.0.1", 3).check()   # raises with nginx's words if invalid
    assert "hash $http_x_stream_id consistent;" in conf
    assert f"client_max_body_size {C.max_body_bytes()};" in conf


def test_nginx_dies_with_the_process_that_started_it(tmp_path):
    """A killed test run or cluster must not leave nginx behind holding its port."""
    import signal

    port = C.free_port()
    code = ("import sys, time; from pathlib import Path; from codecsight.tools import cluster as C; "
            f"d = Path({str(tmp_path)!r}); "
            f"n = C.Nginx(C.render_nginx_conf(['127.0.0.1:1'], '127.0.0.1:{port}', run_dir=d), "
            f"d, '127.0.0.1', {port}).start(); "
            "print(n.process.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    nginx = int(parent.stdout.readline())
    assert C._port_open("127.0.0.1", port)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and C._port_open("127.0.0.1", port):
        time.sleep(0.1)
    assert not C._port_open("127.0.0.1", port)
    stat = Path(f"/proc/{nginx}/stat")
    # gone, or dead and waiting for init to reap it
    assert not stat.exists() or stat.read_text().split()[2] == "Z"


def test_every_request_of_a_stream_reaches_one_instance_as_predicted(tmp_path):
    """32 IDs, each sent 3 times through nginx to 3 stand-ins: one instance per ID, the one
    cluster.nginx_chash_instance predicts; all three take some; a 4th moves only IDs to it."""
    ids = [f"cam-{i:04d}" for i in range(32)]
    stand_ins = [StandIn(f"instance-{i}").start() for i in range(4)]
    try:
        routes = {}
        for n in (3, 4):
            with StandInProxy(stand_ins[:n], tmp_path / f"nginx-{n}") as proxy:
                routes[n] = {sid: {proxy.route(sid) for _ in range(3)} for sid in ids}
                assert all(len(seen) == 1 for seen in routes[n].values())
                assert all(routes[n][sid] == {C.nginx_chash_instance(proxy.addresses, sid)}
                           for sid in ids)
    finally:
        for s in stand_ins:
            s.stop()
    assert {i for seen in routes[3].values() for i in seen} == {0, 1, 2}
    moved = [sid for sid in ids if routes[3][sid] != routes[4][sid]]
    assert moved and all(routes[4][sid] == {3} for sid in moved)


def test_a_request_without_the_header_is_refused_and_health_calls_pass(tmp_path):
    stand_ins = [StandIn(f"instance-{i}").start() for i in range(2)]
    try:
        with StandInProxy(stand_ins, tmp_path) as proxy:
            with pytest.raises(grpc.RpcError) as refused:
                proxy.route(None)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith(PROXY_ERROR_PREFIX)
            assert "x-stream-id" in refused.value.details()
            assert not any(s.seen for s in stand_ins)     # nothing reached an instance
            client = connect(f"127.0.0.1:{proxy.port}")   # health calls carry no header
            assert client.is_server_live() and client.is_model_ready("ensemble")
    finally:
        for s in stand_ins:
            s.stop()


def test_a_request_over_the_proxys_body_limit_is_a_clear_error(tmp_path):
    """StandInProxy renders client_max_body_size 1 MiB: a 2 MiB request never reaches an
    instance and comes back as RESOURCE_EXHAUSTED naming the stream and the limit."""
    from tritonclient.grpc import service_pb2

    stand_in = StandIn("instance-0").start()
    try:
        with StandInProxy([stand_in], tmp_path) as proxy:
            request = service_pb2.ModelInferRequest(model_name="ensemble",
                                                    raw_input_contents=[bytes(2 << 20)])
            with pytest.raises(grpc.RpcError) as refused:
                proxy.stub.ModelInfer(request, metadata=[("x-stream-id", "cam-big")],
                                      timeout=10)
    finally:
        stand_in.stop()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details().startswith(f"{PROXY_ERROR_PREFIX} stream cam-big")
    assert "client_max_body_size=1048576" in refused.value.details()
    assert stand_in.seen == []


class _Answer:
    """An ensemble answer "ok" with every required statistic 0."""

    def as_numpy(self, name):
        import json

        import numpy as np

        from codecsight import protocol as P

        def zeros(cls):
            return json.dumps({f.name: 0 for f in dataclasses.fields(cls)
                               if f.default is dataclasses.MISSING})

        text = {P.ANSWER: "ok", P.PARSE_STATS: zeros(P.ParseStats),
                P.LLM_STATS: zeros(P.LlmStats)}[name]
        return np.array([[text.encode()]], dtype=np.object_)


class _DeadInstanceThenLive:
    """tritonclient stand-in: the first request fails as nginx says when the instance under
    it died; health probes answer live (the proxy reaches a survivor); then it answers."""

    def __init__(self):
        self.calls = 0

    def infer(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise InferenceServerException(
                f"{PROXY_ERROR_PREFIX} stream cam-1: instance 127.0.0.1:1 failed or is "
                "unreachable; retry", status="StatusCode.UNAVAILABLE")
        return _Answer()

    def is_server_live(self):
        return True

    def is_model_ready(self, name):
        return True


def test_a_start_lost_with_its_instance_is_retried_not_refused():
    """Through the proxy an UNAVAILABLE START may be an instance dying under it; the live
    probe would reach a survivor, so the proxy's own error must never read as the cap."""
    client = _DeadInstanceThenLive()
    stream = StreamClient(client, "cam-1", StreamSettings(), notice=lambda m: None)
    assert stream.send(b"\x00\x00\x00\x01\x65").answer == "ok"
    assert client.calls == 2


def test_the_template_and_the_client_agree_on_the_proxy_error_prefix():
    assert C.NGINX_TEMPLATE.read_text().count(f'"{PROXY_ERROR_PREFIX} ') == 3


# -- Kubernetes manifests ------------------------------------------------------------------

MANIFESTS = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def test_the_committed_configmap_is_the_template_rendered_for_its_replicas():
    path = REPO_ROOT / "deploy" / "kubernetes" / "nginx-configmap.yaml"
    doc = yaml.safe_load(path.read_text())
    replicas = int(doc["metadata"]["annotations"]["codecsight/triton-replicas"])
    assert path.read_text() == C.kubernetes_configmap(replicas)
    statefulset = next(d for m in MANIFESTS for d in yaml.safe_load_all(m.read_text())
                       if d and d["kind"] == "StatefulSet")
    assert statefulset["spec"]["replicas"] == replicas   # the upstream names every pod


def _kubernetes_validate(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"),
                           "--strict", *map(str, paths)], capture_output=True, text=True)


def test_the_kubernetes_manifests_validate_against_the_schemas(tmp_path):
    """kubernetes-validate bundles the schemas (offline); --strict refuses unknown fields."""
    assert len(MANIFESTS) >= 3
    result = _kubernetes_validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and it does refuse: the StatefulSet with a misspelt field and a string replica count
    broken = (REPO_ROOT / "deploy" / "kubernetes" / "triton.yaml").read_text() \
        .replace("replicas: 3", 'replicas: "3"').replace("serviceName:", "servicename:")
    (tmp_path / "broken.yaml").write_text(broken)
    refused = _kubernetes_validate(tmp_path / "broken.yaml")
    assert refused.returncode != 0 and "replicas" in refused.stdout + refused.stderr
    kinds = {d["kind"] for m in MANIFESTS for d in yaml.safe_load_all(m.read_text()) if d}
    assert {"StatefulSet", "Service", "Deployment", "ConfigMap"} <= kinds


# -- two real tritonservers behind nginx ---------------------------------------------------

def _capped_repository(dest: Path) -> Path:
    """The committed repository with codec_parser's max_streams = CAP (one spare batcher
    slot, as conftest's capped_server) so a START over the cap reaches the model."""
    import shutil

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.serve import DEFAULT_MODEL_DIR, build, render_repository

    source = build()
    dest = render_repository(source, dest, DEFAULT_MODEL_DIR)
    shutil.copy(source / "vit_pruned" / "1" / "model.onnx", dest / "vit_pruned" / "1")
    for model in ("codec_parser", "llm_prefill"):
        path = dest / model / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.sequence_batching.oldest.max_candidate_sequences = CAP + 1
        if model == "codec_parser":
            config.parameters["max_streams"].string_value = str(CAP)
        path.write_text(text_format.MessageToString(config))
    return dest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    repository = _capped_repository(tmp_path_factory.mktemp("cluster") / "repository")
    # Streams left open by a killed test must not hold the shutdown for 5 s per instance.
    with C.Cluster(repository, 2, log_dir=tmp_path_factory.mktemp("cluster-logs"),
                   extra_args=("--exit-timeout-secs=1",)) as running:
        yield running


@pytest.fixture(scope="module")
def chunks():
    return list(iter_chunks(CLIP, STRIDE_S))[:4]


def active_streams(server) -> int:
    """codec_parser's codecsight_active_streams on an instance's metrics port (0 if unset)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('codecsight_active_streams{model="codec_parser"}'):
            return int(float(line.split()[-1]))
    return 0


def ids_on(cluster, instance: int, n: int, name: str) -> list[str]:
    """n fresh stream IDs that nginx sends to `instance`."""
    servers = [s.grpc_url for s in cluster.servers]
    ids = []
    while len(ids) < n:
        sid = new_id(name)
        if C.nginx_chash_instance(servers, sid) == instance:
            ids.append(sid)
    return ids


def _comparable(window) -> dict:
    """What a window's answer depends on: everything but timings and instance bookkeeping."""
    skip = {"stream", "active_streams", "batch_size", "state_bytes"}
    out = {"answer": window.answer}
    for name, stats in (("parse", window.parse), ("llm", window.llm)):
        out.update({f"{name}.{k}": v for k, v in dataclasses.asdict(stats).items()
                    if not k.endswith("_ms") and k not in skip})
    return out


def _run_streams(client, ids, chunks, *, hold=None, notices=None):
    """Each stream in its own thread sends chunks[:-1]; then, after hold() (if given) sees
    them all open, chunks[-1] with END. Returns {stream ID: [windows]}."""
    settings = clip_settings()
    streams = {sid: StreamClient(client, sid, settings, notice=(notices or {}).get(
        sid, lambda m: None)) for sid in ids}
    windows = {sid: [] for sid in ids}
    opened = threading.Barrier(len(ids) + 1)
    closing = threading.Event()

    def run(sid):
        for chunk in chunks[:-1]:
            windows[sid].append(streams[sid].send(chunk))
        opened.wait(timeout=300)
        closing.wait(timeout=300)
        windows[sid].append(streams[sid].send(chunks[-1], last=True))

    threads = [threading.Thread(target=run, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    opened.wait(timeout=300)
    try:
        if hold:
            hold()
    finally:
        closing.set()
        for t in threads:
            t.join()
    return windows, streams


@pytest.mark.server
def test_four_streams_spread_over_both_instances_and_answer_as_one_server(cluster, server,
                                                                          chunks):
    ids = ids_on(cluster, 0, 2, "spread") + ids_on(cluster, 1, 2, "spread")
    seen = {}

    def count():
        seen.update({i: active_streams(s) for i, s in enumerate(cluster.servers)})

    windows, _ = _run_streams(connect(cluster.grpc_url), ids, chunks[:3], hold=count)
    assert seen == {0: 2, 1: 2}   # both open streams of each instance, on that instance
    alone, _ = _run_streams(connect(server.grpc_url), [new_id("single") for _ in ids],
                            chunks[:3])
    proxied = sorted([_comparable(w) for w in ws] for ws in windows.values())
    single = sorted([_comparable(w) for w in ws] for ws in alone.values())
    assert len(proxied) == 4 and all(len(ws) == 3 for ws in proxied)
    assert proxied == single


@pytest.mark.server
def test_a_start_over_an_instances_cap_is_refused_through_the_proxy_at_once(cluster, chunks):
    client = connect(cluster.grpc_url)
    ids = ids_on(cluster, 1, CAP + 1, "cap")
    settings = clip_settings()
    full = [StreamClient(client, sid, settings) for sid in ids[:CAP]]
    for stream in full:
        stream.send(chunks[0])
    told = []
    extra = StreamClient(client, ids[CAP], settings, reconnect_s=60, notice=told.append)
    t0 = time.monotonic()
    with pytest.raises(StreamRefused, match=rf"'{ids[CAP]}'.*refused.*max_streams={CAP}"):
        extra.send(chunks[0])
    # The refusal comes back as the server sent it, not after a reconnect loop (60 s) or a
    # proxy timeout (600 s); 15 s leaves room for a loaded 2-core machine.
    assert time.monotonic() - t0 < 15 and told == []
    assert active_streams(cluster.servers[0]) == 0   # the other instance never saw them
    for stream in full:
        stream.send(chunks[1], last=True)


@pytest.mark.server
def test_a_killed_instances_streams_resume_on_the_survivor_and_the_others_never_notice(
        cluster, chunks):
    """Instance 0 is SIGKILLed while every stream's third request is in flight (runs last:
    the module's cluster has one instance after it)."""
    moved, stayed = ids_on(cluster, 0, 2, "moved"), ids_on(cluster, 1, 2, "stayed")
    notices = {sid: [] for sid in moved + stayed}
    client = connect(cluster.grpc_url)
    settings = clip_settings()
    streams = {sid: StreamClient(client, sid, settings, notice=notices[sid].append)
               for sid in moved + stayed}
    sent, answered, errors = ({sid: 0 for sid in streams} for _ in range(3))
    third = threading.Barrier(len(streams) + 1)

    def run(sid):
        for i, chunk in enumerate(chunks):
            if i == 2:
                third.wait(timeout=300)
            sent[sid] += 1
            try:
                if streams[sid].send(chunk, last=i == len(chunks) - 1).answer:
                    answered[sid] += 1
            except Exception as e:   # a lost window: counted, the stream goes on
                errors[sid] += 1
                notices[sid].append(repr(e))

    threads = [threading.Thread(target=run, args=(sid,)) for sid in streams]
    for t in threads:
        t.start()
    third.wait(timeout=300)
    time.sleep(0.3)   # the third requests are on their way (a window takes longer than this)
    cluster.kill(0)
    for t in threads:
        t.join(timeout=300)
    assert cluster.dead() == [0]
    for sid in moved:
        assert sent[sid] == len(chunks) and sent[sid] - answered[sid] <= 1, notices[sid]
        assert streams[sid].resumes == 1, notices[sid]
        assert any("resuming it with START from its last keyframe" in n
                   for n in notices[sid])
    for sid in stayed:
        assert (answered[sid], errors[sid], streams[sid].resumes, notices[sid]) == \
            (len(chunks), 0, 0, [])


@pytest.mark.slow
@pytest.mark.server
def test_the_cluster_command_prints_its_addresses_serves_and_stops_on_sigterm(tmp_path):
    """`codecsight cluster` end to end with one instance (slow: its own tritonserver)."""
    import os
    import signal

    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "codecsight"), "cluster", "--instances", "1",
         "--grpc-port", "0", "--log-dir", str(tmp_path), "--admin-key-file",
         str(tmp_path / "admin-key")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]   # blocks until ready
        assert lines[0].startswith("instance 0: grpc 127.0.0.1:") and " metrics " in lines[0]
        proxy = lines[1].split()[2]
        assert lines[1].startswith("proxy: grpc 127.0.0.1:")
        client = connect(proxy)
        chunk = next(iter(iter_chunks(CLIP, STRIDE_S)))
        window = StreamClient(client, new_id("cli"), clip_settings()).send(chunk, last=True)
        assert window.answer and window.parse.frames_decoded > 0
        nginx_pid = int(next(line.split()[-1] for line in (tmp_path / "nginx" / "nginx.pid")
                                .read_text().splitlines()))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "SIGTERM: stopping nginx and the instances" in proc.stderr.read()
        with pytest.raises(ProcessLookupError):   # nginx's master is gone
            os.kill(nginx_pid, 0)
        assert not C._port_open("127.0.0.1", int(proxy.rsplit(":", 1)[1]))
    finally:
        if proc.poll() is None:
            proc.kill()
