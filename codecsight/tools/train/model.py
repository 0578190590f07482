"""The model wrapper: a checkpoint's serving modules with a training forward."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from codecsight.checkpoint import Geometry
from codecsight.llm import VisualLM, WindowFrame
from codecsight.tools import synth
from codecsight.tools.train.data import STOCHASTIC_POLICY, Item, Sample
from codecsight.vision import PrunedVisionEncoder, patchify

STOP_TOKEN = "<|im_end|>"
# Per-token object loss: most merge groups show no object; weigh them down so the ViT does
# not settle on "nothing here".
AUX_BACKGROUND_WEIGHT = 0.1


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
                                          item.keep[sel], s.previous_rgb[sel])
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
        # A stochastic visit takes its groups' tokens from the dense encoding: an
        # approximation (a ViT attends across the frame), which saves encoding every draw.
        policies = [p if p != STOCHASTIC_POLICY else "dense" for p in policies]
        with torch.no_grad():
            for policy in dict.fromkeys(policies):
                for start in range(0, len(samples), batch):
                    chunk = [Item(s, policy, []) for s in samples[start:start + batch]]
                    for item, frames in zip(chunk, self._encode(chunk)):
                        self.frozen[(id(item.sample), policy)] = frames

    def frozen_bytes(self) -> int:
        """Bytes held by the frozen ViT's token cache (0 when the ViT trains)."""
        return sum(f.nbytes for frames in (self.frozen or {}).values() for f in frames)

    def _frozen_frames(self, item: Item) -> list[WindowFrame]:
        policy = "dense" if item.mask is not None else item.policy
        key = (id(item.sample), policy)
        if key not in self.frozen:                 # e.g. a sample added after freezing
            with torch.no_grad():
                self.frozen[key] = self._encode([Item(item.sample, policy, [])])[0]
        frames = [self.frozen[key][int(f)] for f in item.selection]
        if item.mask is None:
            return frames
        out = []
        for f, frame in zip(item.selection, frames):
            keep = torch.from_numpy(item.mask[f][frame.cells[:, 0], frame.cells[:, 1]])
            out.append(dataclasses.replace(frame, tokens=frame.tokens[keep],
                                           cells=frame.cells[keep.numpy()]))
        return out

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
        return int(sum(item.keep[item.selection].sum() for item in items))

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

