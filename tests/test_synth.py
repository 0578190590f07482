"""Synthetic clips: deterministic scenes with exact truth, encoded with an exact GOP."""
import av
import numpy as np
import pytest

from codecsight.codec import MACROBLOCK
from codecsight.tools.synth import Box, encode_h264, moving_boxes

BOX = Box(x=32, y=16, width=48, height=32, vx=4, vy=2)


def decoded_types(data: bytes) -> str:
    ctx = av.CodecContext.create("h264", "r")
    frames = []
    for packet in ctx.parse(data) + ctx.parse(None):
        frames += ctx.decode(packet)
    frames += ctx.decode(None)
    return "".join("?IPB"[int(f.pict_type)] for f in frames)


@pytest.fixture(scope="module")
def clip():
    return moving_boxes(24, 192, 128, boxes=[BOX], seed=3)


def test_same_seed_gives_identical_frames_and_truth(clip):
    frames, truth = moving_boxes(24, 192, 128, boxes=[BOX], seed=3)
    assert np.array_equal(frames, clip[0])
    assert np.array_equal(truth.boxes, clip[1].boxes)
    assert np.array_equal(truth.moving, clip[1].moving)


def test_different_seed_gives_a_different_background(clip):
    frames, _ = moving_boxes(24, 192, 128, boxes=[BOX], seed=4)
    assert frames.shape == clip[0].shape == (24, 128, 192, 3)
    assert np.mean(frames[0] != clip[0][0]) > 0.5


def test_truth_boxes_move_by_the_stated_velocity(clip):
    _, truth = clip
    assert truth.boxes.shape == (24, 1, 4)
    assert tuple(truth.boxes[0, 0]) == (32, 16, 80, 48)
    steps = np.diff(truth.boxes[:, 0], axis=0)
    assert (steps == [4, 2, 4, 2]).all()


def test_box_pixels_are_carried_along_with_the_box(clip):
    frames, truth = clip
    x0, y0, x1, y1 = truth.boxes[0, 0]
    u0, v0, u1, v1 = truth.boxes[5, 0]
    assert np.array_equal(frames[5, v0:v1, u0:u1], frames[0, y0:y1, x0:x1])


def test_background_outside_the_box_is_static_without_noise(clip):
    frames, truth = clip
    untouched = np.ones(frames.shape[1:3], bool)
    for x0, y0, x1, y1 in truth.boxes[:, 0]:
        untouched[y0:y1, x0:x1] = False
    assert np.array_equal(frames[-1][untouched], frames[0][untouched])


def test_moving_mask_covers_old_and_new_box_macroblocks_only(clip):
    _, truth = clip
    assert truth.moving.shape == (24, 128 // MACROBLOCK, 192 // MACROBLOCK)
    assert not truth.moving[0].any()
    # frame 1: box moved from (32,16)-(80,48) to (36,18)-(84,50): MB rows 1..3, cols 2..5
    expected = np.zeros((8, 12), bool)
    expected[1:4, 2:6] = True
    assert np.array_equal(truth.moving[1], expected)


def test_static_box_is_not_moving():
    _, truth = moving_boxes(6, 128, 96, boxes=[Box(x=16, y=16, width=32, height=32)], seed=0)
    assert not truth.moving.any()


def test_box_following_the_pan_moves_relative_to_the_scene():
    follower = Box(x=48, y=32, width=32, height=32, vx=0, vy=0)
    frames, truth = moving_boxes(6, 128, 96, boxes=[follower], seed=0, pan_px_per_frame=3)
    assert truth.moving[1:].any() and not truth.moving[0].any()
    # the background slides left by the pan on screen
    assert np.array_equal(frames[1][:, :20], frames[0][:, 3:23])


def test_sensor_noise_has_the_requested_sigma():
    clean, _ = moving_boxes(4, 128, 96, boxes=[], seed=1)
    noisy, _ = moving_boxes(4, 128, 96, boxes=[], seed=1, noise_sigma=5.0)
    diff = noisy.astype(np.float32) - clean
    assert abs(diff.std() - 5.0) < 0.3
    assert abs(diff.mean()) < 0.3


def test_encoding_is_deterministic_with_b_frames(clip):
    # x264's mbtree made B-frame encodes differ from run to run; it is turned off.
    assert encode_h264(clip[0], 12.5, gop=8, bframes=2) == encode_h264(clip[0], 12.5, gop=8,
                                                                       bframes=2)


def test_gop_length_is_exact(clip):
    types = decoded_types(encode_h264(clip[0], 12.5, gop=8))
    assert len(types) == 24
    assert [i for i, t in enumerate(types) if t == "I"] == [0, 8, 16]
    assert "B" not in types


def test_b_frames_appear_when_asked(clip):
    types = decoded_types(encode_h264(clip[0], 12.5, gop=12, bframes=2))
    assert types == "IBBPBBPBBPBP" * 2


def test_raw_output_is_annexb_with_parameter_sets(clip):
    data = encode_h264(clip[0][:4], 12.5)
    assert data.startswith(b"\x00\x00\x00\x01\x67")  # start code + SPS


def test_mp4_output_is_written_and_decodes(clip, tmp_path):
    path = encode_h264(clip[0], 12.5, gop=8, path=tmp_path / "clip.mp4")
    assert path == tmp_path / "clip.mp4"
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 24


def test_odd_frame_size_is_rejected():
    with pytest.raises(ValueError, match="even width and height"):
        encode_h264(np.zeros((2, 31, 32, 3), np.uint8), 10)


# ---------------------------------------------------------------------------------------------
# Surveillance scenes, labels and serving windows

from codecsight.tools import synth  # noqa: E402
from codecsight.tools.synth import (Actor, SceneConfig, SceneTruth, generate_scene,  # noqa: E402
                              serving_windows, window_facts, write_clip)

SHORT = SceneConfig(seconds=8.0)


def test_same_seed_gives_the_same_scene_and_another_seed_a_different_one():
    frames, truth = generate_scene(11, SHORT)
    again, truth_again = generate_scene(11, SHORT)
    other, _ = generate_scene(12, SHORT)
    assert frames.shape == (80, 168, 224, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, again)
    assert np.array_equal(truth.centres, truth_again.centres, equal_nan=True)
    assert truth.actors == truth_again.actors
    assert np.mean(frames[0] != other[0]) > 0.5


def test_a_suite_has_every_kind_colour_behaviour_and_camera_event():
    kinds, colours, behaviours = set(), set(), set()
    cuts = pans = shakes = 0
    for seed in range(40):
        _, truth = generate_scene(seed, SHORT)
        kinds |= {a.kind for a in truth.actors}
        colours |= {a.colour for a in truth.actors}
        behaviours |= {a.behaviour for a in truth.actors}
        cuts += truth.shot.max() > 0
        for s in np.unique(truth.shot):
            camera = truth.camera[truth.shot == s]
            steps = np.abs(np.diff(camera, axis=0)).sum(axis=1)
            pans += np.ptp(camera[:, 0]) > 8            # drifts steadily far from its start
            shakes += np.ptp(camera[:, 0]) <= 8 and steps.max(initial=0) > 0
    assert kinds == set(synth.KINDS) and colours == set(synth.COLOURS)
    assert behaviours == set(synth.BEHAVIOURS)
    assert cuts >= 5 and pans >= 3 and shakes >= 3


def test_objects_are_drawn_where_the_truth_says_in_their_colour():
    quiet = SceneConfig(seconds=4.0, max_noise_sigma=0.0, max_drift=0.0)
    checked = 0
    for seed in range(10):
        frames, truth = generate_scene(seed, quiet)
        for a, actor in enumerate(truth.actors):
            t = int(np.flatnonzero(truth.shot == actor.shot)[0])
            x0, y0, x1, y1 = truth.boxes[t, a]
            if (x1 - x0) * (y1 - y0) < actor.width * actor.height or actor.colour == "white":
                continue  # partly off-screen, or possibly hidden by another object
            others = [b for b in range(len(truth.actors)) if b != a]
            if any(_overlap(truth.boxes[t, a], truth.boxes[t, b]) for b in others):
                continue
            patch = frames[t, y0:y1, x0:x1].reshape(-1, 3).astype(float)
            share = np.mean(np.abs(patch - synth.COLOURS[actor.colour]).max(axis=1) < 30)
            assert share > 0.3, (seed, actor)
            checked += 1
    assert checked >= 5


def _overlap(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def scripted_truth(paths, *, behaviours=None, shots=None, fps=10.0, camera=None):
    """A SceneTruth for hand-written world paths [F, 2] per object (kind: car)."""
    world = np.stack(paths, axis=1).astype(np.float32)
    n = world.shape[0]
    camera = np.zeros((n, 2), np.int32) if camera is None else camera
    shots = np.zeros(n, np.int32) if shots is None else shots
    actors = tuple(Actor("car", "red", b, 0, 38, 17)
                   for b in (behaviours or ["walk"] * len(paths)))
    centres = world - camera[:, None, :]
    # Drawn boxes as generate_scene pastes them: clipped to the view, nothing outside a shot.
    boxes = np.zeros((n, len(paths), 4), np.int32)
    for t in range(n):
        for a, actor in enumerate(actors):
            if np.isnan(centres[t, a]).any():
                continue
            x0 = int(round(centres[t, a, 0] - actor.width / 2))
            y0 = int(round(centres[t, a, 1] - actor.height / 2))
            boxes[t, a] = np.clip([x0, y0, x0 + actor.width, y0 + actor.height],
                                  0, [224, 168, 224, 168])
    return SceneTruth(boxes=boxes,
                      moving=np.zeros((n, 11, 14), bool),
                      centres=centres, world=world, shot=shots,
                      camera=camera, actors=actors, width=224, height=168, fps=fps)


def line(x0, vx_px_s, y=40.0, frames=40, fps=10.0):
    x = x0 + vx_px_s * np.arange(frames) / fps
    return np.stack([x, np.full(frames, y)], axis=1)


WINDOW = np.arange(0, 40, 5)   # the 8 sampled frames of a 4 s window at 2 fps


def test_an_object_crossing_the_middle_enters_the_right_zone_and_moves():
    facts = window_facts(scripted_truth([line(60.0, 20.0)]), WINDOW)   # x 60 -> 138
    assert facts.entered == {"right"}
    assert ("car", "left") in facts.present and ("car", "right") in facts.present
    assert ("car", "bottom") not in facts.present
    assert facts.moving == 1 and not facts.anomaly


def test_a_parked_object_under_a_panning_camera_is_not_moving():
    camera = np.stack([np.arange(40), np.zeros(40)], axis=1).astype(np.int32)
    facts = window_facts(scripted_truth([line(60.0, 0.0)], camera=camera), WINDOW)
    assert facts.moving == 0 and not facts.anomaly and facts.entered == frozenset()


def test_running_and_moving_against_the_flow_are_anomalies():
    running = window_facts(scripted_truth([line(-20.0, 60.0)]), WINDOW)
    wrong_way = window_facts(scripted_truth([line(200.0, -20.0)]), WINDOW)
    walking = window_facts(scripted_truth([line(10.0, 25.0)]), WINDOW)
    assert running.anomalies == ((0, "running"),)
    assert wrong_way.anomalies == ((0, "against the flow"),)
    assert not walking.anomaly


def test_objects_off_screen_or_in_another_shot_do_not_count():
    shots = np.array([0] * 20 + [1] * 20, np.int32)
    gone = np.full((40, 2), np.nan)
    gone[:20] = line(60.0, 20.0, frames=20)          # only in shot 0, then the cut
    facts = window_facts(scripted_truth([line(-200.0, 20.0), gone], shots=shots), WINDOW)
    assert facts.moving == 1      # the off-screen one never shows; the other moves before the cut
    assert facts.present == {("car", "left"), ("car", "top")}


def test_count_question_and_answers_use_the_tokenizer_vocabulary():
    from codecsight.checkpoint import DOMAIN_WORDS

    rng = np.random.default_rng(0)
    facts = window_facts(scripted_truth([line(60.0, 20.0), line(100.0, 5.0, y=120)]), WINDOW)
    qas = synth.ask(facts, rng)
    assert [qa.task for qa in qas] == list(synth.TASKS)
    assert qas[1].answer == "two"
    words = set(DOMAIN_WORDS)
    for qa in qas:
        assert set(qa.question.replace("?", " ?").split()) <= words
        assert qa.answer in words


def test_questions_are_balanced_over_a_suite():
    rng = np.random.default_rng(0)
    answers = {t: [] for t in synth.TASKS}
    for seed in range(40):
        _, truth = generate_scene(seed, SceneConfig(seconds=8.0))
        for start in (0, 40):
            for qa in synth.ask(window_facts(truth, np.arange(start, start + 40, 5)), rng):
                answers[qa.task].append(qa.answer)
    for task in synth.BINARY_TASKS:
        share = np.mean([a == "yes" for a in answers[task]])
        assert 0.2 < share < 0.8, (task, share)
    assert len(set(answers["count"])) >= 3


def test_serving_windows_hold_the_frames_the_server_windows(tmp_path):
    path = tmp_path / "clip.mp4"
    truth = write_clip(5, path, SHORT)
    windows = serving_windows(path, analysis_fps=2.0, window_seconds=4.0, group_pixels=28)
    assert [w.frame_indices.tolist() for w in windows] == [list(range(0, 40, 5)),
                                                           list(range(40, 80, 5))]
    assert [w.t.tolist() for w in windows] == [list(range(8)), list(range(8, 16))]
    assert windows[0].frame_types == "IPPPIPPP"          # a 2 s GOP at 10 fps
    # Pixels are the decoded frames (lossy), not the rendered ones, padded to merge groups.
    frames, _ = generate_scene(5, SHORT)
    assert windows[1].rgb.shape == (8, 168, 224, 3)
    error = np.abs(windows[1].rgb[3].astype(int) - frames[55]).mean()
    assert 0 < error < 6
    assert truth.num_frames == 80
    # Each frame's previous sampled frame, across the window edge; the first is its own.
    np.testing.assert_array_equal(windows[0].previous_rgb[0], windows[0].rgb[0])
    np.testing.assert_array_equal(windows[0].previous_rgb[1:], windows[0].rgb[:-1])
    np.testing.assert_array_equal(windows[1].previous_rgb[0], windows[0].rgb[-1])


def test_a_longer_window_than_the_stride_reaches_back_into_earlier_chunks(tmp_path):
    path = tmp_path / "clip.mp4"
    write_clip(5, path, SHORT)
    windows = serving_windows(path, analysis_fps=2.0, window_seconds=4.0, stride_seconds=2.0)
    assert len(windows) == 4
    assert windows[2].frame_indices.tolist() == list(range(20, 60, 5))   # (1.5 s, 5.5 s]


def test_object_map_marks_the_merge_groups_an_object_covers_with_its_kind():
    truth = scripted_truth([line(60.0, 0.0, y=42.0)])      # a parked car centred at (60, 42)
    truth.boxes[:, 0] = (37, 34, 83, 55)                    # its 46x21 rectangle
    grid = synth.object_map(truth, 0, 28)
    car = 1 + list(synth.KINDS).index("car")
    assert grid.shape == (6, 8)
    assert set(np.flatnonzero(grid.reshape(-1))) == {9, 10}     # row 1, columns 1 and 2
    assert (grid[grid > 0] == car).all()
    truth.boxes[:, 0] = (53, 34, 99, 55)      # 3 px into column 1: too little to count
    assert set(np.flatnonzero(synth.object_map(truth, 0, 28).reshape(-1))) == {10, 11}
    truth.boxes[:, 0] = (37, 34, 83, 55)
    runner = dataclasses_replace_behaviour(truth, "run")
    assert (synth.object_map(runner, 0, 28)[grid > 0] == car + len(synth.KINDS)).all()


def dataclasses_replace_behaviour(truth, behaviour):
    import dataclasses

    actors = tuple(dataclasses.replace(a, behaviour=behaviour) for a in truth.actors)
    return dataclasses.replace(truth, actors=actors)


def test_an_object_hidden_behind_another_is_not_seen_and_does_not_count():
    # Object 0 drives under object 1 (drawn after it, so painted over it) all window.
    truth = scripted_truth([line(60.0, 20.0), line(60.0, 20.0)])
    facts = window_facts(truth, WINDOW)
    assert facts.moving == 1      # only the one on top shows
    assert synth.sightings(truth, 0).keys() == {1}


def test_an_object_counts_in_view_once_half_of_it_shows():
    # A 38 px car whose left edge is at x = -19 + 4 t: 50% shows from frame 0 on.
    barely = window_facts(scripted_truth([line(-8.0, 0.0)]), WINDOW)     # 30/38 cut off
    half = window_facts(scripted_truth([line(0.0, 0.0)]), WINDOW)        # 19/38 shows
    assert barely.present == frozenset() and barely.moving == 0
    assert half.present == {("car", "left"), ("car", "top")}


def test_entering_from_the_edge_is_seen_when_half_the_object_has_come_in():
    facts = window_facts(scripted_truth([line(-30.0, 20.0)]), WINDOW)    # x -30 -> 48
    assert facts.entered == {"left", "top"} and facts.moving == 1
