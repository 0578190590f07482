"""The training run: configuration, learning rate, progress, the two stages, the CLI."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from codecsight import checkpoint
from codecsight.checkpoint import Geometry
from codecsight.tools import UsageError, synth
from codecsight.tools.train.data import (STOCHASTIC_POLICY, TRAIN_SEED_BASE,
                                         TRAIN_WINDOW_FRAMES, Item, Sample, build_suite,
                                         items_for_step, worst_case_questions)
from codecsight.tools.train.mbs import MicroBatchStreamer, parse_bytes
from codecsight.tools.train.model import DemoModel
from codecsight_client import settings as defaults

STATE_FILE = "train_state.pt"
VISION_BATCH = 2             # windows per vision pre-training step


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
    fps: float = defaults.ANALYSIS_FPS   # analysis frames per second
    window_seconds: float = defaults.TRAINED_WINDOW_SECONDS
    stride_seconds: float | None = None  # None: the window (settings.TRAINED_STRIDE_SHARE)
    policies: tuple = ("dense",)
    checkpoint_every: int = 100
    threads: int = 1                  # 1: OpenMP spin-waits make 2+ threads crawl on busy cores
    val_clips: int = 16
    clip_seconds: float = 16.0
    # Capacity (None: checkpoint.tiny_config's). Head width stays 32 (M-RoPE sections).
    llm_layers: int | None = None
    llm_width: int | None = None      # hidden size; the MLP is 4x, heads width / 32
    vision_depth: int | None = None
    vision_width: int | None = None   # ViT embed dim; heads width / 16
    # Start from this checkpoint's weights (every tensor whose name and shape match), e.g.
    # its trained ViT with --vision-steps 0, or all of it to uptrain on pruned windows.
    init_from: str | None = None

    def scene(self) -> synth.SceneConfig:
        return synth.SceneConfig(seconds=self.clip_seconds)


def resize(model_dir: Path, config: TrainConfig) -> None:
    """Rebuild the initial checkpoint in model_dir at the capacity config asks for.

    Same seed and tokenizer as `checkpoint.build_tiny`; only the widths and depths change.
    Head widths stay 32 (LLM, so M-RoPE's sections still sum to half a head) and 16 (ViT).
    Raises ValueError for widths those head widths do not divide.
    """
    sizes = (config.llm_layers, config.llm_width, config.vision_depth, config.vision_width)
    if all(v is None for v in sizes):
        return
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig.from_pretrained(model_dir)
    text, vision = cfg.text_config, cfg.vision_config
    if config.llm_layers:
        text.num_hidden_layers = config.llm_layers
        text.layer_types = ["full_attention"] * config.llm_layers
    if config.llm_width:
        if config.llm_width % 64:
            raise ValueError(f"--llm-width must be a multiple of 64, got {config.llm_width}")
        text.hidden_size = vision.hidden_size = config.llm_width
        text.intermediate_size = 4 * config.llm_width
        text.num_attention_heads = config.llm_width // 32
        text.num_key_value_heads = max(1, config.llm_width // 64)
    if config.vision_depth:
        vision.depth = config.vision_depth
    if config.vision_width:
        if config.vision_width % 16:
            raise ValueError(f"--vision-width must be a multiple of 16, got "
                             f"{config.vision_width}")
        vision.embed_dim = config.vision_width
        vision.num_heads = config.vision_width // 16
    torch.manual_seed(config.seed)
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(model_dir)


def init_weights(model, model_dir: str | Path) -> int:
    """Copy every tensor of model_dir's checkpoint whose name and shape match into model.

    Returns how many were copied. Raises FileNotFoundError when model_dir has no weights.
    """
    from transformers import Qwen2VLForConditionalGeneration

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {model_dir}: no checkpoint there")
    # transformers maps the file's names onto the module's (they differ across versions)
    source = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True).state_dict()
    state = model.state_dict()
    same = {k: v for k, v in source.items() if k in state and state[k].shape == v.shape}
    model.load_state_dict(same, strict=False)
    return len(same)


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
    resize(init_dir, config)
    model, tokenizer = checkpoint.load(init_dir)
    initialised = None
    if config.init_from:
        initialised = [init_weights(model, config.init_from), len(model.state_dict())]
        say(f"initialised {initialised[0]} of {initialised[1]} tensors from "
            f"{config.init_from}")
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
            raise UsageError(f"{state_path} was written with different settings; train into "
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
        encoded = len(demo.frozen) // max(1, len(samples))   # mix reuses dense's tokens
        say(f"stage 2: ViT frozen; encoded {len(samples)} windows x {encoded} policies once "
            f"({time.perf_counter() - t_freeze:.0f} s); the LLM learns the answers")
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
        "initialised_tensors": initialised,     # [copied, of] from --init-from
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
    for name in ("llm_layers", "llm_width", "vision_depth", "vision_width", "init_from"):
        if getattr(config, name):
            flags.append(f"--{name.replace('_', '-')} {getattr(config, name)}")
    return "codecsight train " + " ".join(flags)


def _mix_note(config: TrainConfig) -> str:
    if STOCHASTIC_POLICY not in config.policies:
        return ""
    return (f" ({STOCHASTIC_POLICY}: codec's merge groups plus each other one with probability "
            "q ~ U(0, 1) per visit, tokens taken from the frozen dense encoding)")


def _capacity(config: TrainConfig) -> str:
    sizes = {"LLM layers": config.llm_layers, "LLM width": config.llm_width,
             "ViT depth": config.vision_depth, "ViT width": config.vision_width}
    given = [f"{k} {v}" for k, v in sizes.items() if v]
    return " with " + ", ".join(given) if given else ""


def _initialised(config: TrainConfig, summary: dict) -> str:
    if not config.init_from:
        return ""
    copied = summary.get("initialised_tensors")
    share = f"{copied[0]} of {copied[1]} tensors" if copied else "the tensors"
    return f", then {share} (those whose name and shape match) from {config.init_from}"


def _pair(values) -> str:
    return "-" if not values else f"{values[0]:.3f} -> {values[1]:.3f}"


def _stage_one(config: TrainConfig, summary: dict) -> str:
    if not config.vision_steps:
        source = f" ({config.init_from})" if config.init_from else ""
        return (f"Stage 1 skipped (--vision-steps 0): the ViT and merger start as "
                f"initialised{source}.")
    return (f"Stage 1 ({config.vision_steps} steps, lr {config.vision_lr:g}): the ViT learns "
            "what each\n  merge group shows (object kind, and whether it looks anomalous) "
            "from the clips' ground\n  truth, through a training-only linear head that is not "
            "part of the checkpoint; object\n  loss "
            f"{_pair(summary.get('vision_loss'))}.")


def training_card(config: TrainConfig, summary: dict) -> str:
    """TRAINING.md of a trained checkpoint: how to reproduce it and what it reached."""
    base = TRAIN_SEED_BASE + config.seed * 10_000
    val = ", ".join(f"{k} {v:.2f}" for k, v in summary["val_accuracy"].items())
    return f"""# Training of this checkpoint

Reproduce (same numbers for the same seed and --threads; ~{summary['wall_seconds'] / 60:.0f} min
on the machine below):

    {command_line(config)}

- Model: tiny Qwen2-VL architecture (`codecsight.checkpoint.tiny_config`{_capacity(config)}),
  {summary['parameters']:,} parameters, initialised by `checkpoint.build_tiny` with seed
  {config.seed}{_initialised(config, summary)}.
- {_stage_one(config, summary)}
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
  (`train.training_questions`); patch policies: {', '.join(config.policies)}{_mix_note(config)}.
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
  {config.threads} thread(s), torch {summary['torch']}.

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
    # The eval's windows (settings.TRAINED_*): what the demo model is asked about.
    defaults.add_window_arguments(parser, window_seconds=d.window_seconds,
                                  stride_share=defaults.TRAINED_STRIDE_SHARE)
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
    parser.add_argument("--llm-layers", type=int, default=None,
                        help="LLM layers (default: checkpoint.tiny_config's 4)")
    parser.add_argument("--llm-width", type=int, default=None,
                        help="LLM hidden size, a multiple of 64 (default 128)")
    parser.add_argument("--vision-depth", type=int, default=None,
                        help="ViT blocks (default 2)")
    parser.add_argument("--vision-width", type=int, default=None,
                        help="ViT embed dim, a multiple of 16 (default 64)")
    parser.add_argument("--init-from", default=None,
                        help="checkpoint directory whose matching weights start the run")
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
        clip_seconds=args.clip_seconds, llm_layers=args.llm_layers, llm_width=args.llm_width,
        vision_depth=args.vision_depth, vision_width=args.vision_width,
        init_from=args.init_from)
    train(config, resume=args.resume, stop_after=args.stop_after)
    return 0
