"""Savings you can watch: custom Prometheus metrics of the Python-backend models.

A model creates one `ModelMetrics(pb_utils, model_name)` in `initialize` and hands it the
statistics it already returns (PARSE_STATS, LLM_STATS) after each request. Triton serves the
metrics on its metrics port (`/metrics`, 8002 by default) next to its own `nv_*` metrics.
Takes the `triton_python_backend_utils` module as an argument so the library never imports
it (it exists only inside the Triton stub); tests pass a stand-in.

Every metric carries a `model` label; per-policy ones also `policy` (patch policy) or
`refresh` (KV refresh policy), so one server running every policy side by side shows each.
Counters only grow: divide their rates, e.g.
`rate(codecsight_patches_kept_total[1m]) / rate(codecsight_patches_total[1m])` is the share
of patches the ViT really ran on.
"""
from __future__ import annotations

from codecsight.protocol import LlmStats, ParseStats

# name -> (kind, help, labels besides "model"). The README's metrics table mirrors this.
METRICS = {
    "codecsight_frames_sampled_total": (
        "COUNTER", "Frames sampled at the analysis fps and sent on to the ViT", ("policy",)),
    "codecsight_patches_kept_total": (
        "COUNTER", "ViT patches kept by the patch policy (what the ViT runs on)", ("policy",)),
    "codecsight_patches_total": (
        "COUNTER", "ViT patches of every sampled frame (what dense would run on)", ("policy",)),
    "codecsight_parser_seconds_total": (
        "COUNTER", "codec_parser time: decode, codec signals, patch selection, patchify",
        ("policy",)),
    "codecsight_parser_ms_per_frame": (
        "GAUGE", "codec_parser milliseconds per sampled frame, last request", ("policy",)),
    "codecsight_windows_total": (
        "COUNTER", "Windows answered by llm_prefill", ("refresh",)),
    "codecsight_tokens_prefilled_total": (
        "COUNTER", "Tokens run through the LLM: new and refreshed visual tokens plus the "
        "question", ("refresh",)),
    "codecsight_tokens_reused_total": (
        "COUNTER", "KV-cache rows reused across windows without recomputation", ("refresh",)),
    "codecsight_tokens_refreshed_total": (
        "COUNTER", "KV-cache rows recomputed although already cached", ("refresh",)),
    "codecsight_prefill_seconds_total": (
        "COUNTER", "LLM prefill time (window refresh plus question), to the first logits",
        ("refresh",)),
    "codecsight_active_streams": (
        "GAUGE", "Streams whose state this model instance holds", ()),
    "codecsight_kv_bytes": (
        "GAUGE", "Bytes of KV cache held for all streams of this model instance", ()),
}


class ModelMetrics:
    """One model instance's CodecSight metrics; a no-op where pb_utils has no MetricFamily."""

    def __init__(self, pb_utils, model_name: str):
        self.model_name = model_name
        self.errors = 0
        self._pb_utils = pb_utils
        self._families = {}
        self._metrics = {}
        self._kv_bytes: dict = {}   # stream ID (as the model keys it) -> KV bytes at its last window
        family_cls = getattr(pb_utils, "MetricFamily", None)
        self.enabled = family_cls is not None
        if self.enabled:
            for name, (kind, text, _) in METRICS.items():
                self._families[name] = family_cls(name=name, description=text,
                                                  kind=getattr(family_cls, kind))

    def metric(self, name: str, **labels):
        """The Metric of family `name` for these labels (created once, then reused)."""
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            wanted = METRICS[name][2]
            if set(labels) != set(wanted):
                raise ValueError(f"{name} takes labels {wanted}, got {sorted(labels)}")
            self._metrics[key] = self._families[name].Metric(
                labels={"model": self.model_name, **{k: str(v) for k, v in labels.items()}})
        return self._metrics[key]

    def observe_parse(self, stats: ParseStats, streams=None) -> None:
        """Count one codec_parser request from its PARSE_STATS.

        streams: the instance's live streams (len() is the active-stream gauge); None leaves
        the gauge to stats.active_streams when set.
        """
        self._guard(self._observe_parse, stats, streams)

    def observe_llm(self, stats: LlmStats, streams=None) -> None:
        """Count one llm_prefill request from its LLM_STATS.

        streams: the instance's live streams (supports `in` and len()); KV bytes of streams no
        longer in it (ended, evicted) stop counting towards codecsight_kv_bytes.
        """
        self._guard(self._observe_llm, stats, streams)

    def set_active_streams(self, count: int) -> None:
        """Set the active-stream gauge, e.g. after an eviction pass."""
        self._guard(lambda: self.metric("codecsight_active_streams").set(float(count)))

    def _observe_parse(self, stats: ParseStats, streams) -> None:
        policy = stats.policy
        self.metric("codecsight_frames_sampled_total", policy=policy).increment(
            stats.frames_sampled)
        self.metric("codecsight_patches_kept_total", policy=policy).increment(stats.patches_kept)
        self.metric("codecsight_patches_total", policy=policy).increment(stats.patches_total)
        self.metric("codecsight_parser_seconds_total", policy=policy).increment(
            stats.parser_ms / 1000.0)
        if stats.frames_sampled:
            self.metric("codecsight_parser_ms_per_frame", policy=policy).set(
                stats.parser_ms / stats.frames_sampled)
        self._set_active(stats.active_streams, streams)

    def _observe_llm(self, stats: LlmStats, streams) -> None:
        refresh = stats.refresh
        for key in ("tokens_prefilled", "tokens_reused", "tokens_refreshed"):
            self.metric(f"codecsight_{key}_total", refresh=refresh).increment(
                getattr(stats, key))
        if stats.answered:   # no prefill when no question was due
            self.metric("codecsight_windows_total", refresh=refresh).increment(1)
            self.metric("codecsight_prefill_seconds_total", refresh=refresh).increment(
                stats.prefill_ms / 1000.0)
        if stats.stream is not None:
            self._kv_bytes[stats.stream] = stats.kv_bytes
        if streams is not None:
            self._kv_bytes = {s: b for s, b in self._kv_bytes.items() if s in streams}
        self.metric("codecsight_kv_bytes").set(float(sum(self._kv_bytes.values())))
        self._set_active(stats.active_streams, streams)

    def _set_active(self, stats_count: int | None, streams) -> None:
        count = len(streams) if streams is not None else stats_count
        if count is not None:
            self.metric("codecsight_active_streams").set(float(count))

    def _guard(self, fn, *args) -> None:
        # A metric must never fail the request it describes: count the error, log it once.
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as e:
            self.errors += 1
            if self.errors == 1:
                logger = getattr(self._pb_utils, "Logger", None)
                if logger is not None:
                    logger.log_warn(f"{self.model_name}: metrics disabled for this request: "
                                    f"{type(e).__name__}: {e}")


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Samples of a Prometheus text exposition: (name, frozenset of label pairs) -> value."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = frozenset()
        if rest:
            pairs = [p for p in rest.rstrip("}").split('",') if p]
            labels = frozenset((k, v.strip('"')) for k, _, v in (p.partition("=") for p in pairs))
        samples[(name, labels)] = float(value)
    return samples


def read_metrics(url: str, timeout_s: float = 10.0) -> dict[tuple[str, frozenset], float]:
    """Fetch and parse a Prometheus endpoint, e.g. http://127.0.0.1:8002/metrics."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse_prometheus(response.read().decode("utf-8"))
