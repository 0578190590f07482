"""vit_pruned on CPU: runs the ONNX export of the pruned vision tower with ONNX Runtime.

Requests that arrive together (several streams) are packed into micro-batches of at most
max_patches patches; each stream's patches attend only within their own frames.
"""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

from pathlib import Path

import triton_python_backend_utils as pb_utils

from codecsight import backend, params
from codecsight.protocol import PATCHES, POSITIONS
from codecsight.requests import EncodeRequest
from codecsight.vision import OnnxVisionEncoder, encode_patch_sets

MODEL = "vit_pruned"


class TritonPythonModel:
    def initialize(self, args):
        self.params = params.read(MODEL, args["model_config"])
        onnx_path = (Path(args["model_repository"]) / args["model_version"]
                     / self.params["onnx_file"])
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} is missing: run `codecsight build` first")
        self.encoder = OnnxVisionEncoder(onnx_path, self.params["intra_op_threads"] or None)

    def execute(self, requests):
        responses, sets = [None] * len(requests), {}
        for i, request in enumerate(requests):
            try:
                sets[i] = self._read(request)
            except Exception as e:
                responses[i] = backend.failure(pb_utils, MODEL, request, e)
        try:
            tokens = encode_patch_sets(self.encoder, [(s.patches, s.positions)
                                                      for s in sets.values()],
                                       self.params["max_patches"])
            for i, t in zip(sets, tokens):
                responses[i] = backend.response(pb_utils, TOKENS=t)
        except Exception:
            # A packed execution failed: run each set alone so one bad set fails only its own.
            for i, patch_set in sets.items():
                responses[i] = backend.respond(pb_utils, MODEL, requests[i],
                                               lambda _, s=patch_set: self._encode_alone(s))
        return responses

    def _read(self, request):
        return EncodeRequest(request.correlation_id(),
                             patches=backend.array(request, PATCHES, pb_utils),
                             positions=backend.array(request, POSITIONS, pb_utils),
                             ).validate(self.encoder.patch_dim, self.encoder.patches_per_group,
                                        self.params["max_patches"])

    def _encode_alone(self, patch_set):
        tokens = encode_patch_sets(self.encoder, [(patch_set.patches, patch_set.positions)],
                                   self.params["max_patches"])[0]
        return backend.response(pb_utils, TOKENS=tokens)
