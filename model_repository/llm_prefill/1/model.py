"""llm_prefill: Triton tensors in, codecsight.llm.StreamSession calls, tensors out."""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import triton_python_backend_utils as pb_utils

from codecsight import backend, params
from codecsight.families import family_for_dir
from codecsight.llm import StreamSession, VisualLM, split_frames
from codecsight.metrics import ModelMetrics
from codecsight.protocol import (ANALYSIS_FPS, FRAME_META, POSITIONS, QUESTION, REFRESH,
                                 TOKENS, WINDOW_SECONDS, InvalidRequest)
from codecsight.requests import PrefillRequest
from codecsight.state import StreamStates

MODEL = "llm_prefill"


class TritonPythonModel:
    def initialize(self, args):
        self.params = params.read(MODEL, args["model_config"])
        model_dir = params.resolve_model_dir(args["model_repository"], self.params["model_dir"])
        self.family = family_for_dir(model_dir)
        model, tokenizer = self.family.load(model_dir)
        self.merge_size = self.family.geometry.merge_size
        self.vlm = VisualLM(model, tokenizer, self.params["max_new_tokens"], family=self.family)
        backend.check_stream_limits(MODEL, args["model_config"], self.params["state_ttl_seconds"])
        self.streams = StreamStates(self.params["state_ttl_seconds"],
                                    self.params["max_state_bytes"], lambda s: s.nbytes)
        self.metrics = ModelMetrics(pb_utils, args["model_name"])

    def execute(self, requests):
        # The sequence batcher may hand us several streams at once: each is served from its
        # own state, in order; the byte cap is enforced once their caches have grown.
        responses = [backend.respond(pb_utils, MODEL, r, lambda r: self._prefill(r, len(requests)))
                     for r in requests]
        self.streams.expire()
        self.metrics.set_active_streams(len(self.streams))
        return responses

    def _prefill(self, request, batch_size):
        req = PrefillRequest(
            backend.sequence(request, pb_utils),
            tokens=backend.array(request, TOKENS, pb_utils),
            positions=backend.array(request, POSITIONS, pb_utils),
            frame_meta=backend.array(request, FRAME_META, pb_utils),
            question=backend.string(request, QUESTION, pb_utils),
            refresh=backend.string(request, REFRESH, pb_utils),
            window_seconds=backend.scalar(request, WINDOW_SECONDS, pb_utils),
        ).validate(self.params["max_question_tokens"],
                   lambda question: len(self.vlm.question_ids(question)))
        seq = req.seq

        def new_session():  # the window, refresh policy and rate named at START are kept
            return StreamSession(req.window_seconds,
                                 refresh=req.refresh or self.params["default_refresh"],
                                 anchor_frames=self.params["anchor_refresh_frames"],
                                 seconds_per_t=self._seconds_per_t(request, seq))

        # codec_parser, first in the ensemble, checks the owner and refuses another's START;
        # a START that reaches this model is the owner's (a copy here may outlive an eviction
        # there, or the owner restarts after a crash), so it replaces the stream.
        with backend.stream_state(self.streams, seq, new_session, replace=True) as session:
            frames = split_frames(req.tokens, req.positions, req.frame_meta, self.merge_size)
            answer, stats = session.step(self.vlm, frames, req.question, req.refresh)
        stats.stream, stats.active_streams = seq.stream_id, len(self.streams)
        stats.state_bytes, stats.batch_size = session.nbytes, batch_size
        if answer is not None and self.params["report_first_logits"]:
            stats.first_logits = answer.first_logits.float().tolist()
        if not seq.dry_run:
            self.metrics.observe_llm(stats, streams=self.streams)
        return backend.response(pb_utils, ANSWER=answer.text if answer else "", LLM_STATS=stats)

    def _seconds_per_t(self, request, seq):
        """Stream seconds per window frame, from the request's ANALYSIS_FPS (None when the
        request has none: a caller other than the ensemble)."""
        if pb_utils.get_input_tensor_by_name(request, ANALYSIS_FPS) is None:
            return None
        fps = backend.scalar(request, ANALYSIS_FPS, pb_utils)
        if not fps > 0:
            raise InvalidRequest(seq.stream_id, f"ANALYSIS_FPS must be positive, got {fps}")
        return self.family.seconds_per_t(fps)

    def finalize(self):
        self.streams = None
