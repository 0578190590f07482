"""codecsight cluster: N tritonservers on this machine behind one nginx with stream affinity.

Every request of a camera stream must reach the instance that holds the stream's decoder
and KV cache. The client sends the stream ID as gRPC metadata `x-stream-id`; nginx hashes it
consistently over the instances (`hash $http_x_stream_id consistent`), so adding or removing
an instance moves only the streams that must move. The nginx configuration is rendered from
deploy/nginx.conf.j2, the same template the Kubernetes ConfigMap is rendered from
(`kubernetes_configmap`).

    codecsight cluster --instances 2 --grpc-port 8001
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from codecsight.serve import (REPO_ROOT, ServerError, TritonServer, child_preexec, dial_host,
                              free_port, prepared_repository)

NGINX_TEMPLATE = REPO_ROOT / "deploy" / "nginx.conf.j2"
KUBERNETES_DIR = REPO_ROOT / "deploy" / "kubernetes"
# Room for the other tensors of a request (its header, the stream's question, AU tables)
# on top of the chunk itself.
REQUEST_OVERHEAD_BYTES = 1024 * 1024
# A dead instance is skipped this long after one failed request, then tried again: a
# refused connection costs ~1 ms, so a short time brings a restarted instance back soon.
FAIL_TIMEOUT_S = 10
# A connection that does not open in this time counts as a dead instance (a pod whose IP
# no longer answers drops packets instead of refusing them).
CONNECT_TIMEOUT_S = 2
# The proxy never gives up on a request before the client does (StreamClient.timeout_s).
READ_TIMEOUT_S = 600
NGINX_STOP_S = 10
# Kubernetes: the StatefulSet and its headless Service (deploy/kubernetes/triton.yaml).
K8S_STATEFULSET, K8S_SERVICE, K8S_NAMESPACE = "codecsight-triton", "codecsight-triton", "codecsight"
K8S_GRPC_PORT, K8S_PROXY_PORT = 8001, 8001
K8S_RESOLVER = "kube-dns.kube-system.svc.cluster.local"


def max_body_bytes(repository: Path | None = None) -> int:
    """Largest request the proxy lets through: the served max_chunk_bytes + overhead, bytes."""
    from codecsight.params import served_parameters

    return served_parameters("codec_parser", repository)["max_chunk_bytes"] + \
        REQUEST_OVERHEAD_BYTES


def render_nginx_conf(servers: list[str], listen: str, *, run_dir: Path | None = None,
                      resolver: str | None = None, body_bytes: int | None = None,
                      fail_timeout_s: int = FAIL_TIMEOUT_S,
                      connect_timeout_s: int = CONNECT_TIMEOUT_S,
                      read_timeout_s: int = READ_TIMEOUT_S) -> str:
    """nginx.conf text from deploy/nginx.conf.j2.

    servers: each instance's gRPC address, "host:port". listen: the proxy's "host:port".
    run_dir: an unprivileged local nginx keeps its pid, logs and temp files there (None:
    logs to stdout/stderr, as in a container). resolver: DNS server that re-resolves the
    server names (Kubernetes pods change IPs). body_bytes: client_max_body_size (default
    max_body_bytes() of the committed repository).
    """
    import jinja2

    if not servers:
        raise ValueError("a cluster needs at least one instance")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(NGINX_TEMPLATE.parent),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(NGINX_TEMPLATE.name).render(
        servers=servers, listen=listen, run_dir=str(run_dir) if run_dir else "",
        resolver=resolver or "", max_body_bytes=body_bytes or max_body_bytes(),
        fail_timeout_s=fail_timeout_s, connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s)


def kubernetes_servers(replicas: int, namespace: str = K8S_NAMESPACE) -> list[str]:
    """gRPC addresses of the StatefulSet's pods: stable DNS names through its headless Service."""
    return [f"{K8S_STATEFULSET}-{i}.{K8S_SERVICE}.{namespace}.svc.cluster.local:{K8S_GRPC_PORT}"
            for i in range(replicas)]


def kubernetes_configmap(replicas: int, namespace: str = K8S_NAMESPACE) -> str:
    """The nginx ConfigMap (YAML) for a StatefulSet of `replicas` Triton pods.

    deploy/kubernetes/nginx-configmap.yaml is this for 3 replicas; re-render it with
    `codecsight cluster --kubernetes-configmap N` when the replica count changes.
    """
    import yaml

    conf = render_nginx_conf(kubernetes_servers(replicas, namespace),
                             f"0.0.0.0:{K8S_PROXY_PORT}", resolver=K8S_RESOLVER)

    class Literal(str):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(Literal, lambda d, s: d.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|"))
    doc = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "codecsight-nginx", "namespace": namespace,
                        "labels": {"app.kubernetes.io/name": "codecsight-nginx"},
                        "annotations": {"codecsight/triton-replicas": str(replicas)}},
           "data": {"nginx.conf": Literal(conf)}}
    header = (f"# Rendered by `codecsight cluster --kubernetes-configmap {replicas}` from "
              "deploy/nginx.conf.j2 (the template of the local cluster too): edit the template.\n"
              "# The upstream lists one server per StatefulSet replica: re-render it when "
              "you scale the StatefulSet.\n")
    return header + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=1000)


def nginx_chash_instance(servers: list[str], stream_id: str) -> int:
    """Index in servers of the instance nginx's `hash ... consistent` sends stream_id to.

    A prediction, for tests and benchmarks that must pick stream IDs per instance or count
    how many move when one is added; nginx itself does the routing. It mirrors
    ngx_http_upstream_hash_module (1.22): each server "host:port" gets 160 points on a CRC32
    ring, crc32(host NUL port prev_point), the key's crc32 goes to the first point at or above
    it. All servers up and of weight 1, as rendered here.
    """
    import bisect
    import struct
    import zlib

    points = {}
    for index, server in enumerate(servers):
        host, _, port = server.rpartition(":")
        base, prev = host.encode() + b"\0" + port.encode(), 0
        for _ in range(160):
            prev = zlib.crc32(base + struct.pack("<I", prev))
            points.setdefault(prev, index)   # nginx drops duplicate points, keeping the first
    ring = sorted(points)
    at = bisect.bisect_left(ring, zlib.crc32(stream_id.encode()))
    return points[ring[at % len(ring)]]


def nginx_binary() -> str:
    """Path of nginx; ServerError saying how to install it when missing."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if not found:
        raise ServerError("nginx not found: install Debian's nginx-light (scripts/setup.sh "
                          "does) or put nginx on PATH")
    return found


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class Nginx:
    """An unprivileged nginx in the foreground on a rendered config; a context manager."""

    def __init__(self, conf_text: str, run_dir: Path, listen_host: str, listen_port: int):
        self.run_dir = Path(run_dir)
        self.conf_path = self.run_dir / "nginx.conf"
        self.listen_host, self.listen_port = listen_host, listen_port
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(conf_text)
        self.process: subprocess.Popen | None = None

    def check(self) -> None:
        """`nginx -t` on the config; ServerError with nginx's words when it is invalid."""
        result = subprocess.run([nginx_binary(), "-t", "-q", "-c", str(self.conf_path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ServerError(f"nginx rejected {self.conf_path}: {result.stderr.strip()}")

    def start(self, timeout_s: float = 10.0) -> "Nginx":
        self.check()
        log = open(self.run_dir / "nginx.out", "wb")
        # child_preexec: a killed test run or cluster must not leave nginx holding its port
        # (die_with_parent, when started from the main thread).
        self.process = subprocess.Popen(
            [nginx_binary(), "-c", str(self.conf_path), "-g", "daemon off;"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=child_preexec())
        log.close()
        host = dial_host(self.listen_host)
        deadline = time.monotonic() + timeout_s
        while not _port_open(host, self.listen_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"nginx did not start on {host}:{self.listen_port}: "
                                  f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    def log_tail(self, lines: int = 10) -> str:
        text = []
        for name in ("nginx.out", "error.log"):
            path = self.run_dir / name
            if path.is_file():
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def stop(self, grace_s: float = NGINX_STOP_S) -> None:
        """Graceful stop (SIGQUIT: requests in flight finish), SIGKILL after grace_s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "Nginx":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class Cluster:
    """N tritonservers on free loopback ports and nginx in front of them; a context manager.

    repository: the model repository every instance serves (prepared_repository's).
    grpc_port: the proxy's port (0: a free one); host: the proxy's address. Each instance
    logs to log_dir/instance-<i>.log; nginx keeps its config, pid and logs in log_dir/nginx.
    """

    def __init__(self, repository: Path, instances: int = 2, *, grpc_port: int = 0,
                 host: str = "127.0.0.1", log_dir: Path | None = None,
                 admin_key: str | None = None, extra_args: tuple[str, ...] = ()):
        if instances < 1:
            raise ValueError(f"--instances must be at least 1, got {instances}")
        self.repository = Path(repository)
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.log_dir = Path(log_dir) if log_dir else Path(
            tempfile.mkdtemp(prefix="codecsight-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Instances listen on loopback only: clients reach them through the proxy.
        self.servers = [TritonServer(self.repository, log_path=self.log_dir / f"instance-{i}.log",
                                     admin_key=admin_key, extra_args=extra_args)
                        for i in range(instances)]
        self.nginx: Nginx | None = None

    @property
    def grpc_url(self) -> str:
        """The proxy's gRPC address: what clients connect to."""
        return f"{dial_host(self.host)}:{self.grpc_port}"

    def nginx_conf(self) -> str:
        return render_nginx_conf([s.grpc_url for s in self.servers],
                                 f"{self.host}:{self.grpc_port}",
                                 run_dir=(self.log_dir / "nginx").resolve(),
                                 body_bytes=max_body_bytes(self.repository))

    def start(self, timeout_s: float = 300.0, progress=None) -> "Cluster":
        """Start every instance at once, then nginx; returns when all are ready.

        Raises ServerError (after stopping what did start) when one cannot be made ready.
        """
        pool = concurrent.futures.ThreadPoolExecutor(len(self.servers))
        try:
            # Launched from this thread, waited for in the pool's: a server dies with the
            # thread that launched it (serve.die_with_parent), and the pool's threads end.
            for server in self.servers:
                server.launch()
            waits = [pool.submit(s.wait_ready, timeout_s, progress) for s in self.servers]
            for future in waits:
                future.result()
            self.nginx = Nginx(self.nginx_conf(), self.log_dir / "nginx", self.host,
                               self.grpc_port).start()
            self._wait_proxy_ready(timeout_s=30)
        except BaseException:
            # Stop the others before waiting for their threads: a loading instance's thread
            # returns as soon as its process is gone, not after its whole timeout.
            self.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return self

    def _wait_proxy_ready(self, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if client.is_server_ready() and client.is_model_ready("ensemble"):
                    return
            time.sleep(0.1)
        raise ServerError(f"nginx on {self.grpc_url} does not answer for the instances: "
                          f"{self.nginx.log_tail()}")

    def describe(self) -> list[str]:
        """One line per instance with its addresses, then the proxy's."""
        lines = [f"instance {i}: grpc {s.grpc_url} http {s.host}:{s.http_port} "
                 f"metrics {s.host}:{s.metrics_port}" for i, s in enumerate(self.servers)]
        return lines + [f"proxy: grpc {self.grpc_url} (nginx, config "
                        f"{self.nginx.conf_path if self.nginx else '-'})"]

    def dead(self) -> list[int]:
        """Indexes of instances whose tritonserver has exited."""
        return [i for i, s in enumerate(self.servers)
                if s.process is not None and s.process.poll() is not None]

    def kill(self, index: int) -> None:
        """SIGKILL instance `index` and its model processes: a machine that dies, no goodbye."""
        process = self.servers[index].process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """Stop nginx first (no new requests), then every instance at once."""
        if self.nginx is not None:
            self.nginx.stop()
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.servers))) as pool:
            list(pool.map(lambda s: s.stop(), self.servers))

    def __enter__(self) -> "Cluster":
        return self.start() if self.nginx is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------
# The `codecsight cluster` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=2,
                        help="tritonservers to start (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001,
                        help="the proxy's gRPC port, what clients connect to; 0: any free "
                        "port (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the proxy's address (default loopback; 0.0.0.0 exposes it); "
                        "instances always listen on loopback")
    parser.add_argument("--model-dir", help="local Qwen2-VL checkpoint directory "
                        "(default: the trained demo model, models/codecsight-demo)")
    parser.add_argument("--log-dir", type=Path,
                        help="instance logs and nginx's files (default: a new temp folder)")
    parser.add_argument("--admin-key-file", type=Path,
                        default=REPO_ROOT / ".codecsight" / "admin-key",
                        help="admin-API key of every instance (created at random if missing)")
    parser.add_argument("--kubernetes-configmap", type=int, metavar="REPLICAS",
                        help="print the nginx ConfigMap for a StatefulSet of REPLICAS Triton "
                        "pods and exit (deploy/kubernetes/nginx-configmap.yaml is 3)")


def _say(message: str) -> None:
    print(f"codecsight cluster: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    """The `codecsight cluster` command; returns an exit code."""
    from codecsight.tools import UsageError
    from codecsight.tools.cli import admin_key

    if args.kubernetes_configmap is not None:
        if args.kubernetes_configmap < 1:
            raise UsageError("--kubernetes-configmap needs at least 1 replica")
        sys.stdout.write(kubernetes_configmap(args.kubernetes_configmap))
        return 0
    if args.instances < 1:
        raise UsageError(f"--instances must be at least 1, got {args.instances}")
    nginx_binary()   # fail before minutes of model loading when nginx is missing
    repository = prepared_repository(args.model_dir, progress=_say)
    cluster = Cluster(repository, args.instances, grpc_port=args.grpc_port, host=args.host,
                      log_dir=args.log_dir, admin_key=admin_key(args.admin_key_file))
    stop = {"signal": None}

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def on_signal(signum, _frame):
        stop["signal"] = signum

    # While loading, SIGTERM interrupts like Ctrl-C: Cluster.start stops what it started
    # (the instances run in their own sessions and would outlive this process otherwise).
    signal.signal(signal.SIGTERM, interrupt)
    _say(f"starting {args.instances} tritonservers (logs in {cluster.log_dir})")
    t0 = time.perf_counter()
    try:
        cluster.start(progress=_say)
    except KeyboardInterrupt:
        _say("interrupted while starting: stopped every instance")
        return 130
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _say(f"ready in {time.perf_counter() - t0:.1f} s")
    for line in cluster.describe():
        print(line, flush=True)
    reported, code = set(), 0
    while stop["signal"] is None:
        dead = set(cluster.dead())
        for i in sorted(dead - reported):
            # Keep serving: nginx sends the dead instance's streams to the survivors, where
            # their clients resume them from the last keyframe.
            _say(f"instance {i} (grpc {cluster.servers[i].grpc_url}) exited with code "
                 f"{cluster.servers[i].process.returncode}; its streams move to the other "
                 f"instances. Last log lines:\n{cluster.servers[i].log_tail(10)}")
        reported |= dead
        if len(dead) == len(cluster.servers):
            _say("every instance has exited: stopping")
            code = 1
            break
        if cluster.nginx.process.poll() is not None:
            _say(f"nginx exited with code {cluster.nginx.process.returncode}: stopping; "
                 f"{cluster.nginx.log_tail()}")
            code = 1
            break
        time.sleep(0.2)
    if stop["signal"] is not None:
        _say(f"{signal.Signals(stop['signal']).name}: stopping nginx and the instances")
    cluster.stop()
    return code
