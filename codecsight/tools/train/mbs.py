"""Micro-Batch Streaming: memory-sized micro-batches with exact gradient accumulation."""
from __future__ import annotations

import argparse
import re

import torch

from codecsight.tools.train.data import Item
from codecsight.tools.train.model import DemoModel

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

