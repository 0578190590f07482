"""The vision side: patchify only the patches we keep, encode them with the checkpoint's ViT.

One patch set is what one stream contributes to one ViT execution:

    patches    float32 [N, C*T*P*P]  normalised pixels, Qwen2-VL's flat patch layout
    positions  int64   [N, 3]        (t, h, w): sampled-frame index and patch-grid coordinates

N is a multiple of the merge group (2x2 = 4 patches): every kept merge group is whole and its
4 patches are consecutive (block-major order), because the ViT's merger turns every 4
consecutive rows into one visual token. The encoder returns tokens float32 [N/4, hidden].

The same encoder exists three ways, all computing the same function:
`PrunedVisionEncoder` (torch, shares the checkpoint's weights), its ONNX export (the single
source of truth for serving) and `OnnxVisionEncoder` (ONNX Runtime on CPU); the TensorRT plan
in model_repository/vit_pruned is built from that ONNX file. The ONNX graph carries Triton's
batch axis in front ([B, N, ...], one patch set per item) because vit_pruned is served with
max_batch_size > 0.

Serving on CPU uses that batch axis for frames (`encode_patch_sets`): every frame of every
stream's set becomes its own batch item, frames sorted by length and padded to a common L
with dummy merge groups in a segment of their own, so attention costs sum(B * L^2) per
execution, about what each frame costs alone, instead of the N^2 of all frames of several
streams in one masked sequence (perf/bench_vit_frames.py measures both).
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
# The ViT's RoPE pairing (dimension i turns with i + d/2), the model's own function.
from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

from codecsight import params
from codecsight.checkpoint import Geometry
from codecsight.protocol import PATCHES as INPUT_PATCHES
from codecsight.protocol import POSITIONS as INPUT_POSITIONS
from codecsight.protocol import TOKENS as OUTPUT_TOKENS

# Keys of the metadata export_onnx stores in the .onnx file, so a serving process knows the
# geometry without the checkpoint directory.
META_PATCHES_PER_GROUP = "codecsight.patches_per_group"
META_PATCH_DIM = "codecsight.patch_dim"
META_VISION_HIDDEN = "codecsight.vision_hidden"

# Above this the weights go to an external .onnx.data file: protobuf cannot hold 2 GiB,
# and a real Qwen2-VL ViT (~675 M parameters, 2.7 GB in float32) is past it.
_MAX_EMBEDDED_WEIGHT_BYTES = 1536 * 2 ** 20


# ---------------------------------------------------------------------------------------------
# Patchify


def _normalisation_table(geometry: Geometry) -> np.ndarray:
    """Normalised value of every uint8 level per channel: float32 [C, 256].

    Computed with the same arithmetic as Qwen2VLImageProcessor (x * (1/255) in float64, then
    (x - mean) / std in float32), so a table look-up reproduces its pixel values bit for bit.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(geometry.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(geometry.image_std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


def _frame_list(frames) -> tuple[list[np.ndarray], tuple[int, ...] | None]:
    """patchify's frames as a list of [H, W, C] arrays (views of a stacked array) and their
    stacked shape [F, H, W, C]; shape None if the frames differ in shape, ndim != 4 arrays
    give their own shape."""
    if isinstance(frames, np.ndarray):
        return (list(frames) if frames.ndim == 4 else []), frames.shape
    frames = [np.asarray(f) for f in frames]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        return frames, None
    return frames, (len(frames), *(shapes.pop() if shapes else (0, 0, 0)))


def patchify(frames: np.ndarray, geometry: Geometry, frame_ids: Sequence[int],
             keep: np.ndarray | None = None,
             previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Turn the kept merge groups of frames into ViT patches and their (t, h, w) positions.

    frames: uint8 [F, H, W, 3] RGB, H and W multiples of geometry.group_pixels (28); or a
        sequence of F uint8 [H, W, 3] arrays of one shape (not stacked: only kept groups are
        copied, where np.stack would copy every frame whole).
    frame_ids: F ints, the stream's global sampled-frame index of each frame (becomes t).
    keep: optional bool [F, H/28, W/28], one flag per merge group; None keeps every group.
    previous: optional uint8 [F, H, W, 3] (or a sequence like frames), the stream's previous
        sampled frame for each frame.
        Given, it fills the first T-1 temporal slots of every patch and the frame the last,
        as Qwen2-VL's video processor fills a patch with consecutive frames: each token then
        sees how its patch changed since the last sampled frame (motion, direction, speed),
        at no extra token. None repeats the frame in every slot, as Qwen2-VL does for images.
    Returns patches float32 [N, patch_dim] (N = 4 * kept groups) in Qwen2VLImageProcessor's
    layout: per frame, merge groups in row-major order, inside a group its 2x2 patches in
    row-major order, each patch flattened as (C, T, P, P); and positions int64 [N, 3] =
    (frame_ids[f], patch row, patch column). Raises ValueError for frames, ids, keep or
    previous of the wrong shape or dtype.
    """
    frames, shape = _frame_list(frames)
    if shape is None or len(shape) != 4 or shape[3] != geometry.in_channels \
            or any(f.dtype != np.uint8 for f in frames):
        got = "frames of different shapes" if shape is None else \
            f"{frames[0].dtype if frames else 'uint8'} {list(shape)}"
        raise ValueError(f"frames must be uint8 [F, H, W, {geometry.in_channels}] RGB, "
                         f"got {got}")
    if previous is not None:
        previous, previous_shape = _frame_list(previous)
        if previous_shape != shape or any(p.dtype != np.uint8 for p in previous):
            got = "frames of different shapes" if previous_shape is None else \
                f"{previous[0].dtype if previous else 'uint8'} {list(previous_shape)}"
            raise ValueError(f"previous frames must match frames: uint8 {list(shape)}, "
                             f"got {got}")
    n_frames, height, width, channels = shape
    group, patch, merge = geometry.group_pixels, geometry.patch_size, geometry.merge_size
    if height % group or width % group:
        raise ValueError(f"frame size {width}x{height} is not a multiple of the {group}-pixel "
                         "merge group: resize or crop frames to multiples of it first")
    frame_ids = np.asarray(frame_ids, dtype=np.int64)
    if frame_ids.shape != (n_frames,):
        raise ValueError(f"need one frame id per frame: {n_frames} frames, "
                         f"frame_ids of shape {list(frame_ids.shape)}")
    groups_h, groups_w = height // group, width // group
    if keep is None:
        keep = np.ones((n_frames, groups_h, groups_w), dtype=bool)
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (n_frames, groups_h, groups_w):
        raise ValueError(f"keep must be bool [F, H/{group}, W/{group}] = "
                         f"{[n_frames, groups_h, groups_w]}, got {list(keep.shape)}")

    # Index the kept groups out of a strided view, so dropped groups are never copied or
    # normalised. nonzero() walks frame, group row, group column: block-major order.
    frame_of, group_row, group_col = np.nonzero(keep)
    slots = geometry.temporal_patch_size

    bounds = np.searchsorted(frame_of, np.arange(n_frames + 1))   # each frame's kept groups

    def kept_pixels(sources: list[np.ndarray]) -> np.ndarray:   # [K, mh, mw, C, P, P] uint8
        parts = []
        for f, source in enumerate(sources):
            if bounds[f] == bounds[f + 1]:
                continue
            view = source.reshape(groups_h, merge, patch, groups_w, merge, patch, channels)
            view = view.transpose(0, 3, 1, 4, 6, 2, 5)       # [gh, gw, mh, mw, C, P, P]
            rows = slice(bounds[f], bounds[f + 1])
            parts.append(view[group_row[rows], group_col[rows]])
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else \
            np.zeros((0, merge, merge, channels, patch, patch), np.uint8)

    # Lay out the uint8 pixels as [K, mh, mw, C, T, P, P] first, then normalise them by table
    # look-up straight into the final layout: no float array is copied.
    pixels = kept_pixels(frames)[:, :, :, :, None]
    if previous is None or slots == 1:
        pixels = np.broadcast_to(pixels, pixels.shape[:4] + (slots,) + pixels.shape[5:])
    else:
        before = kept_pixels(previous)[:, :, :, :, None]
        pixels = np.concatenate([np.broadcast_to(before, before.shape[:4] + (slots - 1,)
                                                 + before.shape[5:]), pixels], axis=4)
    table = _normalisation_table(geometry)
    values = np.empty(pixels.shape, np.float32)
    for c in range(channels):    # a 1-D look-up per channel: ~1.7x faster than one 2-D one
        values[:, :, :, c] = table[c][pixels[:, :, :, c]]
    n_groups = len(frame_of)
    patches = values.reshape(n_groups * geometry.patches_per_group, geometry.patch_dim)

    within = np.arange(merge)
    rows = group_row[:, None, None] * merge + within[None, :, None]   # [K, mh, 1]
    cols = group_col[:, None, None] * merge + within[None, None, :]   # [K, 1, mw]
    positions = np.stack(np.broadcast_arrays(
        frame_ids[frame_of][:, None, None], rows, cols), axis=-1)       # [K, mh, mw, 3]
    return patches, positions.reshape(-1, 3).astype(np.int64)


def check_merge_groups(positions: np.ndarray, merge_size: int, set_index: int = 0) -> None:
    """Raise ValueError unless every merge_size**2 consecutive rows are one whole merge group.

    positions: int64 [N, >=3] (t, h, w, ...). Rows 4k..4k+3 (for 2x2) must share t and the
    merge cell (h // merge, w // merge) and be its patches in row-major order, as patchify
    writes them. The merger folds every 4 consecutive rows into one token whatever they are,
    so a set of a multiple of 4 patches with broken groups would otherwise merge wrongly
    without any error.
    """
    per_group = merge_size ** 2
    n = len(positions)
    if n % per_group:
        raise ValueError(f"patch set {set_index}: {n} patches is not a whole number of "
                         f"{per_group}-patch merge groups: keep or drop whole merge groups")
    if not n:
        return
    grouped = np.asarray(positions)[:, :3].reshape(n // per_group, per_group, 3)
    within = np.arange(per_group)
    expected_h = grouped[:, :1, 1] // merge_size * merge_size + within // merge_size
    expected_w = grouped[:, :1, 2] // merge_size * merge_size + within % merge_size
    bad = (grouped[:, :, 0] != grouped[:, :1, 0]).any(1) | (grouped[:, :, 1] != expected_h).any(1) \
        | (grouped[:, :, 2] != expected_w).any(1)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"patch set {set_index}: rows {k * per_group}-{k * per_group + per_group - 1} are not "
            f"one whole {merge_size}x{merge_size} merge group in row-major order (positions "
            f"{grouped[k].tolist()}): the merger would fold unrelated patches into one token; "
            "keep or drop whole merge groups (patchify's layout)")


# ---------------------------------------------------------------------------------------------
# Encoder (torch)


def rope_attention(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, rotate: Callable = rotate_half) -> torch.Tensor:
    """A Qwen ViT block's attention with explicit rotary cos/sin and an additive or boolean
    mask: x float32 [B, N, width], cos/sin [B, 1, N, head_dim], mask [B, 1, N, N].

    The stock towers take cu_seqlens and packed lengths instead, which fix N at export time;
    this uses the block's own qkv/proj weights through SDPA so N stays dynamic. rotate: the
    family's rotate_half (RoPE pairs dimension i with i + d/2).
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                   # [B, heads, N, hd]
    q = q * cos + rotate(q) * sin
    k = k * cos + rotate(k) * sin
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return attn.proj(out.transpose(1, 2).reshape(b, n, -1))


class PrunedVisionEncoder(torch.nn.Module):
    """A Qwen2-VL or Qwen2.5-VL ViT over an explicit patch set: attention at true positions.

    Shares the weights of a transformers vision tower (`model.model.visual`); only the wiring
    differs: positions come in as data instead of being derived from whole-frame grids, so any
    subset of merge groups can be encoded, and the graph exports to ONNX with dynamic batch and
    patch axes. Which patches attend to which is a mask built from the positions, not from
    their order: every block attends inside each frame (the stock cu_seqlens), except that
    with window_patches (Qwen2.5-VL) the blocks not in full_blocks attend only inside their
    window, the window_patches x window_patches square of patches at (h // window_patches,
    w // window_patches) of the same frame (the stock window_index / cu_window_seqlens, which
    tile each frame's grid from its top-left corner). A pruned set's windows are therefore
    those of the dense frame, partly kept.
    """

    def __init__(self, visual: torch.nn.Module, window_patches: int | None = None,
                 full_blocks: Sequence[int] = ()):
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.rotary = visual.rotary_pos_emb
        self.vision_hidden = visual.merger.mlp[-1].out_features
        self.merge_size = int(visual.spatial_merge_size)
        self.window_patches = window_patches
        # Blocks attending inside each whole frame: all without windows.
        self.full_blocks = frozenset(range(len(self.blocks))) if window_patches is None \
            else frozenset(int(i) for i in full_blocks)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "PrunedVisionEncoder":
        """Load a checkpoint directory and wrap its vision tower (float32, CPU, eval mode)."""
        from codecsight.families import family_for_dir

        family = family_for_dir(model_dir)
        model, _ = family.load(model_dir)
        tower = family.vision_tower(model)
        if not isinstance(tower, cls):
            raise TypeError(f"{family.title}'s vision tower is {type(tower).__name__}, not a "
                            f"{cls.__name__}")
        return tower

    def _rotary_cos_sin(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The stock ViT's axial 2D RoPE: the same frequencies for the row and the column
        # coordinate, concatenated (h then w) to half the head width, then repeated.
        angles = rows_cols[..., None].float() * self.rotary.inv_freq          # [B, N, 2, hd/4]
        angles = torch.cat((angles[..., 0, :], angles[..., 1, :]), dim=-1)     # [B, N, hd/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]                  # [B, 1, N, hd]
        scale = self.rotary.attention_scaling
        return angles.cos() * scale, angles.sin() * scale

    @staticmethod
    def _attention(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        return rope_attention(attn, x, cos, sin, mask)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode patch sets into merged visual tokens.

        patches: float32 [B, N, patch_dim]; positions: int64 [B, N, 3] = (segment, h, w).
        Each batch item is an independent patch set, and inside it patches attend only to
        patches of the same segment (column 0; a frame's t). Returns [B, N/4, vision_hidden].
        A single set without the batch axis ([N, patch_dim], [N, 3]) gives [N/4, hidden].
        """
        if patches.dim() == 2:
            return self(patches[None], positions[None])[0]
        b, n, patch_dim = patches.shape
        cos, sin = self._rotary_cos_sin(positions[..., 1:])
        segment = positions[..., 0]
        # Block-diagonal masks: the stock ViT attends within each frame (cu_seqlens); a mask
        # expresses the same for any number of segments in one static graph. Additive, so each
        # is built once for all blocks (a bool mask exports as a select plus a NaN guard inside
        # every attention: 2x slower in ONNX Runtime). No row is fully masked: a patch always
        # sees itself.
        frame_mask = self._additive(segment[:, None, :, None] == segment[:, None, None, :])
        window_mask = frame_mask
        if self.window_patches is not None:
            window = positions[..., 1:] // self.window_patches              # [B, N, 2]
            same_window = (window[:, :, None, :] == window[:, None, :, :]).all(-1)[:, None]
            window_mask = frame_mask + self._additive(same_window)
        x = self.patch_embed(patches.reshape(b * n, patch_dim)).reshape(b, n, -1)  # [B, N, embed]
        for index, block in enumerate(self.blocks):
            mask = frame_mask if index in self.full_blocks else window_mask
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, mask)
            x = x + block.mlp(block.norm2(x))
        # The merger folds every 4 consecutive rows into one token; N is a multiple of 4, so
        # groups never straddle batch items.
        return self.merger(x).reshape(b, -1, self.vision_hidden)

    @staticmethod
    def _additive(allowed: torch.Tensor) -> torch.Tensor:
        """bool mask -> float32 0 where allowed, -inf elsewhere (same shape)."""
        return torch.zeros(allowed.shape, dtype=torch.float32,
                           device=allowed.device).masked_fill(~allowed, float("-inf"))

    @torch.inference_mode()
    def encode(self, patches: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """numpy in, numpy out, on the module's device: float32 [N, patch_dim], int64 [N, 3]
        -> float32 [N/4, hidden], or a batch [B, N, ...] -> [B, N/4, hidden]. Raises
        ValueError (check_merge_groups) for a set whose merge groups are not whole."""
        patches, positions = np.asarray(patches), np.asarray(positions)
        for index, item in enumerate(positions.reshape((-1,) + positions.shape[-2:])):
            check_merge_groups(item, self.merge_size, index)
        if patches.shape[-2] == 0 or (patches.ndim == 3 and not len(patches)):
            return np.zeros(patches.shape[:-2] + (0, self.vision_hidden), np.float32)
        device = self.merger.mlp[-1].weight.device
        tokens = self(torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(device),
                      torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(device))
        return tokens.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# ONNX export and ONNX Runtime


def _example_batch(geometry: Geometry, batch: int, frames: int, groups_h: int, groups_w: int,
                   kept_per_frame: int, seed: int,
                   position_columns: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random patch sets of equal length: float32 [B, N, patch_dim], int64 [B, N, 3].

    Every item keeps the same number of random merge groups per frame and uses the same t
    values, as sets from different streams do.
    """
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(batch):
        pixels = rng.integers(0, 256, (frames, groups_h * geometry.group_pixels,
                                       groups_w * geometry.group_pixels, geometry.in_channels),
                              dtype=np.uint8)
        keep = np.zeros((frames, groups_h * groups_w), dtype=bool)
        for f in range(frames):
            keep[f, rng.choice(groups_h * groups_w, kept_per_frame, replace=False)] = True
        items.append(patchify(pixels, geometry, np.arange(frames),
                              keep.reshape(frames, groups_h, groups_w)))
    positions = np.stack([q for _, q in items])
    if position_columns == 5:   # each frame's patch grid (Family.position_columns)
        grid = np.broadcast_to(np.array([groups_h, groups_w]) * geometry.merge_size,
                               positions.shape[:2] + (2,))
        positions = np.concatenate([positions, grid], axis=-1)
    return np.stack([p for p, _ in items]), positions


def _renamed_axes(shape, names: Sequence[str]):
    shape = shape.copy()
    for axis, name in enumerate(names):
        shape[axis] = name
    return shape


def export_onnx(model_dir: str | Path, out_path: str | Path, opset: int = 18) -> Path:
    """Export the checkpoint's PrunedVisionEncoder to ONNX with dynamic batch and patch axes.

    Inputs PATCHES float32 [B, N, patch_dim] and POSITIONS int64 [B, N, 3], output TOKENS
    float32 [B, N/4, vision_hidden]: one patch set per batch item, the layout Triton gives a
    model with max_batch_size > 0 (the TensorRT plan is built from this file; ONNX Runtime
    runs it with B = 1). Weights are embedded in the .onnx file unless they are too big for
    protobuf (then next to it as <name>.data). Raises RuntimeError if ONNX Runtime disagrees
    with torch by more than 1e-4 at batch and patch counts not used during export.
    """
    from codecsight.families import family_for_dir

    started = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    family = family_for_dir(model_dir)
    if not family.onnx_exportable:
        raise ValueError(f"{family.title}'s pruned vision tower has no ONNX export; vit_pruned "
                         "serves it with torch (families.Family.onnx_exportable)")
    geometry = family.geometry
    print(f"[export] loading vision tower from {model_dir}", flush=True)
    model, _ = family.load(model_dir)
    encoder = family.vision_tower(model).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    embed = weight_bytes <= _MAX_EMBEDDED_WEIGHT_BYTES

    # Sizes above 1 on both axes: torch.export specialises axes whose example size is 0 or 1.
    patches, positions = _example_batch(geometry, batch=2, frames=2, groups_h=2, groups_w=3,
                                        kept_per_frame=4, seed=0,
                                        position_columns=family.position_columns)
    example = (torch.from_numpy(patches), torch.from_numpy(positions))
    # N = patches_per_group * groups: stating the multiple keeps the merger's reshape to
    # [N/4, 4*embed] valid for every N the graph accepts.
    batch = torch.export.Dim("batch", min=1)
    n_patches = geometry.patches_per_group * torch.export.Dim("groups", min=1)
    axes = {0: batch, 1: n_patches}
    print(f"[export] tracing with torch.export (opset {opset}, example {list(patches.shape)}, "
          f"{weight_bytes / 2 ** 20:.1f} MiB of weights)", flush=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Both inputs share their axes on purpose; the exporter warns about each shared name.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        warnings.filterwarnings("ignore", message=".*treespec, LeafSpec", category=FutureWarning)
        program = torch.onnx.export(
            encoder, example, dynamo=True, dynamic_shapes={"patches": axes, "positions": axes},
            opset_version=opset, input_names=[INPUT_PATCHES, INPUT_POSITIONS],
            output_names=[OUTPUT_TOKENS], verbose=False)
    # Readable axis names in the graph (the exporter writes "4*groups" and generated ones).
    graph = program.model.graph
    for value in graph.inputs:
        value.shape = _renamed_axes(value.shape, ["batch", "n_patches"])
    graph.outputs[0].shape = _renamed_axes(graph.outputs[0].shape, ["batch", "n_tokens"])
    program.model.metadata_props.update({
        META_PATCHES_PER_GROUP: str(geometry.patches_per_group),
        META_PATCH_DIM: str(geometry.patch_dim),
        META_VISION_HIDDEN: str(family.token_width),
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(out_path, external_data=not embed)
    print(f"[export] wrote {out_path} ({out_path.stat().st_size / 2 ** 20:.1f} MiB"
          f"{'' if embed else ', weights in ' + out_path.name + '.data'})", flush=True)

    # Verify at batch and patch counts the trace never saw, each item against torch alone
    # (which also proves that batch items do not see each other).
    patches, positions = _example_batch(geometry, batch=3, frames=2, groups_h=3, groups_w=4,
                                        kept_per_frame=7, seed=1,
                                        position_columns=family.position_columns)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_TOKENS], {INPUT_PATCHES: patches, INPUT_POSITIONS: positions})
    with torch.inference_mode():
        expected = np.stack([encoder(torch.from_numpy(p), torch.from_numpy(q)).numpy()
                             for p, q in zip(patches, positions)])
    max_diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else np.inf
    if not max_diff <= 1e-4:
        raise RuntimeError(
            f"ONNX export of {model_dir} does not match torch: shapes {list(got.shape)} vs "
            f"{list(expected.shape)}, max |diff| {max_diff:.3g} at B={len(patches)}, "
            f"N={patches.shape[1]} (limit 1e-4); check the torch/onnxscript versions and do "
            "not serve this file")
    print(f"[export] verified with ONNX Runtime at B={len(patches)}, N={patches.shape[1]}: "
          f"max |diff| {max_diff:.2g}; done in {time.perf_counter() - started:.1f} s", flush=True)
    return out_path


class OnnxVisionEncoder:
    """The exported vision encoder in ONNX Runtime on CPU: numpy patch sets in, tokens out
    (one set, or a batch of equal-length sets such as batch_frames makes)."""

    def __init__(self, path: str | Path, intra_op_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in (META_PATCHES_PER_GROUP, META_PATCH_DIM, META_VISION_HIDDEN)
                   if k not in meta]
        if missing:
            raise ValueError(f"{self.path} lacks metadata {missing}: it was not written by "
                             "codecsight.vision.export_onnx; export it with that")
        ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        if ranks != {INPUT_PATCHES: 3, INPUT_POSITIONS: 3}:
            raise ValueError(f"{self.path} has inputs {ranks}, not {INPUT_PATCHES} and "
                             f"{INPUT_POSITIONS} with a batch axis: it is an older export; "
                             "export it again (`codecsight build --force`)")
        self.patches_per_group = int(meta[META_PATCHES_PER_GROUP])
        self.patch_dim = int(meta[META_PATCH_DIM])
        self.vision_hidden = int(meta[META_VISION_HIDDEN])

    def __call__(self, patches: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Encode one patch set, float32 [N, patch_dim] and int64 [N, 3] -> float32 [N/4,
        hidden], or a batch of sets of equal length, [B, N, ...] -> [B, N/4, hidden].

        Raises ValueError for shapes that do not fit the graph or N that is not whole merge
        groups.
        """
        patches = np.asarray(patches)
        positions = np.asarray(positions)
        single = patches.ndim == 2
        if patches.ndim not in (2, 3) or patches.shape[-1] != self.patch_dim:
            raise ValueError(f"patches must be [N, {self.patch_dim}] (or [B, N, {self.patch_dim}] "
                             f"for a batch), got {list(patches.shape)}")
        n = patches.shape[-2]
        if positions.shape[:-1] != patches.shape[:-1] or positions.shape[-1] not in (3, 5):
            raise ValueError(f"positions must be [N, 3] = [{n}, 3] (t, h, w; or [N, 5] with "
                             f"each frame's patch grid) to match the patches "
                             f"{list(patches.shape)}, got {list(positions.shape)}")
        if n % self.patches_per_group:
            raise ValueError(f"{n} patches is not a whole number of {self.patches_per_group}-patch "
                             "merge groups: keep or drop whole merge groups")
        if single:   # the graph has Triton's batch axis; one set is a batch of one
            patches, positions = patches[None], positions[None]
        if n == 0 or not len(patches):
            tokens = np.zeros((len(patches), n // self.patches_per_group, self.vision_hidden),
                              np.float32)
            return tokens[0] if single else tokens
        (tokens,) = self.session.run([OUTPUT_TOKENS], {
            INPUT_PATCHES: np.ascontiguousarray(patches, dtype=np.float32),
            INPUT_POSITIONS: np.ascontiguousarray(positions, dtype=np.int64),
        })
        return tokens[0] if single else tokens


class TorchVisionEncoder:
    """A family's pruned tower in torch on a device: the same call as OnnxVisionEncoder.

    vit_pruned serves it for families whose tower has no sound ONNX export
    (Family.onnx_exportable False) and for every family on device "cuda" (served_encoder).
    The tower's weights live on the device; each call moves its numpy batch there once and
    its tokens back once (the Triton edge).
    """

    def __init__(self, family, model_dir: str | Path, intra_op_threads: int | None = None,
                 device: str | torch.device = "cpu"):
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        self.device = torch.device(device)
        model, _ = family.load(model_dir)
        self.tower = family.vision_tower(model).eval().to(self.device)
        g = family.geometry
        self.patches_per_group, self.patch_dim = g.patches_per_group, g.patch_dim
        self.vision_hidden = family.token_width
        self.position_columns = family.position_columns

    @torch.inference_mode()
    def __call__(self, patches: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One patch set, float32 [N, patch_dim] and int64 [N, position_columns] -> float32
        [N/4, token_width], or a batch of equal-length sets [B, N, ...] -> [B, N/4, ...]."""
        patches, positions = np.asarray(patches), np.asarray(positions)
        if patches.shape[-2] == 0 or (patches.ndim == 3 and not len(patches)):
            return np.zeros(patches.shape[:-2] + (0, self.vision_hidden), np.float32)
        tokens = self.tower(
            torch.from_numpy(np.ascontiguousarray(patches, np.float32)).to(self.device),
            torch.from_numpy(np.ascontiguousarray(positions, np.int64)).to(self.device))
        return tokens.cpu().numpy()


# vit_pruned's `device` parameter (codecsight.params): where its encoder runs.
DEVICES = params.PARAMETERS["vit_pruned"]["device"]


def served_encoder(family, model_dir: str | Path, onnx_path: str | Path,
                   intra_op_threads: int | None = None, device: str = "cpu"):
    """vit_pruned's encoder for a family on a device (its `device` parameter, DEVICES).

    cpu: the ONNX export in ONNX Runtime where the family has one (FileNotFoundError if it
    was not built), else the torch tower. cuda: the torch tower on the GPU for every family:
    this build's ONNX Runtime is CPU-only (onnxruntime-gpu is not installed; RUNBOOK), and
    the torch tower computes the function the export is verified against (export_onnx).
    Raises ValueError naming vit_pruned and the parameter for an unknown device or "cuda"
    where torch sees no CUDA device (params.torch_device), so the model fails to load
    instead of serving on CPU.
    """
    if params.torch_device("vit_pruned", device).type == "cuda":
        return TorchVisionEncoder(family, model_dir, intra_op_threads, device)
    if not family.onnx_exportable:
        return TorchVisionEncoder(family, model_dir, intra_op_threads, device)
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"{onnx_path} is missing: run `codecsight build` first")
    return OnnxVisionEncoder(onnx_path, intra_op_threads)


def frame_grid_positions(positions: np.ndarray, frame_meta: np.ndarray,
                         merge_size: int) -> np.ndarray:
    """positions int64 [N, 3] (t, h, w) -> [N, 5] (t, h, w, frame patch rows, frame patch
    columns), each patch's frame found by t in frame_meta (FRAME_META rows): for towers whose
    position embedding is resampled to the whole frame's grid (Qwen3-VL). ValueError if a
    patch's t has no FRAME_META row."""
    from codecsight.protocol import META

    t = frame_meta[:, META["t"]]
    order = np.argsort(t, kind="stable")
    where = np.searchsorted(t[order], positions[:, 0])
    where = np.minimum(where, max(len(t) - 1, 0))
    if len(positions) and (not len(t) or (t[order][where] != positions[:, 0]).any()):
        raise ValueError("a patch's t has no FRAME_META row: send each frame's metadata")
    rows = order[where] if len(positions) else np.zeros(0, np.int64)
    grid = frame_meta[rows][:, [META["grid_h"], META["grid_w"]]] * merge_size
    return np.concatenate([positions, grid.astype(np.int64)], axis=1)


# ---------------------------------------------------------------------------------------------
# Per-frame batching: every frame its own batch item, several frames per execution

# Most padding one frame may carry, as a share of its batch's L. Frames are sorted by kept
# length and cut into batches greedily; a frame joins the current batch while its own
# padding stays within the share, so its attention costs at most 1 / (1 - share)^2 of what it
# costs alone: 1.23x at 0.1, inside issue 17's 1.25x target even for the worst-placed frame.
# perf/bench_vit_frames.py (perf/results/vit_frames.md) timed 0, 0.1, 0.25 and 0.5 on the
# clip's dense and codec frames at 1, 4 and 8 streams on ONNX Runtime (CPU): all within the
# noise of one another and of one execution per frame; 0.1 keeps that bound while letting
# codec's many small frames of nearly equal length share executions (fewer calls, which a
# GPU engine needs more than a CPU one).
MAX_PADDING_SHARE = 0.1
# Segment id of the padding rows in a batch item (the item's frame is segment 0): padding
# attends only to itself, so no real patch sees it.
_PADDING_SEGMENT = 1


@dataclasses.dataclass
class FrameBatch:
    """One encoder execution: B frames, one per batch item, each padded to the longest (L).

    patches    float32 [B, L, patch_dim]  the frame's rows, then zeros
    positions  int64   [B, L, C]          the frame's rows with column 0 set to segment 0;
                                          then whole dummy merge groups in segment 1
    frames     (set index, first row in its set, rows) of each item's frame
    """

    patches: np.ndarray
    positions: np.ndarray
    frames: list[tuple[int, int, int]]


def frame_spans(positions: np.ndarray, set_index: int = 0) -> list[tuple[int, int]]:
    """(first row, end row) of each frame of a patch set, in row order.

    positions: int64 [N, >=3]; a frame is a run of rows sharing column 0 (t). Raises
    ValueError naming the set if a frame's rows are not consecutive.
    """
    segment = np.asarray(positions)[:, 0]
    if not len(segment):
        return []
    bounds = np.flatnonzero(np.concatenate([[True], segment[1:] != segment[:-1], [True]]))
    if len(bounds) - 1 != len(np.unique(segment)):
        raise ValueError(f"patch set {set_index}: the patches of a frame (positions column 0) "
                         "must be consecutive; produce sets with patchify")
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _padding_positions(rows: int, template: np.ndarray, merge_size: int) -> np.ndarray:
    """rows dummy positions int64 [rows, C]: whole merge groups at (h, w) in the top-left
    merge cell, in segment _PADDING_SEGMENT, other columns copied from template [C] (a row
    of the item's frame, so e.g. a frame-grid column stays valid for its tower)."""
    per_group = merge_size ** 2
    within = np.arange(rows) % per_group
    pad = np.repeat(template[None], rows, axis=0)
    pad[:, 0] = _PADDING_SEGMENT
    pad[:, 1] = within // merge_size
    pad[:, 2] = within % merge_size
    return pad


def batch_frames(sets: Sequence[tuple[np.ndarray, np.ndarray]], max_patches: int,
                 merge_size: int = 2,
                 max_padding: float = MAX_PADDING_SHARE) -> list[FrameBatch]:
    """Cut patch sets into per-frame batches: one frame per batch item, B * L <= max_patches.

    sets: (patches float32 [N_i, patch_dim], positions int64 [N_i, C >= 3]) per set, e.g. one
    per stream; a frame is a run of rows sharing t (positions column 0). Frames of all sets
    are sorted by length, longest first, and cut greedily: a frame of n rows joins the
    current batch (whose first frame set L) while B * L stays <= max_patches and its padding
    L - n is at most max_padding * L. Frames of equal length (dense frames of one picture
    size) always share a batch up to max_patches. Attention then costs sum(B * L^2) over the
    batches instead of the N^2 of all frames packed into one masked sequence.
    Raises ValueError naming the set for a malformed set, a frame that is not whole merge
    groups, or a frame larger than max_patches.
    """
    if max_patches <= 0:
        raise ValueError(f"max_patches must be positive, got {max_patches}")
    if not 0 <= max_padding < 1:
        raise ValueError(f"max_padding is a share of a batch's rows in [0, 1), got {max_padding}")
    per_group = merge_size ** 2
    frames: list[tuple[int, int, int]] = []          # (set index, start, rows)
    for set_index, (patches, positions) in enumerate(sets):
        patches, positions = np.asarray(patches), np.asarray(positions)
        if patches.ndim != 2 or positions.ndim != 2 or len(positions) != len(patches) \
                or positions.shape[1] < 3:
            raise ValueError(f"patch set {set_index}: need patches [N, patch_dim] and positions "
                             f"[N, 3] (t, h, w, then any per-patch columns), got "
                             f"{list(patches.shape)} and {list(positions.shape)}")
        for start, stop in frame_spans(positions, set_index):
            rows = stop - start
            if rows % per_group:
                raise ValueError(f"patch set {set_index}: frame t={int(positions[start, 0])} "
                                 f"has {rows} patches, not a whole number of {per_group}-patch "
                                 "merge groups")
            if rows > max_patches:
                raise ValueError(
                    f"patch set {set_index}: frame t={int(positions[start, 0])} has {rows} "
                    f"patches, more than max_patches={max_patches} (one execution's limit); "
                    "raise max_patches or use smaller frames")
            frames.append((set_index, start, rows))
    # Longest first, ties in arrival order (stable), so equal frames stay together.
    frames.sort(key=lambda f: -f[2])

    groups: list[list[tuple[int, int, int]]] = []
    for frame in frames:
        current = groups[-1] if groups else None
        if current:
            length = current[0][2]                # longest first: the batch's L
            if (len(current) + 1) * length <= max_patches \
                    and length - frame[2] <= max_padding * length:
                current.append(frame)
                continue
        groups.append([frame])

    batches = []
    for group in groups:
        length = group[0][2]
        first_patches, first_positions = sets[group[0][0]]
        patches = np.zeros((len(group), length, first_patches.shape[1]), np.float32)
        positions = np.zeros((len(group), length, first_positions.shape[1]), np.int64)
        for item, (set_index, start, rows) in enumerate(group):
            set_patches, set_positions = sets[set_index]
            patches[item, :rows] = set_patches[start:start + rows]
            positions[item, :rows] = set_positions[start:start + rows]
            positions[item, :rows, 0] = 0
            if rows < length:
                positions[item, rows:] = _padding_positions(length - rows,
                                                            positions[item, 0], merge_size)
        batches.append(FrameBatch(patches, positions, group))
    return batches


def encode_patch_sets(encoder: Callable[[np.ndarray, np.ndarray], np.ndarray],
                      sets: Sequence[tuple[np.ndarray, np.ndarray]],
                      max_patches: int, merge_size: int = 2,
                      max_padding: float = MAX_PADDING_SHARE) -> list[np.ndarray]:
    """Encode many patch sets frame by frame in per-frame batches (batch_frames); tokens come
    back per set, in set order.

    encoder: batched numpy callable, patches float32 [B, L, patch_dim] and positions int64
    [B, L, C] -> tokens float32 [B, L/4, width], every item its own patch set
    (OnnxVisionEncoder, TorchVisionEncoder, PrunedVisionEncoder.encode).
    Returns one float32 [N_i/4, width] array per set, equal to encoding each frame alone
    (padding sits in a segment of its own: no real patch attends to it).
    Raises ValueError (check_merge_groups, batch_frames) naming the set that is malformed.
    """
    for set_index, (_, positions) in enumerate(sets):
        check_merge_groups(positions, merge_size, set_index)
    per_group = merge_size ** 2
    parts: list[list[tuple[int, np.ndarray]]] = [[] for _ in sets]
    width = None
    for batch in batch_frames(sets, max_patches, merge_size, max_padding):
        tokens = encoder(batch.patches, batch.positions)        # [B, L/4, width]
        width = tokens.shape[-1]
        for item, (set_index, start, rows) in enumerate(batch.frames):
            parts[set_index].append((start, tokens[item, :rows // per_group]))
    if width is None and sets:   # only empty sets: the encoder says how wide tokens are
        patches, positions = sets[0]
        width = encoder(np.asarray(patches)[None], np.asarray(positions)[None]).shape[-1]
    out = []
    for pieces in parts:
        pieces.sort(key=lambda p: p[0])
        out.append(np.concatenate([t for _, t in pieces]) if pieces
                   else np.zeros((0, width), np.float32))
    return out
