"""codecsight.metrics against a stand-in pb_utils, and on a real tritonserver's metrics port."""
import dataclasses
import time
import types

import numpy as np
import pytest

from codecsight.metrics import METRICS, ModelMetrics, parse_prometheus
from codecsight.protocol import LlmStats, ParseStats

from triton_stub import MetricFamily as FakeMetricFamily

PARSE_DENSE = ParseStats.empty(policy="dense", frames_sampled=4, patches_kept=7168,
                               patches_total=7168, parser_ms=60.0, stream="cam-1",
                               active_streams=1)
PARSE_CODEC = ParseStats.empty(policy="codec", frames_sampled=4, patches_kept=1024,
                               patches_total=7168, parser_ms=20.0, stream="cam-2",
                               active_streams=2)


def llm_stats(stream, refresh="selective", kv_bytes=1000, prefill_ms=12.5, **counts) -> LlmStats:
    fields = dict(refresh=refresh, stream=stream, kv_bytes=kv_bytes, tokens_prefilled=300,
                  tokens_reused=1500, tokens_refreshed=20, active_streams=1,
                  prefill_ms=prefill_ms)
    return LlmStats.empty(**{**fields, **counts})


@pytest.fixture
def pb_utils():
    warnings = []
    fake = types.SimpleNamespace(MetricFamily=FakeMetricFamily,
                                 Logger=types.SimpleNamespace(log_warn=warnings.append))
    fake.warnings = warnings
    return fake


def value(metrics, name, **labels):
    return metrics._families[name].metrics[
        frozenset({"model": metrics.model_name, **labels}.items())].value()


def test_every_metric_family_is_created_with_its_kind(pb_utils):
    metrics = ModelMetrics(pb_utils, "codec_parser")
    assert set(metrics._families) == set(METRICS)
    assert metrics._families["codecsight_patches_kept_total"].kind == "counter"
    assert metrics._families["codecsight_kv_bytes"].kind == "gauge"


def test_patches_kept_and_total_are_counted_per_policy(pb_utils):
    metrics = ModelMetrics(pb_utils, "codec_parser")
    metrics.observe_parse(PARSE_DENSE)
    metrics.observe_parse(PARSE_CODEC)
    metrics.observe_parse(PARSE_CODEC)
    assert value(metrics, "codecsight_patches_kept_total", policy="dense") == 7168
    assert value(metrics, "codecsight_patches_total", policy="dense") == 7168
    assert value(metrics, "codecsight_patches_kept_total", policy="codec") == 2048
    assert value(metrics, "codecsight_patches_total", policy="codec") == 14336
    assert value(metrics, "codecsight_frames_sampled_total", policy="codec") == 8
    assert metrics.errors == 0


def test_parser_time_is_counted_in_seconds_and_shown_per_frame(pb_utils):
    metrics = ModelMetrics(pb_utils, "codec_parser")
    metrics.observe_parse(PARSE_DENSE)
    metrics.observe_parse(dataclasses.replace(PARSE_DENSE, parser_ms=100.0, frames_sampled=5))
    assert value(metrics, "codecsight_parser_seconds_total", policy="dense") == pytest.approx(0.16)
    assert value(metrics, "codecsight_parser_ms_per_frame", policy="dense") == 20.0


def test_a_chunk_without_sampled_frames_leaves_the_per_frame_gauge_alone(pb_utils):
    metrics = ModelMetrics(pb_utils, "codec_parser")
    metrics.observe_parse(PARSE_DENSE)
    metrics.observe_parse(dataclasses.replace(PARSE_DENSE, frames_sampled=0, patches_kept=0,
                                              patches_total=0, parser_ms=3.0))
    assert value(metrics, "codecsight_parser_ms_per_frame", policy="dense") == 15.0


def test_tokens_prefilled_reused_refreshed_are_counted_per_refresh_policy(pb_utils):
    metrics = ModelMetrics(pb_utils, "llm_prefill")
    metrics.observe_llm(llm_stats("cam-1", refresh="full", tokens_prefilled=3600,
                                  tokens_reused=0, tokens_refreshed=1800))
    metrics.observe_llm(llm_stats("cam-2"))
    metrics.observe_llm(llm_stats("cam-2"))
    assert value(metrics, "codecsight_tokens_prefilled_total", refresh="full") == 3600
    assert value(metrics, "codecsight_tokens_refreshed_total", refresh="full") == 1800
    assert value(metrics, "codecsight_tokens_prefilled_total", refresh="selective") == 600
    assert value(metrics, "codecsight_tokens_reused_total", refresh="selective") == 3000
    assert value(metrics, "codecsight_windows_total", refresh="selective") == 2
    assert value(metrics, "codecsight_prefill_seconds_total", refresh="selective") == \
        pytest.approx(0.025)


def test_a_window_with_no_question_due_is_not_counted_as_answered(pb_utils):
    metrics = ModelMetrics(pb_utils, "llm_prefill")
    metrics.observe_llm(llm_stats("cam-1", prefill_ms=None, tokens_prefilled=0,
                                  tokens_reused=0, tokens_refreshed=0))
    assert value(metrics, "codecsight_tokens_prefilled_total", refresh="selective") == 0
    assert "codecsight_windows_total" not in {n for n, _ in metrics._metrics}


def test_kv_bytes_sum_the_live_streams_and_drop_ended_ones(pb_utils):
    metrics = ModelMetrics(pb_utils, "llm_prefill")
    live = {"cam-1", "cam-2"}
    metrics.observe_llm(llm_stats("cam-1", kv_bytes=1000), streams=live)
    metrics.observe_llm(llm_stats("cam-2", kv_bytes=500), streams=live)
    metrics.observe_llm(llm_stats("cam-1", kv_bytes=1200), streams=live)
    assert value(metrics, "codecsight_kv_bytes") == 1700
    assert value(metrics, "codecsight_active_streams") == 2
    live.discard("cam-1")  # its END: the model frees the state before it reports
    metrics.observe_llm(llm_stats("cam-1", kv_bytes=1200), streams=live)
    assert value(metrics, "codecsight_kv_bytes") == 500
    assert value(metrics, "codecsight_active_streams") == 1


def test_integer_stream_ids_are_matched_as_the_model_keys_them(pb_utils):
    metrics = ModelMetrics(pb_utils, "llm_prefill")
    metrics.observe_llm(llm_stats(7, kv_bytes=64), streams={7})
    assert value(metrics, "codecsight_kv_bytes") == 64


def test_active_streams_fall_back_to_the_stats_count(pb_utils):
    metrics = ModelMetrics(pb_utils, "codec_parser")
    metrics.observe_parse(PARSE_CODEC)
    assert value(metrics, "codecsight_active_streams") == 2
    metrics.set_active_streams(0)
    assert value(metrics, "codecsight_active_streams") == 0


def test_a_failing_metric_never_fails_the_request_and_is_logged_once(pb_utils):
    metrics = ModelMetrics(pb_utils, "codec_parser")
    bad = dataclasses.replace(PARSE_DENSE, patches_kept=-5)  # a counter cannot go down
    metrics.observe_parse(bad)
    metrics.observe_parse(bad)
    assert metrics.errors == 2
    assert len(pb_utils.warnings) == 1 and "codec_parser" in pb_utils.warnings[0]


def test_without_metric_family_support_everything_is_a_no_op():
    metrics = ModelMetrics(types.SimpleNamespace(), "codec_parser")
    metrics.observe_parse(PARSE_DENSE)
    metrics.observe_llm(llm_stats("cam-1"))
    assert not metrics.enabled and metrics.errors == 0


def test_prometheus_text_is_parsed_with_labels():
    text = ('# HELP codecsight_kv_bytes KV\n# TYPE codecsight_kv_bytes gauge\n'
            'codecsight_kv_bytes{model="llm_prefill"} 1700\n'
            'codecsight_patches_total{model="codec_parser",policy="codec"} 14336\n'
            'nv_inference_count 3\n')
    samples = parse_prometheus(text)
    assert samples[("codecsight_kv_bytes", frozenset({("model", "llm_prefill")}))] == 1700
    assert samples[("codecsight_patches_total", frozenset(
        {("model", "codec_parser"), ("policy", "codec")}))] == 14336
    assert samples[("nv_inference_count", frozenset())] == 3


# --- on a real tritonserver -----------------------------------------------------------------

PROBE_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  { name: "KIND"  data_type: TYPE_STRING dims: [ 1 ] },
  { name: "STATS" data_type: TYPE_STRING dims: [ 1 ] }
]
output [ { name: "ERRORS" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

# A model that only feeds PARSE_STATS/LLM_STATS to ModelMetrics: the real pb_utils, the real stub.
PROBE_MODEL = '''
import os
import sys
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
import numpy as np
import triton_python_backend_utils as pb_utils
from codecsight.metrics import ModelMetrics
from codecsight.protocol import LlmStats, ParseStats


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = ModelMetrics(pb_utils, args["model_name"])
        self.streams = set()

    def execute(self, requests):
        responses = []
        for request in requests:
            kind = pb_utils.get_input_tensor_by_name(request, "KIND").as_numpy()[0].decode()
            text = pb_utils.get_input_tensor_by_name(request, "STATS").as_numpy()[0]
            stats = (ParseStats if kind == "parse" else LlmStats).from_json(text)
            self.streams.add(stats.stream)
            getattr(self.metrics, "observe_" + kind)(stats, streams=self.streams)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(
                "ERRORS", np.array([self.metrics.errors], np.int32))]))
        return responses
'''


@pytest.fixture(scope="module")
def probe_server(tmp_path_factory):
    import tritonclient.grpc as grpcclient

    from codecsight.serve import ServerError, TritonServer

    class ProbeServer(TritonServer):
        def wait_ready(self, timeout_s, progress=None):
            client = grpcclient.InferenceServerClient(self.grpc_url)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited:\n{self.log_tail()}")
                try:
                    if all(client.is_model_ready(m) for m in ("metrics_probe",
                                                               "metrics_probe_2")):
                        return
                except Exception:
                    pass
                time.sleep(0.2)
            raise ServerError(f"metrics_probe not ready:\n{self.log_tail()}")

    repo = tmp_path_factory.mktemp("probe_repo")
    # Two models, as codec_parser and llm_prefill: both declare every metric family.
    for name in ("metrics_probe", "metrics_probe_2"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(PROBE_CONFIG.replace("{name}", name))
        (repo / name / "1" / "model.py").write_text(PROBE_MODEL)
    with ProbeServer(repo, config_name="", log_path=repo / "tritonserver.log") as server:
        yield server


@pytest.mark.server
def test_metrics_appear_on_tritons_metrics_port(probe_server):
    import tritonclient.grpc as grpcclient

    from codecsight.metrics import read_metrics

    client = grpcclient.InferenceServerClient(probe_server.grpc_url)

    def send(kind, stats, model="metrics_probe"):
        inputs = []
        for name, text in (("KIND", kind), ("STATS", stats.to_json())):
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            inputs.append(tensor)
        return int(client.infer(model, inputs).as_numpy("ERRORS")[0])

    assert send("parse", PARSE_DENSE) == 0
    assert send("parse", PARSE_CODEC) == 0
    assert send("llm", llm_stats("cam-1", kv_bytes=4096)) == 0
    assert send("llm", llm_stats("cam-2", kv_bytes=1024)) == 0
    assert send("parse", PARSE_CODEC, model="metrics_probe_2") == 0
    samples = read_metrics(f"http://127.0.0.1:{probe_server.metrics_port}/metrics")

    def sample(name, **labels):
        return samples[(name, frozenset({"model": "metrics_probe", **labels}.items()))]

    assert sample("codecsight_patches_kept_total", policy="codec") == 1024
    assert sample("codecsight_patches_total", policy="codec") == 7168
    assert sample("codecsight_patches_kept_total", policy="dense") == 7168
    assert sample("codecsight_parser_ms_per_frame", policy="codec") == 5.0
    assert sample("codecsight_tokens_reused_total", refresh="selective") == 3000
    assert sample("codecsight_kv_bytes") == 5120
    assert sample("codecsight_active_streams") == 2  # cam-1 and cam-2
    # The other model's series of the same family are its own.
    assert samples[("codecsight_patches_kept_total", frozenset(
        {"model": "metrics_probe_2", "policy": "codec"}.items()))] == 1024
