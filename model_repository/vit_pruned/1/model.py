"""vit_pruned on CPU: the checkpoint family's pruned vision tower (codecsight.families):
its ONNX export in ONNX Runtime, or the torch tower for a family without a sound export.

Requests that arrive together (several streams) are encoded frame by frame: every frame of
every request is one batch item, frames of similar length share an execution of at most
max_patches patches (vision.encode_patch_sets), so attention costs what each frame costs
alone. `device` (cpu or cuda) says where the encoder runs (vision.served_encoder). A family
whose tower needs each frame's grid (Family.position_columns 5: Qwen3-VL) also receives
FRAME_META (the rendered repository maps it in) and gets it appended to POSITIONS.
"""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

from pathlib import Path

import triton_python_backend_utils as pb_utils

from codecsight import backend, params
from codecsight.families import family_for_dir
from codecsight.protocol import FRAME_META, PATCHES, POSITIONS
from codecsight.requests import EncodeRequest
from codecsight.vision import encode_patch_sets, frame_grid_positions, served_encoder

MODEL = "vit_pruned"


class TritonPythonModel:
    def initialize(self, args):
        self.params = params.read(MODEL, args["model_config"])
        model_dir = params.resolve_model_dir(args["model_repository"], self.params["model_dir"])
        self.family = family_for_dir(model_dir)
        onnx_path = (Path(args["model_repository"]) / args["model_version"]
                     / self.params["onnx_file"])
        self.encoder = served_encoder(self.family, model_dir, onnx_path,
                                      self.params["intra_op_threads"] or None,
                                      self.params["device"])
        self.merge_size = self.family.geometry.merge_size

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
                                       self.params["max_patches"], self.merge_size)
            for i, t in zip(sets, tokens):
                responses[i] = backend.response(pb_utils, TOKENS=t)
        except Exception:
            # A shared execution failed: run each set alone so one bad set fails only its own.
            for i, patch_set in sets.items():
                responses[i] = backend.respond(pb_utils, MODEL, requests[i],
                                               lambda _, s=patch_set: self._encode_alone(s))
        return responses

    def _read(self, request):
        encode = EncodeRequest(request.correlation_id(),
                               patches=backend.array(request, PATCHES, pb_utils),
                               positions=backend.array(request, POSITIONS, pb_utils),
                               ).validate(self.encoder.patch_dim, self.encoder.patches_per_group,
                                          self.params["max_patches"])
        if self.family.position_columns == 5:
            encode.positions = frame_grid_positions(
                encode.positions, backend.array(request, FRAME_META, pb_utils), self.merge_size)
        return encode

    def _encode_alone(self, patch_set):
        tokens = encode_patch_sets(self.encoder, [(patch_set.patches, patch_set.positions)],
                                   self.params["max_patches"], self.merge_size)[0]
        return backend.response(pb_utils, TOKENS=tokens)
