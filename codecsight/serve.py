"""Run a real tritonserver on the CodecSight model repository.

`start_server` is the one way to get a ready server: the CLI (serve, demo), bench, eval and
the test fixtures all call it. It builds what is missing first (`build`: the ONNX export of
the vision tower; `prepared_repository`: the committed repository, or a copy rendered for
another checkpoint).

Two ways to get the server binary: the tritonserver 2.51 that the `nvidia-pytriton` wheel
bundles (assembled here into a backend directory with the Python-backend stub matching the
running Python), or a `tritonserver` already on PATH, as in NVIDIA's Triton containers.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from codecsight import families

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "codecsight-demo"   # trained, committed
ENSEMBLE = "ensemble"
# Python-backend shared memory starts at 1 MB; a dense window of patches is ~100 MB.
SHM_DEFAULT_BYTES = 64 * 1024 * 1024
SHM_GROWTH_BYTES = 64 * 1024 * 1024
# APIs that can change the server or read its memory: only callers sending the admin key
# header may use them. Inference, health, metadata, config and statistics stay open.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_KEY_HEADER = "admin-key"


def _libc_prctl():
    """libc's prctl, looked up before any fork (a child between fork and exec must not
    import or allocate); None where there is none (not Linux)."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for server children: SIGTERM them when the process that started them dies.

    A killed test run or a `codecsight serve` that gets SIGKILL would otherwise leave its
    tritonservers (GBs of memory each) running as orphans. Linux only; elsewhere a no-op.
    Linux signals the child when the *thread* that forked it exits: use it only from the
    main thread (`child_preexec`).
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def child_preexec():
    """die_with_parent when called on the main thread, else None: a child started from a
    worker thread would be killed when that thread ends, so it goes without (as before)."""
    import threading
    return die_with_parent if threading.current_thread() is threading.main_thread() else None


class ServerError(RuntimeError):
    """The server could not be started or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dial_host(bind_host: str) -> str:
    """The address a local client dials for a listener bound to bind_host: loopback for the
    wildcard ("0.0.0.0" or ""), which is not an address one can connect to."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "") else bind_host


def has_gpu() -> bool:
    """True when an NVIDIA GPU is visible (then the TensorRT vit_pruned config is used)."""
    if not Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _bundled_server() -> tuple[Path, Path, Path] | None:
    """(tritonserver, python backend dir, stub) from the nvidia-pytriton wheel, if installed."""
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python-backend stub for Python {version}; "
                          "use Python 3.8-3.13")
    return binary, root / "backends" / "python", stub


def make_backend_dir(python_backend: Path, stub: Path, dest: Path) -> Path:
    """A --backend-directory holding the Python backend with the stub beside it."""
    target = dest / "python"
    shutil.copytree(python_backend, target, ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    shutil.copy2(stub, target / stub.name)
    return dest


def server_env(site_packages: str | None = None) -> dict[str, str]:
    """Environment for tritonserver and its Python stubs: our packages and bundled libs."""
    env = dict(os.environ)
    site = site_packages or sysconfig.get_paths()["purelib"]
    # The stub embeds the system libpython; PYTHONPATH is how it finds the venv's packages
    # and this repository (an editable install's .pth is not read from PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), site, env.get("PYTHONPATH")) if p)
    libs = Path(site) / "nvidia_pytriton.libs"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
    # Each model instance gets its own process; keep their thread pools from oversubscribing.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    return env


# Triton logs in glog format: an error line starts with E and the date (E1130 05:10:00.1 ...).
_LOG_ERROR = re.compile(r"^E\d{4} ")
EXIT_TIMEOUT_S = 5


class TritonServer:
    """A tritonserver process on a model repository; use as a context manager."""

    def __init__(self, repository: Path = DEFAULT_REPOSITORY, *, host: str = "127.0.0.1",
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 config_name: str | None = None, log_path: Path | None = None,
                 log_verbose: int = 0, admin_key: str | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.repository = Path(repository).resolve()
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.config_name = config_name if config_name is not None else (
            "" if has_gpu() else "cpu")
        self.log_path = log_path
        self.log_verbose = log_verbose
        # A fresh random key unless one is given: nobody can use the admin APIs by default.
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.extra_args = tuple(extra_args)
        # The Python backend's shared-memory regions (/dev/shm) carry this prefix, so stop()
        # can remove what a stub left behind (it does when a stream is open at shutdown).
        self.shm_prefix = f"codecsight_{secrets.token_hex(6)}_"
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"{dial_host(self.host)}:{self.grpc_port}"

    def command(self) -> list[str]:
        on_path = shutil.which("tritonserver")
        bundled = _bundled_server()
        if bundled is not None:
            binary, python_backend, stub = bundled
            self._tmp = tempfile.TemporaryDirectory(prefix="codecsight-backends-")
            backend_args = ["--backend-directory",
                            str(make_backend_dir(python_backend, stub, Path(self._tmp.name)))]
        elif on_path:
            binary, backend_args = Path(on_path), []  # NVIDIA container: its own backends
        else:
            raise ServerError("no tritonserver found: install nvidia-pytriton==0.7.0 "
                              "(scripts/setup.sh does) or run inside NVIDIA's Triton container")
        args = [
            str(binary), f"--model-repository={self.repository}", *backend_args,
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none", "--exit-on-error=true", "--strict-readiness=true",
            # A camera stream left open never finishes: on shutdown, wait this long for the
            # requests in flight, not Triton's default 30 s (nothing is lost: state is freed).
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_KEY_HEADER}={self.admin_key}",
            f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_KEY_HEADER}={self.admin_key}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.config_name:
            args.append(f"--model-config-name={self.config_name}")
        return args + list(self.extra_args)

    def start(self, timeout_s: float = 300.0, progress=None) -> "TritonServer":
        self.launch()
        self.wait_ready(timeout_s, progress)
        return self

    def launch(self) -> "TritonServer":
        """Start the process without waiting for it to be ready (then wait_ready).

        Launched from the main thread, the server dies with this process (die_with_parent);
        from a worker thread it does not (PR_SET_PDEATHSIG follows the forking thread, so it
        would die with that thread). Several servers start in parallel by launching each
        from the main thread, then waiting in threads (codecsight.tools.cluster).
        """
        cmd = self.command()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, env=server_env(), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=child_preexec())
        return self

    def wait_ready(self, timeout_s: float, progress=None) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        deadline, last_note = time.monotonic() + timeout_s, 0.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} "
                                  f"while loading; last log lines:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if client.is_server_ready() and client.is_model_ready(ENSEMBLE):
                    return
            if progress and time.monotonic() - last_note > 5:
                progress(f"waiting for models to load ({self.log_path})")
                last_note = time.monotonic()
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; last log lines:\n"
                          f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The log's error lines (a model that failed to load says why there, far above the
        end), then its last `lines` lines."""
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        text = Path(self.log_path).read_text(errors="replace").splitlines()
        tail = text[-lines:]
        errors = [line for line in text[:-lines] if _LOG_ERROR.match(line)]
        return "\n".join((["errors logged:", *errors, "last lines:"] if errors else []) + tail)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None and self.process.poll() is not None:
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def render_repository(source: Path, dest: Path, model_dir: Path) -> Path:
    """Copy a model repository for another checkpoint.

    Sets every model's `model_dir` parameter, and the fixed trailing dims of the visual
    tensors (patch length, token width) that the TensorRT config spells out. For the
    checkpoint's family (codecsight.families): a tower without a sound ONNX export, or one that
    needs each frame's grid (position_columns 5, which gets FRAME_META), is served in the
    Python backend in every config (the TensorRT config is replaced by the CPU one).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.protocol import FRAME_META, PATCHES, TOKENS

    family = families.family_for_dir(model_dir)
    geometry = family.geometry
    widths = {PATCHES: geometry.patch_dim, TOKENS: family.token_width}
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(
        "__pycache__", "*.onnx", "*.onnx.data", "*.plan"))
    vit = dest / "vit_pruned"
    if not family.onnx_exportable or family.position_columns != 3:
        # The Python-backend model widens POSITIONS with FRAME_META before the tower, and runs
        # a torch tower: a TensorRT plan's fixed inputs can do neither.
        shutil.copy2(vit / "configs" / "cpu.pbtxt", vit / "config.pbtxt")
    for config_path in list(dest.glob("*/config.pbtxt")) + list(dest.glob("*/configs/*.pbtxt")):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        if "model_dir" in config.parameters:
            config.parameters["model_dir"].string_value = str(Path(model_dir).resolve())
        for tensor in list(config.input) + list(config.output):
            if tensor.name in widths and tensor.dims and tensor.dims[-1] != -1:
                tensor.dims[-1] = widths[tensor.name]
        if family.position_columns == 5:
            _map_frame_meta_to_vit(config, FRAME_META)
        config_path.write_text(text_format.MessageToString(config))
    return dest


def _map_frame_meta_to_vit(config, frame_meta: str) -> None:
    """vit_pruned takes FRAME_META (each frame's grid) and the ensemble feeds it."""
    if config.name == "vit_pruned" and all(i.name != frame_meta for i in config.input):
        tensor = config.input.add(name=frame_meta, data_type=config.input[1].data_type)
        tensor.dims.extend([-1, -1])
        tensor.allow_ragged_batch = config.input[1].allow_ragged_batch
    if config.platform == "ensemble":
        for step in config.ensemble_scheduling.step:
            if step.model_name == "vit_pruned" and frame_meta not in step.input_map:
                step.input_map[frame_meta] = "frame_meta"


# -------------------------------------------------------------------------------------------
# Artifacts and the one way to start a server


def _quiet(message: str) -> None:
    pass


def require_checkpoint(model_dir: str | Path) -> Path:
    """model_dir as a Path if it holds a checkpoint (config.json); else ServerError saying how
    to get one."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        committed = model_dir.resolve() == DEFAULT_MODEL_DIR.resolve()
        hint = ("it is committed with the repository: restore it with `git checkout -- "
                f"{DEFAULT_MODEL_DIR.relative_to(REPO_ROOT)}`, or retrain it with the command "
                "in its TRAINING.md") if committed \
            else "give a Hugging Face checkpoint directory of a supported family"
        raise ServerError(f"no model checkpoint in {model_dir} (config.json missing): {hint}"
                          + ("" if committed else f" ({families.supported()})"))
    try:
        families.family_for_dir(model_dir)
    except ValueError as e:   # UnsupportedFamily, or a bad codecsight.json
        raise ServerError(f"cannot serve {model_dir}: {e}") from e
    return model_dir


def build(model_dir: Path = DEFAULT_MODEL_DIR, repository: Path = DEFAULT_REPOSITORY,
          force: bool = False, progress=None) -> Path:
    """Make sure the checkpoint and the vit_pruned ONNX export exist; returns the repository.

    The export (repository/vit_pruned/1/model.onnx) is redone when missing, older than the
    checkpoint's weights, or force. progress: called with one line per step (str -> None).
    Raises ServerError when model_dir holds no checkpoint.
    """
    from codecsight import vision

    progress = progress or _quiet
    model_dir = require_checkpoint(model_dir)
    family = families.family_for_dir(model_dir)
    if not family.onnx_exportable:
        progress(f"{family.title}: vit_pruned serves the torch tower (no ONNX export)")
        return Path(repository)
    onnx_path = Path(repository) / "vit_pruned" / "1" / "model.onnx"
    weights = model_dir / "model.safetensors"
    stale = onnx_path.is_file() and weights.is_file() and \
        weights.stat().st_mtime > onnx_path.stat().st_mtime
    if force or stale or not onnx_path.is_file():
        progress(f"exporting the pruned vision tower to {onnx_path}")
        t0 = time.perf_counter()
        vision.export_onnx(model_dir, onnx_path)
        progress(f"exported in {time.perf_counter() - t0:.1f} s")
    return Path(repository)


def prepared_repository(model_dir: str | Path | None = None, dest: Path | None = None,
                        progress=None) -> Path:
    """The repository to serve model_dir from, built (see build).

    The committed repository for the default checkpoint (model_dir None or the committed
    one); otherwise a copy rendered for model_dir into dest (default
    REPO_ROOT/.codecsight/repository, replaced).
    """
    progress = progress or _quiet
    if model_dir is None or Path(model_dir).resolve() == DEFAULT_MODEL_DIR.resolve():
        return build(progress=progress)
    model_dir = require_checkpoint(model_dir)
    dest = Path(dest) if dest is not None else REPO_ROOT / ".codecsight" / "repository"
    progress(f"rendering the model repository for {model_dir} into {dest}")
    render_repository(DEFAULT_REPOSITORY, dest, Path(model_dir))
    return build(Path(model_dir), dest, progress=progress)


def start_server(model_dir: str | Path | None = None, *, host: str = "127.0.0.1",
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 log_path: Path | None = None, admin_key: str | None = None,
                 repository_dest: Path | None = None, timeout_s: float = 300.0,
                 progress=None) -> TritonServer:
    """A tritonserver serving model_dir (default: the committed demo model), started and ready.

    Builds what is missing first (prepared_repository; repository_dest: where a repository
    for another checkpoint is rendered). Ports 0 take free ones. Use the result as a context
    manager (or call stop()) to end it. progress: one line per step (str -> None), e.g. to
    stderr. Raises ServerError when it cannot be built, started or made ready in timeout_s.
    """
    progress = progress or _quiet
    server = TritonServer(prepared_repository(model_dir, repository_dest, progress), host=host,
                          grpc_port=grpc_port, http_port=http_port,
                          metrics_port=metrics_port, log_path=log_path, admin_key=admin_key)
    progress(f"starting tritonserver on {server.repository} "
             f"(config: {server.config_name or 'default (GPU)'})")
    t0 = time.perf_counter()
    try:
        server.start(timeout_s, progress=progress)
    except BaseException:
        server.stop()   # a server that exited while loading still holds its backend copy
        raise
    progress(f"ready in {time.perf_counter() - t0:.1f} s: gRPC {server.host}:{server.grpc_port}, "
             f"HTTP {server.host}:{server.http_port}, metrics {server.host}:{server.metrics_port}; "
             f"log {server.log_path}")
    return server
