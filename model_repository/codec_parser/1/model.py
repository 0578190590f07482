"""codec_parser: Triton tensors in, codecsight.parser.StreamParser calls, tensors out."""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import triton_python_backend_utils as pb_utils

from codecsight import backend, params
from codecsight.checkpoint import Geometry
from codecsight.metrics import ModelMetrics
from codecsight.parser import StreamParser
from codecsight.policy import PruningConfig
from codecsight.protocol import (ANALYSIS_FPS, AU_BYTES, AU_PTS, CHUNK, CHUNK_SEQ, CODEC,
                                 POLICY, ROTATION, SOURCE_FPS, STREAM_TOKEN, TIME_JUMP,
                                 WINDOW_SECONDS)
from codecsight.requests import ParseRequest
from codecsight.state import ChunkOrder, OrderedStream, StreamStates

MODEL = "codec_parser"


class TritonPythonModel:
    def initialize(self, args):
        self.params = params.read(MODEL, args["model_config"])
        self.geometry = Geometry.from_model_dir(
            params.resolve_model_dir(args["model_repository"], self.params["model_dir"]))
        self.pruning = PruningConfig.from_params(self.params)
        backend.check_stream_limits(MODEL, args["model_config"],
                                    self.params["state_ttl_seconds"], self.params["max_streams"])
        self.streams = StreamStates(self.params["state_ttl_seconds"],
                                    self.params["max_state_bytes"], lambda s: s.nbytes,
                                    max_streams=self.params["max_streams"])
        self.metrics = ModelMetrics(pb_utils, args["model_name"])

    def execute(self, requests):
        return [backend.respond(pb_utils, MODEL, r, self._parse) for r in requests]

    def _parse(self, request):
        req = ParseRequest(
            backend.sequence(request, pb_utils), chunk=backend.array(request, CHUNK, pb_utils),
            policy=backend.string(request, POLICY, pb_utils),
            codec=backend.string(request, CODEC, pb_utils),
            source_fps=backend.scalar(request, SOURCE_FPS, pb_utils),
            analysis_fps=backend.scalar(request, ANALYSIS_FPS, pb_utils),
            window_seconds=backend.scalar(request, WINDOW_SECONDS, pb_utils),
            au_bytes=backend.array(request, AU_BYTES, pb_utils),
            au_pts=backend.array(request, AU_PTS, pb_utils),
            chunk_seq=int(backend.scalar(request, CHUNK_SEQ, pb_utils)),
            stream_token=backend.string(request, STREAM_TOKEN, pb_utils),
            rotation=int(backend.scalar(request, ROTATION, pb_utils)),
            time_jump=backend.scalar(request, TIME_JUMP, pb_utils),
        ).validate(self.params["max_chunk_bytes"])
        seq, chunk = req.seq, req.chunk.tobytes()
        # Only the token bound at START may continue, restart or END the stream.
        restart = seq.start and self.streams.is_owner(seq.stream_id, req.stream_token)
        with backend.stream_state(self.streams, seq, lambda: self._new_stream(req, restart),
                                  owner=req.stream_token) as stream:
            if stream.order.is_duplicate(seq.stream_id, req.chunk_seq, chunk, seq.end):
                result = stream.state.duplicate(len(chunk))
            else:
                result = stream.state.parse(chunk, req.policy or None, final=seq.end,
                                            au_bytes=req.au_bytes, au_pts=req.au_pts)
                stream.order.processed(req.chunk_seq, chunk)
                stream.time_jumps += req.time_jump != 0.0
        stats = result.stats
        stats.stream, stats.active_streams = seq.stream_id, len(self.streams)
        stats.chunk_seq, stats.time_jump = req.chunk_seq, req.time_jump
        stats.time_jumps, stats.owner_restart = stream.time_jumps, restart
        if not seq.dry_run:
            self.metrics.observe_parse(stats, streams=self.streams)
        return backend.response(pb_utils, PATCHES=result.patches, POSITIONS=result.positions,
                                FRAME_META=result.frame_meta, PARSE_STATS=stats)

    def _new_stream(self, req, owner_restart: bool = False):
        return OrderedStream(self._new_parser(req), ChunkOrder(req.chunk_seq, owner_restart))

    def _new_parser(self, req):
        # The policy named at START holds for the stream's requests that name none.
        return StreamParser(self.geometry, req.codec, req.source_fps, req.analysis_fps,
                            policy=req.policy or self.params["default_policy"],
                            config=self.pruning, window_seconds=req.window_seconds,
                            skip_loop_filter=self.params["skip_loop_filter"],
                            rotation=req.rotation, max_pixels=self.params["max_pixels"],
                            min_pixels=self.geometry.min_pixels, stream_id=req.seq.stream_id)

    def finalize(self):
        self.streams = None
