"""Evaluation: metrics, and held-out clips streamed through a real tritonserver."""
import json

import pytest

from codecsight.tools import eval as ev
from codecsight import protocol
from codecsight.serve import REPO_ROOT

DEMO_MODEL = REPO_ROOT / "models" / "codecsight-demo"


def test_f1_counts_yes_as_the_positive_class():
    truth = ["yes", "yes", "no", "no", "yes"]
    answers = ["yes", "no", "yes", "no", "maybe"]      # tp 1, fn 2 (one invalid), fp 1
    assert ev.f1_yes(truth, answers) == pytest.approx(2 / (2 + 1 + 2))
    assert ev.f1_yes(["no"], ["no"]) is None


def test_macro_f1_averages_over_the_true_classes():
    truth = ["one", "one", "two", "zero"]
    answers = ["one", "two", "two", "one"]
    # one: tp1 fp1 fn1 -> 0.5; two: tp1 fp1 fn0 -> 2/3; zero: tp0 fn1 -> 0
    assert ev.macro_f1(truth, answers) == pytest.approx((0.5 + 2 / 3 + 0) / 3)


def record(policy, task, truth, answer, kept=100, tokens=50, latency=0.1):
    return {"policy": policy, "refresh": "full", "task": task, "truth": truth,
            "answer": answer, "correct": truth == answer, "latency_s": latency,
            "frames_sampled": 8, "patches_kept": kept, "patches_total": 100,
            "tokens_prefilled": tokens, "window_matches_labels": True}


def test_summary_reports_the_drop_against_dense_at_measured_compute():
    records = [record("dense", "anomaly", t, a) for t, a in
               [("yes", "yes"), ("yes", "yes"), ("no", "no"), ("no", "no")]]
    records += [record("codec", "anomaly", t, a, kept=25, tokens=20, latency=0.05) for t, a in
                [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "no")]]
    rows = ev.summarize(records, [("dense", "full"), ("codec", "full")])
    dense, codec = rows
    assert dense["tasks"]["anomaly"] == {"f1": 1.0, "accuracy": 1.0, "n": 4, "positives": 2}
    assert codec["tasks"]["anomaly"]["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert codec["vs_dense"]["f1_drop"]["anomaly"] == pytest.approx(1 / 3, abs=1e-4)
    assert codec["vs_dense"]["patches_kept_ratio"] == 0.25
    assert codec["vs_dense"]["tokens_prefilled_ratio"] == 0.4
    assert codec["vs_dense"]["speedup"] == pytest.approx(2.0)
    table = ev.markdown(rows, {"model_dir": "m", "clips": 1, "seeds": "1..1", "windows": 4,
                               "fps": 2.0, "window_seconds": 4.0, "device": "CPU"})
    assert "| codec | full | - | - | - | 0.67 / 0.75 |" in table
    assert "+33.3" in table and "25%" in table


def test_clip_intervals_resample_whole_clips_and_pair_the_drop():
    records = []
    for clip in range(6):
        for truth, wrong in (("yes", clip % 2 == 0), ("no", False)):
            for policy in ("dense", "codec", "evs"):
                # codec answers exactly as dense; evs misses every even clip's "yes"
                answer = "no" if policy == "evs" and wrong else truth
                records.append(dict(record(policy, "anomaly", truth, answer), clip=clip))
    combos = [("dense", "full"), ("codec", "full"), ("evs", "full")]
    rows = ev.summarize(records, combos)
    ev.clip_intervals(records, rows, resamples=500)
    dense, codec, evs = rows
    assert dense["intervals"]["anomaly"] == {"f1": [1.0, 1.0]}
    assert codec["intervals"]["anomaly"] == {"f1": [1.0, 1.0], "drop": [0.0, 0.0]}
    low, high = evs["intervals"]["anomaly"]["drop"]
    assert 0 < low <= evs["vs_dense"]["f1_drop"]["anomaly"] <= high < 1
    table = ev.markdown(rows, {"model_dir": "m", "clips": 6, "seeds": "0..5", "windows": 12,
                               "fps": 2.0, "window_seconds": 4.0, "device": "CPU"})
    assert "95% intervals, resampling whole clips" in table
    assert "| codec | full | - | - | - | - | - | - | [1.00, 1.00] | [+0.0, +0.0] |" in table


def test_every_policy_combination_is_evaluated_by_default():
    combos = ev.policy_combinations()
    assert combos[0] == ("dense", "full")
    assert set(combos) == {(p, r) for p in protocol.PATCH_POLICIES
                           for r in protocol.REFRESH_POLICIES}
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        ev.policy_combinations(["fast"])


def test_held_out_seeds_are_not_training_seeds():
    from codecsight.tools import train

    assert ev.EVAL_SEED_BASE > train.TRAIN_SEED_BASE + 10_000 * 10


@pytest.mark.server
def test_a_small_eval_through_the_real_server(grpc, server, tmp_path):
    result = ev.evaluate(grpc, tmp_path, seeds=[ev.EVAL_SEED_BASE], model_dir="served",
                         window_seconds=4.0, tasks=("presence", "anomaly"))
    combos = ev.policy_combinations()
    rows = {(r["policy"], r["refresh"]): r for r in result["policies"]}
    assert set(rows) == set(combos)
    windows = result["meta"]["windows"]
    assert windows == 4                                   # a 16 s clip in 4 s windows
    for row in rows.values():
        assert row["requests"] == windows * 2
        assert row["windows_mismatched"] == 0             # the server saw the labelled frames
        assert row["frames_per_s"] > 0 and row["tokens_prefilled"] > 0
        assert set(row["tasks"]) == {"presence", "anomaly"}
    dense = rows[("dense", "full")]
    assert dense["patches_kept_share"] == 1.0
    assert dense["tokens_prefilled_per_window"] > 8 * 48  # 8 frames x 48 merged tokens
    if ("codec", "full") in rows:
        assert rows[("codec", "full")]["patches_kept_share"] < 1.0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["records"]) == windows * 2 * len(combos)
    assert "| dense | full |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "eval.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory):
    """Dense/full eval of the trained demo model on the default 24 held-out clips (docs/EVAL.md)."""
    from codecsight_client.stream import connect
    from codecsight.serve import start_server

    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("no trained demo model: run `codecsight train` (see TRAINING.md)")
    tmp = tmp_path_factory.mktemp("demo-eval")
    with start_server(DEMO_MODEL, log_path=tmp / "tritonserver.log",
                      repository_dest=tmp / "repository") as server:
        result = ev.evaluate(connect(server.grpc_url), tmp / "eval",
                             seeds=range(ev.EVAL_SEED_BASE, ev.EVAL_SEED_BASE + 24),
                             model_dir=str(DEMO_MODEL), policies=["dense"],
                             refreshes=["full"])
    return result["policies"][0]


SHORT_OF_THE_BAR = pytest.mark.xfail(
    strict=True, reason="the demo model misses F1 0.8 on this task (docs/EVAL.md); a model "
    "that reaches it turns this into a failure, so this mark gets removed")


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("task", ["presence", "anomaly",
                                  pytest.param("entered", marks=SHORT_OF_THE_BAR)])
def test_the_trained_demo_model_reaches_f1_08_dense(demo_eval, task):
    assert demo_eval["windows_mismatched"] == 0
    assert demo_eval["tasks"][task]["f1"] >= 0.8, demo_eval["tasks"][task]


def test_a_server_setting_is_measured_on_a_rendered_copy_of_the_repository(tiny_dir, tmp_path):
    """--anchor-refresh-frames: the eval's own repository, the committed one untouched."""
    from codecsight.params import served_parameters
    from codecsight.serve import DEFAULT_REPOSITORY

    committed = (DEFAULT_REPOSITORY / "llm_prefill" / "config.pbtxt").read_text()
    repo = ev.served_with(tiny_dir, tmp_path / "repo",
                          {"llm_prefill": {"anchor_refresh_frames": "2"}})
    assert served_parameters("llm_prefill", repo)["anchor_refresh_frames"] == 2
    assert (DEFAULT_REPOSITORY / "llm_prefill" / "config.pbtxt").read_text() == committed
    with pytest.raises(KeyError, match="no parameter 'anchor_frames'"):
        ev.served_with(tiny_dir, tmp_path / "other", {"llm_prefill": {"anchor_frames": "2"}})


def test_paired_drop_compares_two_runs_on_the_same_windows():
    def rec(clip, window, answer, truth="yes", task="presence"):
        return {"clip": clip, "window": window, "task": task, "truth": truth, "answer": answer}

    full = [rec(c, w, "yes") for c in (1, 2, 3) for w in range(4)]
    selective = [rec(c, w, "no" if (c, w) == (1, 0) else "yes") for c in (1, 2, 3)
                 for w in range(4)]
    drop = ev.paired_drop(full, selective)["presence"]
    assert drop["reference_f1"] == 1.0 and drop["f1"] == round(22 / 23, 4)
    assert drop["drop"] == round(100 / 23, 2)
    assert drop["interval"][0] == 0.0 and drop["interval"][1] >= drop["drop"]
    with pytest.raises(ValueError, match="same clips"):
        ev.paired_drop(full, selective[1:])


def test_a_run_is_compared_request_by_request_with_a_reference_run_full_refresh():
    """--against: F1 drop, tokens per window (all, and those that reuse cached rows), same
    answer and first-token KL."""
    import numpy as np

    def rec(clip, window, refresh, answer, tokens, reused, logits):
        return {"clip": clip, "window": window, "task": "presence", "policy": "codec",
                "refresh": refresh, "truth": "yes", "answer": answer,
                "tokens_prefilled": tokens, "tokens_reused": reused, "first_logits": logits}

    sure, unsure = [4.0, 0.0, 0.0], [1.0, 0.0, 0.0]
    full = [rec(c, w, "full", "yes", 120, 0, sure) for c in (1, 2) for w in range(4)]
    # window 0 has not slid (nothing reused); the later ones reuse rows and prefill 30
    selective = [rec(c, w, "selective", "no" if (c, w) == (2, 3) else "yes",
                     120 if w == 0 else 30, 0 if w == 0 else 90,
                     sure if w < 3 else unsure) for c in (1, 2) for w in range(4)]
    row, = ev.against_reference(full, selective)
    assert (row["policy"], row["refresh"], row["requests"], row["reusing"]) == \
        ("codec", "selective", 8, 6)
    assert row["tasks"]["presence"]["f1"] == round(2 * 7 / (2 * 7 + 1), 4)
    assert row["token_share"] == round(52.5 / 120, 4)        # (120 + 3 x 30) / 4 per clip
    assert row["token_share_reusing"] == 0.25
    assert row["same_answer"] == 7 / 8
    p = np.exp(sure) / np.exp(sure).sum()
    q = np.exp(unsure) / np.exp(unsure).sum()
    kl = float((p * np.log(p / q)).sum())
    assert ev.first_token_kl(sure, unsure) == pytest.approx(kl)
    assert ev.first_token_kl(sure, sure) == 0.0
    # 2 of the 6 windows that reuse rows have another first-token distribution
    assert row["kl_mean"] == pytest.approx(2 * kl / 6, abs=1e-5)
    assert row["kl_max"] == pytest.approx(kl, abs=1e-5)
    table = ev.against_markdown([row], {"server_overrides": {
        "llm_prefill": {"anchor_refresh_frames": 0}}})
    assert "anchor_refresh_frames 0" in table and "| codec | selective |" in table
    assert "120 / 30 (0.25)" in table and "88%" in table
    with pytest.raises(ValueError, match="no codec/full answer"):
        ev.against_reference(full[1:], selective)
