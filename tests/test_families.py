"""The model-family interface: detection and refusal, whole merge groups, the slide rotation,
the checkpoint's own frame layout in the parser, and Qwen2-VL laid out as a real checkpoint
against the stock forward. (Qwen2.5-VL: tests/test_family_qwen2_5.py; Qwen3-VL:
tests/test_family_qwen3.py; served through the ensemble: tests/test_families_served.py.)"""
from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

from codecsight import checkpoint, families
from codecsight.families import CheckpointSettings, UnsupportedFamily, family_for_dir
from codecsight.families.base import Family, rope_axes_from_sections
from codecsight.llm import VisualLM, split_frames
from codecsight.parser import StreamParser
from codecsight.policy import PruningConfig
from codecsight.protocol import FRAME_META_COLUMNS, FRAME_TYPES, META
from codecsight.serve import DEFAULT_MODEL_DIR, ServerError, require_checkpoint
from codecsight.vision import PrunedVisionEncoder, encode_patch_sets, patchify
from codecsight_client.demux import iter_chunks

from family_reference import processor_patches
from streams import CLIP

QUESTION = "is anyone in the loading bay?"


@pytest.fixture(scope="module")
def q2_dir(tmp_path_factory):
    """A tiny Qwen2-VL checkpoint laid out as a real one (no CodecSight marker)."""
    return checkpoint.build_tiny_family(tmp_path_factory.mktemp("qwen2"), "qwen2_vl")


# --- detection -----------------------------------------------------------------------------


def test_every_supported_family_is_detected_from_config_json(tmp_path):
    for name in ("qwen2_vl", "qwen2_5_vl"):
        cls = {f.name: f for f in families.FAMILIES}[name]
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"model_type": name, "vision_config": {"hidden_size": 64, "out_hidden_size": 96},
             "text_config": {"hidden_size": 96}}))
        family = family_for_dir(tmp_path / name)
        assert type(family) is cls
        # Qwen2-VL names the merged width hidden_size, later families out_hidden_size.
        assert family.geometry.vision_hidden == (64 if name == "qwen2_vl" else 96)


@pytest.mark.parametrize("model_type", ["llava", "internvl", None])
def test_an_unsupported_checkpoint_is_refused_with_the_supported_list(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type,
                                                      "architectures": ["X"]}))
    with pytest.raises(UnsupportedFamily) as e:
        family_for_dir(tmp_path)
    message = str(e.value)
    assert repr(model_type) in message
    for family in families.FAMILIES:
        assert family.title in message and family.model_types[0] in message
    assert ("pixel-shuffle" in message) == (model_type == "internvl")
    # Serving refuses it before anything is built or started.
    with pytest.raises(ServerError, match="cannot serve .*supported: Qwen2-VL"):
        require_checkpoint(tmp_path)


def test_checkpoint_settings_default_by_origin_and_refuse_unknown_keys(tmp_path, q2_dir):
    assert CheckpointSettings.for_model_dir(DEFAULT_MODEL_DIR) == CheckpointSettings(
        "overlapping", "transformers5")
    assert CheckpointSettings.for_model_dir(q2_dir) == CheckpointSettings(
        "pairs", "previous_max")
    (tmp_path / "config.json").write_text((q2_dir / "config.json").read_text())
    (tmp_path / families.SETTINGS_FILE).write_text(json.dumps({"frame_layout": "overlapping"}))
    assert family_for_dir(tmp_path).geometry.frame_layout == "overlapping"
    (tmp_path / families.SETTINGS_FILE).write_text(json.dumps({"frame_layot": "pairs"}))
    with pytest.raises(ValueError, match="unknown keys .*frame_layot"):
        family_for_dir(tmp_path)


# --- whole merge groups --------------------------------------------------------------------


def test_a_broken_merge_group_is_an_error_not_a_wrong_merge(tiny):
    model, _ = tiny
    encoder = PrunedVisionEncoder(model.model.visual).eval()
    geometry = dataclasses.replace(checkpoint.Geometry.from_model_dir(DEFAULT_MODEL_DIR))
    frames = np.random.default_rng(0).integers(0, 256, (1, 56, 56, 3), dtype=np.uint8)
    patches, positions = patchify(frames, geometry, [0])          # 4 groups, 16 patches
    encoder.encode(patches, positions)                           # whole groups: fine
    # 8 patches = two groups' worth, but rows 0-3 mix two groups: a multiple of 4, still wrong.
    mixed = np.r_[0:2, 4:6, 2:4, 6:8]
    for broken in (mixed, np.r_[0:4, 5, 4, 6, 7]):                # mixed; out of order
        with pytest.raises(ValueError, match="not one whole 2x2 merge group"):
            encoder.encode(patches[broken], positions[broken])
        with pytest.raises(ValueError, match="patch set 0: rows"):
            encode_patch_sets(encoder.encode, [(patches[broken], positions[broken])], 4096)


# --- the slide rotation --------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotate_keys_equals_encoding_at_the_moved_position(interleaved):
    """Sectioned (Qwen2/2.5-VL) and interleaved (Qwen3-VL) M-RoPE, all three axes moved."""
    from transformers import Qwen2VLTextConfig, Qwen3VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VLRotaryEmbedding,
                                                                apply_rotary_pos_emb)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    section = [4, 6, 6]
    rope = {"rope_type": "default", "rope_theta": 100.0, "mrope_section": section}
    if interleaved:
        rotary = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(
            hidden_size=128, num_attention_heads=4, head_dim=32, rope_parameters=rope))
    else:
        rotary = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(
            hidden_size=128, num_attention_heads=4, rope_parameters=rope))
    keys = torch.randn(1, 2, 5, 32)
    pos = torch.tensor([[40, 41, 42, 43, 44], [3, 4, 5, 6, 7], [9, 8, 7, 6, 5]])
    delta = torch.tensor([[-7, -3, 2]] * 5)

    def encode(p):   # both embeddings return cos/sin already recomposed per frequency
        cos, sin = rotary(keys, p[:, None, :])
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    axes = rope_axes_from_sections(section, interleaved)
    moved = Family.rotate_keys(encode(pos), delta, rotary.inv_freq, axes)
    torch.testing.assert_close(moved, encode(pos + delta.T), atol=1e-5, rtol=1e-5)
    assert (encode(pos) - encode(pos + delta.T)).abs().max() > 1e-2


# --- frames as the checkpoint expects them: the parser ----------------------------------------


def parse_clip(geometry, policy, seconds=6.0, chunk_seconds=2.0):
    parser = StreamParser(geometry, "h264", 12.5, 2.0, policy=policy,
                          config=PruningConfig.served(whole_frame_seconds=4.0))
    chunks = list(itertools.islice(iter_chunks(CLIP, chunk_seconds), int(seconds // chunk_seconds)))
    return [parser.parse(c.data, au_bytes=c.au_sizes, au_pts=c.au_pts, final=i == len(chunks) - 1)
            for i, c in enumerate(chunks)]


def test_pairs_hold_two_consecutive_sampled_frames_as_the_processor_does(tiny_dir):
    overlapping = checkpoint.Geometry.from_model_dir(tiny_dir)
    assert overlapping.frame_layout == "overlapping"
    pairs = dataclasses.replace(overlapping, frame_layout="pairs")
    ours = parse_clip(pairs, "dense")
    theirs = parse_clip(overlapping, "dense")
    # Overlapping row 2k+1 is filled with sampled frames (2k, 2k+1): pair k exactly.
    meta = np.concatenate([r.frame_meta for r in ours])
    single = np.concatenate([r.frame_meta for r in theirs])
    assert len(single) == 12 and meta[:, META["t"]].tolist() == list(range(6))
    # Chunks of 2 s hold 4 sampled frames: pairs never straddle them here, so compare per chunk.
    for a, b in zip(ours, theirs):
        odd = b.positions[:, 0] % 2 == 1
        np.testing.assert_array_equal(a.patches, b.patches[odd])
        np.testing.assert_array_equal(a.positions[:, 1:], b.positions[odd, 1:])
        np.testing.assert_array_equal(a.positions[:, 0], b.positions[odd, 0] // 2)
    times = single[:, META["time_ms"]].reshape(-1, 2)
    assert np.abs(meta[:, META["time_ms"]] - times.mean(1)).max() <= 0.5   # the patch's mean time
    assert meta[:, META["frame_index"]].tolist() == single[0::2, META["frame_index"]].tolist()


@pytest.mark.parametrize("policy", ["codec", "evs"])
def test_pruned_pairs_keep_what_changed_in_either_frame_or_since_the_previous_pair(tiny_dir,
                                                                                  policy):
    pairs = dataclasses.replace(checkpoint.Geometry.from_model_dir(tiny_dir),
                                frame_layout="pairs")
    results = parse_clip(pairs, policy)
    keeps = [k for r in results for k in r.keep]                  # per sampled frame
    meta = np.concatenate([r.frame_meta for r in results])
    union = [a | b for a, b in zip(keeps[0::2], keeps[1::2])]
    assert meta[:, META["kept_groups"]].tolist() == [int(u.sum()) for u in union]
    assert any(int(b.sum()) < int(u.sum()) for b, u in zip(keeps[1::2], union))  # 1st frame adds
    assert any(u.sum() < u.size for u in union)                  # and it still prunes
    n = sum(len(r.patches) for r in results)
    assert n == 4 * sum(int(u.sum()) for u in union)


def test_a_pair_waits_across_chunks_and_a_lone_last_frame_fills_both_slots(tiny_dir):
    pairs = dataclasses.replace(checkpoint.Geometry.from_model_dir(tiny_dir),
                                frame_layout="pairs")
    # 1.5 s chunks at 2 fps: 3 sampled frames each, so every other pair straddles two chunks;
    # 4.5 s in all: 9 sampled frames, the last alone at the end.
    results = parse_clip(pairs, "dense", seconds=4.5, chunk_seconds=1.5)
    per_chunk = [len(r.frame_meta) for r in results]
    assert per_chunk == [1, 2, 2] and sum(r.stats.frames_sampled for r in results) == 9
    last = results[-1]
    lone = last.positions[:, 0] == 4
    slots = last.patches[lone].reshape(int(lone.sum()), 3, 2, 14 * 14)
    np.testing.assert_array_equal(slots[:, :, 0], slots[:, :, 1])


# --- Qwen2-VL as a real checkpoint, at library level --------------------------------------


def test_qwen2_vl_pairs_equal_the_stock_forward(q2_dir):
    """Dense frames in the processor's pair layout, through our tower and LLM layout, give
    the stock Qwen2VLForConditionalGeneration logits of the same video."""
    family = family_for_dir(q2_dir)
    model, tokenizer = family.load(q2_dir)
    g = family.geometry
    frames = np.random.default_rng(1).integers(0, 256, (6, 4 * 28, 5 * 28, 3), dtype=np.uint8)
    patches, positions = patchify(frames[1::2], g, [0, 1, 2], previous=frames[0::2])
    reference, grid = processor_patches(frames, g.image_mean, g.image_std, g.patch_size,
                                        g.merge_size, g.temporal_patch_size)
    np.testing.assert_allclose(patches, reference, atol=1e-6, rtol=0)
    tokens = family.vision_tower(model).encode(patches, positions)
    meta = np.array([[t, 2 * t, 1000 * t, FRAME_TYPES["P"], 4, 5, 20, 0] for t in range(3)],
                    np.int64).reshape(-1, len(FRAME_META_COLUMNS))
    vlm = VisualLM(model, tokenizer, 4, family=family)
    ours = vlm.answer_full(split_frames(tokens, positions, meta, 2), QUESTION).first_logits
    pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = torch.tensor([vlm.prefix_ids + [pad] * len(tokens) + vlm.question_ids(QUESTION)])
    with torch.no_grad():
        stock = model(input_ids=ids, mm_token_type_ids=(ids == pad).int() * 2,
                      pixel_values_videos=torch.from_numpy(reference),
                      video_grid_thw=torch.tensor([grid])).logits[0, -1]
    assert (ours - stock).abs().max() <= 1e-4


# --- the rendered repository per family -----------------------------------------------------


def test_the_repository_is_rendered_for_the_checkpoints_family(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight.serve import DEFAULT_REPOSITORY, render_repository

    def read(path):
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())

    def checkpoint_dir(name, config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    q25 = checkpoint_dir("q25", {"model_type": "qwen2_5_vl", "text_config": {"hidden_size": 96},
                                 "vision_config": {"hidden_size": 64, "out_hidden_size": 96}})
    out = render_repository(DEFAULT_REPOSITORY, tmp_path / "repo25", q25)
    trt = read(out / "vit_pruned" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan"
    assert [list(t.dims) for t in trt.output] == [[-1, 96]]          # out_hidden_size
    assert "FRAME_META" not in [i.name for i in trt.input]

    q3 = checkpoint_dir("q3", {"model_type": "qwen3_vl", "text_config": {"hidden_size": 96},
                               "vision_config": {"hidden_size": 64, "out_hidden_size": 96,
                                                 "patch_size": 16,
                                                 "deepstack_visual_indexes": [0, 1]}})
    out = render_repository(DEFAULT_REPOSITORY, tmp_path / "repo3", q3)
    for name in ("config.pbtxt", "configs/cpu.pbtxt"):   # Python backend on GPU and CPU alike
        vit = read(out / "vit_pruned" / name)
        assert vit.backend == "python" and vit.platform == ""
        assert [i.name for i in vit.input] == ["PATCHES", "POSITIONS", "FRAME_META"]
    ensemble = read(out / "ensemble" / "config.pbtxt")
    step = [s for s in ensemble.ensemble_scheduling.step if s.model_name == "vit_pruned"][0]
    assert step.input_map["FRAME_META"] == "frame_meta"
    assert family_for_dir(q3).token_width == 96 * 3                  # deepstack behind the token


def test_frame_grid_positions_append_each_patchs_frame_grid():
    from codecsight.vision import frame_grid_positions

    meta = np.array([[5, 0, 0, 2, 3, 4, 1], [7, 0, 0, 2, 2, 2, 1]], np.int64)
    positions = np.array([[5, 0, 0], [7, 1, 1], [5, 3, 5]], np.int64)
    assert frame_grid_positions(positions, meta, 2).tolist() == [
        [5, 0, 0, 6, 8], [7, 1, 1, 4, 4], [5, 3, 5, 6, 8]]
    with pytest.raises(ValueError, match="no FRAME_META row"):
        frame_grid_positions(np.array([[6, 0, 0]]), meta, 2)
