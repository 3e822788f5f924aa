"""vLLM's per-step statistics become per-model appliance metrics (``--engine-metrics``).

The statistics are built with vLLM 0.32's own classes, the ones its engine hands stat loggers,
so a renamed field in a later vLLM fails here rather than on a running box.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from vllm.v1.engine import FinishReason
from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats
from vllm.v1.spec_decode.metrics import SpecDecodingStats

from appliance.engine_metrics import EngineMetrics
from appliance.engines.base import EngineStepFigures
from appliance.engines.vllm.stats import StatsRecorder
from appliance.metrics import Metrics


class Collected:
    """An ``EngineFigureSink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, EngineStepFigures]] = []

    def record_engine_step(self, model: str, figures: EngineStepFigures) -> None:
        self.steps.append((model, figures))


def vllm_step() -> tuple[SchedulerStats, IterationStats]:
    """One step as vLLM reports it: cache lookups, a preemption, drafts, a finished request."""
    scheduler = SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25)
    scheduler.prefix_cache_stats.queries = 160
    scheduler.prefix_cache_stats.hits = 144
    scheduler.spec_decoding_stats = SpecDecodingStats.new(num_spec_tokens=2)
    scheduler.spec_decoding_stats.num_drafts = 3
    scheduler.spec_decoding_stats.num_draft_tokens = 6
    scheduler.spec_decoding_stats.num_accepted_tokens = 4
    iteration = IterationStats()
    iteration.num_preempted_reqs = 1
    iteration.prompt_token_stats.cached_tokens = 144
    iteration.finished_requests.append(
        FinishedRequestStats(
            finish_reason=FinishReason.LENGTH,
            queued_time=0.5,
            prefill_time=0.25,
            decode_time=1.5,
            inference_time=1.75,
        )
    )
    return scheduler, iteration


def test_recorder_turns_vllm_stats_into_figures() -> None:
    sink = Collected()
    recorder = StatsRecorder("chat", sink)
    recorder.record(*vllm_step())
    assert (recorder.running, recorder.waiting, recorder.kv_cache_usage) == (2, 1, 0.25)
    [(model, figures)] = sink.steps
    assert model == "chat"
    assert figures.prefix_cache_queries == 160 and figures.prefix_cache_hits == 144
    assert figures.preemptions == 1 and figures.prompt_tokens_cached == 144
    assert (figures.spec_decode_drafts, figures.spec_decode_draft_tokens) == (3, 6)
    assert figures.spec_decode_accepted_tokens == 4
    [done] = figures.finished
    assert (done.queued, done.prefill, done.decode, done.inference) == (0.5, 0.25, 1.5, 1.75)
    assert done.finish_reason == "length"


def test_recorder_without_sink_or_figures_passes_nothing_on() -> None:
    quiet = StatsRecorder("chat")  # --engine-metrics off: gauges only
    quiet.record(*vllm_step())
    assert quiet.running == 2
    sink = Collected()
    idle = StatsRecorder("chat", sink)
    idle.record(SchedulerStats(), IterationStats())  # a step with nothing to count
    assert sink.steps == []


def test_figures_reach_the_appliance_registry_by_model() -> None:
    metrics = Metrics()
    engine = EngineMetrics(CollectorRegistry())
    metrics.registry.register(engine.registry)
    for model in ("chat", "coder"):
        StatsRecorder(model, engine).record(*vllm_step())
    StatsRecorder("chat", engine).record(*vllm_step())
    text = metrics.render()[0].decode()
    assert "_created" not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("appliance_vllm_")
    }

    def of(name: str, model: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model": model, **labels}.items())))]

    assert of("appliance_vllm_prefix_cache_queries_total", "chat") == 320
    assert of("appliance_vllm_prefix_cache_hits_total", "coder") == 144
    assert of("appliance_vllm_num_preemptions_total", "chat") == 2
    assert of("appliance_vllm_request_success_total", "chat", finished_reason="length") == 2
    assert of("appliance_vllm_request_queue_time_seconds_count", "coder") == 1
    assert of("appliance_vllm_request_decode_time_seconds_sum", "chat") == 3.0
    assert of("appliance_vllm_spec_decode_num_accepted_tokens_total", "chat") == 8
    assert {dict(labels)["model"] for _, labels in samples} == {"chat", "coder"}
