"""vLLM's per-step statistics: the stat-logger adapter and the engine step figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from appliance.engines.base import (
    EngineFigureSink,
    EngineStepFigures,
    FinishedRequestTimes,
    SchedulerSnapshot,
)


class StatsRecorder:
    """Keeps the latest scheduler statistics vLLM reports, for metrics.

    With a ``sink`` (``--engine-metrics``) it also hands on each step's counts and finished
    requests' timings, the figures vLLM's own Prometheus logger would have exposed.
    """

    def __init__(
        self,
        model: str = "",
        sink: EngineFigureSink | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage: float | None = None
        # The same figures with the time they came: with several clients, each step's go to
        # one of them, and the owner shows the freshest client's.
        self.snapshot: SchedulerSnapshot | None = None
        self._model = model
        self._sink = sink
        self._clock = clock

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Take one step's statistics from vLLM."""
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
            self.snapshot = SchedulerSnapshot(
                waiting=self.waiting, kv_cache_usage=self.kv_cache_usage, at=self._clock()
            )
        if self._sink is not None:
            figures = _step_figures(scheduler_stats, iteration_stats)
            if figures != _NO_FIGURES:
                self._sink.record_engine_step(self._model, figures)

    def factory(self) -> Any:
        """A vLLM stat-logger factory whose loggers write into this recorder."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        recorder = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                recorder.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


_NO_FIGURES = EngineStepFigures()


def _step_figures(scheduler_stats: Any, iteration_stats: Any) -> EngineStepFigures:
    """Our figures from vLLM's ``SchedulerStats`` and ``IterationStats`` of one step."""
    queries = hits = drafts = draft_tokens = accepted = 0
    if scheduler_stats is not None:
        queries = scheduler_stats.prefix_cache_stats.queries
        hits = scheduler_stats.prefix_cache_stats.hits
        spec = scheduler_stats.spec_decoding_stats
        if spec is not None:
            drafts = spec.num_drafts
            draft_tokens = spec.num_draft_tokens
            accepted = spec.num_accepted_tokens
    preemptions = cached = 0
    finished: tuple[FinishedRequestTimes, ...] = ()
    if iteration_stats is not None:
        preemptions = iteration_stats.num_preempted_reqs
        cached = iteration_stats.prompt_token_stats.cached_tokens
        finished = tuple(
            FinishedRequestTimes(
                queued=done.queued_time,
                prefill=done.prefill_time,
                decode=done.decode_time,
                inference=done.inference_time,
                finish_reason=str(done.finish_reason),
            )
            for done in iteration_stats.finished_requests
        )
    return EngineStepFigures(
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        preemptions=preemptions,
        prompt_tokens_cached=cached,
        spec_decode_drafts=drafts,
        spec_decode_draft_tokens=draft_tokens,
        spec_decode_accepted_tokens=accepted,
        finished=finished,
    )


def unexposed_prometheus_logger() -> Any:
    """A stand-in for vLLM's Prometheus stat logger, which does nothing.

    vLLM adds a ``PrometheusStatLogger`` to every ``AsyncLLM`` unless it is handed one. Its
    metrics go to prometheus-client's global registry, which the appliance never exposes (it
    has its own, fed by ``StatsRecorder``), yet it costs about 4% of the API process's CPU
    under load: work for nobody. Handing vLLM this subclass keeps it from adding the real one.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class _Unexposed(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            pass  # registers nothing

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log(self) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

    return _Unexposed
