"""perf/gpu_check.py: the library-level GPU check runs with only what a GPU machine has.

GPU machines (the device tool's) have torch, numpy, transformers, onnx and onnxruntime, but
none of the project's serving and client dependencies. The check runs here on the CPU
(`--device cpu`) under an import guard that makes those packages fail to import, so a
dependency that creeps onto its path fails this test rather than the GPU run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Installed here for serving, the client, the page or the tests; absent on a GPU machine.
ABSENT_ON_GPU_MACHINES = ("tritonclient", "pytriton", "psutil", "pydantic", "matplotlib", "PIL",
                          "tenacity", "starlette", "uvicorn", "playwright", "grpc", "locust",
                          "gevent", "kubernetes_validate", "pytest")

GUARD = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class _Hide(importlib.abc.MetaPathFinder):
    # Every finder behind one that answers "not found" for the blocked packages: to imports
    # and to availability probes (importlib.util.find_spec) alike, as on a machine without them.
    def __init__(self, finders):
        self.finders = finders
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None
    def find_distributions(self, *args, **kwargs):   # importlib.metadata asks here
        for finder in self.finders:
            yield from getattr(finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs)
    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()
sys.meta_path[:] = [_Hide(list(sys.meta_path))]
"""


def test_gpu_check_runs_on_cpu_without_serving_dependencies(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(GUARD.format(blocked=ABSENT_ON_GPU_MACHINES))
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # The guard really hides them (psutil, pydantic and tritonclient are installed here).
    hidden = subprocess.run([sys.executable, "-c", "import psutil"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert hidden.returncode != 0 and "ModuleNotFoundError" in hidden.stderr
    proc = subprocess.run(
        [sys.executable, str(REPO / "perf" / "gpu_check.py"), "--device", "cpu", "--seconds", "4",
         "--streams", "2", "--check-windows", "1", "--threads", "1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    text = json.dumps(result)
    assert "dense" in text and "codec" in text
    assert result["device"] == "cpu"
    # The CPU compared with itself: bit-identical tokens and logits, the same answers.
    for check in result["check"].values():
        assert check["vit_tokens_max_abs_diff"] == 0
        assert check["first_logits_max_abs_diff"] == 0
        assert check["same_answers"] is True


def test_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(REPO / "perf" / "gpu_check.py"), "--device", "cuda"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cuda" in (proc.stdout + proc.stderr).lower()
