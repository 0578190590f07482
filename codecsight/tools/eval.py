"""Evaluation through the real Triton ensemble: F1 per task and policy on held-out clips.

A held-out suite of generated clips (seeds distinct from training) is streamed through a
real tritonserver with `codecsight_client.stream.run_stream`, once per patch policy x refresh policy
(`protocol.PATCH_POLICIES` x `protocol.REFRESH_POLICIES`, so policies added there are
picked up). Every clip is streamed once per task: each request of that stream carries the
question about the window it completes, and the answer is scored against the ground truth
of exactly the frames the server's window holds (`synth.serving_windows`, checked against
the window range the server reports). Policies are interleaved clip by clip and requests
run one at a time, so their timings share the same conditions.

Reported per policy combination: F1 and accuracy per task, patches kept, tokens prefilled,
throughput; written as JSON, a markdown table and a plot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from codecsight import protocol
from codecsight.tools import synth
from codecsight_client import settings as defaults

# Held-out clips are EVAL_SEED_BASE + i: far from training's (train.TRAIN_SEED_BASE + ...).
EVAL_SEED_BASE = 900_000


def say(message: str) -> None:
    print(f"codecsight eval: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class EvalClip:
    """A held-out clip: its file, the server's windows over it and one question per task."""

    seed: int
    path: Path
    windows: list            # synth.ServedWindow per request
    questions: list          # [window] -> list[synth.QA], one per task


def make_suite(seeds, out_dir: Path, *, analysis_fps: float, window_seconds: float,
               stride_seconds: float | None = None, tasks=synth.TASKS,
               scene: synth.SceneConfig = synth.SceneConfig()) -> list[EvalClip]:
    """Write the held-out clips to out_dir and label every serving window."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = []
    for seed in seeds:
        path = out_dir / f"clip-{seed}.mp4"
        truth = synth.write_clip(seed, path, scene)
        windows = synth.serving_windows(path, analysis_fps=analysis_fps,
                                        window_seconds=window_seconds,
                                        stride_seconds=stride_seconds)
        # Questions are a function of (clip seed, window), identical for every policy.
        questions = [synth.ask(synth.window_facts(truth, w.frame_indices),
                               np.random.default_rng([seed, 5, w.chunk]), tasks)
                     for w in windows]
        clips.append(EvalClip(seed, path, windows, questions))
    return clips


def policy_combinations(policies=None, refreshes=None) -> list[tuple[str, str]]:
    """(patch policy, refresh policy) pairs to evaluate, dense/full first."""
    policies = policies or protocol.PATCH_POLICIES
    refreshes = refreshes or protocol.REFRESH_POLICIES
    for p in policies:
        protocol.check_choice("eval", "policy", p, protocol.PATCH_POLICIES)
    for r in refreshes:
        protocol.check_choice("eval", "refresh policy", r, protocol.REFRESH_POLICIES)
    return [(p, r) for p in policies for r in refreshes]


def stream_clip(client, clip: EvalClip, task: int, policy: str, refresh: str, *,
                analysis_fps: float, window_seconds: float,
                stride_seconds: float | None = None) -> list[dict]:
    """Stream one clip asking one task's questions; one record per request."""
    from codecsight_client.stream import StreamSettings, run_stream
    from codecsight_client.demux import iter_chunks, probe

    info = probe(str(clip.path))
    qas = [q[task] for q in clip.questions]
    settings = StreamSettings(question=qas[0].question, codec=info.codec,
                              source_fps=info.fps, analysis_fps=analysis_fps,
                              window_seconds=window_seconds, policy=policy, refresh=refresh)

    def next_question(window, _chunk):
        # The client reads settings at every send: set the question of the next window.
        if window.index + 1 < len(qas):
            settings.question = qas[window.index + 1].question

    stream_id = f"eval-{clip.seed}-{policy}-{refresh}-{qas[0].task}"
    results = run_stream(client, stream_id, settings,
                         iter_chunks(str(clip.path), stride_seconds or window_seconds),
                         on_window=next_question)
    if len(results) != len(clip.windows):
        raise RuntimeError(f"stream {stream_id}: {len(results)} answers for "
                           f"{len(clip.windows)} labelled windows")
    records = []
    for window, served, qa in zip(results, clip.windows, qas):
        reported = window.llm.window_frame_range
        expected = [int(served.frame_indices[0]), int(served.frame_indices[-1])] \
            if len(served.frame_indices) else None
        record = {
            "clip": clip.seed, "window": window.index, "task": qa.task, "policy": policy,
            "refresh": refresh, "question": qa.question, "truth": qa.answer,
            "answer": window.answer, "correct": window.answer == qa.answer,
            "latency_s": window.latency_s,
            "frames_sampled": window.parse.frames_sampled,
            "patches_kept": window.parse.patches_kept,
            "patches_total": window.parse.patches_total,
            "tokens_prefilled": window.llm.tokens_prefilled,
            "tokens_reused": window.llm.tokens_reused,
            "visual_tokens": (window.llm.visual_tokens or 0),
            "visual_tokens_pruned": window.llm.visual_tokens_pruned,   # after the ViT
            "window_frames": window.llm.window_frames,
            "window_matches_labels": reported == expected
            and window.llm.window_frames == len(served.frame_indices),
        }
        if window.llm.first_logits is not None:     # served with report_first_logits on
            record["first_logits"] = [round(float(x), 4) for x in window.llm.first_logits]
        records.append(record)
    return records


def run_suite(client, clips: list[EvalClip], combos, *, analysis_fps: float,
              window_seconds: float, stride_seconds: float | None = None,
              progress=None) -> list[dict]:
    """Every clip x policy combination x task, combinations interleaved clip by clip."""
    records = []
    n_tasks = len(clips[0].questions[0]) if clips and clips[0].questions else 0
    total = len(clips) * len(combos) * n_tasks
    done = 0
    started = time.perf_counter()
    for i, clip in enumerate(clips):
        # Rotate the order per clip so no combination always runs first (warm caches, load).
        order = combos[i % len(combos):] + combos[:i % len(combos)]
        for policy, refresh in order:
            for task in range(n_tasks):
                records += stream_clip(client, clip, task, policy, refresh,
                                       analysis_fps=analysis_fps, window_seconds=window_seconds,
                                       stride_seconds=stride_seconds)
                done += 1
                if progress:
                    progress(done, total, time.perf_counter() - started)
    return records


# ---------------------------------------------------------------------------------------------
# Metrics


def f1_yes(truth: list[str], answers: list[str]) -> float | None:
    """F1 of the "yes" class (any other answer counts as "no"); None with no yes at all."""
    tp = sum(t == "yes" and a == "yes" for t, a in zip(truth, answers))
    fp = sum(t != "yes" and a == "yes" for t, a in zip(truth, answers))
    fn = sum(t == "yes" and a != "yes" for t, a in zip(truth, answers))
    return None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(truth: list[str], answers: list[str]) -> float | None:
    """Mean F1 over the classes that occur in the truth (count task)."""
    scores = []
    for label in sorted(set(truth)):
        tp = sum(t == label and a == label for t, a in zip(truth, answers))
        fp = sum(t != label and a == label for t, a in zip(truth, answers))
        fn = sum(t == label and a != label for t, a in zip(truth, answers))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else None


BOOTSTRAP_RESAMPLES = 2000


def _confusion_by_clip(records: list[dict], task: str, clips: list, labels: list[str]):
    """tp, fp, fn per clip and class: int [clips, classes, 3] (one class, "yes", if binary)."""
    index = {c: i for i, c in enumerate(clips)}
    out = np.zeros((len(clips), len(labels), 3), np.int64)
    for r in records:
        if r["task"] != task:
            continue
        for k, label in enumerate(labels):
            truth, said = r["truth"] == label, r["answer"] == label
            out[index[r["clip"]], k] += (truth and said, said and not truth, truth and not said)
    return out


def _f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """F1 averaged over the classes present, from tp/fp/fn sums [..., classes, 3]."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)    # a resample with no class present
        return np.nanmean(np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan), axis=-1)


def clip_intervals(records: list[dict], rows: list[dict], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> None:
    """Add 95% intervals to each row against dense: row["intervals"][task] = {"f1": [lo, hi],
    "drop": [lo, hi]}, by resampling whole clips (a clip's windows are correlated) with the
    same resample for dense and the policy, so the drop's interval is paired."""
    clips = sorted({r["clip"] for r in records})
    if len(clips) < 2:
        return
    picks = np.random.default_rng(seed).integers(0, len(clips), (resamples, len(clips)))
    dense = {r["refresh"]: r for r in rows if r["policy"] == "dense"}
    for row in rows:
        ref = dense.get(row["refresh"]) or dense.get("full")
        mine = [r for r in records if (r["policy"], r["refresh"]) == (row["policy"],
                                                                        row["refresh"])]
        theirs = [] if ref is None else [r for r in records if (r["policy"], r["refresh"])
                                         == (ref["policy"], ref["refresh"])]
        row["intervals"] = {}
        for task in row["tasks"]:
            labels = ["yes"] if task in synth.BINARY_TASKS else sorted(
                {r["truth"] for r in mine if r["task"] == task})
            f1 = _f1_from_counts(_confusion_by_clip(mine, task, clips, labels)[picks].sum(1))
            entry = {"f1": np.nanpercentile(f1, [2.5, 97.5]).round(4).tolist()}
            if theirs and ref is not row:
                base = _f1_from_counts(
                    _confusion_by_clip(theirs, task, clips, labels)[picks].sum(1))
                entry["drop"] = np.nanpercentile(base - f1, [2.5, 97.5]).round(4).tolist()
            row["intervals"][task] = entry


def paired_drop(reference: list[dict], records: list[dict],
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """F1 drop of records against reference on the same windows, per task, in points.

    E.g. selective refresh against full, or one server setting against another. Returns
    {task: {"reference_f1", "f1", "drop", "interval": [lo, hi]}}, the interval paired by
    resampling whole clips, the same resample for both (as `clip_intervals`).
    Raises ValueError when the two do not cover the same (clip, window, task) requests.
    """
    def key(r):
        return r["clip"], r["window"], r["task"]

    if sorted(map(key, reference)) != sorted(map(key, records)):
        raise ValueError("paired_drop needs the same clips, windows and tasks on both sides")
    clips = sorted({r["clip"] for r in records})
    picks = np.random.default_rng(seed).integers(0, len(clips), (resamples, len(clips)))
    out = {}
    for task in dict.fromkeys(r["task"] for r in records):
        labels = ["yes"] if task in synth.BINARY_TASKS else sorted(
            {r["truth"] for r in records if r["task"] == task})
        ref = _confusion_by_clip(reference, task, clips, labels)
        mine = _confusion_by_clip(records, task, clips, labels)
        point = float(_f1_from_counts(ref.sum(0)) - _f1_from_counts(mine.sum(0)))
        spread = _f1_from_counts(ref[picks].sum(1)) - _f1_from_counts(mine[picks].sum(1))
        out[task] = {"reference_f1": round(float(_f1_from_counts(ref.sum(0))), 4),
                     "f1": round(float(_f1_from_counts(mine.sum(0))), 4),
                     "drop": round(100 * point, 2),
                     "interval": (100 * np.nanpercentile(spread, [2.5, 97.5])).round(2).tolist()}
    return out


def first_token_kl(p_logits, q_logits) -> float:
    """KL(softmax p || softmax q) in nats, float64, of two [vocab] logit vectors."""
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    log_p = p - p.max() - np.log(np.exp(p - p.max()).sum())
    log_q = q - q.max() - np.log(np.exp(q - q.max()).sum())
    return float((np.exp(log_p) * (log_p - log_q)).sum())


def against_reference(reference: list[dict], records: list[dict],
                      reference_refresh: str = "full") -> list[dict]:
    """Each (policy, refresh) of records against the reference run's (policy, full) answers.

    reference: the records of another eval run on the same clips, windows and questions
    (e.g. `--refresh full`), records: this run's (e.g. `--refresh selective` served with some
    anchor_refresh_frames). Per combination: `paired_drop` per task (points, positive =
    records worse, paired 95% interval over whole clips), tokens prefilled per window on both
    sides and their share (all windows, and the windows where this side reused cached KV
    rows: every request after a stream's first under selective refresh), the share of
    requests with the same answer, and, when both runs carry first_logits
    (`--first-logits`), the KL(reference || this) of the first answer token in nats, mean
    and max over the windows that reused rows.
    Raises ValueError when a combination's requests are not all in the reference.
    """
    def key(r):
        return r["clip"], r["window"], r["task"]

    out = []
    for policy, refresh in dict.fromkeys((r["policy"], r["refresh"]) for r in records):
        mine = [r for r in records if (r["policy"], r["refresh"]) == (policy, refresh)]
        by_key = {key(r): r for r in reference
                  if (r["policy"], r["refresh"]) == (policy, reference_refresh)}
        missing = [key(r) for r in mine if key(r) not in by_key]
        if missing:
            raise ValueError(f"{policy}/{refresh}: {len(missing)} requests (e.g. clip, window, "
                             f"task {missing[0]}) have no {policy}/{reference_refresh} answer "
                             "in the reference run; run both on the same clips and stride")
        theirs = [by_key[key(r)] for r in mine]
        reusing = [(a, b) for a, b in zip(theirs, mine) if b["tokens_reused"] > 0]
        row = {"policy": policy, "refresh": refresh, "reference_refresh": reference_refresh,
               "requests": len(mine), "reusing": len(reusing),
               "tasks": paired_drop(theirs, mine),
               "tokens_reference": round(float(np.mean([r["tokens_prefilled"]
                                                        for r in theirs])), 1),
               "tokens": round(float(np.mean([r["tokens_prefilled"] for r in mine])), 1),
               "same_answer": round(float(np.mean([a["answer"] == b["answer"]
                                                   for a, b in zip(theirs, mine)])), 4)}
        row["token_share"] = round(row["tokens"] / max(1e-9, row["tokens_reference"]), 4)
        if reusing:
            ref_reusing = float(np.mean([a["tokens_prefilled"] for a, _ in reusing]))
            row["tokens_reference_reusing"] = round(ref_reusing, 1)
            row["tokens_reusing"] = round(float(np.mean([b["tokens_prefilled"]
                                                      for _, b in reusing])), 1)
            row["token_share_reusing"] = round(row["tokens_reusing"] / max(1e-9, ref_reusing), 4)
            if all("first_logits" in a and "first_logits" in b for a, b in reusing):
                kl = [first_token_kl(a["first_logits"], b["first_logits"]) for a, b in reusing]
                row["kl_mean"] = round(float(np.mean(kl)), 5)
                row["kl_max"] = round(float(np.max(kl)), 5)
        out.append(row)
    return out


def against_markdown(rows: list[dict], meta: dict) -> str:
    """The table of `against_reference`: F1 (drop [95%]) per task, tokens, KL, agreement."""
    tasks = list(synth.TASKS)
    anchors = meta.get("server_overrides", {}).get("llm_prefill", {}).get(
        "anchor_refresh_frames", "config.pbtxt's")
    lines = ["", f"Against the reference run's full refresh on the same requests (anchor_refresh_"
             f"frames {anchors}): F1 (drop in points, positive = worse [95% interval, whole "
             "clips resampled]); tokens prefilled per window, all windows and those that "
             "reused cached rows; KL(full || this) of the first answer token over the latter.",
             "", "| policy | refresh | " + " | ".join(f"{t} F1 (drop)" for t in tasks)
             + " | tokens full / this (share) | reused: full / this (share) | KL mean (max) "
             "| same answer |", "|" + "---|" * (len(tasks) + 6)]
    for r in rows:
        cells = [r["policy"], r["refresh"]]
        for t in tasks:
            d = r["tasks"].get(t)
            cells.append("-" if d is None or d["f1"] is None else
                         f"{d['f1']:.2f} ({d['drop']:+.1f} [{d['interval'][0]:+.1f}, "
                         f"{d['interval'][1]:+.1f}])")
        cells.append(f"{r['tokens_reference']:.0f} / {r['tokens']:.0f} ({r['token_share']:.2f})")
        cells.append("-" if "token_share_reusing" not in r else
                     f"{r['tokens_reference_reusing']:.0f} / {r['tokens_reusing']:.0f} "
                     f"({r['token_share_reusing']:.2f})")
        cells.append("-" if "kl_mean" not in r else f"{r['kl_mean']:.3f} ({r['kl_max']:.2f})")
        cells.append(f"{100 * r['same_answer']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(records: list[dict], combos) -> list[dict]:
    """Per policy combination: F1/accuracy per task, patches kept, tokens, throughput."""
    rows = []
    for policy, refresh in combos:
        mine = [r for r in records if r["policy"] == policy and r["refresh"] == refresh]
        if not mine:
            continue
        tasks = {}
        for task in dict.fromkeys(r["task"] for r in mine):
            sub = [r for r in mine if r["task"] == task]
            truth = [r["truth"] for r in sub]
            answers = [r["answer"] for r in sub]
            f1 = f1_yes(truth, answers) if task in synth.BINARY_TASKS else macro_f1(truth,
                                                                                   answers)
            tasks[task] = {
                "f1": None if f1 is None else round(f1, 4),
                "accuracy": round(float(np.mean([r["correct"] for r in sub])), 4),
                "n": len(sub), "positives": sum(t == "yes" for t in truth)
                if task in synth.BINARY_TASKS else None,
            }
        binary = [tasks[t]["f1"] for t in synth.BINARY_TASKS
                  if t in tasks and tasks[t]["f1"] is not None]
        latency = sum(r["latency_s"] for r in mine)
        rows.append({
            "policy": policy, "refresh": refresh, "tasks": tasks,
            "binary_f1_mean": round(float(np.mean(binary)), 4) if binary else None,
            "requests": len(mine),
            "patches_kept": int(sum(r["patches_kept"] for r in mine)),
            "patches_total": int(sum(r["patches_total"] for r in mine)),
            "patches_kept_share": round(sum(r["patches_kept"] for r in mine)
                                        / max(1, sum(r["patches_total"] for r in mine)), 4),
            "tokens_prefilled": int(sum(r["tokens_prefilled"] for r in mine)),
            # visual tokens the ViT encoded and llm_prefill dropped (vllm_evs)
            "visual_tokens_pruned": int(sum(r.get("visual_tokens_pruned", 0) for r in mine)),
            "tokens_prefilled_per_window": round(float(np.mean(
                [r["tokens_prefilled"] for r in mine])), 1),
            "frames_per_s": round(sum(r["frames_sampled"] for r in mine) / latency, 2),
            "windows_per_s": round(len(mine) / latency, 2),
            "latency_ms_p50": round(float(np.percentile([r["latency_s"] for r in mine],
                                                        50)) * 1000, 1),
            "windows_mismatched": sum(not r["window_matches_labels"] for r in mine),
        })
    dense = {r["refresh"]: r for r in rows if r["policy"] == "dense"}
    for row in rows:
        ref = dense.get(row["refresh"]) or dense.get("full")
        if ref is None or row is ref:
            continue
        row["vs_dense"] = {
            "f1_drop": {t: round(ref["tasks"][t]["f1"] - row["tasks"][t]["f1"], 4)
                        for t in row["tasks"] if t in ref["tasks"]
                        and None not in (ref["tasks"][t]["f1"], row["tasks"][t]["f1"])},
            "binary_f1_drop": None if None in (ref["binary_f1_mean"], row["binary_f1_mean"])
            else round(ref["binary_f1_mean"] - row["binary_f1_mean"], 4),
            "patches_kept_ratio": round(row["patches_kept"] / max(1, ref["patches_kept"]), 4),
            "tokens_prefilled_ratio": round(row["tokens_prefilled"]
                                            / max(1, ref["tokens_prefilled"]), 4),
            "speedup": round(row["frames_per_s"] / ref["frames_per_s"], 3),
        }
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """The result tables: per policy combination, and the drop against dense."""
    tasks = list(synth.TASKS)
    head = ["policy", "refresh"] + [f"{t} F1 / acc" for t in tasks] + [
        "binary F1 (mean)", "patches kept", "tokens prefilled / window", "frames/s",
        "p50 ms/window", "tokens dropped after the ViT"]
    lines = [f"Held-out suite: {meta['clips']} clips (seeds {meta['seeds']}), "
             f"{meta['windows']} windows x {len(tasks)} tasks per policy; model "
             f"`{meta['model_dir']}`; analysis {meta['fps']:g} fps, window "
             f"{meta['window_seconds']:g} s, a request every "
             f"{meta.get('stride_seconds') or meta['window_seconds']:g} s. "
             "F1 of \"yes\" for binary tasks, macro F1 for "
             "count. Requests one at a time on " + meta["device"] + "." + "".join(
                 f" Served with {model} {key} = {value}."
                 for model, values in meta.get("server_overrides", {}).items()
                 for key, value in values.items()), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["policy"], r["refresh"]]
        for t in tasks:
            m = r["tasks"].get(t)
            cells.append("-" if m is None else
                         f"{_num(m['f1'])} / {m['accuracy']:.2f}")
        cells += [_num(r["binary_f1_mean"]), f"{100 * r['patches_kept_share']:.1f}%",
                  f"{r['tokens_prefilled_per_window']:.0f}", f"{r['frames_per_s']:.1f}",
                  f"{r['latency_ms_p50']:.0f}", str(r.get("visual_tokens_pruned", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    drops = [r for r in rows if "vs_dense" in r]
    if drops:
        lines += ["", "Against dense (same refresh policy): F1 drop in points (positive = "
                  "worse) at the measured compute.", "",
                  "| policy | refresh | " + " | ".join(f"{t} drop" for t in tasks)
                  + " | binary F1 drop | patches vs dense | tokens prefilled vs dense "
                  "| throughput vs dense |", "|" + "---|" * (len(tasks) + 6)]
        for r in drops:
            v = r["vs_dense"]
            cells = [r["policy"], r["refresh"]] + [
                _pts(v["f1_drop"].get(t)) for t in tasks] + [
                _pts(v["binary_f1_drop"]), f"{100 * v['patches_kept_ratio']:.0f}%",
                f"{100 * v['tokens_prefilled_ratio']:.0f}%", f"{v['speedup']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    if any("drop" in i for r in drops for i in r.get("intervals", {}).values()):
        lines += ["", f"95% intervals, resampling whole clips {BOOTSTRAP_RESAMPLES} times "
                  "(windows of one clip are correlated; the drop is paired): F1 of each "
                  "policy, and its drop against dense in points.", "",
                  "| policy | refresh | " + " | ".join(f"{t} F1 | {t} drop" for t in tasks)
                  + " |", "|" + "---|" * (2 + 2 * len(tasks))]
        for r in rows:
            cells = [r["policy"], r["refresh"]]
            for t in tasks:
                i = r.get("intervals", {}).get(t, {})
                cells.append("-" if "f1" not in i else f"[{i['f1'][0]:.2f}, {i['f1'][1]:.2f}]")
                cells.append("-" if "drop" not in i else
                             f"[{_pts(i['drop'][0])}, {_pts(i['drop'][1])}]")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pts(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def plot(rows: list[dict], path: Path) -> Path:
    """F1 per task per policy combination, and mean binary F1 against patches kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    tasks = list(synth.TASKS)
    width = 0.8 / max(1, len(rows))
    for k, r in enumerate(rows):
        values = [r["tasks"].get(t, {}).get("f1") or 0.0 for t in tasks]
        left.bar(np.arange(len(tasks)) + k * width, values, width,
                 label=f"{r['policy']}/{r['refresh']}")
    left.set_xticks(np.arange(len(tasks)) + width * (len(rows) - 1) / 2)
    left.set_xticklabels([f"{t}\n({'F1 yes' if t in synth.BINARY_TASKS else 'macro F1'})"
                          for t in tasks])
    left.set_ylim(0, 1)
    left.axhline(0.8, color="grey", lw=0.8, ls="--")
    left.set_title("F1 per task")
    left.legend(fontsize=8)
    placed: list[tuple[float, float]] = []
    for r in rows:
        point = (100 * r["patches_kept_share"], r["binary_f1_mean"] or 0.0)
        right.scatter(*point, s=60)
        # Labels of nearby points are stacked: two refresh policies of one patch policy
        # share a point, and dense and vllm_evs (both send every patch) nearly do.
        below = sum(abs(x - point[0]) < 25 and abs(y - point[1]) < 0.06 for x, y in placed)
        placed.append(point)
        right.annotate(f"{r['policy']}/{r['refresh']}: {r['frames_per_s']:.0f} frames/s",
                       point, fontsize=8, xytext=(6, 6 - 12 * below),
                       textcoords="offset points", ha="right" if point[0] > 70 else "left")
    right.set_xlabel("patches kept (% of dense)")
    right.set_ylabel("mean binary F1")
    right.set_xlim(0, 105)
    right.set_ylim(0, 1)
    right.set_title("accuracy at measured compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The evaluation run


def evaluate(client, out_dir: Path, *, seeds, model_dir: str,
             analysis_fps: float = defaults.ANALYSIS_FPS,
             window_seconds: float = defaults.TRAINED_WINDOW_SECONDS,
             stride_seconds: float | None = None,
             policies=None, refreshes=None, tasks=synth.TASKS, device: str = "CPU",
             progress=None, server_overrides: dict | None = None) -> dict:
    """Run the suite against a server (a tritonclient gRPC client); write JSON, md and PNG.

    stride_seconds None: the window length, so held-out windows do not overlap
    (settings.TRAINED_STRIDE_SHARE).
    """
    stride_seconds = defaults.stride_seconds(window_seconds, stride_seconds,
                                             defaults.TRAINED_STRIDE_SHARE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds)
    combos = policy_combinations(policies, refreshes)
    t0 = time.perf_counter()
    clips = make_suite(seeds, out_dir / "clips", analysis_fps=analysis_fps,
                       window_seconds=window_seconds, stride_seconds=stride_seconds,
                       tasks=tasks)
    say(f"{len(clips)} held-out clips, {sum(len(c.windows) for c in clips)} windows, "
        f"generated in {time.perf_counter() - t0:.0f} s; policies: "
        + ", ".join(f"{p}/{r}" for p, r in combos))
    records = run_suite(client, clips, combos, analysis_fps=analysis_fps,
                        window_seconds=window_seconds, stride_seconds=stride_seconds,
                        progress=progress)
    rows = summarize(records, combos)
    clip_intervals(records, rows)
    meta = {"model_dir": str(model_dir), "clips": len(clips),
            "seeds": f"{seeds[0]}..{seeds[-1]}" if seeds else "-",
            "windows": sum(len(c.windows) for c in clips), "fps": analysis_fps,
            "window_seconds": window_seconds, "stride_seconds": stride_seconds,
            "tasks": list(tasks), "device": device,
            "server_overrides": server_overrides or {},
            "wall_seconds": round(time.perf_counter() - t0, 1)}
    result = {"meta": meta, "policies": rows, "records": records}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    (out_dir / "eval.md").write_text(markdown(rows, meta))
    plot(rows, out_dir / "eval.png")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from codecsight.serve import DEFAULT_MODEL_DIR, REPO_ROOT

    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="checkpoint to serve (default: the trained demo model)")
    parser.add_argument("--out", default=str(REPO_ROOT / "perf" / "out" / "eval"),
                        help="directory for eval.json, eval.md, eval.png and the clips")
    parser.add_argument("--clips", type=int, default=24, help="held-out clips")
    parser.add_argument("--first-seed", type=int, default=EVAL_SEED_BASE,
                        help="seed of the first held-out clip (training uses other seeds)")
    # The windows the demo model was trained on, not overlapping (settings.TRAINED_*).
    defaults.add_window_arguments(parser, window_seconds=defaults.TRAINED_WINDOW_SECONDS,
                                  stride_share=defaults.TRAINED_STRIDE_SHARE)
    parser.add_argument("--policies", help="patch policies, comma-separated (default: all)")
    parser.add_argument("--refresh", help="refresh policies, comma-separated (default: all)")
    parser.add_argument("--url", help="gRPC address of a running server on this model "
                        "(default: start one)")
    parser.add_argument("--log", type=Path, help="tritonserver log file")
    parser.add_argument("--anchor-refresh-frames", type=int, default=None,
                        help="serve with this llm_prefill anchor_refresh_frames instead of "
                        "its config.pbtxt's (the eval renders a repository of its own)")
    parser.add_argument("--first-logits", action="store_true",
                        help="serve with llm_prefill's report_first_logits on and keep each "
                        "answer's first-token logits in eval.json (for --against's KL)")
    parser.add_argument("--against", type=Path, metavar="EVAL_JSON",
                        help="an earlier run's eval.json on the same clips and stride (e.g. "
                        "--refresh full): compare every policy here with its full refresh "
                        "there, request by request (F1 drop, tokens, KL, same answer)")


def served_with(model_dir: Path, dest: Path, parameters: dict[str, dict[str, str]]) -> Path:
    """A repository for model_dir rendered into dest with some config parameters replaced.

    parameters: {model name: {parameter key: value}} set in that model's config.pbtxt (and
    any configs/*.pbtxt), e.g. {"llm_prefill": {"anchor_refresh_frames": "0"}}, so one
    server setting can be measured without editing the committed repository.
    Raises KeyError for a parameter the model's config does not have.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from codecsight import serve

    serve.require_checkpoint(model_dir)
    serve.render_repository(serve.DEFAULT_REPOSITORY, dest, model_dir)
    for model, values in parameters.items():
        for path in [dest / model / "config.pbtxt"] + sorted((dest / model).glob("configs/*")):
            config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            for key, value in values.items():
                if key not in config.parameters:
                    raise KeyError(f"{path} has no parameter {key!r}")
                config.parameters[key].string_value = str(value)
            path.write_text(text_format.MessageToString(config))
    return serve.build(model_dir, dest, progress=say)


def _server(model_dir: Path, dest: Path, log: Path | None, overrides: dict):
    """A started server on model_dir (a repository of its own, rendered into dest).

    overrides: {model: {parameter: value}} replacing config.pbtxt values (`served_with`).
    """
    from codecsight.serve import TritonServer, start_server

    if not overrides:
        return start_server(model_dir, log_path=log, progress=say, repository_dest=dest)
    server = TritonServer(served_with(model_dir, dest, {
        model: {k: str(v).lower() for k, v in values.items()}
        for model, values in overrides.items()}), log_path=log)
    say(f"starting tritonserver on {server.repository} with " + ", ".join(
        f"{model} {k} = {v}" for model, values in overrides.items() for k, v in values.items()))
    try:
        server.start(300.0, progress=say)
    except BaseException:
        server.stop()
        raise
    return server


def _split(text: str | None):
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def run(args) -> int:
    from codecsight_client.stream import connect

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        say(f"no checkpoint in {model_dir}: train one with `codecsight train --out "
            f"{model_dir}` or pass --model-dir")
        return 1
    seeds = range(args.first_seed, args.first_seed + args.clips)

    def progress(done, total, elapsed):
        if done == total or done % 10 == 0:
            say(f"  streams {done}/{total} ({elapsed:.0f} s)")

    kwargs = dict(seeds=seeds, model_dir=str(model_dir), analysis_fps=args.fps,
                  window_seconds=args.window_seconds, stride_seconds=args.stride_seconds,
                  policies=_split(args.policies), refreshes=_split(args.refresh),
                  progress=progress)
    overrides = {}
    if args.anchor_refresh_frames is not None:
        overrides["anchor_refresh_frames"] = args.anchor_refresh_frames
    if args.first_logits:
        overrides["report_first_logits"] = True
    if overrides:
        kwargs["server_overrides"] = {"llm_prefill": overrides}
    reference = None
    if args.against:
        if not args.against.is_file():
            say(f"--against {args.against}: no such eval.json")
            return 1
        reference = json.loads(args.against.read_text())["records"]
    if args.url:
        result = evaluate(connect(args.url), Path(args.out), **kwargs)
    else:
        # A checkpoint other than the committed one is rendered into a repository of its own,
        # so the eval never rewrites one that `codecsight serve` may be serving.
        with tempfile.TemporaryDirectory(prefix="codecsight-eval-repo-") as tmp, \
                _server(model_dir, Path(tmp) / "repository", args.log,
                        kwargs.get("server_overrides", {})) as server:
            device = "GPU" if not server.config_name else "CPU (ONNX Runtime ViT)"
            result = evaluate(connect(server.grpc_url), Path(args.out), device=device,
                              **kwargs)
    print(markdown(result["policies"], result["meta"]))
    if reference is not None:
        result["against"] = against_reference(reference, result["records"])
        result["meta"]["against"] = str(args.against)
        (Path(args.out) / "eval.json").write_text(json.dumps(result, indent=1))
        table = against_markdown(result["against"], result["meta"])
        with open(Path(args.out) / "eval.md", "a") as md:
            md.write(table)
        print(table)
    say(f"wrote {args.out}/eval.json, eval.md, eval.png "
        f"({result['meta']['wall_seconds']:.0f} s)")
    mismatched = sum(r["windows_mismatched"] for r in result["policies"])
    if mismatched:
        say(f"WARNING: {mismatched} windows held other frames than labelled")
    return 0
