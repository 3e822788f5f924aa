"""Metrics: events in, exact series out, read back through Prometheus' own text parser."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance import __version__
from appliance.api.metrics_routes import build_metrics_router
from appliance.api.middleware import RequestInfo
from appliance.catalogue.catalogue import Catalogue
from appliance.catalogue.registry_client import CatalogueSource
from appliance.catalogue.schema import LocalModelSpec
from appliance.engines.base import EngineStats, Usage
from appliance.host.inventory import GIB, GpuMemory
from appliance.metrics import Metrics
from appliance.supervisor.states import ModelState, Transition
from tests.fakes import FakeEngine

DASHBOARD = Path(__file__).resolve().parents[2] / "scripts" / "grafana-dashboard.json"

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- fakes -------------------------------------------------------------------------------


@dataclass
class FakeSpec:
    autoload: bool = True


@dataclass
class FakeHandle:
    """The parts of ``ModelHandle`` that metrics read."""

    name: str
    state: ModelState
    in_flight: int = 0
    engine: FakeEngine | None = None
    spec: FakeSpec = field(default_factory=FakeSpec)


@dataclass
class FakeSupervisor:
    models: list[FakeHandle]

    def handles(self) -> list[FakeHandle]:
        return list(self.models)

    def engine_stats(self, handle: FakeHandle) -> Any:
        return handle.engine.stats() if handle.engine is not None else None

    def in_flight(self, handle: FakeHandle) -> int:
        return handle.in_flight


def catalogue(*names: str, origin: CatalogueSource = CatalogueSource.FILE) -> Catalogue:
    return Catalogue([LocalModelSpec(name=n, source=f"models/{n}") for n in names], origin)


@pytest.fixture
def make_metrics() -> Callable[..., Metrics]:
    """Metrics over a catalogue of ``llama`` and ``gpt2`` and no GPUs, unless told otherwise."""

    def make(
        *,
        supervisor: FakeSupervisor | None = None,
        cat: Catalogue | None = None,
        registry_status: Callable[[], Mapping[str, Any]] | None = None,
        remote_status: Callable[[], Mapping[str, bool]] | None = None,
        gpus: list[GpuMemory] | None = None,
    ) -> Metrics:
        return Metrics(
            supervisor=supervisor,  # type: ignore[arg-type]
            catalogue=cat or catalogue("llama", "gpt2"),
            registry_status=registry_status,
            remote_status=remote_status,
            gpu_memory=lambda: list(gpus or []),
        )

    return make


def scrape(metrics: Metrics) -> Series:
    """Every sample of a render, keyed by sample name and label set."""
    body, _ = metrics.render()
    series: Series = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def names_of(series: Series, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called ``name``."""
    return [dict(labels) for (n, labels) in series if n == name]


def request(
    model: str | None,
    *,
    endpoint: str | None = "chat/completions",
    stream: bool = False,
    ttft: float | None = None,
    usage: Usage | None = None,
) -> RequestInfo:
    info = RequestInfo(request_id="r", started=100.0, model=model, endpoint=endpoint)
    info.stream = stream
    info.usage = usage
    if ttft is not None:
        info.first_token_at = info.started + ttft
    return info


# -- requests ----------------------------------------------------------------------------


def test_requests_are_counted_by_model_endpoint_and_status(make_metrics: Any) -> None:
    m = make_metrics()
    m.on_request_done(request("llama", usage=Usage(10, 5)), 200, 0.25)
    m.on_request_done(request("llama", usage=Usage(4, 6)), 200, 0.5)
    m.on_request_done(request("llama"), 503, 0.125)
    m.on_request_done(request("gpt2", endpoint="completions"), 200, 1.0)
    s = scrape(m)

    total = "appliance_requests_total"
    assert value(s, total, model="llama", endpoint="chat/completions", status="200") == 2
    assert value(s, total, model="llama", endpoint="chat/completions", status="503") == 1
    assert value(s, total, model="gpt2", endpoint="completions", status="200") == 1
    duration = "appliance_request_duration_seconds"
    llama = {"model": "llama", "endpoint": "chat/completions"}
    assert value(s, f"{duration}_count", **llama) == 3
    assert value(s, f"{duration}_sum", **llama) == pytest.approx(0.875)
    assert value(s, f"{duration}_bucket", **llama, le="0.25") == 2  # 0.125 and 0.25
    assert value(s, f"{duration}_bucket", **llama, le="300.0") == 3
    assert value(s, "appliance_prompt_tokens_total", model="llama") == 14
    assert value(s, "appliance_generation_tokens_total", model="llama") == 11
    # Non-streamed requests have no first token to time.
    assert names_of(s, "appliance_time_to_first_token_seconds_count") == []


def test_streamed_request_records_time_to_first_token(make_metrics: Any) -> None:
    m = make_metrics()
    m.on_request_done(request("llama", stream=True, ttft=0.04, usage=Usage(3, 7)), 200, 2.0)
    m.on_request_done(request("llama", stream=True, ttft=0.5), 200, 3.0)
    # A stream that failed before its first chunk has no TTFT but is still a request.
    m.on_request_done(request("llama", stream=True), 500, 0.01)
    s = scrape(m)

    ttft = "appliance_time_to_first_token_seconds"
    assert value(s, f"{ttft}_count", model="llama") == 2
    assert value(s, f"{ttft}_sum", model="llama") == pytest.approx(0.54)
    assert value(s, f"{ttft}_bucket", model="llama", le="0.05") == 1
    assert value(s, "appliance_generation_tokens_total", model="llama") == 7
    assert (
        value(
            s,
            "appliance_request_duration_seconds_count",
            model="llama",
            endpoint="chat/completions",
        )
        == 3
    )


def test_unknown_models_share_the_empty_label(make_metrics: Any) -> None:
    m = make_metrics()
    m.on_request_done(request("no-such-model"), 404, 0.01)  # the route sets what the body said
    m.on_request_done(request(None), 400, 0.01)  # body had no model at all
    m.on_request_done(request("other-unknown", endpoint=None), 404, 0.01)
    m.observe_inter_token("no-such-model", 0.01)
    s = scrape(m)

    total = "appliance_requests_total"
    assert value(s, total, model="", endpoint="chat/completions", status="404") == 1
    assert value(s, total, model="", endpoint="chat/completions", status="400") == 1
    assert value(s, total, model="", endpoint="other", status="404") == 1
    assert {d["model"] for d in names_of(s, total)} == {""}
    assert value(s, "appliance_inter_token_latency_seconds_count", model="") == 1


def test_without_a_catalogue_every_request_model_is_unknown() -> None:
    m = Metrics(gpu_memory=list)
    m.on_request_done(request("llama"), 200, 0.1)
    s = scrape(m)
    assert names_of(s, "appliance_requests_total") == [
        {"model": "", "endpoint": "chat/completions", "status": "200"}
    ]


def test_catalogue_changes_are_followed(make_metrics: Any) -> None:
    cat = catalogue("llama")
    m = make_metrics(cat=cat)
    m.on_request_done(request("mistral"), 404, 0.1)
    cat.replace([LocalModelSpec(name="mistral", source="models/mistral")], CatalogueSource.FILE)
    m.on_request_done(request("mistral"), 200, 0.1)
    s = scrape(m)
    assert (
        value(s, "appliance_requests_total", model="", endpoint="chat/completions", status="404")
        == 1
    )
    assert (
        value(
            s,
            "appliance_requests_total",
            model="mistral",
            endpoint="chat/completions",
            status="200",
        )
        == 1
    )


def test_inter_token_and_queue_wait(make_metrics: Any) -> None:
    m = make_metrics()
    for gap in (0.01, 0.02, 0.03):
        m.observe_inter_token("llama", gap)
    m.observe_inter_token("gpt2", 0.5)
    m.observe_queue_wait("llama", 2.0)
    m.observe_queue_wait("nope", 1.0)
    s = scrape(m)

    itl = "appliance_inter_token_latency_seconds"
    assert value(s, f"{itl}_count", model="llama") == 3
    assert value(s, f"{itl}_sum", model="llama") == pytest.approx(0.06)
    assert value(s, f"{itl}_bucket", model="llama", le="0.02") == 2
    assert value(s, f"{itl}_count", model="gpt2") == 1
    assert value(s, "appliance_queue_wait_seconds_count", model="llama") == 1
    assert value(s, "appliance_queue_wait_seconds_sum", model="llama") == 2.0
    assert value(s, "appliance_queue_wait_seconds_count", model="") == 1


# -- lifecycle ---------------------------------------------------------------------------


def transition(model: str, old: ModelState, new: ModelState) -> Transition:
    return Transition(model=model, old=old, new=new, reason="test", at=0.0, seconds_in_old=1.0)


def test_lifecycle_events_are_counted(make_metrics: Any) -> None:
    m = make_metrics()
    S = ModelState
    m.on_transition(transition("llama", S.UNLOADED, S.LOADING))
    m.on_transition(transition("llama", S.LOADING, S.READY))
    m.on_transition(transition("llama", S.READY, S.FAILED))
    m.on_transition(transition("llama", S.FAILED, S.LOADING))
    m.on_transition(transition("llama", S.LOADING, S.READY))
    m.on_load("llama", 12.0)
    m.on_load("llama", 3.0)
    m.on_restart("llama")
    m.on_eviction("gpt2")
    m.on_eviction("gpt2")
    s = scrape(m)

    moves = "appliance_model_state_transitions_total"
    assert value(s, moves, model="llama", from_state="loading", to_state="ready") == 2
    assert value(s, moves, model="llama", from_state="ready", to_state="failed") == 1
    assert len(names_of(s, moves)) == 4
    load = "appliance_model_load_duration_seconds"
    assert value(s, f"{load}_count", model="llama") == 2
    assert value(s, f"{load}_sum", model="llama") == 15.0
    assert value(s, f"{load}_bucket", model="llama", le="5.0") == 1
    assert value(s, f"{load}_bucket", model="llama", le="1800.0") == 2
    assert value(s, "appliance_engine_restarts_total", model="llama") == 1
    assert value(s, "appliance_evictions_total", model="gpt2") == 2


# -- scrape-time values ------------------------------------------------------------------


def test_model_state_is_one_hot_and_engines_are_read_at_scrape(make_metrics: Any) -> None:
    llama = FakeHandle(
        "llama",
        ModelState.READY,
        in_flight=3,
        engine=FakeEngine(snapshot=EngineStats(running=2, waiting=1, kv_cache_usage=0.25)),
    )
    gpt2 = FakeHandle("gpt2", ModelState.UNLOADED)
    m = make_metrics(supervisor=FakeSupervisor([llama, gpt2]))
    s = scrape(m)

    assert value(s, "appliance_requests_in_flight", model="llama") == 3
    assert value(s, "appliance_requests_in_flight", model="gpt2") == 0
    assert len(names_of(s, "appliance_model_state")) == 2 * len(ModelState)
    for handle in (llama, gpt2):
        for state in ModelState:
            want = 1.0 if state is handle.state else 0.0
            got = value(s, "appliance_model_state", model=handle.name, state=state.value)
            assert got == want, (handle.name, state)
    assert value(s, "appliance_engine_running_requests", model="llama") == 2
    assert value(s, "appliance_engine_waiting_requests", model="llama") == 1
    assert value(s, "appliance_engine_kv_cache_usage_ratio", model="llama") == 0.25
    assert names_of(s, "appliance_engine_running_requests") == [{"model": "llama"}]

    # Nothing is cached between scrapes: the next one sees the change.
    llama.in_flight = 0
    llama.engine = None
    gpt2.state = ModelState.LOADING
    s = scrape(m)
    assert value(s, "appliance_requests_in_flight", model="llama") == 0
    assert value(s, "appliance_model_state", model="gpt2", state="loading") == 1
    assert value(s, "appliance_model_state", model="gpt2", state="unloaded") == 0
    assert names_of(s, "appliance_engine_running_requests") == []


def test_engine_stats_gaps_do_not_break_the_scrape(make_metrics: Any) -> None:
    no_kv = FakeHandle(
        "llama", ModelState.READY, engine=FakeEngine(snapshot=EngineStats(running=1))
    )
    dying = FakeHandle("gpt2", ModelState.READY, engine=FakeEngine(snapshot=None))
    s = scrape(make_metrics(supervisor=FakeSupervisor([no_kv, dying])))
    assert names_of(s, "appliance_engine_kv_cache_usage_ratio") == []
    assert names_of(s, "appliance_engine_running_requests") == [{"model": "llama"}]
    assert value(s, "appliance_model_state", model="gpt2", state="ready") == 1


def test_registry_and_catalogue_source(make_metrics: Any) -> None:
    status: dict[str, Any] = {"up": False, "source": "registry_cache"}
    m = make_metrics(registry_status=lambda: status)
    s = scrape(m)
    assert value(s, "appliance_registry_up") == 0
    sources = {
        d["source"]: value(s, "appliance_catalogue_source", **d)
        for d in names_of(s, "appliance_catalogue_source")
    }
    assert sources == {"file": 0, "registry": 0, "registry_cache": 1}

    status.update(up=True, source=CatalogueSource.REGISTRY)
    s = scrape(m)
    assert value(s, "appliance_registry_up") == 1
    assert value(s, "appliance_catalogue_source", source="registry") == 1
    assert value(s, "appliance_catalogue_source", source="registry_cache") == 0


def test_without_registry_status_source_comes_from_the_catalogue(make_metrics: Any) -> None:
    s = scrape(make_metrics(cat=catalogue("llama", origin=CatalogueSource.FILE)))
    assert names_of(s, "appliance_registry_up") == []
    assert value(s, "appliance_catalogue_source", source="file") == 1
    assert value(s, "appliance_catalogue_source", source="registry") == 0


def test_remote_backends_gpus_and_build_info(make_metrics: Any) -> None:
    gpus = [GpuMemory(0, "GPU-a", 10.0, 80.0), GpuMemory(1, "GPU-b", 0.5, 80.0)]
    m = make_metrics(remote_status=lambda: {"far": True, "farther": False}, gpus=gpus)
    s = scrape(m)
    assert value(s, "appliance_remote_backend_up", model="far") == 1
    assert value(s, "appliance_remote_backend_up", model="farther") == 0
    assert value(s, "appliance_gpu_memory_used_bytes", gpu="gpu0") == 10 * GIB
    assert value(s, "appliance_gpu_memory_total_bytes", gpu="gpu1") == 80 * GIB
    assert value(s, "appliance_gpu_memory_used_bytes", gpu="gpu1") == 0.5 * GIB
    assert value(s, "appliance_build_info", version=__version__) == 1


def test_cpu_host_exports_no_gpu_series(make_metrics: Any) -> None:
    s = scrape(make_metrics(gpus=[]))
    assert names_of(s, "appliance_gpu_memory_used_bytes") == []
    assert names_of(s, "appliance_remote_backend_up") == []


def test_bind_attaches_supervisor_and_catalogue_later() -> None:
    m = Metrics(gpu_memory=list)
    m.bind(
        supervisor=FakeSupervisor([FakeHandle("llama", ModelState.READY)]),  # type: ignore[arg-type]
        catalogue=catalogue("llama"),
    )
    m.on_request_done(request("llama"), 200, 0.1)
    s = scrape(m)
    assert value(s, "appliance_model_state", model="llama", state="ready") == 1
    assert (
        value(
            s, "appliance_requests_total", model="llama", endpoint="chat/completions", status="200"
        )
        == 1
    )


def test_each_metrics_has_its_own_registry(make_metrics: Any) -> None:
    a, b = make_metrics(), make_metrics()
    a.on_restart("llama")
    assert names_of(scrape(b), "appliance_engine_restarts_total") == []


def test_metrics_route_serves_prometheus_text(make_metrics: Any) -> None:
    m = make_metrics()
    m.on_eviction("llama")
    app = FastAPI()
    app.include_router(build_metrics_router(m))
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert 'appliance_evictions_total{model="llama"} 1.0' in response.text


# -- the Grafana dashboard ---------------------------------------------------------------


def every_sample_name(make_metrics: Any) -> set[str]:
    """The names of every series a fully fed Metrics exports."""
    handle = FakeHandle(
        "llama", ModelState.READY, engine=FakeEngine(snapshot=EngineStats(1, 1, kv_cache_usage=0.5))
    )
    m = make_metrics(
        supervisor=FakeSupervisor([handle]),
        registry_status=lambda: {"up": True, "source": "registry"},
        remote_status=lambda: {"far": True},
        gpus=[GpuMemory(0, None, 1.0, 2.0)],
    )
    m.on_request_done(request("llama", stream=True, ttft=0.1, usage=Usage(1, 1)), 200, 1.0)
    m.observe_inter_token("llama", 0.01)
    m.observe_queue_wait("llama", 0.1)
    m.on_transition(transition("llama", ModelState.LOADING, ModelState.READY))
    m.on_load("llama", 1.0)
    m.on_restart("llama")
    m.on_eviction("llama")
    return {name for (name, _) in scrape(m)}


def expressions(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and variable queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("expr", "definition") and isinstance(item, str):
                found.append(item)
            elif key == "query" and isinstance(item, (str, dict)):
                found.extend([item] if isinstance(item, str) else expressions(item))
            else:
                found.extend(expressions(item))
    elif isinstance(node, list):
        for item in node:
            found.extend(expressions(item))
    return found


def test_dashboard_uses_only_exported_metric_names(make_metrics: Any) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    exprs = [e for e in expressions(dashboard) if "appliance_" in e]
    assert len(exprs) > 20
    used = {name for e in exprs for name in re.findall(r"\bappliance_[a-z0-9_]+", e)}
    exported = every_sample_name(make_metrics)
    assert used - exported == set()
    # Every panel that queries data names the datasource variable.
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_covers_the_promised_panels() -> None:
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for words in (
        "requests/s",
        "latency p50 / p99",
        "first token",
        "inter-token",
        "tokens/s",
        "in flight",
        "model states",
        "kv cache",
        "load duration",
        "restarts",
        "gpu memory",
    ):
        assert words in titles, words


def test_no_created_series(make_metrics: Callable[..., Metrics]) -> None:
    """Counters and histograms come without their ``_created`` twins (issue 15)."""
    metrics = make_metrics()
    metrics.on_request_done(request("llama", usage=Usage(3, 4)), 200, 0.2)
    metrics.on_load("llama", 12.0)
    body, _ = metrics.render()
    text = body.decode()
    assert "appliance_requests_total{" in text
    assert "appliance_model_load_duration_seconds_count{" in text
    assert "_created" not in text
