"""codec_parser: Triton tensors in, codecsight.parser.StreamParser calls, tensors out."""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import av
import numpy as np
import triton_python_backend_utils as pb_utils

from codecsight import backend
from codecsight.checkpoint import Geometry
from codecsight.codec import LOOP_FILTER_SKIPS
from codecsight.metrics import ModelMetrics
from codecsight.params import model_params, resolve_model_dir
from codecsight.parser import StreamParser
from codecsight.policy import PruningConfig
from codecsight.protocol import (ANALYSIS_FPS, CHUNK, CODEC, PATCH_POLICIES, POLICY, SOURCE_FPS,
                                 StreamError, check_choice)
from codecsight.state import StreamStates

DEFAULTS = {"model_dir": "../models/codecsight-demo", "state_ttl_seconds": 60.0,
            "max_state_bytes": 2 << 30, "max_chunk_bytes": 32 << 20,
            "default_policy": "dense", "skip_loop_filter": "noref",
            **PruningConfig.defaults()}


class TritonPythonModel:
    def initialize(self, args):
        self.params = model_params(args["model_config"], DEFAULTS)
        model_dir = resolve_model_dir(args["model_repository"], self.params["model_dir"])
        self.geometry = Geometry.from_model_dir(model_dir)
        self.pruning = PruningConfig.from_params(self.params)
        for key, allowed in (("default_policy", PATCH_POLICIES),
                             ("skip_loop_filter", LOOP_FILTER_SKIPS)):
            if self.params[key] not in allowed:
                raise ValueError(f"codec_parser: parameter {key}={self.params[key]!r}; "
                                 f"use one of {', '.join(allowed)}")
        self.streams = StreamStates(self.params["state_ttl_seconds"],
                                    self.params["max_state_bytes"], lambda s: s.nbytes)
        self.metrics = ModelMetrics(pb_utils, args["model_name"])

    def execute(self, requests):
        return [self._execute_one(r) for r in requests]

    def _execute_one(self, request):
        try:
            seq = backend.Sequence(request, pb_utils)
            chunk = backend.array(request, CHUNK, pb_utils)
            if chunk.dtype != np.uint8 or chunk.ndim != 1:
                raise StreamError(seq.stream_id, "CHUNK must be a 1-D UINT8 tensor")
            if len(chunk) > self.params["max_chunk_bytes"]:
                raise StreamError(seq.stream_id, f"chunk of {len(chunk)} bytes is over the "
                                  f"{self.params['max_chunk_bytes']}-byte cap; send smaller chunks")
            # An empty POLICY keeps the stream's policy (the one named at START).
            policy = backend.string(request, POLICY, pb_utils)
            if policy:
                check_choice(seq.stream_id, "policy", policy, PATCH_POLICIES)
            if len(chunk) == 0 and not seq.end:
                raise StreamError(seq.stream_id, "empty CHUNK: send at least one access unit "
                                  "(an empty chunk is only valid with END)")
            with backend.stream_state(self.streams, seq,
                                      lambda: self._new_parser(seq, request, policy)) as parser:
                result = parser.parse(chunk.tobytes(), policy or None, final=seq.end)
            result.stats.stream, result.stats.active_streams = seq.stream_id, len(self.streams)
            if not seq.dry_run:
                self.metrics.observe_parse(result.stats, streams=self.streams)
            return backend.response(pb_utils, PATCHES=result.patches, POSITIONS=result.positions,
                                    FRAME_META=result.frame_meta, PARSE_STATS=result.stats)
        except StreamError as e:
            return backend.error(pb_utils, f"codec_parser: {e}")
        except Exception as e:  # one bad request must never take the model down
            return backend.error(pb_utils, f"codec_parser: stream "
                                 f"{request.correlation_id()!r}: {type(e).__name__}: {e}")

    def _new_parser(self, seq, request, policy):
        codec = backend.string(request, CODEC, pb_utils)
        source_fps = backend.scalar(request, SOURCE_FPS, pb_utils)
        analysis_fps = backend.scalar(request, ANALYSIS_FPS, pb_utils)
        try:
            return StreamParser(self.geometry, codec, source_fps, analysis_fps,
                                policy=policy or self.params["default_policy"],
                                config=self.pruning,
                                skip_loop_filter=self.params["skip_loop_filter"])
        except av.codec.codec.UnknownCodecError as e:
            raise StreamError(seq.stream_id, f"unknown codec {codec!r}: send h264 (the codec "
                              "policy's input) or another codec FFmpeg decodes") from e
        except ValueError as e:
            raise StreamError(seq.stream_id, str(e)) from e

    def finalize(self):
        self.streams = None
