"""codecsight bench and the perf/ tools: their arithmetic on made-up runs, then short real
runs through the session's tritonserver (bench, perf_analyzer, Locust)."""
import argparse
import base64
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from codecsight import protocol as P
from codecsight.tools import UsageError, bench
from codecsight.tools.bench import AnsweredWindow, Run, make_ratios, make_record, stage_deltas
from codecsight_client import settings as defaults
from codecsight_client.demux import SourceInfo, iter_chunks
from codecsight.serve import REPO_ROOT

CLIP = str(REPO_ROOT / "media" / "car-detection.mp4")
PERF = REPO_ROOT / "perf"
INFO = SourceInfo(codec="h264", fps=12.5, width=768, height=432, duration_s=30.0)


@pytest.fixture(scope="module")
def perf_tools():
    """The perf/ scripts as modules (they import one another by file name)."""
    sys.path.insert(0, str(PERF))
    try:
        yield {name: importlib.import_module(name) for name in
               ("make_inputs", "perf_analyzer", "run_locust", "streams_sustained", "results",
                "bench_decode")}
    finally:
        sys.path.remove(str(PERF))


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def window(latency_ms, frames=4, kept=1792, total=1792, prefilled=3600, parser_ms=40.0,
           prefill_ms=200.0, reused=0):
    return AnsweredWindow(
        latency_s=latency_ms / 1000.0, bytes_sent=100_000,
        parse=P.ParseStats.empty(frames_sampled=frames, patches_kept=kept,
                                 patches_total=total, parser_ms=parser_ms),
        llm=P.LlmStats.empty(tokens_prefilled=prefilled, tokens_reused=reused,
                             tokens_refreshed=0, prefill_ms=prefill_ms, kv_bytes=1 << 20))


def run_of(windows, wall_s, vit_ms, llm_ms=100.0, parser_ms=50.0, rss=2 << 30):
    stages = {"vit_pruned": {"compute_input_ms": 1.0, "compute_infer_ms": vit_ms,
                             "compute_output_ms": 1.0, "queue_ms": 2.0},
              "llm_prefill": {"compute_input_ms": 0.0, "compute_infer_ms": llm_ms,
                              "compute_output_ms": 0.0, "queue_ms": 0.0},
              "codec_parser": {"compute_input_ms": 0.0, "compute_infer_ms": parser_ms,
                               "compute_output_ms": 10.0, "queue_ms": 0.0}}
    return Run(windows=windows, wall_s=wall_s, stages=stages, peak_rss_bytes=rss)


def test_stage_deltas_are_per_model_differences_in_ms():
    before = {"vit_pruned": {"requests": 2, "executions": 2, "queue_ns": 1_000_000,
                             "compute_infer_ns": 5_000_000}}
    after = {"vit_pruned": {"requests": 5, "executions": 4, "queue_ns": 3_000_000,
                            "compute_infer_ns": 65_000_000}}
    assert stage_deltas(before, after) == {"vit_pruned": {
        "requests": 3, "executions": 2, "queue_ms": 2.0, "compute_infer_ms": 60.0}}


def test_a_record_sums_windows_and_divides_stage_time_by_sampled_frames():
    args = bench_args("--fps", "2", "--window-seconds", "8")
    runs = [run_of([window(800), window(1000)], wall_s=2.0, vit_ms=800.0),
            run_of([window(600), window(1200)], wall_s=2.0, vit_ms=400.0)]
    r = make_record(CLIP, INFO, "dense", "full", runs, args)
    assert (r["frames_sampled"], r["windows"], r["rounds"]) == (16, 4, 2)
    assert r["patches_kept"] == r["patches_total"] == 4 * 1792
    assert r["vit_ms_per_frame"] == pytest.approx(1200.0 / 16)
    assert r["parser_ms_per_frame"] == pytest.approx(10.0)
    assert r["prefill_tokens_per_window"] == 3600
    assert r["throughput_frames_per_s"] == pytest.approx(16 / 4.0)
    assert r["throughput_frames_per_s_rounds"] == [4.0, 4.0]
    assert r["window_latency_ms_p50"] == pytest.approx(900.0)
    assert 1190 < r["window_latency_ms_p99"] <= 1200
    assert r["raw_rgb_bytes"] == 16 * 768 * 432 * 3 and r["bytes_sent"] == 400_000
    assert r["peak_rss_mb"] == 2048
    assert r["stage_compute_ms_per_frame"]["vit_pruned"] == pytest.approx(1204.0 / 16)


def test_ratios_are_taken_against_dense_full_of_the_same_video_and_round():
    args = bench_args()
    dense = make_record(CLIP, INFO, "dense", "full",
                        [run_of([window(1000)], 2.0, 800.0), run_of([window(1000)], 4.0, 800.0)],
                        args)
    codec = make_record(CLIP, INFO, "codec", "selective",
                        [run_of([window(250, kept=448, prefilled=600)], 0.5, 100.0),
                         run_of([window(250, kept=448, prefilled=600)], 2.0, 100.0)], args)
    other = make_record("other.mp4", INFO, "codec", "full", [run_of([window(1)], 1.0, 1.0)], args)
    ratios = {(q["video"], q["policy"]): q for q in make_ratios([dense, codec, other])}
    assert ("other.mp4", "codec") not in ratios  # no dense run of that video to compare with
    q = ratios[(CLIP, "codec")]
    assert q["baseline"] == "dense/full"
    assert q["patches_kept"] == pytest.approx(0.25)
    assert q["vit_ms_per_frame"] == pytest.approx(0.125)
    assert q["prefill_tokens_per_window"] == pytest.approx(600 / 3600)
    assert q["throughput_ratio_rounds"] == [4.0, 2.0]      # paired round by round
    assert q["throughput_ratio_median"] == 3.0
    assert q["throughput_frames_per_s"] == pytest.approx((8 / 2.5) / (8 / 6.0))
    assert ratios[(CLIP, "dense")]["throughput_frames_per_s"] == 1.0
    table = bench.format_table([dense, codec], list(ratios.values())[:2])
    assert "ratios against dense/full" in table and "0.25x" in table


def test_unknown_policies_are_refused_with_the_ones_this_build_has():
    with pytest.raises(UsageError, match="unknown patch policy nope; this build has dense"):
        bench.check_policies(["dense", "nope"], ("dense", "codec"), "patch policy")


def test_load_runs_refuse_a_server_that_is_not_this_machine():
    with pytest.raises(UsageError, match="loopback"):
        with bench.serving("10.0.0.8:8001"):
            pass


def test_the_cli_turns_a_usage_error_into_its_message_and_exit_code_2(capsys):
    from codecsight.tools.cli import main

    assert main(["bench", "--policies", "dense,nope", "--url", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "codecsight: unknown patch policy nope; this build has "
        + ", ".join(P.PATCH_POLICIES))


def test_bench_takes_the_clients_defaults_and_resolves_the_stride_like_it():
    args = bench_args()
    assert (args.fps, args.window_seconds, args.question) == (
        defaults.ANALYSIS_FPS, defaults.WINDOW_SECONDS, defaults.QUESTION)
    assert bench.stride_of(args) == defaults.WINDOW_SECONDS / 4 == 2.0
    assert bench.stride_of(bench_args("--window-seconds", "16")) == 4.0
    assert bench.stride_of(bench_args("--stride-seconds", "3")) == 3.0


def test_perf_inputs_carry_the_clips_real_chunks_and_every_ensemble_input(perf_tools):
    steps = perf_tools["make_inputs"].stream_steps(
        CLIP, policy="codec", refresh="selective", fps=2.0, window_seconds=8.0,
        stride_seconds=2.0, chunks=3, question="q?")
    chunks = list(iter_chunks(CLIP, 2.0))[:3]
    assert len(steps) == 3
    for step, chunk in zip(steps, chunks):
        assert base64.b64decode(step["CHUNK"]["b64"]) == chunk.data
        assert step["CHUNK"]["shape"] == [len(chunk.data)]
        assert step["POLICY"] == ["codec"] and step["REFRESH"] == ["selective"]
        assert step["SOURCE_FPS"] == [12.5] and step["WINDOW_SECONDS"] == [8.0]
        assert step["AU_BYTES"] == {"content": list(chunk.au_sizes),
                                    "shape": [len(chunk.au_sizes)]}
        assert step["AU_PTS"]["content"] == list(chunk.au_pts)
    assert [s["CHUNK_SEQ"] for s in steps] == [[0], [1], [2]]
    assert len({s["STREAM_TOKEN"][0] for s in steps}) == 1   # one owner for the stream
    from codecsight.protocol import ENSEMBLE_INPUTS
    assert set(steps[0]) == set(ENSEMBLE_INPUTS)


PA_STDOUT = """
  Client:
    Request count: 12
    Sequence count: 4 (1.33297 seq/sec)
  Composing models:
  codec_parser, version: 1
      Inference count: 12
      Avg request latency: 146241 usec (overhead 4 usec + queue 7632 usec + compute input 59 usec + compute infer 133659 usec + compute output 4886 usec)

  vit_pruned, version: 1
      Inference count: 12
      Avg request latency: 196324 usec (overhead 4 usec + queue 31571 usec + compute input 662 usec + compute infer 163631 usec + compute output 455 usec)
"""


def test_the_decode_benchmark_compares_every_setting_with_plain_decoding(perf_tools, tmp_path):
    """perf/bench_decode.py on a short generated clip: every setting measured in one run,
    ratios against plain decoding, and the loop filter skips keep types and vectors."""
    out = tmp_path / "decode.json"
    clip = perf_tools["bench_decode"].generated_clip(tmp_path)
    assert perf_tools["bench_decode"].main([str(clip), "--repeats", "1", "--chunk-seconds",
                                            "2", "--json", str(out)]) == 0
    (rows,) = [c["settings"] for c in json.loads(out.read_text())["clips"].values()]
    assert {"plain", "mvs"} <= set(rows) and rows["plain"]["cpu_vs_plain"] == 1.0
    frames = {r["frames"] for r in rows.values()}
    assert len(frames) == 1 and frames.pop() > 0          # every setting decoded every frame
    for name, row in rows.items():
        assert row["cpu_ms_per_frame"] > 0 and row["decode_errors"] == 0, name
        assert row["types_equal_mvs"], name
        if name != "plain":
            assert row["vectors_equal_mvs"], name


def test_perf_analyzer_output_gives_the_composing_model_breakdown(perf_tools):
    parsed = perf_tools["perf_analyzer"].parse_output(PA_STDOUT)
    assert parsed["sequences_per_s"] == pytest.approx(1.33297)
    assert parsed["composing"]["vit_pruned"]["compute_infer_ms"] == pytest.approx(163.631)
    assert parsed["composing"]["codec_parser"]["queue_ms"] == pytest.approx(7.632)


def test_the_ramp_doubles_then_bisects_to_the_largest_sustained_level(perf_tools):
    ramp = perf_tools["streams_sustained"].Ramp(max_streams=32)
    tried = []
    while (n := ramp.next()) is not None:
        tried.append(n)
        ramp.record(n, sustained=n <= 5)   # a server that holds 5 streams
    assert tried == [1, 2, 4, 8, 6, 5]
    assert ramp.best == 5


def test_the_ramp_stops_at_its_cap_and_at_a_first_failure(perf_tools):
    Ramp = perf_tools["streams_sustained"].Ramp
    capped = Ramp(max_streams=3)
    while (n := capped.next()) is not None:
        capped.record(n, sustained=True)
    assert capped.best == 3
    none = Ramp(max_streams=8)
    none.record(none.next(), sustained=False)
    assert none.next() is None and none.best == 0


def test_results_markdown_says_whether_each_target_was_met(perf_tools, tmp_path):
    args = bench_args()
    static = "static-640x360.mp4"
    records = [make_record(static, INFO, "dense", "full", [run_of([window(1000)], 4.0, 800.0)],
                           args),
               make_record(static, INFO, "codec", "full",
                           [run_of([window(300, kept=300)], 2.0, 100.0, llm_ms=900.0)], args)]
    data = {"meta": {"date": "d", "command": "codecsight bench", "machine": {"cpu_count": 2},
                     "server": {}, "settings": {"fps": 2.0, "window_seconds": 8.0,
                                                "stride_seconds": 2.0, "streams": 1,
                                                "rounds": 1}},
            "videos": [{"path": static, "codec": "h264", "width": 640, "height": 360,
                        "fps": 10.0, "duration_s": 24.0}],
            "records": records, "ratios": make_ratios(records)}
    (tmp_path / "bench.json").write_text(json.dumps(data))
    text = perf_tools["results"].render(tmp_path, tmp_path)
    assert "codec/full vs dense/full on static-camera `static-640x360.mp4`: **2.00x**" in text
    assert "NOT met" in text and "Held back by **llm_prefill**" in text
    # a bench.json written before a ratio field existed still renders, the field as "-"
    for q in data["ratios"]:
        del q["llm_tokens_kept"]
    (tmp_path / "bench.json").write_text(json.dumps(data))
    assert "**2.00x**" in perf_tools["results"].render(tmp_path, tmp_path)


def test_results_markdown_holds_codec_alone_to_the_streams_target(perf_tools, tmp_path):
    """The committed streams run: codec is judged against issue 17's 10x, the peer is not
    judged, and every policy says what saturated first."""
    import shutil

    shutil.copy(PERF / "results" / "streams_sustained.json", tmp_path)
    run = json.loads((tmp_path / "streams_sustained.json").read_text())
    dense, peer, codec = (run["sustained"][k] for k in ("dense/full", "vllm_evs/full",
                                                          "codec/full"))
    text = perf_tools["results"].render(tmp_path, tmp_path)
    verdict = "met" if codec >= 10 * dense else "NOT met"
    assert f"codec/full {codec} vs dense/full {dense}: **{codec / dense:.2f}x** " \
           f"(target >= 10x: {verdict})" in text
    assert f"vllm_evs/full {peer} vs dense/full {dense}: **{peer / dense:.2f}x** " \
           "(a peer policy: no target" in text
    assert text.count("the largest stage is") == 3     # dense, vllm_evs, codec


# --- through the real server ---------------------------------------------------------------


@pytest.mark.server
def test_bench_measures_policies_side_by_side_through_the_server(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench_args(CLIP, "--url", server.grpc_url, "--policies", "dense,codec",
                      "--refresh", "full", "--max-chunks", "2", "--warmup-chunks", "0",
                      "--json", str(out))
    assert bench.run(args) == 0
    data = json.loads(out.read_text())
    records = {r["policy"]: r for r in data["records"]}
    dense, codec = records["dense"], records["codec"]
    for r in (dense, codec):
        assert r["windows"] == 2 and r["frames_sampled"] == 8
        assert r["vit_ms_per_frame"] > 0 and r["parser_ms_per_frame"] > 0
        assert r["window_latency_ms_p99"] >= r["window_latency_ms_p50"] > 0
        assert r["peak_rss_mb"] > 100   # tritonserver plus its three model stubs
    assert dense["patches_kept"] == dense["patches_total"] == codec["patches_total"]
    assert codec["patches_kept"] < dense["patches_kept"] / 2
    assert dense["bytes_sent"] == codec["bytes_sent"] < dense["raw_rgb_bytes"] / 5
    # The ViT's own compute time, read from Triton's statistics, follows the patches kept.
    assert codec["vit_ms_per_frame"] < dense["vit_ms_per_frame"]
    ratio = {q["policy"]: q for q in data["ratios"]}["codec"]
    assert ratio["patches_kept"] == codec["patches_kept"] / dense["patches_kept"]
    assert Path(data["plot"]).stat().st_size > 10_000
    assert data["meta"]["server"]["triton_version"] == "2.51.0"
    assert "ratios against dense/full" in capsys.readouterr().out


@pytest.mark.server
def test_perf_analyzer_replays_real_chunks_against_the_ensemble(server, perf_tools, tmp_path):
    pa, inputs = perf_tools["perf_analyzer"], perf_tools["make_inputs"]
    paths = inputs.write_inputs([CLIP], tmp_path, ["codec"], ["full"], fps=2.0,
                                window_seconds=8.0, stride_seconds=2.0, chunks=2,
                                question="is anyone moving?")
    args = argparse.Namespace(chunks=2, sequences=1, timeout_s=300)
    figures = pa.run_one(server.grpc_url, paths[("codec", "full")], 1, args, tmp_path,
                         "codec-full-c1", first_id=7_000_000)
    assert figures["requests_per_s"] > 0
    assert figures["latency_ms_p99"] >= figures["latency_ms_p50"] > 0
    assert set(figures["composing"]) == {"codec_parser", "vit_pruned", "llm_prefill"}
    assert all(m["compute_infer_ms"] > 0 for m in figures["composing"].values())


@pytest.mark.server
def test_locust_runs_headless_and_reports_each_window(server, perf_tools, tmp_path):
    prefix = tmp_path / "csv" / "locust"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "locust"), "-f", str(PERF / "locustfile.py"),
         "--headless", "--users", "1", "--spawn-rate", "1", "--run-time", "4s",
         "--stop-timeout", "60", "--host", server.grpc_url, "--csv", str(prefix),
         "--only-summary", "--policies", "codec", "--refresh", "full", "--chunks", "2"],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["name"]: r for r in perf_tools["run_locust"].read_stats(prefix)}
    row = rows["window codec/full"]
    failures = Path(f"{prefix}_failures.csv").read_text()
    assert row["failures"] == 0, failures
    assert row["requests"] >= 2 and row["requests"] % 2 == 0, (row, done.stdout[-2000:])
    assert row["latency_ms_p50"] > 0
