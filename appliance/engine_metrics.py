"""vLLM's own engine figures as appliance metrics, per model (``appliance up --engine-metrics``).

vLLM's Prometheus logger cannot serve here: it writes to prometheus-client's global registry,
labels by engine rather than by our model name, and unregisters every ``vllm:`` metric each
time an engine starts, so a second engine in the process would wipe the first's. These are the
figures operators tune with (prefix-cache hits, preemptions, where a request's time went in the
engine, speculative-decoding acceptance), fed from the per-step statistics the engine adapter
already receives, on the appliance's registry. Off by default: they cost the API process work
on every engine step (BENCHMARKS.md measured about 4% for vLLM's own logger).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from appliance.engines.base import EngineStepFigures

# vLLM's own buckets for request phase times (v1/metrics/loggers.py, request_latency_buckets).
PHASE_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
PREFIX = "appliance_vllm_"


class EngineMetrics:
    """Counters and histograms of vLLM's engine steps by model: an ``EngineFigureSink``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[str, _ModelChildren] = {}
        r = registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(PREFIX + name, doc, ["model", *labels], registry=r)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, ["model"], buckets=PHASE_BUCKETS, registry=r)

        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache."
        )
        self.prompt_tokens_cached = counter(
            "prompt_tokens_cached", "Prompt tokens not computed again (cached)."
        )
        self.preemptions = counter("num_preemptions", "Requests preempted by the scheduler.")
        self.request_success = counter(
            "request_success", "Requests the engine finished, by reason.", "finished_reason"
        )
        self.spec_drafts = counter("spec_decode_num_drafts", "Speculative-decoding drafts.")
        self.spec_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Tokens proposed by speculative decoding."
        )
        self.spec_accepted = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted by the target model."
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited in the engine's queue."
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds", "Time a request spent in prefill."
        )
        self.decode_time = histogram(
            "request_decode_time_seconds", "Time a request spent decoding."
        )
        self.inference_time = histogram(
            "request_inference_time_seconds", "Time a request spent running (prefill + decode)."
        )

    def record_engine_step(self, model: str, figures: EngineStepFigures) -> None:
        """Account one engine step of ``model`` (a catalogue name: the label set stays bounded)."""
        children = self._children.get(model)
        if children is None:
            children = self._children[model] = _ModelChildren(self, model)
        for child, amount in (
            (children.prefix_cache_queries, figures.prefix_cache_queries),
            (children.prefix_cache_hits, figures.prefix_cache_hits),
            (children.prompt_tokens_cached, figures.prompt_tokens_cached),
            (children.preemptions, figures.preemptions),
            (children.spec_drafts, figures.spec_decode_drafts),
            (children.spec_draft_tokens, figures.spec_decode_draft_tokens),
            (children.spec_accepted, figures.spec_decode_accepted_tokens),
        ):
            if amount > 0:
                child.inc(amount)
        for done in figures.finished:
            self.request_success.labels(model=model, finished_reason=done.finish_reason).inc()
            children.queue_time.observe(done.queued)
            children.prefill_time.observe(done.prefill)
            children.decode_time.observe(done.decode)
            children.inference_time.observe(done.inference)


class _ModelChildren:
    """One model's labelled series, looked up once: ``labels()`` validates and locks on every
    call, and steps come many times a second per engine."""

    def __init__(self, metrics: EngineMetrics, model: str) -> None:
        self.prefix_cache_queries = metrics.prefix_cache_queries.labels(model=model)
        self.prefix_cache_hits = metrics.prefix_cache_hits.labels(model=model)
        self.prompt_tokens_cached = metrics.prompt_tokens_cached.labels(model=model)
        self.preemptions = metrics.preemptions.labels(model=model)
        self.spec_drafts = metrics.spec_drafts.labels(model=model)
        self.spec_draft_tokens = metrics.spec_draft_tokens.labels(model=model)
        self.spec_accepted = metrics.spec_accepted.labels(model=model)
        self.queue_time = metrics.queue_time.labels(model=model)
        self.prefill_time = metrics.prefill_time.labels(model=model)
        self.decode_time = metrics.decode_time.labels(model=model)
        self.inference_time = metrics.inference_time.labels(model=model)
