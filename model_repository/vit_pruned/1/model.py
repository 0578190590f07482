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

from codecsight import backend
from codecsight.params import model_params
from codecsight.protocol import PATCHES, POSITIONS
from codecsight.vision import OnnxVisionEncoder, encode_patch_sets

DEFAULTS = {"model_dir": "../models/codecsight-demo", "onnx_file": "model.onnx",
            "max_patches": 4096, "intra_op_threads": 0}


class TritonPythonModel:
    def initialize(self, args):
        self.params = model_params(args["model_config"], DEFAULTS)
        onnx_path = Path(args["model_repository"]) / args["model_version"] / self.params["onnx_file"]
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} is missing: run `codecsight build` first")
        self.encoder = OnnxVisionEncoder(onnx_path, self.params["intra_op_threads"] or None)

    def execute(self, requests):
        responses = [None] * len(requests)
        sets, owners = [], []
        for i, request in enumerate(requests):
            try:
                sets.append((backend.array(request, PATCHES, pb_utils),
                             backend.array(request, POSITIONS, pb_utils)))
                owners.append(i)
            except Exception as e:
                responses[i] = backend.error(pb_utils, f"vit_pruned: stream "
                                             f"{request.correlation_id()!r}: {e}")
        try:
            outputs = encode_patch_sets(self.encoder, sets, self.params["max_patches"])
            for i, tokens in zip(owners, outputs):
                responses[i] = backend.response(pb_utils, TOKENS=tokens)
        except Exception:
            # A packed execution failed: run each set alone so one bad set fails only its own.
            for i, patch_set in zip(owners, sets):
                try:
                    tokens = encode_patch_sets(self.encoder, [patch_set],
                                               self.params["max_patches"])[0]
                    responses[i] = backend.response(pb_utils, TOKENS=tokens)
                except Exception as e:
                    responses[i] = backend.error(pb_utils, f"vit_pruned: stream "
                                                 f"{requests[i].correlation_id()!r}: {e}")
        return responses
