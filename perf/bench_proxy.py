"""What the stream-affinity proxy costs and how it spreads streams (issue 15), in one run.

1. **Added latency.** A cluster of --instances tritonservers behind nginx (codecsight
   cluster). Stream pairs send the same chunks, one stream of each pair through the proxy and
   its twin straight to the instance the proxy picks for the first, request by request in
   turn (the same work on the same instance, so the paired difference is the proxy's cost).
   Also a cheap call (is_model_ready) both ways, where the proxy's share is not buried in
   inference time.
2. **Failover.** The instance holding half the streams is killed (SIGKILL, its model
   processes too) while requests are in flight; per stream: windows sent and answered,
   resumes, the failover request's latency; streams of the survivor: errors and resumes.
3. **Spread.** 8 and 32 stream IDs routed by the real nginx (the same template) to 2, 3 and
   4 stand-in instances (gRPC servers that only say who they are: the spread depends on the
   hash, not on the model), and how many streams move when a 3rd/4th/5th instance joins.

    .venv/bin/python perf/bench_proxy.py --json perf/results/proxy.json \
        --markdown perf/results/proxy.md
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from codecsight.serve import free_port  # noqa: E402
from codecsight.tools.cluster import Nginx, nginx_chash_instance, render_nginx_conf  # noqa: E402
from codecsight_client.stream import STREAM_ID_HEADER  # noqa: E402


# -------------------------------------------------------------------------------------------
# Stand-in instances: the Triton gRPC service, answering only who they are


class StandIn(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC server speaking Triton's protocol whose ModelInfer answers its own name (in
    the response's model_name) and records each stream ID it served; health calls say live.
    For measuring how nginx spreads streams without loading a model per instance."""

    def __init__(self, name: str):
        self.name, self.seen = name, []
        self.port = free_port()
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "StandIn":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=True)

    def ModelInfer(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.seen.append(metadata.get(STREAM_ID_HEADER))
        return service_pb2.ModelInferResponse(model_name=self.name, id=request.id)


class StandInProxy:
    """nginx rendered from deploy/nginx.conf.j2 in front of running StandIns; a context
    manager. route(stream_id) -> index of the stand-in that answered a ModelInfer sent
    through nginx with the stream's x-stream-id header (grpc.RpcError on a proxy refusal)."""

    def __init__(self, instances: list[StandIn], run_dir: Path):
        self.instances = instances
        self.port = free_port()
        self.nginx = Nginx(render_nginx_conf(self.addresses, f"127.0.0.1:{self.port}",
                                             run_dir=run_dir, body_bytes=1024 * 1024),
                           run_dir, "127.0.0.1", self.port)
        self.channel = None

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.instances]

    def __enter__(self) -> "StandInProxy":
        self.nginx.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        return self

    def route(self, stream_id: str | None) -> int:
        metadata = [(STREAM_ID_HEADER, stream_id)] if stream_id is not None else []
        reply = self.stub.ModelInfer(service_pb2.ModelInferRequest(model_name="ensemble",
                                                                   id=stream_id or ""),
                                     metadata=metadata, timeout=10)
        return int(reply.model_name.rsplit("-", 1)[1])

    def __exit__(self, *exc) -> None:
        if self.channel is not None:
            self.channel.close()
        self.nginx.stop()


def stream_ids(n: int, prefix: str = "cam") -> list[str]:
    """n camera-like stream IDs: cam-0000 ... (a site's naming, not random)."""
    return [f"{prefix}-{i:04d}" for i in range(n)]


def measure_spread(counts=(8, 32), instances=(2, 3, 4), repeats: int = 3) -> dict:
    """Streams per instance as nginx routed them, and the moves when one more joins.

    Stand-ins 0..n are started once; nginx is rendered over the first n of them for each n,
    so the n+1st joins a ring whose other members keep their addresses (as a StatefulSet
    scaled up does). Each ID is sent `repeats` times: every request of a stream must reach
    one instance. Also the spread nginx would give the Kubernetes pod names
    (cluster.kubernetes_servers) by the predictor, once it matched nginx here.
    """
    from codecsight.tools.cluster import kubernetes_servers

    all_ids = stream_ids(max(counts))
    sizes = sorted(set(instances) | {n + 1 for n in instances})
    stand_ins = [StandIn(f"instance-{i}").start() for i in range(max(sizes))]
    routes, violations, predictor_ok = {}, 0, True
    try:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, \
                    StandInProxy(stand_ins[:n], Path(tmp)) as proxy:
                routes[n] = {}
                for sid in all_ids:
                    seen = {proxy.route(sid) for _ in range(repeats)}
                    violations += len(seen) > 1
                    routes[n][sid] = min(seen)
                    predictor_ok &= nginx_chash_instance(proxy.addresses, sid) == routes[n][sid]
    finally:
        for s in stand_ins:
            s.stop()

    def per_instance(route: dict, ids: list[str], n: int) -> list[int]:
        return [sum(route[s] == i for s in ids) for i in range(n)]

    spread, moves, k8s = [], [], []
    for n in instances:
        k8s_route = {s: nginx_chash_instance(kubernetes_servers(n), s) for s in all_ids}
        k8s_next = {s: nginx_chash_instance(kubernetes_servers(n + 1), s) for s in all_ids}
        for count in counts:
            ids = all_ids[:count]
            per = per_instance(routes[n], ids, n)
            spread.append({"ids": count, "instances": n, "per_instance": per,
                           "max_over_mean": round(max(per) / (count / n), 2)})
            moved = [s for s in ids if routes[n][s] != routes[n + 1][s]]
            moves.append({"ids": count, "from": n, "to": n + 1, "moved": len(moved),
                          "moved_to_new": sum(routes[n + 1][s] == n for s in moved)})
            kper = per_instance(k8s_route, ids, n)
            k8s.append({"ids": count, "instances": n, "per_instance": kper,
                        "max_over_mean": round(max(kper) / (count / n), 2),
                        "moved_on_scale_up": sum(k8s_route[s] != k8s_next[s] for s in ids)})
    return {"addresses": [s.address for s in stand_ins], "spread": spread, "moves": moves,
            "affinity_violations": violations, "predictor_matches_nginx": predictor_ok,
            "kubernetes_pods_predicted": k8s}


def measure_standin_latency(payload_bytes: int, calls: int) -> dict:
    """The proxy's own cost per inference request: ModelInfer carrying payload_bytes (a
    chunk's size) to a stand-in, straight and through nginx, interleaved call by call; no
    model time to hide it (the stand-in answers at once)."""
    stand_in = StandIn("instance-0").start()
    payload = bytes(payload_bytes)
    request = service_pb2.ModelInferRequest(model_name="ensemble", id="cam-0000",
                                            raw_input_contents=[payload])
    metadata = [(STREAM_ID_HEADER, "cam-0000")]
    times = {"direct": [], "proxied": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, \
                StandInProxy([stand_in], Path(tmp)) as proxy, \
                grpc.insecure_channel(stand_in.address) as channel:
            # grpc's default 4 MiB receive limit is the stand-in's; chunks are below it.
            stubs = {"direct": service_pb2_grpc.GRPCInferenceServiceStub(channel),
                     "proxied": proxy.stub}
            for path in stubs:   # warm both connections (TCP, HTTP/2, nginx keepalive)
                stubs[path].ModelInfer(request, metadata=metadata, timeout=10)
            for i in range(calls):
                for path in (("direct", "proxied") if i % 2 else ("proxied", "direct")):
                    t0 = time.perf_counter()
                    stubs[path].ModelInfer(request, metadata=metadata, timeout=10)
                    times[path].append(time.perf_counter() - t0)
    finally:
        stand_in.stop()
    paired = [(p - d) * 1000 for p, d in zip(times["proxied"], times["direct"])]
    return {"payload_bytes": payload_bytes, "direct": _summary_ms(times["direct"]),
            "proxied": _summary_ms(times["proxied"]),
            "added_p50_ms": round(_pct(paired, 50), 3), "added_p99_ms": round(_pct(paired, 99), 3)}


# -------------------------------------------------------------------------------------------
# Added latency and failover on real tritonservers


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _summary_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(_pct(ms, 50), 3), "p99_ms": round(_pct(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def measure_latency(cluster, chunks, settings, pairs: int, cheap_calls: int) -> dict:
    """Proxied vs direct latency on the same instance, interleaved request by request."""
    from codecsight_client.stream import StreamClient, connect

    proxy = connect(cluster.grpc_url)
    servers = [s.grpc_url for s in cluster.servers]
    direct_clients = {url: connect(url) for url in servers}
    proxied, direct, paired = [], [], []
    for p in range(pairs):
        sid = f"lat-{p}-{uuid.uuid4().hex[:6]}"
        home = servers[nginx_chash_instance(servers, sid)]
        a = StreamClient(proxy, sid, settings, notice=lambda m: None)
        b = StreamClient(direct_clients[home], sid + "-direct", settings, notice=lambda m: None)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            # Alternate which goes first: the second of a pair may find warmer caches.
            order = [(a, proxied), (b, direct)] if i % 2 == 0 else [(b, direct), (a, proxied)]
            got = {}
            for stream, sink in order:
                window = stream.send(chunk, last=last)
                sink.append(window.latency_s)
                got[stream is a] = window.latency_s
            paired.append(got[True] - got[False])
    cheap_proxy, cheap_direct = [], []
    direct_any = direct_clients[servers[0]]
    for i in range(cheap_calls):
        for client, sink in ((proxy, cheap_proxy), (direct_any, cheap_direct))[::1 if i % 2 else -1]:
            t0 = time.perf_counter()
            client.is_model_ready("ensemble")
            sink.append(time.perf_counter() - t0)
    ms = [d * 1000 for d in paired]
    return {"windows": {"proxied": _summary_ms(proxied), "direct": _summary_ms(direct),
                        "paired_difference_ms": {"n": len(ms), "p50": round(_pct(ms, 50), 3),
                                                 "p99": round(_pct(ms, 99), 3)}},
            "is_model_ready": {"proxied": _summary_ms(cheap_proxy),
                               "direct": _summary_ms(cheap_direct),
                               "added_p50_ms": round((_pct(cheap_proxy, 50) -
                                                      _pct(cheap_direct, 50)) * 1000, 3),
                               "added_p99_ms": round((_pct(cheap_proxy, 99) -
                                                      _pct(cheap_direct, 99)) * 1000, 3)}}


def measure_failover(cluster, chunks, settings, streams_per_instance: int,
                     kill_after: int) -> dict:
    """Kill instance 0 while every stream's request number kill_after is in flight."""
    from codecsight_client.stream import StreamClient, connect

    servers = [s.grpc_url for s in cluster.servers]
    ids: dict[int, list[str]] = {i: [] for i in range(len(servers))}
    while min(len(v) for v in ids.values()) < streams_per_instance:
        sid = f"fo-{uuid.uuid4().hex[:8]}"
        home = nginx_chash_instance(servers, sid)
        if len(ids[home]) < streams_per_instance:
            ids[home].append(sid)
    proxy = connect(cluster.grpc_url)
    barrier = threading.Barrier(sum(len(v) for v in ids.values()) + 1)
    records = {}

    def run(sid: str, home: int) -> None:
        notices = []
        stream = StreamClient(proxy, sid, settings, notice=notices.append)
        record = {"instance": home, "sent": 0, "answered": 0, "errors": [],
                  "latency_s": []}
        for i, chunk in enumerate(chunks):
            if i == kill_after:
                barrier.wait()
            record["sent"] += 1
            try:
                window = stream.send(chunk, last=i == len(chunks) - 1)
                record["answered"] += 1
                record["latency_s"].append(round(window.latency_s, 3))
            except Exception as e:   # counted as a lost window, the run goes on
                record["errors"].append(f"{type(e).__name__}: {e}")
        record.update(resumes=stream.resumes, notices=notices)
        records[sid] = record

    threads = [threading.Thread(target=run, args=(sid, home)) for home, v in ids.items()
               for sid in v]
    for t in threads:
        t.start()
    barrier.wait()
    time.sleep(0.2)   # the requests are sent: kill under them
    t_kill = time.perf_counter()
    cluster.kill(0)
    for t in threads:
        t.join()
    for r in records.values():
        r["lost"] = r["sent"] - r["answered"]
    return {"killed": 0, "killed_after_requests": kill_after, "t_kill_s": t_kill,
            "streams": records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4, help="stream pairs for latency")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per stream")
    parser.add_argument("--stride-seconds", type=float, default=2.0)
    parser.add_argument("--cheap-calls", type=int, default=400)
    parser.add_argument("--standin-calls", type=int, default=1000,
                        help="chunk-sized requests to a stand-in, each path")
    parser.add_argument("--failover-streams", type=int, default=2,
                        help="streams per instance in the failover run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    from codecsight.serve import build
    from codecsight.tools.bench import machine_info
    from codecsight.tools.cluster import Cluster
    from codecsight_client.demux import iter_chunks, probe

    clip = str(Path(__file__).resolve().parent.parent / "media" / "car-detection.mp4")
    info = probe(clip)
    from codecsight_client.stream import StreamSettings

    settings = StreamSettings(question="is anyone moving?", codec=info.codec,
                              source_fps=info.fps, analysis_fps=1.0, window_seconds=4.0)
    chunks = list(iter_chunks(clip, args.stride_seconds))[:args.chunks]
    result = {"machine": machine_info(), "command": " ".join(sys.argv),
              "clip": clip, "stride_seconds": args.stride_seconds}
    print("spread over stand-in instances ...", file=sys.stderr, flush=True)
    result["spread"] = measure_spread()
    chunk_bytes = sorted(len(c.data) for c in chunks)[len(chunks) // 2]
    print(f"proxy cost per request ({chunk_bytes} B, the median chunk) ...", file=sys.stderr,
          flush=True)
    result["standin_latency"] = measure_standin_latency(chunk_bytes, args.standin_calls)
    with Cluster(build(), args.instances) as cluster:
        print("latency: proxied vs direct ...", file=sys.stderr, flush=True)
        result["latency"] = measure_latency(cluster, chunks, settings, args.pairs,
                                            args.cheap_calls)
        print("failover ...", file=sys.stderr, flush=True)
        result["failover"] = measure_failover(cluster, chunks, settings,
                                              args.failover_streams, kill_after=2)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    """The results as the tables of perf/results/proxy.md."""
    lat, own = r["latency"], r["standin_latency"]
    lines = ["## Proxy latency (ms per request; proxied and direct interleaved on one instance)",
             "", "| call | path | n | p50 | p99 |", "|---|---|---|---|---|"]
    for path in ("direct", "proxied"):
        s = own[path]
        lines.append(f"| ModelInfer, {own['payload_bytes']} B chunk, stand-in instance | {path} "
                     f"| {s['n']} | {s['p50_ms']} | {s['p99_ms']} |")
    for call, key in (("window (ensemble)", "windows"), ("is_model_ready", "is_model_ready")):
        for path in ("direct", "proxied"):
            s = lat[key][path]
            lines.append(f"| {call} | {path} | {s['n']} | {s['p50_ms']} | {s['p99_ms']} |")
    d = lat["windows"]["paired_difference_ms"]
    lines += ["", f"**Added by the proxy per request** (chunk-sized ModelInfer, paired call by call): "
              f"p50 {own['added_p50_ms']} ms, p99 {own['added_p99_ms']} ms.", ""]
    lines += [f"Paired difference per window (proxied - direct, same chunk, same instance): "
              f"p50 {d['p50']} ms, p99 {d['p99']} ms over {d['n']} pairs. "
              f"is_model_ready added: p50 {lat['is_model_ready']['added_p50_ms']} ms, "
              f"p99 {lat['is_model_ready']['added_p99_ms']} ms.", "",
              "## Failover (instance 0 killed with its requests in flight)", "",
              "| stream | instance | sent | answered | lost | resumes | latencies s |",
              "|---|---|---|---|---|---|---|"]
    for sid, s in r["failover"]["streams"].items():
        lines.append(f"| {sid} | {s['instance']} | {s['sent']} | {s['answered']} | {s['lost']} "
                     f"| {s['resumes']} | {' '.join(str(x) for x in s['latency_s'])} |")
    lines += ["", "## Spread of stream IDs cam-0000... over instances (nginx, consistent hash)",
              "", "| IDs | instances | streams per instance | max / mean |", "|---|---|---|---|"]
    for s in r["spread"]["spread"]:
        lines.append(f"| {s['ids']} | {s['instances']} | {s['per_instance']} | "
                     f"{s['max_over_mean']} |")
    lines += ["", "| IDs | instances | moved | of them to the new instance |", "|---|---|---|---|"]
    for m in r["spread"]["moves"]:
        lines.append(f"| {m['ids']} | {m['from']} -> {m['to']} | {m['moved']} | "
                     f"{m['moved_to_new']} |")
    lines += ["", f"Affinity violations (an ID answered by two instances): "
              f"{r['spread']['affinity_violations']}; the predictor "
              f"(cluster.nginx_chash_instance) matched nginx on every ID: "
              f"{r['spread']['predictor_matches_nginx']}.", "",
              "Kubernetes pod names (codecsight-triton-<i>...:8001), predicted:", "",
              "| IDs | pods | streams per pod | max / mean | moved when one pod joins |",
              "|---|---|---|---|---|"]
    for s in r["spread"]["kubernetes_pods_predicted"]:
        lines.append(f"| {s['ids']} | {s['instances']} | {s['per_instance']} | "
                     f"{s['max_over_mean']} | {s['moved_on_scale_up']} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
