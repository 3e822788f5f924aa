"""Prometheus metrics: request, token, lifecycle, engine and host series under ``appliance_``.

Events (finished requests, tokens, state changes, loads) update counters and histograms as
they happen; everything that is a current value (states, in-flight requests, engine queues,
GPU memory, registry health) is read at scrape time by a collector, so nothing polls in the
background. Each ``Metrics`` owns its registry: two apps in one process (tests) never share
series.

The ``model`` label only ever holds catalogue names (or ``""``): a name taken from a request
body is checked against the catalogue first, so clients cannot grow the series set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.catalogue.registry_client import CatalogueSource
from appliance.host.inventory import GIB, GpuMemory, gpu_memory_used
from appliance.supervisor.states import ModelState

if TYPE_CHECKING:
    from appliance.catalogue.catalogue import Catalogue
    from appliance.request_info import RequestInfo
    from appliance.supervisor.states import Transition
    from appliance.supervisor.supervisor import Supervisor

log = logging.getLogger("appliance.metrics")

# Whole requests: from a cached embedding (milliseconds) to a long generation (minutes).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# First token: prefill of a short prompt up to a long prompt behind a loading model.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Between tokens: a few ms on a GPU, tens to hundreds of ms on a CPU or under heavy batching.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
# Waiting for a loading model or a free slot: bounded by the supervisor's load wait.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Engine start: seconds for a tiny model, tens of minutes for a big one from a cold cache.
LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800)


class Metrics:
    """Every appliance metric on one private registry.

    A ``SupervisorObserver`` (lifecycle events) and a ``RequestObserver`` (finished requests)
    by shape; routes also call :meth:`observe_inter_token` and :meth:`observe_queue_wait`.
    """

    def __init__(
        self,
        *,
        supervisor: Supervisor | None = None,
        catalogue: Catalogue | None = None,
        registry_status: Callable[[], Mapping[str, Any]] | None = None,
        remote_status: Callable[[], Mapping[str, bool]] | None = None,
        gpu_memory: Callable[[], list[GpuMemory]] = gpu_memory_used,
    ) -> None:
        self.registry = CollectorRegistry()
        self.supervisor = supervisor
        self.catalogue = catalogue
        self.registry_status = registry_status
        self.remote_status = remote_status
        self.gpu_memory = gpu_memory
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "Finished HTTP requests.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "appliance_request_duration_seconds",
            "Time from the request's arrival to its last byte.",
            ["model", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first chunk.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "appliance_inter_token_latency_seconds",
            "Time between two generated tokens of a stream.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "appliance_queue_wait_seconds",
            "Time a request waited for a loading model or a free slot.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "appliance_generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.transitions = Counter(
            "appliance_model_state_transitions",
            "Model state changes.",
            ["model", "from_state", "to_state"],
            registry=r,
        )
        self.load_duration = Histogram(
            "appliance_model_load_duration_seconds",
            "Time a model took to load, to ready.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "appliance_engine_restarts", "Restarts of failed engines.", ["model"], registry=r
        )
        self.evictions = Counter(
            "appliance_evictions",
            "Models unloaded to make room for another.",
            ["model"],
            registry=r,
        )
        build = Gauge("appliance_build_info", "The appliance's version.", ["version"], registry=r)
        build.labels(version=__version__).set(1)
        # Per-token hot path: one dict lookup instead of labels() (which validates and locks).
        self._inter_token_children: dict[str, Any] = {}
        r.register(_ScrapeCollector(self))

    def bind(
        self, *, supervisor: Supervisor | None = None, catalogue: Catalogue | None = None
    ) -> None:
        """Attach the supervisor and/or catalogue once they exist (the app builds them later)."""
        if supervisor is not None:
            self.supervisor = supervisor
        if catalogue is not None:
            self.catalogue = catalogue

    def model_label(self, name: str | None) -> str:
        """``name`` if the catalogue holds it or it is a LoRA adapter in the model table, else
        ``""``: labels stay a bounded set (adapters are added by the operator only)."""
        if name is None or self.catalogue is None:
            return ""
        if name in self.catalogue:
            return name
        if self.supervisor is not None and name in self.supervisor.adapter_names():
            return name
        return ""

    # -- RequestObserver -----------------------------------------------------------------

    def on_request_done(self, info: RequestInfo, status: int, seconds: float) -> None:
        """Count a finished request, its latency, its first token and its tokens."""
        model = self.model_label(info.model)
        endpoint = info.endpoint or "other"
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        self.request_duration.labels(model=model, endpoint=endpoint).observe(seconds)
        if info.stream and info.first_token_at is not None:
            self.ttft.labels(model=model).observe(max(0.0, info.first_token_at - info.started))
        if info.usage is not None:
            self.prompt_tokens.labels(model=model).inc(info.usage.prompt_tokens)
            self.generation_tokens.labels(model=model).inc(info.usage.completion_tokens)

    def observe_inter_token(self, model: str, seconds: float) -> None:
        """Record the gap between two tokens of a stream of ``model``."""
        child = self._inter_token_children.get(model)
        if child is None:
            label = self.model_label(model)
            child = self.inter_token.labels(model=label)
            if label:  # cache catalogue names only, so unknown names cannot grow the dict
                self._inter_token_children[model] = child
        child.observe(seconds)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """Record how long a request for ``model`` waited before an engine took it."""
        self.queue_wait.labels(model=self.model_label(model)).observe(seconds)

    # -- SupervisorObserver --------------------------------------------------------------
    # Model names here come from the supervisor, which holds catalogue entries only.

    def on_transition(self, transition: Transition) -> None:
        """Count a model's change of state."""
        self.transitions.labels(
            model=transition.model,
            from_state=transition.old.value,
            to_state=transition.new.value,
        ).inc()

    def on_load(self, model: str, seconds: float) -> None:
        """Record how long a model took to load."""
        self.load_duration.labels(model=model).observe(seconds)

    def on_restart(self, model: str) -> None:
        """Count a restart of a failed engine."""
        self.restarts.labels(model=model).inc()

    def on_eviction(self, model: str) -> None:
        """Count a model unloaded to make room for another."""
        self.evictions.labels(model=model).inc()

    # -- exposition ----------------------------------------------------------------------

    def render(self, *, per_key: bool = True) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type; without the series
        labelled by API key unless ``per_key``."""
        return generate_latest(_WithoutCreated(self.registry, per_key)), CONTENT_TYPE_LATEST


KEY_LABEL = "key"
"""The label of the per-key series (``usage.ledger``), which only the operator sees."""


class _WithoutCreated(Collector):
    """``registry`` less the ``_created`` series, which double every counter's output and
    which Prometheus does not need (the process start time says as much). Filtered here rather
    than with ``disable_created_metrics()``, which would change every registry in the process."""

    def __init__(self, registry: CollectorRegistry, per_key: bool = True) -> None:
        self._registry = registry
        self._per_key = per_key

    def collect(self) -> Iterator[Metric]:
        """Each family of the registry, without its ``_created`` samples (and without the
        families labelled by ``key`` unless ``per_key``)."""
        for family in self._registry.collect():
            if not self._per_key and any(KEY_LABEL in s.labels for s in family.samples):
                continue
            created = family.name + "_created"
            if any(sample.name == created for sample in family.samples):
                family.samples = [s for s in family.samples if s.name != created]
            yield family


class _ScrapeCollector(Collector):
    """Current values, read from the supervisor and friends when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        """Yield the scrape-time gauges."""
        yield from self._models()
        yield from self._catalogue()
        yield from self._remotes()
        yield from self._gpus()

    def _models(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "appliance_requests_in_flight",
            "Requests a model (local or remote) is serving now.",
            labels=["model"],
        )
        state = GaugeMetricFamily(
            "appliance_model_state",
            "1 for the model's current state, 0 for the others.",
            labels=["model", "state"],
        )
        running = GaugeMetricFamily(
            "appliance_engine_running_requests", "Requests the engine runs now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "appliance_engine_waiting_requests",
            "Requests queued inside the engine.",
            labels=["model"],
        )
        kv = GaugeMetricFamily(
            "appliance_engine_kv_cache_usage_ratio",
            "Share of the engine's KV cache in use (0 to 1).",
            labels=["model"],
        )
        download_done = GaugeMetricFamily(
            "appliance_model_download_bytes",
            "Bytes of its files a downloading model has on disk so far.",
            labels=["model"],
        )
        download_total = GaugeMetricFamily(
            "appliance_model_download_total_bytes",
            "Size of the files a downloading model needs.",
            labels=["model"],
        )
        supervisor = self._m.supervisor
        handles = supervisor.handles() if supervisor is not None else []
        for handle in handles:
            in_flight.add_metric([handle.name], supervisor.in_flight(handle))
            for each in ModelState:
                state.add_metric([handle.name, each.value], 1.0 if handle.state is each else 0.0)
            if handle.state is ModelState.DOWNLOADING and handle.download is not None:
                download_done.add_metric([handle.name], handle.download.done_bytes)
                download_total.add_metric([handle.name], handle.download.total_bytes)
            try:
                stats = supervisor.engine_stats(handle)
            except Exception as exc:  # a dying engine must not fail the whole scrape
                log.debug("model %s: engine stats failed: %r", handle.name, exc)
                continue
            if stats is None:
                continue
            running.add_metric([handle.name], stats.running)
            waiting.add_metric([handle.name], stats.waiting)
            if stats.kv_cache_usage is not None:
                kv.add_metric([handle.name], stats.kv_cache_usage)
        yield from (in_flight, state, running, waiting, kv, download_done, download_total)

    def _catalogue(self) -> Iterator[Metric]:
        status = self._m.registry_status() if self._m.registry_status is not None else {}
        up = status.get("up")
        if up is not None:
            registry_up = GaugeMetricFamily(
                "appliance_registry_up", "1 when the registry service answered last time."
            )
            registry_up.add_metric([], 1.0 if up else 0.0)
            yield registry_up
        source = status.get("source")
        if source is None and self._m.catalogue is not None:
            source = self._m.catalogue.origin
        if source is None:
            return
        current = source.value if isinstance(source, CatalogueSource) else str(source)
        family = GaugeMetricFamily(
            "appliance_catalogue_source",
            "1 for where the catalogue in force came from.",
            labels=["source"],
        )
        for origin in CatalogueSource:
            family.add_metric([origin.value], 1.0 if origin.value == current else 0.0)
        yield family

    def _remotes(self) -> Iterator[Metric]:
        if self._m.remote_status is None:
            return
        family = GaugeMetricFamily(
            "appliance_remote_backend_up",
            "1 when a remote backend answered its last check.",
            labels=["model"],
        )
        for model, up in self._m.remote_status().items():
            family.add_metric([model], 1.0 if up else 0.0)
        yield family

    def _gpus(self) -> Iterator[Metric]:
        readings = self._m.gpu_memory()
        if not readings:
            return
        used = GaugeMetricFamily(
            "appliance_gpu_memory_used_bytes", "GPU memory in use, per NVML.", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "appliance_gpu_memory_total_bytes", "GPU memory in all, per NVML.", labels=["gpu"]
        )
        for reading in readings:
            # Same naming as Device.label, so dashboards and logs agree on "gpu0".
            label = f"gpu{reading.index}"
            used.add_metric([label], reading.used_gib * GIB)
            total.add_metric([label], reading.total_gib * GIB)
        yield from (used, total)
