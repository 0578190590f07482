"""Micro-Batch Streaming (MBS) training of the demo model on generated surveillance clips.

Training runs the serving path, so that trained weights mean the same thing when served:
each clip is encoded with libx264, cut into chunks and windowed exactly as a stream is
(`synth.serving_windows`: demux.iter_chunks -> codec.StreamDecoder -> codec.FrameSampler ->
llm.SlidingWindow, pixels from codec.frame_to_rgb); a window's kept merge groups are
patchified with `vision.patchify`, encoded by `vision.PrunedVisionEncoder` (the module exported to ONNX for
vit_pruned) and laid out by `llm.VisualLM.layout` (prompt, M-RoPE positions).

Two stages, because the answer loss alone did not train a model from random weights in the
time budget (measured: 800 steps stayed at the answer prior; a random ViT gives the LLM
nothing to attend to and the LLM gives the ViT too faint a signal):
1. the ViT learns what each merge group shows (object kind, anomalous look: with the
   previous sampled frame in each patch's first temporal slot it sees motion too) from the
   clips' ground truth, through a training-only linear head that is not saved
   (`pretrain_vision`);
2. the LLM learns the answers, cross-entropy on the answer tokens plus the stop token
   "<|im_end|>" only. By default the ViT is frozen there and each window encoded once
   (`DemoModel.freeze_vision`), so all compute goes to the LLM; --no-freeze-vision trains
   both, the ViT at a lower rate and with the object loss kept as an auxiliary term.

Micro-Batch Streaming: an effective batch of windows is split into micro-batches whose size
comes from a memory budget and the measured memory of one sample; micro-batches stream
through the model with gradient accumulation, and the loss is normalised by the number of
target tokens in the whole batch, so the accumulated gradient is the full-batch gradient
(per-micro-batch means would weight a token by the size of the micro-batch it fell in).

One training sample is one window with every question it can teach
(`training_questions`); the questions share the window's prefix (prompt + visual tokens),
which is run once and its KV cache repeated per question: causal attention makes that
exactly the per-question forward.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from codecsight import checkpoint
from codecsight.tools import synth
from codecsight.checkpoint import Geometry
from codecsight.llm import VisualLM, WindowFrame
from codecsight.protocol import PATCH_POLICIES
from codecsight.vision import PrunedVisionEncoder, patchify

STOP_TOKEN = "<|im_end|>"
STATE_FILE = "train_state.pt"
# Data seeds: training clips are TRAIN_SEED_BASE + i; evaluation defaults elsewhere
# (codecsight.tools.eval.EVAL_SEED_BASE) so the two suites never share a clip.
TRAIN_SEED_BASE = 100_000
# Training windows: a serving window, or its last 1, 2 or 4 sampled frames (what a server
# with a shorter WINDOW_SECONDS holds at that moment) -> share of visits. Short windows are
# a small haystack: the model learns kinds, zones and motion on them fast, and the full
# windows the evaluation uses make the largest share.
TRAIN_WINDOW_FRAMES = {1: 0.2, 2: 0.2, 4: 0.25, 8: 0.35}
MAX_PRESENCE_QUESTIONS = 4   # per answer ("yes" and "no") and window
# Per-token object loss: most merge groups show no object; weigh them down so the ViT does
# not settle on "nothing here".
AUX_BACKGROUND_WEIGHT = 0.1
VISION_BATCH = 2             # windows per vision pre-training step
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20,
          "mb": 10 ** 6, "mib": 2 ** 20, "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30}


def parse_bytes(text: str | int) -> int:
    """Bytes from "1073741824", "512MiB", "1GB", "2g" (binary units for k/m/g, KiB/MiB/GiB)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"memory budget {text!r} is not a byte count; write e.g. 1073741824, 512MiB or 1GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# ---------------------------------------------------------------------------------------------
# Data: windows of generated clips, as the server sees them


@dataclasses.dataclass
class Sample:
    """One serving window of one generated clip, with its truth and per-policy patch masks."""

    clip_seed: int
    window: int                 # request index within the clip's stream
    rgb: np.ndarray             # uint8 [F, Hp, Wp, 3] frame_to_rgb pixels of the window frames
    previous_rgb: np.ndarray    # uint8 [F, Hp, Wp, 3] each frame's previous sampled frame
    t: np.ndarray               # int64 [F] sampled-frame index in the stream
    frame_indices: np.ndarray   # int64 [F] display-order frame numbers
    time_ms: np.ndarray         # int64 [F]
    frame_types: str
    keep: dict                  # policy -> bool [F, Hp/28, Wp/28]: merge groups the policy keeps
    facts: synth.WindowFacts
    truth: synth.SceneTruth     # the clip's, to label shorter windows
    labels: np.ndarray          # int64 [F, Hp/28, Wp/28] synth.object_map per window frame

    @property
    def groups(self) -> int:
        return int(self.keep["dense"].sum())


@dataclasses.dataclass
class Item:
    """What one training step feeds for a sample: the policy's patches and the questions."""

    sample: Sample
    policy: str
    qas: list
    frames: np.ndarray | None = None   # int64 indices of the window frames used (None: all)

    @property
    def selection(self) -> np.ndarray:
        return np.arange(len(self.sample.t)) if self.frames is None else self.frames


def policy_keep_masks(path: Path, geometry: Geometry, policy: str, *, analysis_fps: float,
                      stride_seconds: float) -> dict[int, np.ndarray]:
    """Merge groups a patch policy keeps per sampled frame: t -> bool [Hp/28, Wp/28].

    Runs the server's own `parser.StreamParser` over the clip's chunks, so training on a
    pruned policy sees exactly the patches codec_parser would send.
    """
    from codecsight_client.demux import iter_chunks, probe
    from codecsight.parser import StreamParser

    info = probe(str(path))
    parser = StreamParser(geometry, info.codec, info.fps, analysis_fps)
    chunks = list(iter_chunks(str(path), stride_seconds))
    masks: dict[int, np.ndarray] = {}
    per_group = geometry.patches_per_group
    for c, chunk in enumerate(chunks):
        result = parser.parse(chunk.data, policy, final=c == len(chunks) - 1)
        meta = result.frame_meta
        cells = result.positions[::per_group]
        for row in meta:
            t, grid_h, grid_w = int(row[0]), int(row[4]), int(row[5])
            mask = np.zeros((grid_h, grid_w), bool)
            mine = cells[cells[:, 0] == t]
            mask[mine[:, 1] // geometry.merge_size, mine[:, 2] // geometry.merge_size] = True
            masks[t] = mask
    return masks


def build_suite(seeds, geometry: Geometry, *, scene: synth.SceneConfig, analysis_fps: float,
                window_seconds: float, stride_seconds: float | None = None,
                policies=("dense",), clip_dir: Path | None = None,
                progress=None) -> list[Sample]:
    """Generate, encode and window the clips of these seeds; one Sample per serving window.

    clip_dir: where the MP4 files go (a temporary directory when None).
    """
    stride = stride_seconds or window_seconds
    unknown = [p for p in policies if p not in PATCH_POLICIES]
    if unknown:
        raise ValueError(f"unknown patch policies {unknown}; this build has "
                         f"{', '.join(PATCH_POLICIES)}")
    tmp = None
    if clip_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="codecsight-clips-")
        clip_dir = Path(tmp.name)
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    seeds = list(seeds)
    started = time.perf_counter()
    try:
        for n, seed in enumerate(seeds):
            path = clip_dir / f"clip-{seed}.mp4"
            truth = synth.write_clip(seed, path, scene)
            windows = synth.serving_windows(path, analysis_fps=analysis_fps,
                                            window_seconds=window_seconds,
                                            stride_seconds=stride,
                                            group_pixels=geometry.group_pixels)
            masks = {p: policy_keep_masks(path, geometry, p, analysis_fps=analysis_fps,
                                          stride_seconds=stride)
                     for p in policies if p != "dense"}
            for w in windows:
                if not len(w.t):
                    continue
                grid = (len(w.t),) + tuple(s // geometry.group_pixels for s in w.rgb.shape[1:3])
                keep = {"dense": np.ones(grid, bool)}
                for p, by_t in masks.items():
                    keep[p] = np.stack([by_t[int(t)] for t in w.t])
                samples.append(Sample(
                    clip_seed=seed, window=w.chunk, rgb=w.rgb, previous_rgb=w.previous_rgb,
                    t=w.t,
                    frame_indices=w.frame_indices, time_ms=w.time_ms,
                    frame_types=w.frame_types, keep=keep,
                    facts=synth.window_facts(truth, w.frame_indices), truth=truth,
                    labels=np.stack([synth.object_map(truth, int(f), geometry.group_pixels)
                                     for f in w.frame_indices])))
            if progress:
                progress(n + 1, len(seeds), time.perf_counter() - started)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return samples


def training_questions(facts: synth.WindowFacts, rng: np.random.Generator,
                       frames: int) -> list[synth.QA]:
    """Every question a window can teach, with true answers; they share the window's prefix.

    Presence and entry: every true (kind, zone) pair or zone (at most MAX_PRESENCE_QUESTIONS)
    and as many false ones (at least one); count and anomaly. A one-frame window has no
    motion, so it is asked presence only.
    """
    def balanced(options, truth):
        # every true option (capped) and as many false ones, at least one, shuffled
        true = [o for o in options if o in truth]
        false = [o for o in options if o not in truth]
        n = min(len(true), MAX_PRESENCE_QUESTIONS)
        chosen = [true[i] for i in rng.permutation(len(true))[:n]]
        chosen += [false[i] for i in rng.permutation(len(false))[:max(1, n)]]
        return [chosen[i] for i in rng.permutation(len(chosen))]

    pairs = [(k, z) for k in synth.KINDS for z in synth.ZONES]
    qas = [synth.QA("presence", synth.QUESTIONS["presence"].format(kind=k, zone=z),
                    synth.answer(facts, "presence", k, z))
           for k, z in balanced(pairs, facts.present)]
    if frames > 1:
        qas += [synth.QA("entered", synth.QUESTIONS["entered"].format(zone=z),
                         synth.answer(facts, "entered", zone=z))
                for z in balanced(synth.ZONES, facts.entered)]
        qas += [synth.QA(t, synth.QUESTIONS[t], synth.answer(facts, t))
                for t in ("count", "anomaly")]
    return qas


def items_for_step(samples: list[Sample], step: int, batch_size: int, seed: int,
                   policies=("dense",)) -> list[Item]:
    """The effective batch of a step: a pure function of (seed, step), so resume is exact.

    Epoch e visits the samples in a permutation drawn from (seed, e); each visit draws the
    window length (TRAIN_WINDOW_FRAMES), the policy when several are trained, and labels
    the frames used from the clip's truth.
    """
    lengths = list(TRAIN_WINDOW_FRAMES)
    shares = list(TRAIN_WINDOW_FRAMES.values())
    items = []
    for k in range(batch_size):
        position = step * batch_size + k
        epoch, offset = divmod(position, len(samples))
        order = np.random.default_rng([seed, 1, epoch]).permutation(len(samples))
        index = int(order[offset])
        sample = samples[index]
        rng = np.random.default_rng([seed, 2, epoch, index])
        policy = policies[int(rng.integers(len(policies)))]
        n = len(sample.t)
        length = min(n, lengths[int(rng.choice(len(lengths), p=shares))])
        newest = int(rng.integers(length - 1, n))
        frames = np.arange(newest - length + 1, newest + 1)
        facts = sample.facts if length == n else synth.window_facts(
            sample.truth, sample.frame_indices[frames])
        items.append(Item(sample, policy, training_questions(facts, rng, length),
                          None if length == n else frames))
    return items


def worst_case_questions() -> list[synth.QA]:
    """The most questions training asks about one window (for the memory measurement)."""
    presence = [synth.QA("presence", synth.QUESTIONS["presence"].format(kind=k, zone=z), "no")
                for k in synth.KINDS for z in synth.ZONES][:2 * MAX_PRESENCE_QUESTIONS]
    return presence + [synth.QA("entered", synth.QUESTIONS["entered"].format(zone=z), "no")
                       for z in synth.ZONES] + [
        synth.QA("count", synth.QUESTIONS["count"], "three"),
        synth.QA("anomaly", synth.QUESTIONS["anomaly"], "no")]


# ---------------------------------------------------------------------------------------------
# Model: the serving modules with a training forward


class DemoModel:
    """A Qwen2-VL checkpoint's serving modules (PrunedVisionEncoder, VisualLM) for training."""

    def __init__(self, model, tokenizer, geometry: Geometry, aux_head: bool = False):
        self.model = model
        # Training-only head reading each visual token's object kind (not in the checkpoint).
        self.aux_head = torch.nn.Linear(geometry.vision_hidden, synth.OBJECT_CLASSES) \
            if aux_head else None
        self.frozen: dict | None = None    # (sample, policy) -> WindowFrames, see freeze_vision
        self.geometry = geometry
        self.encoder = PrunedVisionEncoder(model.model.visual)
        self.vlm = VisualLM(model, tokenizer, max_new_tokens=4)
        self.tokenizer = tokenizer
        self.stop_id = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
        self.pad_id = tokenizer.pad_token_id

    @staticmethod
    def aux_class_weights() -> torch.Tensor:
        weights = torch.ones(synth.OBJECT_CLASSES)
        weights[0] = AUX_BACKGROUND_WEIGHT
        return weights

    def parameters(self):
        """The checkpoint's parameters, then the training-only head's."""
        yield from self.model.parameters()
        if self.aux_head is not None:
            yield from self.aux_head.parameters()

    def answer_ids(self, text: str) -> list[int]:
        """Target tokens of an answer: its words, then the stop token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.stop_id]

    def target_tokens(self, items: list[Item]) -> int:
        """Target tokens of a list of items (known before any forward)."""
        return sum(len(self.answer_ids(qa.answer)) for item in items for qa in item.qas)

    def encode_frames(self, items: list[Item]) -> list[list[WindowFrame]]:
        """ViT over every window frame of the items in one execution; WindowFrames per item.

        Each frame is its own batch item of PrunedVisionEncoder, padded to the longest frame
        with rows of segment -1: patches attend only within their frame (same segment), so
        this equals encoding each window's patch set as vit_pruned does, at per-frame cost.
        After freeze_vision the tokens come from memory.
        """
        if self.frozen is not None:
            return [self._frozen_frames(item) for item in items]
        return self._encode(items)

    def _encode(self, items: list[Item]) -> list[list[WindowFrame]]:
        geometry = self.geometry
        per_group = geometry.patches_per_group
        sets = []                        # (item, frame, patches, positions)
        for i, item in enumerate(items):
            s, sel = item.sample, item.selection
            patches, positions = patchify(s.rgb[sel], geometry, s.t[sel],
                                          s.keep[item.policy][sel], s.previous_rgb[sel])
            bounds = np.searchsorted(positions[:, 0], s.t[sel], side="left").tolist() + [
                len(positions)]
            for k, f in enumerate(sel):
                sets.append((i, int(f), patches[bounds[k]:bounds[k + 1]],
                             positions[bounds[k]:bounds[k + 1]]))
        longest = max(max(len(p) for _, _, p, _ in sets), per_group)
        batch = np.zeros((len(sets), longest, geometry.patch_dim), np.float32)
        where = np.zeros((len(sets), longest, 3), np.int64)
        where[:, :, 0] = -1              # padding rows: a segment of their own
        for b, (_, _, p, q) in enumerate(sets):
            batch[b, :len(p)] = p
            where[b, :len(q)] = q
        tokens = self.encoder(torch.from_numpy(batch), torch.from_numpy(where))  # [B, n/4, H]
        frames: list[list[WindowFrame]] = [[] for _ in items]
        for b, (i, f, p, q) in enumerate(sets):
            s = items[i].sample
            grid_h, grid_w = s.keep["dense"].shape[1:]
            frames[i].append(WindowFrame(
                t=int(s.t[f]), frame_index=int(s.frame_indices[f]), time_ms=int(s.time_ms[f]),
                frame_type=s.frame_types[f], grid_h=grid_h, grid_w=grid_w,
                tokens=tokens[b, :len(p) // per_group],
                cells=q[::per_group, 1:] // geometry.merge_size))
        return frames

    def freeze_vision(self, samples: list[Sample], policies, batch: int = 4) -> None:
        """Freeze the ViT: encode every window once and serve its tokens from memory.

        Stage 2 then spends all its compute on the LLM; tokens are those encode_frames
        would compute (same modules, no gradient).
        """
        self.frozen = {}
        for p in self.model.model.visual.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            for policy in policies:
                for start in range(0, len(samples), batch):
                    chunk = [Item(s, policy, []) for s in samples[start:start + batch]]
                    for item, frames in zip(chunk, self._encode(chunk)):
                        self.frozen[(id(item.sample), policy)] = frames

    def frozen_bytes(self) -> int:
        """Bytes held by the frozen ViT's token cache (0 when the ViT trains)."""
        return sum(f.nbytes for frames in (self.frozen or {}).values() for f in frames)

    def _frozen_frames(self, item: Item) -> list[WindowFrame]:
        key = (id(item.sample), item.policy)
        if key not in self.frozen:                 # e.g. a sample added after freezing
            with torch.no_grad():
                self.frozen[key] = self._encode([Item(item.sample, item.policy, [])])[0]
        frames = self.frozen[key]
        return [frames[int(f)] for f in item.selection]

    def batch_logits(self, windows: list[list[WindowFrame]], questions: list[list[str]],
                     answers: list[list[list[int]]]) -> list[torch.Tensor]:
        """Teacher-forced logits of every question's answer tokens, for several windows.

        Each window's shared part (prompt prefix + visual tokens, from VisualLM.layout) runs
        once, all windows in one right-padded batch; its KV cache is then gathered per
        question and every question (+ its answer tokens) of every window runs as a second
        batch, masked to its own window's prefix. Causal attention makes this exactly each
        question's own forward. Returns per window logits [Q, A, vocab]: row q, column k
        predicts answers[q][k] (columns past len(answers[q]) are padding).
        """
        from transformers import DynamicCache

        vlm = self.vlm
        pad = vlm.embed(torch.tensor([self.pad_id]))[0]
        prefixes, rows, owners = [], [], []
        for w, (frames, qs, targets) in enumerate(zip(windows, questions, answers)):
            layouts = [vlm.layout(frames, q) for q in qs]
            shared = len(vlm.prefix_ids) + sum(len(f.tokens) for f in frames)
            prefixes.append((layouts[0][0][:shared], layouts[0][1][:, :shared]))
            for (e, p), target in zip(layouts, targets):
                given = torch.tensor(target[:-1], dtype=torch.long)   # answer tokens fed back
                # Generated tokens continue after the highest position (VisualLM._greedy).
                after = int(p.max()) + 1
                rows.append((torch.cat([e[shared:], vlm.embed(given)]),
                             torch.cat([p[:, shared:], torch.arange(
                                 after, after + len(given)).expand(3, -1)], dim=1),
                             len(e) - shared - 1, len(target)))  # start: predicts target[0]
                owners.append(w)

        def padded(parts):
            # right-pad embeddings with <|pad|> and positions with their last value
            length = max(len(e) for e, _ in parts)
            embeds = torch.stack([torch.cat([e, pad.expand(length - len(e), -1)])
                                  for e, _ in parts])
            pos = torch.stack([torch.cat([p, p[:, -1:].expand(-1, length - p.shape[1])], 1)
                               for _, p in parts], dim=1)             # [3, B, length]
            valid = torch.tensor([[1] * len(e) + [0] * (length - len(e)) for e, _ in parts])
            return embeds, pos, valid

        embeds, pos, prefix_valid = padded(prefixes)
        cache = DynamicCache(config=vlm.text_model.config)
        vlm.text_model(inputs_embeds=embeds, position_ids=pos, attention_mask=prefix_valid,
                       past_key_values=cache, use_cache=True)
        owner = torch.tensor(owners)
        cache.batch_select_indices(owner)
        embeds, pos, valid = padded([(e, p) for e, p, _, _ in rows])
        out = vlm.text_model(inputs_embeds=embeds, position_ids=pos,
                             attention_mask=torch.cat([prefix_valid[owner], valid], dim=1),
                             past_key_values=cache, use_cache=True).last_hidden_state
        width = max(n for _, _, _, n in rows)
        hidden = torch.stack([
            torch.cat([out[r, start:start + n], out[r, -1:].expand(width - n, -1)])
            for r, (_, _, start, n) in enumerate(rows)])            # [rows, A, H]
        logits = vlm.lm_head(hidden)
        per_window, first = [], 0
        for qs in questions:
            per_window.append(logits[first:first + len(qs)])
            first += len(qs)
        return per_window

    def visual_tokens(self, items: list[Item]) -> int:
        """Visual tokens (kept merge groups) of a list of items."""
        return int(sum(item.sample.keep[item.policy][item.selection].sum() for item in items))

    def loss_sum(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Summed answer cross-entropy and summed auxiliary token loss of the items, + stats.

        The auxiliary term is the training-only head's cross-entropy against the kind of
        object under each visual token (`Sample.labels`); it is 0 without a head.
        """
        windows = self.encode_frames(items)
        answers = [[self.answer_ids(qa.answer) for qa in item.qas] for item in items]
        logits = self.batch_logits(windows, [[qa.question for qa in item.qas]
                                             for item in items], answers)
        total = torch.zeros(())
        stats = {"tokens": 0, "correct": 0, "answers": 0, "visual_tokens": 0,
                 "by_task": {}, "visual_norm": 0.0}
        for item, window, targets, window_logits in zip(items, windows, answers, logits):
            for q, (qa, target) in enumerate(zip(item.qas, targets)):
                n = len(target)
                total = total + torch.nn.functional.cross_entropy(
                    window_logits[q, :n], torch.tensor(target), reduction="sum")
                right = bool((window_logits[q, :n].argmax(-1) == torch.tensor(target)).all())
                stats["correct"] += right
                task = stats["by_task"].setdefault(qa.task, [0, 0])
                task[0] += right
                task[1] += 1
                stats["tokens"] += n
                stats["answers"] += 1
            stats["visual_tokens"] += sum(len(f.tokens) for f in window)
            stats["visual_norm"] += float(sum(f.tokens.detach().norm(dim=-1).sum()
                                              for f in window))
        aux = torch.zeros(())
        if self.aux_head is not None:
            tokens, labels = [], []
            for item, window in zip(items, windows):
                for f, frame in zip(item.selection, window):
                    tokens.append(frame.tokens)
                    labels.append(torch.from_numpy(
                        item.sample.labels[f][frame.cells[:, 0], frame.cells[:, 1]]))
            aux = torch.nn.functional.cross_entropy(
                self.aux_head(torch.cat(tokens)), torch.cat(labels), reduction="sum",
                weight=self.aux_class_weights())
        return total, aux, stats


# ---------------------------------------------------------------------------------------------
# Micro-Batch Streaming


def activation_bytes(fn, exclude=()) -> tuple[object, int]:
    """Run fn() and count the bytes autograd saves for backward (distinct storages).

    exclude: tensors not to count (the parameters, which backward also saves).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


class MicroBatchStreamer:
    """Splits an effective batch into memory-sized micro-batches and accumulates gradients."""

    def __init__(self, model: DemoModel, memory_budget: int, *, aux_weight: float = 0.0,
                 fixed_bytes: int | None = None):
        self.model = model
        self.memory_budget = int(memory_budget)
        self.aux_weight = aux_weight
        # Weights, gradients and AdamW's two moments: 4 copies of every trained parameter;
        # frozen ones once, plus the token cache of a frozen ViT.
        self.fixed_bytes = fixed_bytes if fixed_bytes is not None else sum(
            p.numel() * p.element_size() * (4 if p.requires_grad else 1)
            for p in model.parameters()) + model.frozen_bytes()
        self.sample_bytes: int | None = None

    def measure(self, item: Item) -> int:
        """Memory of one sample: its patch input plus the activations kept for backward.

        Measure the densest sample (every patch kept): pruned samples need less.
        """
        patch_bytes = 0 if self.model.frozen is not None else \
            4 * item.sample.keep[item.policy][item.selection].sum() * \
            self.model.geometry.patches_per_group * self.model.geometry.patch_dim
        (loss, aux, _), saved = activation_bytes(lambda: self.model.loss_sum([item]),
                                                 exclude=list(self.model.parameters()))
        del loss, aux
        self.sample_bytes = int(saved + patch_bytes)
        return self.sample_bytes

    def micro_batch_size(self) -> int:
        """Samples per micro-batch that fit the budget next to the fixed (optimizer) memory."""
        if self.sample_bytes is None:
            raise RuntimeError("call measure() on a sample first")
        room = self.memory_budget - self.fixed_bytes
        if room < self.sample_bytes:
            raise ValueError(
                f"memory budget {self.memory_budget} bytes is too small: weights, gradients "
                f"and optimizer state take {self.fixed_bytes} and one sample "
                f"{self.sample_bytes}; give at least {self.fixed_bytes + self.sample_bytes}")
        return int(room // self.sample_bytes)

    def accumulate(self, items: list[Item], micro_batch_size: int) -> dict:
        """Gradients of the whole batch's token-mean loss, streamed in micro-batches.

        Each micro-batch's summed loss is divided by the target tokens of the whole batch
        before its backward, so the gradients summed over micro-batches equal the gradient
        of the mean over all target tokens computed at once. The auxiliary token loss (with
        aux_weight > 0) is normalised the same way, by the visual tokens of the whole batch.
        """
        total_tokens = self.model.target_tokens(items)
        total_visual = max(1, self.model.visual_tokens(items))
        loss_value = 0.0
        merged = {"tokens": 0, "correct": 0, "answers": 0, "visual_tokens": 0, "by_task": {},
                  "micro_batches": 0, "visual_norm": 0.0}
        for start in range(0, len(items), micro_batch_size):
            loss, aux, stats = self.model.loss_sum(items[start:start + micro_batch_size])
            objective = loss / total_tokens
            if self.aux_weight:
                objective = objective + self.aux_weight * aux / total_visual
                merged["aux_loss"] = merged.get("aux_loss", 0.0) + float(aux.detach()) / \
                    total_visual
            objective.backward()
            loss_value += float(loss.detach()) / total_tokens
            merged["micro_batches"] += 1
            for key in ("tokens", "correct", "answers", "visual_tokens", "visual_norm"):
                merged[key] += stats[key]
            for task, (right, n) in stats["by_task"].items():
                acc = merged["by_task"].setdefault(task, [0, 0])
                acc[0] += right
                acc[1] += n
        assert merged["tokens"] == total_tokens
        merged["loss"] = loss_value
        merged["visual_norm"] /= max(1, merged["visual_tokens"])   # mean |visual token|
        return merged


# ---------------------------------------------------------------------------------------------
# The training run


@dataclasses.dataclass
class TrainConfig:
    out_dir: str
    seed: int = 0
    clips: int = 150
    steps: int = 1500
    batch_size: int = 8               # effective batch, windows (each with all its questions)
    memory_budget: int = 1 << 30      # bytes
    lr: float = 3e-3
    vision_lr_scale: float = 0.25     # the ViT and merger learn at lr x this (see train())
    aux_weight: float = 0.5           # weight of the training-only per-token object loss; 0: off
    vision_steps: int = 2000          # stage 1: ViT pre-training on per-token object labels
    vision_lr: float = 1e-3
    freeze_vision: bool = True        # stage 2 trains the LLM on the stage-1 ViT's tokens
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    fps: float = 2.0                  # analysis frames per second
    window_seconds: float = 4.0
    stride_seconds: float | None = None
    policies: tuple = ("dense",)
    checkpoint_every: int = 100
    threads: int = 1                  # 1: OpenMP spin-waits make 2+ threads crawl on busy cores
    val_clips: int = 16
    clip_seconds: float = 16.0

    def scene(self) -> synth.SceneConfig:
        return synth.SceneConfig(seconds=self.clip_seconds)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Progress:
    """A one-line progress bar on stderr: step, loss, answer accuracy, throughput, ETA."""

    def __init__(self, total: int, start: int = 0, stream=sys.stderr, every_s: float = 1.0,
                 label: str = "train"):
        self.total, self.start, self.stream, self.label = total, start, stream, label
        self.tty = stream.isatty()
        self.every_s = every_s if self.tty else 15.0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, step: int, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        done = step - self.start
        rate = done / max(1e-9, now - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / max(1, self.total))
        bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
        line = (f"{self.label} [{bar}] {step}/{self.total} {text} | "
                f"{_clock(now - self.t0)} elapsed, eta {_clock(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60:02d}:{seconds % 60:02d}"


def say(message: str) -> None:
    print(f"codecsight train: {message}", file=sys.stderr, flush=True)


def evaluate_answers(model: DemoModel, samples: list[Sample], seed: int,
                     policy: str = "dense", batch: int = 8) -> dict:
    """Teacher-forced answer accuracy per task on samples (no gradients); a quick check."""
    counts: dict[str, list[int]] = {}
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            items = [Item(s, policy, synth.ask(s.facts, np.random.default_rng([seed, 3, i])))
                     for i, s in enumerate(samples[start:start + batch], start)]
            _, _, stats = model.loss_sum(items)
            for task, (right, n) in stats["by_task"].items():
                acc = counts.setdefault(task, [0, 0])
                acc[0] += right
                acc[1] += n
    return {task: round(right / n, 4) for task, (right, n) in sorted(counts.items())}


def pretrain_vision(demo: DemoModel, samples: list[Sample], steps: int, lr: float,
                    seed: int) -> list[float]:
    """Stage 1: the ViT (+ training-only head) learns what each merge group shows.

    Per-token cross-entropy against `Sample.labels` (object kind, and whether it looks
    anomalous) on dense windows, VISION_BATCH windows a step; returns the loss per step.
    Without it the answer loss alone left the model at the answer prior for 800 steps
    (measured): a random ViT gives the LLM nothing to attend to, and the LLM gives the ViT
    too weak a signal to learn from.
    """
    params = list(demo.model.model.visual.parameters()) + list(demo.aux_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98))
    weights = demo.aux_class_weights()
    losses = []
    bar = Progress(steps, label="vision")
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        rng = np.random.default_rng([seed, 4, step])
        picks = rng.choice(len(samples), min(VISION_BATCH, len(samples)), replace=False)
        items = [Item(samples[int(i)], "dense", []) for i in picks]
        windows = demo.encode_frames(items)
        tokens = torch.cat([f.tokens for w in windows for f in w])
        labels = torch.cat([torch.from_numpy(item.sample.labels[k][f.cells[:, 0], f.cells[:, 1]])
                            for item, w in zip(items, windows) for k, f in enumerate(w)])
        loss = torch.nn.functional.cross_entropy(demo.aux_head(tokens), labels, weight=weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(step + 1, f"object loss {np.mean(losses[-50:]):.3f}", force=step + 1 == steps)
    bar.close()
    return losses


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Train the tiny Qwen2-VL-architecture model; write it (HF layout) to config.out_dir.

    resume: continue from the state saved in out_dir (same config required).
    stop_after: save the state and return after this step, as if interrupted (resume later).
    """
    t_start = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE

    init_dir = out_dir / "init"
    checkpoint.build_tiny(init_dir, seed=config.seed)
    model, tokenizer = checkpoint.load(init_dir)
    model.train()
    geometry = Geometry.from_model_dir(init_dir)
    torch.manual_seed(config.seed)     # the training-only head's initial weights
    demo = DemoModel(model, tokenizer, geometry, aux_head=config.aux_weight > 0)
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
        f"(Qwen2-VL architecture, checkpoint.tiny_config), seed {config.seed}, "
        f"{config.threads} threads")

    say(f"generating {config.clips} training clips (seeds {TRAIN_SEED_BASE + config.seed * 10_000}"
        f"..), {config.scene().seconds:g} s each, windows of {config.window_seconds:g} s "
        f"at {config.fps:g} fps, policies {', '.join(config.policies)}")

    def data_progress(done, total, elapsed):
        if done == total or done % 20 == 0:
            say(f"  clips {done}/{total} ({elapsed:.0f} s)")

    base = TRAIN_SEED_BASE + config.seed * 10_000
    samples = build_suite(range(base, base + config.clips), geometry, scene=config.scene(),
                          analysis_fps=config.fps, window_seconds=config.window_seconds,
                          stride_seconds=config.stride_seconds, policies=config.policies,
                          progress=data_progress)
    val = build_suite(range(base + config.clips, base + config.clips + config.val_clips),
                      geometry, scene=config.scene(), analysis_fps=config.fps,
                      window_seconds=config.window_seconds,
                      stride_seconds=config.stride_seconds, policies=("dense",))
    data_s = time.perf_counter() - t_start
    say(f"{len(samples)} training windows, {len(val)} validation windows "
        f"({data_s:.0f} s)")

    start_step, history, vision_losses = 0, [], []
    state = None
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["config"] != dataclasses.asdict(config):
            raise SystemExit(f"{state_path} was written with different settings; train into "
                             "a fresh --out or run with the same flags")
    elif resume:
        say(f"nothing to resume in {out_dir}; starting at step 0")
    if config.vision_steps and state is None:
        if demo.aux_head is None:
            raise ValueError("vision pre-training needs the object head: set aux_weight > 0")
        say(f"stage 1: {config.vision_steps} steps of ViT pre-training on what each merge "
            "group shows (object kind, anomalous look)")
        t_vision = time.perf_counter()
        vision_losses = pretrain_vision(demo, samples, config.vision_steps, config.vision_lr,
                                        config.seed)
        say(f"stage 1 done in {time.perf_counter() - t_vision:.0f} s: object loss "
            f"{np.mean(vision_losses[:50]):.3f} -> {np.mean(vision_losses[-50:]):.3f}")
    if state is not None:
        model.load_state_dict(state["model"])
        if demo.aux_head is not None:
            demo.aux_head.load_state_dict(state["aux_head"])
    aux_weight = config.aux_weight
    if config.freeze_vision:
        t_freeze = time.perf_counter()
        demo.freeze_vision(samples, config.policies)
        aux_weight = 0.0          # the head only shapes the ViT, which no longer learns
        say(f"stage 2: ViT frozen; encoded {len(samples)} windows x {len(config.policies)} "
            f"policies once ({time.perf_counter() - t_freeze:.0f} s); the LLM learns the answers")
    params = [p for p in demo.parameters() if p.requires_grad]

    streamer = MicroBatchStreamer(demo, config.memory_budget, aux_weight=aux_weight)
    densest = max(samples, key=lambda s: s.groups)
    streamer.measure(Item(densest, "dense", worst_case_questions()))
    micro = min(config.batch_size, streamer.micro_batch_size())
    model.zero_grad(set_to_none=True)
    say(f"one sample holds {streamer.sample_bytes / 2 ** 20:.1f} MiB (measured), fixed "
        f"{streamer.fixed_bytes / 2 ** 20:.1f} MiB; budget {config.memory_budget / 2 ** 20:.0f} "
        f"MiB -> micro-batches of {micro} for an effective batch of {config.batch_size}")

    # When the vision tower trains with the LLM it learns slower: at the LLM's rate its
    # merger drifts into a large component shared by every visual token (the fastest way
    # to move the answer prior), after which RMSNorm leaves the tokens' content a small
    # perturbation and the model stops looking at the video.
    vision_ids = {id(p) for p in model.model.visual.parameters()}
    groups = [{"params": [p for p in params if id(p) not in vision_ids], "scale": 1.0},
              {"params": [p for p in params if id(p) in vision_ids],
               "scale": config.vision_lr_scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                  betas=(0.9, 0.98), weight_decay=config.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = state["step"], state["history"]
        say(f"resumed from {state_path} at step {start_step}")

    bar = Progress(config.steps, start_step)
    window_loss = window_acc = None
    t_loop = time.perf_counter()
    windows_done = tokens_done = 0
    for step in range(start_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step) * group["scale"]
        items = items_for_step(samples, step, config.batch_size, config.seed, config.policies)
        stats = streamer.accumulate(items, micro)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acc = stats["correct"] / stats["answers"]
        window_loss = stats["loss"] if window_loss is None else 0.95 * window_loss + \
            0.05 * stats["loss"]
        window_acc = acc if window_acc is None else 0.95 * window_acc + 0.05 * acc
        windows_done += len(items)
        tokens_done += stats["visual_tokens"]
        history.append({"step": step + 1, "loss": round(stats["loss"], 5),
                        "accuracy": round(acc, 4), "grad_norm": round(grad_norm, 4),
                        "lr": learning_rate(config, step),
                        "visual_norm": round(stats["visual_norm"], 4),
                        "aux_loss": round(stats.get("aux_loss", 0.0), 5),
                        "by_task": {k: v for k, v in stats["by_task"].items()}})
        elapsed = time.perf_counter() - t_loop
        bar.update(step + 1, f"loss {window_loss:.3f} acc {window_acc:.2f} "
                   f"|v| {stats['visual_norm']:.2f} | "
                   f"{windows_done / elapsed:.2f} windows/s "
                   f"{tokens_done / elapsed:.0f} visual tok/s",
                   force=step + 1 == config.steps)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "aux_head": demo.aux_head.state_dict() if demo.aux_head else None,
                        "step": step + 1, "history": history,
                        "config": dataclasses.asdict(config)}, state_path.with_suffix(".tmp"))
            os.replace(state_path.with_suffix(".tmp"), state_path)
        if stop_after is not None and step + 1 >= stop_after and step + 1 < config.steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "aux_head": demo.aux_head.state_dict() if demo.aux_head else None,
                        "step": step + 1, "history": history,
                        "config": dataclasses.asdict(config)}, state_path)
            bar.close()
            say(f"stopped after step {step + 1}; continue with --resume")
            return {"stopped_at": step + 1, "history": history}
    bar.close()

    model.eval()
    val_accuracy = evaluate_answers(demo, val, config.seed)
    say(f"validation answer accuracy (teacher-forced, dense): {val_accuracy}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copy2(init_dir / "preprocessor_config.json", out_dir / "preprocessor_config.json")
    shutil.rmtree(init_dir)
    (out_dir / "CODECSIGHT.md").write_text(
        "Tiny Qwen2-VL-architecture model TRAINED by `codecsight train` on generated "
        "surveillance clips (see TRAINING.md). It answers four questions about a window: "
        + "; ".join(synth.QUESTIONS.values()) + "\n")
    last = history[-20:]
    summary = {
        "config": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_windows": len(samples), "val_windows": len(val),
        "micro_batch_size": micro, "sample_bytes": streamer.sample_bytes,
        "fixed_bytes": streamer.fixed_bytes,
        "final_loss": round(float(np.mean([h["loss"] for h in last])), 4) if last else None,
        "first_loss": history[0]["loss"] if history else None,
        "vision_loss": [round(float(np.mean(vision_losses[:50])), 4),
                        round(float(np.mean(vision_losses[-50:])), 4)] if vision_losses
        else None,
        "val_accuracy": val_accuracy,
        "data_seconds": round(data_s, 1),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "torch": torch.__version__,
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "TRAINING.md").write_text(training_card(config, summary))
    state_path.unlink(missing_ok=True)    # the run is complete: nothing left to resume
    (out_dir / "training_history.json").write_text(json.dumps(history))
    say(f"done in {summary['wall_seconds']:.0f} s: final loss {summary['final_loss']} "
        f"(mean of the last {len(last)} steps); wrote {out_dir}")
    return summary


def command_line(config: TrainConfig) -> str:
    """The `codecsight train` command that reproduces config, every setting spelled out."""
    flags = [f"--out {config.out_dir}", f"--seed {config.seed}", f"--clips {config.clips}",
             f"--clip-seconds {config.clip_seconds:g}", f"--steps {config.steps}",
             f"--batch-size {config.batch_size}", f"--memory-budget {config.memory_budget}",
             f"--lr {config.lr:g}", f"--warmup-steps {config.warmup_steps}",
             f"--fps {config.fps:g}", f"--window-seconds {config.window_seconds:g}",
             f"--policies {','.join(config.policies)}", f"--threads {config.threads}",
             f"--val-clips {config.val_clips}", f"--aux-weight {config.aux_weight:g}",
             f"--vision-lr-scale {config.vision_lr_scale:g}",
             f"--vision-steps {config.vision_steps}", f"--vision-lr {config.vision_lr:g}",
             "--freeze-vision" if config.freeze_vision else "--no-freeze-vision",
             f"--checkpoint-every {config.checkpoint_every}"]
    if config.stride_seconds:
        flags.append(f"--stride-seconds {config.stride_seconds:g}")
    return "codecsight train " + " ".join(flags)


def _pair(values) -> str:
    return "-" if not values else f"{values[0]:.3f} -> {values[1]:.3f}"


def training_card(config: TrainConfig, summary: dict) -> str:
    """TRAINING.md of a trained checkpoint: how to reproduce it and what it reached."""
    base = TRAIN_SEED_BASE + config.seed * 10_000
    val = ", ".join(f"{k} {v:.2f}" for k, v in summary["val_accuracy"].items())
    return f"""# Training of this checkpoint

Reproduce (same numbers for the same seed and --threads; ~{summary['wall_seconds'] / 60:.0f} min
on the machine below):

    {command_line(config)}

- Model: tiny Qwen2-VL architecture (`codecsight.checkpoint.tiny_config`),
  {summary['parameters']:,} parameters, initialised by `checkpoint.build_tiny` with seed
  {config.seed}.
- Stage 1 ({config.vision_steps} steps, lr {config.vision_lr:g}): the ViT learns what each
  merge group shows (object kind, and whether it looks anomalous) from the clips' ground
  truth, through a training-only linear head that is not part of the checkpoint; object
  loss {_pair(summary.get('vision_loss'))}.
- Every patch holds the previous sampled frame and this one in its two temporal slots, as
  codec_parser sends them (`vision.patchify(previous=...)`).
- Stage 2 ({config.steps} steps): {"the ViT frozen, its tokens computed once per window; "
  "the LLM" if config.freeze_vision else "ViT (lr x " + f"{config.vision_lr_scale:g}" + ") and LLM"}
  learns the answers with the loss on answer tokens and the stop token only.
- Data: {config.clips} generated clips (`codecsight.tools.synth.generate_scene`, seeds
  {base}..{base + config.clips - 1}), {config.clip_seconds:g} s at
  {synth.SceneConfig().fps:g} fps, 224x168, libx264 with a
  {synth.SceneConfig().gop_seconds:g} s GOP; {summary['train_windows']} serving windows of
  {config.window_seconds:g} s at {config.fps:g} fps, visited whole or as their last 1, 2 or
  4 frames (shares {', '.join(f'{k}: {v:g}' for k, v in TRAIN_WINDOW_FRAMES.items())});
  every presence/entry/count/anomaly question a window can teach
  (`train.training_questions`); patch policies: {', '.join(config.policies)}.
- Micro-Batch Streaming: effective batch {config.batch_size} windows, memory budget
  {config.memory_budget} bytes; one sample measured {summary['sample_bytes'] / 2 ** 20:.1f} MiB
  -> micro-batches of {summary['micro_batch_size']}.
- Optimiser: AdamW, peak lr {config.lr:g}, {config.warmup_steps} warm-up steps, cosine to
  10%, weight decay {config.weight_decay:g}, gradient clip {config.grad_clip:g};
  {config.steps} steps.
- Stage-2 loss (mean cross-entropy per answer token, stop token included): first step
  {summary['first_loss']:.3f}, final {summary['final_loss']:.3f} (mean of the last 20 steps).
- Validation ({summary['val_windows']} windows of {config.val_clips} further clips,
  teacher-forced answer accuracy, dense): {val}.
- Wall time {summary['wall_seconds']:.0f} s (data {summary['data_seconds']:.0f} s),
  {config.threads} threads, torch {summary['torch']}.

F1 through the real Triton ensemble: `codecsight eval --model-dir <this directory>`.
"""


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(out_dir="")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seeds initial weights, clips, data order and questions")
    parser.add_argument("--clips", type=int, default=d.clips, help="training clips to generate")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="effective batch in windows (each with one question per task)")
    parser.add_argument("--memory-budget", type=parse_bytes, default=d.memory_budget,
                        help="bytes for training (e.g. 1073741824, 512MiB); sets micro-batches")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--vision-lr-scale", type=float, default=d.vision_lr_scale,
                        help="the ViT and merger learn at lr x this")
    parser.add_argument("--vision-steps", type=int, default=d.vision_steps,
                        help="stage 1: ViT pre-training steps on per-token object labels")
    parser.add_argument("--vision-lr", type=float, default=d.vision_lr)
    parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction,
                        default=d.freeze_vision,
                        help="stage 2 trains the LLM only, on the stage-1 ViT's tokens")
    parser.add_argument("--aux-weight", type=float, default=d.aux_weight,
                        help="weight of the training-only per-token object-kind loss (0: off)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--fps", type=float, default=d.fps, help="analysis frames per second")
    parser.add_argument("--window-seconds", type=float, default=d.window_seconds)
    parser.add_argument("--stride-seconds", type=float, default=None,
                        help="video per request (default: the window length)")
    parser.add_argument("--policies", default=",".join(d.policies),
                        help="patch policies to train on, comma-separated (a random one per "
                        "window visit), e.g. dense or dense,codec")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from --out/{STATE_FILE} if present")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch threads (results are reproducible for a fixed count)")
    parser.add_argument("--val-clips", type=int, default=d.val_clips)
    parser.add_argument("--clip-seconds", type=float, default=d.clip_seconds)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="save the state and stop after this step (resume later)")


def run(args) -> int:
    config = TrainConfig(
        out_dir=str(args.out), seed=args.seed, clips=args.clips, steps=args.steps,
        batch_size=args.batch_size, memory_budget=args.memory_budget, lr=args.lr,
        vision_lr_scale=args.vision_lr_scale, aux_weight=args.aux_weight,
        vision_steps=args.vision_steps, vision_lr=args.vision_lr,
        freeze_vision=args.freeze_vision,
        warmup_steps=args.warmup_steps, fps=args.fps, window_seconds=args.window_seconds,
        stride_seconds=args.stride_seconds,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        checkpoint_every=args.checkpoint_every, threads=args.threads, val_clips=args.val_clips,
        clip_seconds=args.clip_seconds)
    train(config, resume=args.resume, stop_after=args.stop_after)
    return 0
