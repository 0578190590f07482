"""The rule-based oracle: the labels can be read off the frames the server samples."""
import numpy as np

from codecsight.tools import oracle, synth
from test_synth import WINDOW, line, scripted_truth


def test_the_oracle_reads_every_label_off_the_sampled_frames():
    # 6 clips, 24 windows as `codecsight eval` streams them (the committed figure uses 48).
    rows = oracle.window_pairs(range(900000, 900006), analysis_fps=2.0, window_seconds=4.0)
    scores = oracle.score([(r["label"], r["oracle"]) for r in rows])
    assert len(rows) == 24
    for task, s in scores.items():
        assert s["f1"] >= oracle.ORACLE_TARGET, (task, s)


def test_the_oracle_never_reads_true_centres_or_world_positions():
    _, truth = synth.generate_scene(900001)
    frames = np.arange(0, 40, 5)
    before = oracle.oracle_facts(truth, frames)
    truth.centres = np.full_like(truth.centres, np.nan)
    truth.world = np.full_like(truth.world, np.nan)
    assert oracle.oracle_facts(truth, frames) == before


def test_motion_read_from_visible_edges_matches_the_world_motion():
    walking = scripted_truth([line(-30.0, 20.0), line(150.0, -60.0, y=120.0)])
    facts = oracle.oracle_facts(walking, WINDOW)
    assert facts == synth.window_facts(walking, WINDOW)
    assert facts.moving == 2 and facts.anomalies == ((1, "against the flow"),)


def test_a_panning_camera_does_not_move_a_parked_car_for_the_oracle():
    camera = np.stack([np.arange(40) * 2, np.zeros(40)], axis=1).astype(np.int32)
    facts = oracle.oracle_facts(scripted_truth([line(120.0, 0.0)], camera=camera), WINDOW)
    assert facts.moving == 0 and not facts.anomaly


def test_oracle_f1_is_computed_per_question_with_the_evals_scores():
    yes = synth.WindowFacts(present=frozenset({("car", "left")}), entered=frozenset({"left"}),
                            moving=1, anomaly=True)
    no = synth.WindowFacts(present=frozenset(), entered=frozenset(), moving=0, anomaly=False)
    scores = oracle.score([(yes, yes), (yes, no)])
    assert scores["presence"]["f1"] == round(2 / 3, 4) and scores["presence"]["disagreements"] == 1
    assert scores["anomaly"]["f1"] == round(2 / 3, 4)
    assert scores["count"]["questions"] == 2
