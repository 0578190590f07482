"""llm_prefill: Triton tensors in, codecsight.llm.StreamSession calls, tensors out."""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import triton_python_backend_utils as pb_utils

from codecsight import backend, checkpoint
from codecsight.llm import StreamSession, VisualLM, split_frames
from codecsight.metrics import ModelMetrics
from codecsight.params import model_params, resolve_model_dir
from codecsight.protocol import (FRAME_META, POSITIONS, QUESTION, REFRESH, REFRESH_POLICIES,
                                 TOKENS, WINDOW_SECONDS, StreamError, check_choice)
from codecsight.state import StreamStates

DEFAULTS = {"model_dir": "../models/codecsight-demo", "max_new_tokens": 8,
            "max_question_tokens": 64, "state_ttl_seconds": 60.0, "max_state_bytes": 4 << 30,
            "default_refresh": "selective", "anchor_refresh_frames": 1}


class TritonPythonModel:
    def initialize(self, args):
        self.params = model_params(args["model_config"], DEFAULTS)
        if self.params["default_refresh"] not in REFRESH_POLICIES:
            raise ValueError(f"llm_prefill: default_refresh {self.params['default_refresh']!r}"
                             f" is not one of {', '.join(REFRESH_POLICIES)}")
        if self.params["anchor_refresh_frames"] < 0:
            raise ValueError("llm_prefill: anchor_refresh_frames must be >= 0")
        model_dir = resolve_model_dir(args["model_repository"], self.params["model_dir"])
        model, tokenizer = checkpoint.load(model_dir)
        self.merge_size = checkpoint.Geometry.from_model_dir(model_dir).merge_size
        self.vlm = VisualLM(model, tokenizer, self.params["max_new_tokens"])
        self.streams = StreamStates(self.params["state_ttl_seconds"],
                                    self.params["max_state_bytes"], lambda s: s.nbytes)
        self.metrics = ModelMetrics(pb_utils, args["model_name"])

    def execute(self, requests):
        # The sequence batcher may hand us several streams at once: each is served from its
        # own state, in order; the byte cap is enforced once their caches have grown.
        responses = [self._execute_one(r, len(requests)) for r in requests]
        self.streams.expire()
        self.metrics.set_active_streams(len(self.streams))
        return responses

    def _execute_one(self, request, batch_size):
        try:
            seq = backend.Sequence(request, pb_utils)
            refresh = backend.string(request, REFRESH, pb_utils)
            if refresh:  # empty keeps the stream's policy
                check_choice(seq.stream_id, "refresh policy", refresh, REFRESH_POLICIES)
            question = backend.string(request, QUESTION, pb_utils)
            n_question = len(self.vlm.question_ids(question))
            if n_question > self.params["max_question_tokens"]:
                raise StreamError(seq.stream_id, f"question is {n_question} tokens, over the "
                                  f"limit of {self.params['max_question_tokens']}; shorten it")
            if seq.start or seq.dry_run:
                window_seconds = backend.scalar(request, WINDOW_SECONDS, pb_utils)
                if not window_seconds > 0:
                    raise StreamError(seq.stream_id, "WINDOW_SECONDS must be positive")

            def new_session():  # WINDOW_SECONDS is read at START and kept
                return StreamSession(window_seconds,
                                     refresh=refresh or self.params["default_refresh"],
                                     anchor_frames=self.params["anchor_refresh_frames"])

            # codec_parser, first in the ensemble, refuses a duplicate START; a copy here may
            # outlive an eviction there, so a resumed stream replaces it.
            with backend.stream_state(self.streams, seq, new_session, replace=True) as session:
                frames = split_frames(backend.array(request, TOKENS, pb_utils),
                                      backend.array(request, POSITIONS, pb_utils),
                                      backend.array(request, FRAME_META, pb_utils),
                                      self.merge_size)
                answer, stats = session.step(self.vlm, frames, question, refresh)
            stats.stream, stats.active_streams = seq.stream_id, len(self.streams)
            stats.state_bytes, stats.batch_size = session.nbytes, batch_size
            if not seq.dry_run:
                self.metrics.observe_llm(stats, streams=self.streams)
            return backend.response(pb_utils, ANSWER=answer.text if answer else "",
                                    LLM_STATS=stats)
        except StreamError as e:
            return backend.error(pb_utils, f"llm_prefill: {e}")
        except Exception as e:  # one bad request must never take the model down
            return backend.error(pb_utils, f"llm_prefill: stream "
                                 f"{request.correlation_id()!r}: {type(e).__name__}: {e}")

    def finalize(self):
        self.streams = None
