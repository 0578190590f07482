"""Every supported family served through the real ensemble, against the stock transformers
forward of the same tiny random checkpoint (the issue's acceptance test).

For each family a tiny checkpoint is built here (its own config classes and processor
config, laid out as a real checkpoint: non-overlapping temporal pairs), served by its own
tritonserver with llm_prefill's report_first_logits on, and the first 4 s of the bundled clip
streamed at 2 fps (4 pairs) into a window that never slides:

- dense/full: the served first answer token's logits == the stock *ForConditionalGeneration
  forward on the same sampled frames in the processor's layout, within 1e-4;
- codec/full: == the stock forward given only the kept patches (its tower at their true
  positions) and their tokens at their positions in the dense grid;
- codec/selective (no slide) == codec/full at every window.

The sampled frames' pixels come from codec.StreamParser run here on the same chunks (the
served codec_parser runs the same code); that the parser's pair layout is the processor's is
checked in tests/test_families.py and tests/test_family_qwen2_5.py.
"""
from __future__ import annotations

import functools
import itertools
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from codecsight import checkpoint, families
from codecsight.codec import PTS_UNITS, FrameSampler
from codecsight.families import family_for_dir
from codecsight.parser import StreamParser
from codecsight.policy import PruningConfig
from codecsight.protocol import META
from codecsight.serve import TritonServer, prepared_repository
from codecsight_client.demux import iter_chunks
from codecsight_client.stream import StreamSettings, connect, run_stream

from family_reference import stock_first_logits, stock_tower_kwargs
from streams import CLIP, new_id

pytestmark = pytest.mark.server

SOURCE_FPS, ANALYSIS_FPS = 12.5, 2.0
SECONDS, STRIDE = 4.0, 2.0         # 2 chunks, 8 sampled frames, 4 pairs
WINDOW = 8.0                       # longer than the stream: no slide
# The served picture's pixel budget (codec_parser's max_pixels) here: the clip's 768x432
# scaled to about 1/6 of its area (a 12x7-group grid for 28-pixel groups) keeps four
# servers' worth of checks inside the default suite's time on a loaded 2-core machine.
MAX_PIXELS = 65536
QUESTION = "is anyone in the loading bay?"
# Qwen3-VL-MoE differs from Qwen3-VL only in its text MLP (held to the stock forward at
# library level in tests/test_family_qwen3.py): its served run is in the slow suite, so the
# default suite starts three servers, not four.
SERVED = [pytest.param(f.name, marks=pytest.mark.slow) if f.name == "qwen3_vl_moe" else f.name
          for f in families.FAMILIES]


@pytest.fixture(scope="module", params=SERVED)
def served(request, tmp_path_factory):
    """(family, model, tokenizer, server) of one family's tiny checkpoint, served."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = checkpoint.build_tiny_family(root / "model", request.param)
    repository = prepared_repository(model_dir, root / "repository")
    for name, key, value in (("llm_prefill", "report_first_logits", "true"),
                             ("codec_parser", "max_pixels", str(MAX_PIXELS))):
        path = repository / name / "config.pbtxt"
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        config.parameters[key].string_value = value
        path.write_text(text_format.MessageToString(config))
    family = family_for_dir(model_dir)
    model, tokenizer = family.load(model_dir)
    with TritonServer(repository, log_path=root / "tritonserver.log") as server:
        server.start(timeout_s=300)
        # Each stream once per family: the tests below read them.
        windows = {(policy, refresh): stream(server, policy, refresh)
                   for policy, refresh in (("dense", "full"), ("codec", "full"),
                                           ("codec", "selective"))}
        yield family, model, tokenizer, windows


def chunks():
    return list(itertools.islice(iter_chunks(CLIP, STRIDE), int(SECONDS / STRIDE)))


def stream(server, policy, refresh):
    settings = StreamSettings(question=QUESTION, codec="h264", source_fps=SOURCE_FPS,
                              analysis_fps=ANALYSIS_FPS, window_seconds=WINDOW, policy=policy,
                              refresh=refresh)
    windows = run_stream(connect(server.grpc_url), new_id(f"family-{policy}-{refresh}"),
                         settings, chunks())
    return [torch.tensor(w.llm.first_logits) for w in windows]


def parsed(family, policy):
    """What codec_parser makes of the same chunks: patches, positions, FRAME_META, and each
    sampled frame's display index."""
    parser = StreamParser(family.geometry, "h264", SOURCE_FPS, ANALYSIS_FPS, policy=policy,
                          config=PruningConfig.served(), window_seconds=WINDOW,
                          max_pixels=MAX_PIXELS,
                          min_pixels=family.geometry.min_pixels)
    parts = chunks()
    results = [parser.parse(c.data, au_bytes=c.au_sizes, au_pts=c.au_pts,
                            final=i == len(parts) - 1) for i, c in enumerate(parts)]
    patches = np.concatenate([r.patches for r in results])
    positions = np.concatenate([r.positions for r in results])
    meta = np.concatenate([r.frame_meta for r in results])
    # Each sampled frame's display index, by the server's own sampler on the chunks' times
    # (a FRAME_META row is one temporal patch: a real checkpoint's pair holds two frames).
    sampler = FrameSampler(SOURCE_FPS, ANALYSIS_FPS)
    times = sorted(Fraction(round(t * PTS_UNITS), PTS_UNITS) for c in parts for t in c.au_pts)
    indices = [round(t * Fraction(SOURCE_FPS)) for t in times if sampler.sample(t) is not None]
    return patches, positions, meta, indices


def stock_prompt(family, tokenizer, meta, indices, tokens_per_frame):
    """Token ids of the dense prompt as the family's processor writes it, and the video pad."""
    if family.name.startswith("qwen3"):
        from transformers import Qwen3VLProcessor
        from transformers.video_utils import VideoMetadata

        from codecsight.families import qwen3_vl

        processor = types.SimpleNamespace(
            video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
            vision_start_token=qwen3_vl.VISION_START, vision_end_token=qwen3_vl.VISION_END,
            video_token=qwen3_vl.VIDEO_PAD,
            _calculate_timestamps=functools.partial(Qwen3VLProcessor._calculate_timestamps,
                                                    None))
        metadata = VideoMetadata(total_num_frames=int(indices[-1]) + 1, fps=SOURCE_FPS,
                                 frames_indices=list(indices))
        grid = torch.tensor([[len(meta), 2, 2 * tokens_per_frame]])
        video = Qwen3VLProcessor.replace_video_token(
            processor, {"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        text = f"<|im_start|>user\n{video}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        pad = tokenizer.convert_tokens_to_ids(qwen3_vl.VIDEO_PAD)
        return tokenizer(text, add_special_tokens=False)["input_ids"], pad
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    n = len(meta) * tokens_per_frame
    return ids(family.prompt_prefix()) + [pad] * n + ids(family.question_text(QUESTION)), pad


def video_kwargs(family, grid_t, meta):
    grid_h, grid_w = int(meta[0, META["grid_h"]]), int(meta[0, META["grid_w"]])
    kwargs = {"video_grid_thw": torch.tensor([[grid_t, 2 * grid_h, 2 * grid_w]])}
    if family.name == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([family.seconds_per_t(ANALYSIS_FPS)])
    return kwargs


def test_dense_full_equals_the_stock_forward(served):
    family, model, tokenizer, windows = served
    logits = windows["dense", "full"]
    patches, positions, meta, indices = parsed(family, "dense")
    assert meta[:, META["t"]].tolist() == [0, 1, 2, 3]            # 4 non-overlapping pairs
    per_frame = int(meta[0, META["grid_h"]] * meta[0, META["grid_w"]])
    ids, pad = stock_prompt(family, tokenizer, meta, indices, per_frame)
    stock = stock_first_logits(model, ids, pad, pixel_values_videos=torch.from_numpy(patches),
                               **video_kwargs(family, len(meta), meta))
    diff = float((logits[-1] - stock).abs().max())
    print(f"\n{family.title} served dense/full vs stock forward: max |diff| {diff:.2g}")
    assert diff <= 1e-4


def test_codec_full_equals_the_stock_forward_of_the_kept_tokens(served):
    family, model, tokenizer, windows = served
    logits = windows["codec", "full"]
    patches, positions, meta, indices = parsed(family, "codec")
    kept = meta[:, META["kept_groups"]]
    per_frame = int(meta[0, META["grid_h"]] * meta[0, META["grid_w"]])
    assert kept[0] == per_frame and kept.sum() < per_frame * len(meta)   # it did prune
    dense_ids, pad = stock_prompt(family, tokenizer, meta, indices, per_frame)
    dense_ids = torch.tensor(dense_ids)
    grid = video_kwargs(family, len(meta), meta)
    dense_pos, _ = model.model.get_rope_index(
        dense_ids[None], (dense_ids[None] == pad).int() * 2, **grid)
    # The kept rows: every text row, and the visual rows of the kept groups.
    cells = positions[::4]
    kept_cells = np.zeros((len(meta), per_frame), bool)
    grid_w = int(meta[0, META["grid_w"]])
    kept_cells[cells[:, 0] - meta[0, META["t"]], (cells[:, 1] // 2) * grid_w + cells[:, 2] // 2] \
        = True
    rows = torch.ones(len(dense_ids), dtype=torch.bool)
    rows[dense_ids == pad] = torch.from_numpy(kept_cells.ravel())
    if family.name.startswith("qwen3"):
        from codecsight.families import qwen3_vl

        side = family.vision_tower(model).side
        full_grid = np.broadcast_to(np.array([2 * meta[0, META["grid_h"]],
                                              2 * grid_w]), (len(positions), 2))
        tower = qwen3_vl.stock_tower_kwargs(positions, full_grid, side, prefix="video_")
    else:
        window = family.window_patches // 2 if family.name == "qwen2_5_vl" else None
        tower = {f"video_{k}": v for k, v in stock_tower_kwargs(positions, 2, window).items()}
    n_tokens = len(patches) // 4
    extra = {k: v for k, v in grid.items() if k != "video_grid_thw"}
    stock = stock_first_logits(model, dense_ids[rows].tolist(), pad,
                               pixel_values_videos=torch.from_numpy(patches),
                               video_grid_thw=torch.tensor([[1, 2, 2 * n_tokens]]),
                               position_ids=dense_pos[:, :, rows], **extra, **tower)
    diff = float((logits[-1] - stock).abs().max())
    print(f"\n{family.title} served codec/full ({kept.sum()}/{per_frame * len(meta)} groups) vs "
          f"stock forward of the kept tokens: max |diff| {diff:.2g}")
    assert diff <= 1e-4


def test_selective_without_a_slide_equals_full(served):
    family, _, _, windows = served
    full, selective = windows["codec", "full"], windows["codec", "selective"]
    diffs = [float((a - b).abs().max()) for a, b in zip(selective, full)]
    print(f"\n{family.title} served codec/selective vs codec/full per window: max |diff| "
          f"{max(diffs):.2g}")
    assert len(diffs) == SECONDS / STRIDE and max(diffs) <= 1e-4
