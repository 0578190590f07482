"""vLLM's Efficient Video Sampling as vLLM runs it: prune visual tokens after the ViT.

The `vllm_evs` patch policy. codec_parser sends every patch (the ViT costs what `dense` costs);
llm_prefill then drops the video tokens whose embeddings are most similar to the same token of
the previous frame, at `video_pruning_rate` (llm_prefill's config.pbtxt parameter, vLLM's name).
The pixel `evs` policy (codecsight.policy.evs_keep) is the EVS paper's variant before the ViT.

Source of the algorithm: vLLM, `vllm/multimodal/evs.py`, `compute_retention_mask` and
`compute_retained_tokens_count`, which Qwen2.5-VL and Qwen3-VL call per video from
`_postprocess_video_embeds_evs` (vllm/model_executor/models/qwen2_5_vl.py, qwen3_vl.py).
Reimplemented here from its description, not copied. Per video of T temporal patches on an
h x w merge grid (tokens [T * h * w, D], row-major over (t, h, w)):

  1. dissimilarity of token (t, h, w) = 1 - cosine(token (t, h, w), token (t - 1, h, w));
  2. every token of the first temporal patch gets 255 (above any 1 - cosine, which is <= 2),
     so the first frame is always kept whole;
  3. a stable descending argsort of all T * h * w dissimilarities;
  4. the first max(h * w, int(T * h * w * (1 - q))) of that order are retained.

Retained tokens keep their original (t, h, w) positions (vLLM's compute_mrope_for_media of
the unpruned grid, indexed by the mask; here: WindowFrame.cells). For Qwen3-VL the vectors
compared are whole TOKENS rows, the merged token with its deepstack features behind it, as
vLLM's Qwen3-VL passes its tower's concatenated output.

The streaming analogue (where this differs from vLLM, and why). vLLM sees one finished video
per request; a camera stream never ends. Here each request's frames are one "video", with two
differences that make a stream of requests behave like one long video:

  - the first frame of a request is compared with the stream's previous frame (its full
    tokens, kept here across requests), not kept whole: only frames without a previous
    vllm_evs frame of the same grid (the stream's first, after a size change, or after a
    request under another policy) get 255, as vLLM's first frame does;
  - frames codec_parser marks whole (FRAME_META token_pruning = vllm_evs_whole: the stream's
    start and the whole-frame timer, `whole_frame_seconds` capped by the window, the same
    rule as the other pruning policies) also get 255. A vLLM user watching a camera sends
    each window as a video, whose first frame vLLM keeps whole; the timer gives every
    window of ours one whole frame too;
  - the number retained is max(tokens of forced frames, int(total * (1 - q))): vLLM's rule,
    whose minimum is the first frame's tokens because that frame is forced. A request with
    no forced frame keeps int(total * (1 - q)) (vLLM's floor of h * w would keep a one-frame
    request whole, so a stream sent frame by frame would never be pruned).

For a request that holds a stream's first frame and no other forced frame the mask is
exactly vLLM's (tests/test_vllm_evs.py holds it to an independent reference).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from codecsight.protocol import META, TOKEN_PRUNING

# vLLM's dissimilarity of the first frame's tokens: above any 1 - cosine (at most 2).
FORCED = 255.0
# FRAME_META token_pruning codes (protocol.TOKEN_PRUNING).
NONE, PRUNE, WHOLE = (TOKEN_PRUNING.index(name) for name in ("none", "vllm_evs", "vllm_evs_whole"))


def check_rate(rate: float) -> float:
    """rate if it is a pruning rate vLLM accepts ([0, 1)); else ValueError naming it."""
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"video_pruning_rate must be in [0, 1) (the share of video tokens "
                         f"dropped, vLLM's range), got {rate!r}")
    return float(rate)


def retained_tokens_count(tokens_per_frame: int, frames: int, rate: float,
                          forced_tokens: int | None = None) -> int:
    """Tokens kept of a video of `frames` temporal patches of `tokens_per_frame` tokens.

    vLLM's compute_retained_tokens_count: max(tokens_per_frame, int(total * (1 - rate))),
    the minimum being the first frame's tokens, which vLLM always keeps. forced_tokens: the
    tokens kept unconditionally here (None: one frame's, vLLM's case; 0: none).
    """
    total = tokens_per_frame * frames
    floor = tokens_per_frame if forced_tokens is None else forced_tokens
    return max(floor, int(total * (1.0 - check_rate(rate))))


def retention_mask(tokens, grid: tuple[int, int, int], rate: float, previous=None,
                   forced=None) -> torch.Tensor:
    """vLLM's EVS retention mask over one video's merged tokens: bool [T * h * w].

    tokens: float [T * h * w, D] (torch or numpy), row-major over (t, h, w); grid: (T, h, w),
    the video's temporal patches and merge grid. rate: the share to drop, [0, 1).
    previous: float [h * w, D], the tokens of the frame before the video (None: there is none,
    so the first frame is forced, exactly vLLM's compute_retention_mask). forced: bool [T],
    frames kept whole (dissimilarity 255) besides a first frame without `previous`.
    Returns True for each retained token, on the tokens' device: the max(forced tokens,
    int(T*h*w*(1 - rate))) most dissimilar, ties in (t, h, w) order (a stable sort, as
    vLLM's). ValueError if the shapes disagree or the rate is outside [0, 1).
    """
    frames, height, width = (int(n) for n in grid)
    per_frame = height * width
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or len(tokens) != frames * per_frame:
        raise ValueError(f"tokens {tuple(tokens.shape)} are not [T*h*w, D] for grid {grid}")
    video = tokens.reshape(frames, height, width, -1).float()
    if previous is not None:
        previous = torch.as_tensor(previous).to(video.device).float()
        if tuple(previous.shape) != (per_frame, video.shape[-1]):
            raise ValueError(f"previous frame {tuple(previous.shape)} is not [h*w, D] = "
                             f"[{per_frame}, {video.shape[-1]}]")
        before = torch.cat([previous.reshape(1, height, width, -1), video[:-1]])
    else:
        before = torch.cat([video[:1], video[:-1]])
    dissimilarity = 1.0 - torch.nn.functional.cosine_similarity(video, before, dim=-1)
    whole = torch.zeros(frames, dtype=torch.bool, device=video.device)
    if forced is not None:
        whole |= torch.as_tensor(np.asarray(forced, dtype=bool), device=video.device)
    if previous is None and frames:
        whole[0] = True
    dissimilarity[whole] = FORCED
    order = torch.argsort(dissimilarity.reshape(-1), descending=True, stable=True)
    keep = retained_tokens_count(per_frame, frames, rate, int(whole.sum()) * per_frame)
    mask = torch.zeros(frames * per_frame, dtype=torch.bool, device=video.device)
    mask[order[:keep]] = True
    return mask


def _full_grid(frame) -> bool:
    """True if a WindowFrame holds every token of its grid, row-major (what vLLM compares)."""
    cells = np.asarray(frame.cells)
    if len(cells) != frame.grid_h * frame.grid_w:
        return False
    h, w = np.divmod(np.arange(len(cells)), frame.grid_w)
    return bool((cells[:, 0] == h).all() and (cells[:, 1] == w).all())


class StreamTokenPruner:
    """One stream's vllm_evs state: the full tokens of its last frame, across requests.

    `prune` takes each request's new frames (llm.split_frames' WindowFrames) before they enter
    the stream's window, and returns them with vllm_evs's dropped tokens removed.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None   # [h * w, D] the last frame's full tokens
        self.previous_grid: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the last frame's full tokens, held here only (the window holds the
        pruned copy)."""
        return 0 if self.previous is None else self.previous.numel() * self.previous.element_size()

    def prune(self, frames: list, frame_meta: np.ndarray, rate: float,
              stream_id=None) -> tuple[list, int]:
        """(frames, tokens dropped): the request's frames after vLLM's EVS retention mask.

        frames: WindowFrames of one request, in order; frame_meta: int64 [F, len(META)], their
        FRAME_META rows; its token_pruning column says which frames vllm_evs prunes (PRUNE),
        keeps whole (WHOLE) or leaves as codec_parser sent them (NONE). The vllm_evs frames of
        the request are one video (module docstring); each kept token keeps its cell.
        rate: video_pruning_rate. stream_id names the stream in errors.
        Raises ValueError if a vllm_evs frame lacks some of its grid's tokens.
        """
        codes = np.asarray(frame_meta)[:, META["token_pruning"]]
        if len(codes) != len(frames):
            raise ValueError(f"stream {stream_id!r}: {len(codes)} FRAME_META rows for "
                             f"{len(frames)} frames")
        out, dropped, i = [], 0, 0
        while i < len(frames):
            if codes[i] == NONE:
                # Another policy's frame: vllm_evs starts over at its next frame, whole, as
                # vLLM does at a video's first frame (holding no reference costs nothing).
                self.previous = self.previous_grid = None
                out.append(frames[i])
                i += 1
                continue
            # One run of vllm_evs frames on one grid: one "video".
            grid = (frames[i].grid_h, frames[i].grid_w)
            j = i
            while j < len(frames) and codes[j] != NONE and (
                    frames[j].grid_h, frames[j].grid_w) == grid:
                if not _full_grid(frames[j]):
                    raise ValueError(f"stream {stream_id!r}: vllm_evs frame t={frames[j].t} "
                                     f"holds {len(frames[j].tokens)} of its "
                                     f"{grid[0] * grid[1]} tokens; the ViT must see every "
                                     "patch of a vllm_evs frame")
                j += 1
            run = frames[i:j]
            previous = self.previous if self.previous_grid == grid else None
            mask = retention_mask(torch.cat([f.tokens for f in run]), (len(run), *grid), rate,
                                  previous=previous, forced=codes[i:j] == WHOLE)
            per_frame = mask.reshape(len(run), -1)
            for frame, keep in zip(run, per_frame):
                # tokens stay on their device; cells (numpy) take the mask's host copy
                out.append(dataclasses.replace(frame, tokens=frame.tokens[keep],
                                               cells=frame.cells[keep.cpu().numpy()]))
            dropped += int((~mask).sum())
            self.previous, self.previous_grid = run[-1].tokens, grid
            i = j
        return out, dropped
