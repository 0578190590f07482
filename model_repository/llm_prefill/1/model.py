"""llm_prefill: Triton tensors in, codecsight.llm.step_streams calls, tensors out."""

import os
import sys

# The Python-backend stub embeds an isolated interpreter that ignores PYTHONPATH; `codecsight
# serve` passes the virtualenv and this repository there, so put them first on sys.path.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

import triton_python_backend_utils as pb_utils

from codecsight import backend, params
from codecsight.families import family_for_dir
from codecsight.llm import StreamSession, VisualLM, split_frames, step_streams
from codecsight.metrics import ModelMetrics
from codecsight.protocol import (ANALYSIS_FPS, FRAME_META, POSITIONS, QUESTION, REFRESH,
                                 TOKENS, WINDOW_SECONDS, InvalidRequest)
from codecsight.requests import PrefillRequest
from codecsight.state import StreamStates

MODEL = "llm_prefill"


class TritonPythonModel:
    def initialize(self, args):
        self.params = params.read(MODEL, args["model_config"])
        self.device = params.torch_device(MODEL, self.params["device"],
                                          int(args.get("model_instance_device_id") or 0))
        model_dir = params.resolve_model_dir(args["model_repository"], self.params["model_dir"])
        self.family = family_for_dir(model_dir)
        model, tokenizer = self.family.load(model_dir)
        self.merge_size = self.family.geometry.merge_size
        self.vlm = VisualLM(model, tokenizer, self.params["max_new_tokens"], family=self.family,
                            device=self.device)
        backend.check_stream_limits(MODEL, args["model_config"], self.params["state_ttl_seconds"])
        self.streams = StreamStates(self.params["state_ttl_seconds"],
                                    self.params["max_state_bytes"], lambda s: s.nbytes)
        self.metrics = ModelMetrics(pb_utils, args["model_name"])

    def execute(self, requests):
        # The sequence batcher may hand us several streams at once: their windows are
        # prefilled in one forward and answered together (llm.step_streams). A request that
        # fails validation or its own step fails alone; a stream met twice waits a round.
        responses = [None] * len(requests)
        for batch in _rounds(requests):
            opened = []
            for i in batch:
                try:
                    opened.append(self._open(i, requests[i]))
                except Exception as e:  # noqa: BLE001 (answered as an error, alone)
                    responses[i] = backend.failure(pb_utils, MODEL, requests[i], e)
            results = step_streams(self.vlm, [(o.session, o.frames, o.req.question,
                                               o.req.refresh) for o in opened])
            for o, result in zip(opened, results):
                responses[o.index] = backend.respond(
                    pb_utils, MODEL, requests[o.index],
                    lambda r: self._close(o, result, len(requests)))
        # The byte cap is enforced once the batch's caches have grown.
        self.streams.expire()
        self.metrics.set_active_streams(len(self.streams))
        return responses

    def _open(self, index, request):
        """Validate a request and enter its stream's state; its frames, ready for the step."""
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
        state = backend.stream_state(self.streams, seq, new_session, replace=True)
        session = state.__enter__()
        try:
            frames = split_frames(req.tokens, req.positions, req.frame_meta, self.merge_size,
                                  self.device)
            # vllm_evs drops tokens here, after the ViT, before they enter the window.
            frames, pruned = session.token_pruner.prune(
                frames, req.frame_meta, self.params["video_pruning_rate"], seq.stream_id)
        except BaseException as e:
            state.__exit__(type(e), e, e.__traceback__)
            raise
        return _Opened(index, req, state, session, frames, pruned)

    def _close(self, opened, result, batch_size):
        """Leave the stream's state (freed on END, dropped for a failed START); the response."""
        if isinstance(result, BaseException):
            opened.state.__exit__(type(result), result, result.__traceback__)
            raise result
        opened.state.__exit__(None, None, None)
        answer, stats = result
        seq = opened.req.seq
        stats.visual_tokens_pruned = opened.pruned
        stats.stream, stats.active_streams = seq.stream_id, len(self.streams)
        stats.state_bytes, stats.batch_size = opened.session.nbytes, batch_size
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


class _Opened:
    """A validated request inside its stream's state, waiting for the batch's step."""

    def __init__(self, index, req, state, session, frames, pruned):
        self.index, self.req, self.state, self.session = index, req, state, session
        self.frames, self.pruned = frames, pruned


def _rounds(requests):
    """Request indices in rounds that hold each stream (correlation ID) at most once, in
    arrival order (the sequence batcher gives one request per stream; warmup's share ID 0)."""
    rounds, seen = [], []
    for i, request in enumerate(requests):
        stream = request.correlation_id()
        k = next((k for k, ids in enumerate(seen) if stream not in ids), len(rounds))
        if k == len(rounds):
            rounds.append([])
            seen.append(set())
        rounds[k].append(i)
        seen[k].add(stream)
    return rounds
