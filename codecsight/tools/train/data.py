"""Training data: windows of generated clips as the server sees them, and their questions.

Each clip is encoded with libx264, cut into chunks and windowed exactly as a stream is
(`synth.serving_windows`); pruned policies' keep masks come from the server's own
`parser.StreamParser`.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from codecsight.checkpoint import Geometry
from codecsight.protocol import PATCH_POLICIES
from codecsight.tools import synth

# Data seeds: training clips are TRAIN_SEED_BASE + i; evaluation defaults elsewhere
# (codecsight.tools.eval.EVAL_SEED_BASE) so the two suites never share a clip.
TRAIN_SEED_BASE = 100_000
# Training windows: a serving window, or its last 1, 2 or 4 sampled frames (what a server
# with a shorter WINDOW_SECONDS holds at that moment) -> share of visits. Short windows are
# a small haystack: the model learns kinds, zones and motion on them fast, and the full
# windows the evaluation uses make the largest share.
TRAIN_WINDOW_FRAMES = {1: 0.2, 2: 0.2, 4: 0.25, 8: 0.35}
MAX_PRESENCE_QUESTIONS = 4   # per answer ("yes" and "no") and window
# Training-only patch policy: pruning-robust training with stochastic pruning rates (as the
# EVS paper trains): each visit keeps what the codec policy keeps plus every other merge
# group with probability q ~ U(0, 1), so the model sees every rate from codec to dense.
STOCHASTIC_POLICY = "mix"


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
    mask: np.ndarray | None = None     # bool [F, Hg, Wg]: this visit's own keep mask
    #                                    (STOCHASTIC_POLICY); None: the policy's

    @property
    def selection(self) -> np.ndarray:
        return np.arange(len(self.sample.t)) if self.frames is None else self.frames

    @property
    def keep(self) -> np.ndarray:
        """bool [F, Hg, Wg]: the merge groups this visit feeds, per window frame."""
        return self.sample.keep[self.policy] if self.mask is None else self.mask


def policy_keep_masks(path: Path, geometry: Geometry, policy: str, *, analysis_fps: float,
                      stride_seconds: float,
                      window_seconds: float | None = None) -> dict[int, np.ndarray]:
    """Merge groups a patch policy keeps per sampled frame: t -> bool [Hp/28, Wp/28].

    Runs the server's own `parser.StreamParser` over the clip's chunks with codec_parser's
    served settings (its config.pbtxt), for a stream whose window is window_seconds long,
    so training on a pruned policy sees exactly the patches codec_parser would send.
    """
    from codecsight_client.demux import iter_chunks, probe
    from codecsight.params import served_parameters
    from codecsight.parser import StreamParser
    from codecsight.policy import PruningConfig

    info = probe(str(path))
    parser = StreamParser(geometry, info.codec, info.fps, analysis_fps,
                          config=PruningConfig.served(),
                          skip_loop_filter=served_parameters("codec_parser")["skip_loop_filter"],
                          window_seconds=window_seconds)
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
    if STOCHASTIC_POLICY in policies:      # draws its masks on top of codec's
        policies = tuple(dict.fromkeys(
            [p for p in policies if p != STOCHASTIC_POLICY] + ["codec"]))
    unknown = [p for p in policies if p not in PATCH_POLICIES]
    if unknown:
        raise ValueError(f"unknown patch policies {unknown}; this build has "
                         f"{', '.join(PATCH_POLICIES)}")
    if "vllm_evs" in policies:
        # Its pruning happens after the ViT, in llm_prefill; the training masks are patch
        # masks, so it would silently train on dense windows.
        raise ValueError("patch policy vllm_evs prunes visual tokens after the ViT, which the "
                         "training windows do not model: train with dense or codec (or mix)")
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
                                          stride_seconds=stride, window_seconds=window_seconds)
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
        mask = None
        if policy == STOCHASTIC_POLICY:
            base = sample.keep["codec"]
            mask = base | (rng.random(base.shape) < rng.uniform(0.0, 1.0))
        items.append(Item(sample, policy, training_questions(facts, rng, length),
                          None if length == n else frames, mask))
    return items


def worst_case_questions() -> list[synth.QA]:
    """The most questions training asks about one window (for the memory measurement)."""
    presence = [synth.QA("presence", synth.QUESTIONS["presence"].format(kind=k, zone=z), "no")
                for k in synth.KINDS for z in synth.ZONES][:2 * MAX_PRESENCE_QUESTIONS]
    return presence + [synth.QA("entered", synth.QUESTIONS["entered"].format(zone=z), "no")
                       for z in synth.ZONES] + [
        synth.QA("count", synth.QUESTIONS["count"], "three"),
        synth.QA("anomaly", synth.QUESTIONS["anomaly"], "no")]

