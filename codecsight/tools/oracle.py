"""Rule-based oracles: can each task's label be read off the frames the server samples?

An oracle answers every task of a window from what its sampled frames show, and nothing
else: the frames are exactly those the serving pipeline puts in the window
(`synth.serving_windows`: `FrameSampler` at the analysis fps, the window edges of
`llm.SlidingWindow`). Per sampled frame it reads what a perfect detector and tracker would
read off the picture: the pixels each object covers once clipped to the view and once the
objects drawn over it are painted (an id map rendered in the generator's paint order), the
object's kind and identity, the camera's offset (the background moves with it) and the shot
(a cut changes the whole picture). It never reads an object's true centre, a position in an
unsampled frame, or its behaviour.

Its answers are scored against the labels (`synth.window_facts`) with the evaluation's F1
(`eval.f1_yes`, `eval.macro_f1`) over every question a window can be asked. A task whose
oracle F1 is under `ORACLE_TARGET` has labels that the pictures do not determine.

    python -m codecsight.tools.oracle --clips 48     # held-out seeds 900000.., ~30 s
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from codecsight.tools import synth
from codecsight.tools.synth import Sighting
from codecsight_client import settings as defaults

ORACLE_TARGET = 0.95


def _cut_edges(ids: np.ndarray, a: int, box: tuple[int, int, int, int]) -> set[int]:
    """Edges (0 x0, 1 y0, 2 x1, 3 y1) of object a's visible box that are not its own: the
    view's border, or another object drawn over it next to that edge."""
    height, width = ids.shape
    x0, y0, x1, y1 = box
    beside = {0: ids[y0:y1, x0 - 1] if x0 > 0 else None,
              1: ids[y0 - 1, x0:x1] if y0 > 0 else None,
              2: ids[y0:y1, x1] if x1 < width else None,
              3: ids[y1, x0:x1] if y1 < height else None}
    return {k for k, strip in beside.items()
            if strip is None or ((strip != -1) & (strip != a)).any()}


def _displacement(a: Sighting, b: Sighting, cut_a: set[int], cut_b: set[int],
                  shift: np.ndarray) -> np.ndarray:
    """World displacement (dx, dy) px of an object from sighting a to sighting b.

    shift: the camera's move between the two frames (screen + camera = world). Measured on
    the edges of the visible box that are the object's own in both frames (a tracker locks
    onto real edges); the centroid's move when no edge of an axis is.
    """
    move = []
    for axis, (lo, hi) in enumerate(((0, 2), (1, 3))):
        free = [b.box[k] - a.box[k] for k in (lo, hi) if k not in cut_a and k not in cut_b]
        move.append(np.mean(free) if free else b.centroid[axis] - a.centroid[axis])
    return np.asarray(move, np.float64) + shift


def oracle_facts(truth: synth.SceneTruth, frame_indices) -> synth.WindowFacts:
    """The window's facts as read off its sampled frames only (same rules as the labels:
    zones by where the object shows, motion between consecutive window frames)."""
    idx = np.asarray(frame_indices, np.int64)
    ids = [synth.object_ids(truth, int(f)) for f in idx]
    seen = [synth.sightings(truth, int(f)) for f in idx]
    times = idx / truth.fps
    present, entered, anomalies = set(), set(), []
    moving = 0
    for a, actor in enumerate(truth.actors):
        zones_at = []                                          # per frame: zones, or None
        for f, s in enumerate(seen):
            if truth.shot[idx[f]] != actor.shot:
                zones_at.append(None)
                continue
            if a not in s:
                zones_at.append(set())
                continue
            x, y = s[a].centroid
            zones_at.append({"left" if x < truth.width / 2 else "right",
                             "top" if y < truth.height / 2 else "bottom"})
        for zone in synth.ZONES:
            inside = [z is not None and zone in z for z in zones_at]
            if any(inside):
                present.add((actor.kind, zone))
            in_shot = [v for v, z in zip(inside, zones_at) if z is not None]
            first = in_shot.index(True) if True in in_shot else None
            if first is not None and not all(in_shot[:first]):
                entered.add(zone)
        velocities = []
        for f in range(len(idx) - 1):
            if a in seen[f] and a in seen[f + 1] and \
                    truth.shot[idx[f]] == truth.shot[idx[f + 1]] == actor.shot:
                shift = (truth.camera[idx[f + 1]] - truth.camera[idx[f]]).astype(np.float64)
                d = _displacement(seen[f][a], seen[f + 1][a],
                                  _cut_edges(ids[f], a, seen[f][a].box),
                                  _cut_edges(ids[f + 1], a, seen[f + 1][a].box), shift)
                velocities.append(d / (times[f + 1] - times[f]))
        if not velocities:
            continue
        v = np.array(velocities)
        speed = np.hypot(v[:, 0], v[:, 1])
        if (speed >= synth.MOVING_PX_PER_S).any():
            moving += 1
        if (v[:, 0] <= -synth.AGAINST_FLOW_PX_PER_S).any():
            anomalies.append((a, "against the flow"))
        elif (speed >= synth.RUNNING_PX_PER_S).any():
            anomalies.append((a, "running"))
    return synth.WindowFacts(present=frozenset(present), entered=frozenset(entered),
                             moving=moving, anomaly=bool(anomalies),
                             anomalies=tuple(anomalies))


def questions() -> dict[str, list[tuple]]:
    """Every question of each task, as (kind, zone) arguments of `synth.answer`."""
    return {"presence": [(k, z) for k in synth.KINDS for z in synth.ZONES],
            "entered": [(None, z) for z in synth.ZONES],
            "count": [(None, None)], "anomaly": [(None, None)]}


def score(pairs) -> dict:
    """Oracle F1 per task over (label facts, oracle facts) pairs, every question asked.

    Returns {task: {"f1", "accuracy", "questions", "disagreements"}}: F1 of "yes" on the
    binary tasks and macro F1 on count, as `codecsight eval` scores the model.
    """
    from codecsight.tools.eval import f1_yes, macro_f1

    out = {}
    for task, args in questions().items():
        truth, said = [], []
        for label, seen in pairs:
            for kind, zone in args:
                truth.append(synth.answer(label, task, kind, zone))
                said.append(synth.answer(seen, task, kind, zone))
        f1 = macro_f1(truth, said) if task == "count" else f1_yes(truth, said)
        wrong = sum(t != s for t, s in zip(truth, said))
        out[task] = {"f1": None if f1 is None else round(f1, 4),
                     "accuracy": round(1 - wrong / len(truth), 4),
                     "questions": len(truth), "disagreements": wrong}
    return out


def window_pairs(seeds, *, analysis_fps: float, window_seconds: float,
                 stride_seconds: float | None = None,
                 scene: synth.SceneConfig = synth.SceneConfig()) -> list[dict]:
    """Label and oracle facts of every serving window of the clips of these seeds.

    Each clip is generated, encoded and windowed as `codecsight eval` streams it.
    Returns one {"clip", "window", "frames", "label", "oracle"} per window.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="codecsight-oracle-") as tmp:
        for seed in seeds:
            path = Path(tmp) / f"clip-{seed}.mp4"
            truth = synth.write_clip(seed, path, scene)
            for w in synth.serving_windows(path, analysis_fps=analysis_fps,
                                           window_seconds=window_seconds,
                                           stride_seconds=stride_seconds):
                if not len(w.frame_indices):
                    continue
                rows.append({"clip": seed, "window": w.chunk,
                             "frames": w.frame_indices.tolist(),
                             "label": synth.window_facts(truth, w.frame_indices),
                             "oracle": oracle_facts(truth, w.frame_indices)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from codecsight.tools.eval import EVAL_SEED_BASE

    parser.add_argument("--clips", type=int, default=24, help="clips to generate")
    parser.add_argument("--first-seed", type=int, default=EVAL_SEED_BASE,
                        help="seed of the first clip (default: the held-out suite's)")
    defaults.add_window_arguments(parser, window_seconds=defaults.TRAINED_WINDOW_SECONDS,
                                  stride_share=defaults.TRAINED_STRIDE_SHARE)
    parser.add_argument("--json", type=Path, default=None, help="also write the scores here")


def run(args) -> int:
    rows = window_pairs(range(args.first_seed, args.first_seed + args.clips),
                        analysis_fps=args.fps, window_seconds=args.window_seconds,
                        stride_seconds=args.stride_seconds)
    scores = score([(r["label"], r["oracle"]) for r in rows])
    print(f"oracle over {len(rows)} windows of {args.clips} clips "
          f"(seeds {args.first_seed}..{args.first_seed + args.clips - 1}), every question:")
    for task, s in scores.items():
        flag = "" if s["f1"] is not None and s["f1"] >= ORACLE_TARGET else "   < target"
        print(f"  {task:9s} F1 {s['f1']}  accuracy {s['accuracy']}  "
              f"({s['disagreements']} of {s['questions']} answers differ){flag}")
    if args.json:
        args.json.write_text(json.dumps({"windows": len(rows), "scores": scores}, indent=1))
    return 0 if all(s["f1"] is not None and s["f1"] >= ORACLE_TARGET
                    for s in scores.values()) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codecsight.tools.oracle", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
