"""Issue 16: several HTTP workers, each a client of every engine; one set of limits and counts.

One appliance with ``--workers 2``: the owner (worker 0) and one worker process share the
port. Every answer names the process that took it (``X-Appliance-Worker``); each request goes
on a new connection, so the kernel hands them to both. The serving, lifecycle, hardening and
federation suites run with two workers too; this module shows what only workers can break:
a load asked from both at once, key limits and counts that must hold across processes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import ApplianceProcess, tiny_chat, wait_until

pytestmark = pytest.mark.integration

USER = "sk-user-0123456789abcdef0123456789"
ADMIN = "sk-admin-0123456789abcdef0123456789"
PACED = "sk-paced-0123456789abcdef0123456789"
SINGLE = "sk-single-0123456789abcdef0123456789"
PER_MINUTE = 6
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """tiny-chat loaded, ``lazy`` loaded on demand; keys with a rate and a concurrency limit."""
    workdir = tmp_path_factory.mktemp("workers")
    keys = workdir / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "public": ["health", "metrics"],
                "keys": [
                    {"name": "user", "key": USER},
                    {"name": "ops", "key": ADMIN, "role": "admin"},
                    {"name": "paced", "key": PACED, "requests_per_minute": PER_MINUTE},
                    {"name": "single", "key": SINGLE, "max_concurrent": 1},
                ],
            }
        )
    )
    keys.chmod(0o600)
    proc = ApplianceProcess(
        workdir,
        [
            tiny_chat("tiny-chat"),
            tiny_chat("lazy", autoload=False, load_on_demand=True),
        ],
    )
    proc.start("--api-keys", str(keys), "--workers", "2", "--load-wait", "300")
    yield proc
    proc.stop()


def post(appliance: ApplianceProcess, key: str, model: str = "tiny-chat", **extra: Any) -> Any:
    """One chat request on a connection of its own (so either worker may take it)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(extra)
    with httpx.Client(timeout=300) as client:
        return client.post(
            f"{appliance.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}", **JSON},
        )


def worker_of(response: httpx.Response) -> str:
    """Which HTTP process answered."""
    return response.headers["x-appliance-worker"]


def scrape(appliance: ApplianceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = httpx.get(f"{appliance.url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def title(pid: int) -> str:
    """A process's command line as ``ps`` shows it (setproctitle pads it with empty args)."""
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return ""


def test_the_workers_are_processes_of_their_own(appliance: ApplianceProcess) -> None:
    assert appliance.proc is not None
    titles = [title(pid) for pid in appliance.descendants()]
    assert titles.count("appliance: http worker 1") == 1


def test_requests_for_one_model_are_answered_by_both_workers(appliance: ApplianceProcess) -> None:
    answered: set[str] = set()
    texts = set()

    def both_answered() -> bool:
        reply = post(appliance, USER, temperature=0, max_tokens=4)
        assert reply.status_code == 200, reply.text
        answered.add(worker_of(reply))
        texts.add(reply.json()["choices"][0]["message"]["content"])
        return answered == {"0", "1"}

    # Which process accepts a connection is the kernel's choice; both take some.
    wait_until(both_answered, "both workers answer", timeout=120)
    # Either worker's client of the same engine answers the same.
    assert len(texts) == 1


def test_a_load_asked_from_both_workers_at_once_happens_once(appliance: ApplianceProcess) -> None:
    before = scrape(appliance)
    replies: list[httpx.Response] = []
    lock = threading.Lock()

    def ask() -> None:
        reply = post(appliance, USER, model="lazy")
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in replies] == [200] * 12, [r.text for r in replies]
    assert {worker_of(r) for r in replies} == {"0", "1"}
    after = scrape(appliance)
    loads = value(
        after,
        "appliance_model_state_transitions_total",
        model="lazy",
        from_state="unloaded",
        to_state="loading",
    ) - value(
        before,
        "appliance_model_state_transitions_total",
        model="lazy",
        from_state="unloaded",
        to_state="loading",
    )
    assert loads == 1


def test_a_key_rate_limit_holds_across_workers(appliance: ApplianceProcess) -> None:
    statuses: list[int] = []
    workers: set[str] = set()
    # Until both workers have answered, and past the limit: the key's minute is one window
    # whichever process a request reached.
    while len(statuses) < PER_MINUTE + 3 or workers != {"0", "1"}:
        reply = post(appliance, PACED)
        statuses.append(reply.status_code)
        workers.add(worker_of(reply))
        assert len(statuses) < 60, statuses
    assert statuses[:PER_MINUTE] == [200] * PER_MINUTE
    assert set(statuses[PER_MINUTE:]) == {429}


def test_a_key_concurrency_limit_holds_across_workers(appliance: ApplianceProcess) -> None:
    started = threading.Event()
    done = threading.Event()

    def long_stream() -> None:
        body = {
            "model": "tiny-chat",
            "prompt": "once upon a time",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        with (
            httpx.Client(timeout=300) as client,
            client.stream(
                "POST",
                f"{appliance.url}/v1/completions",
                json=body,
                headers={"Authorization": f"Bearer {SINGLE}", **JSON},
            ) as stream,
        ):
            assert stream.status_code == 200
            for _ in stream.iter_lines():
                started.set()
        done.set()

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    try:
        assert started.wait(120)
        refused_by: set[str] = set()
        while refused_by != {"0", "1"} and not done.is_set():
            reply = post(appliance, SINGLE)
            if done.is_set():
                break
            assert reply.status_code == 429, reply.text
            refused_by.add(worker_of(reply))
        assert refused_by == {"0", "1"}, "the stream ended before both workers refused"
    finally:
        streamer.join()
    # Its one slot is free again once the stream is over.
    wait_until(lambda: post(appliance, SINGLE).status_code == 200, "the slot is given back")


def test_counts_are_exact_across_workers(appliance: ApplianceProcess) -> None:
    labels = {"model": "tiny-chat", "endpoint": "chat/completions", "status": "200"}
    before = scrape(appliance)
    usage_before = _usage(appliance, "user")
    for _ in range(10):
        reply = post(appliance, USER, max_tokens=3, ignore_eos=True)
        assert reply.status_code == 200
    # Read at once: a scrape first takes in what each worker counted.
    after = scrape(appliance)
    assert (
        value(after, "appliance_requests_total", **labels)
        - value(before, "appliance_requests_total", **labels)
        == 10
    )
    assert (
        value(after, "appliance_generation_tokens_total", model="tiny-chat")
        - value(before, "appliance_generation_tokens_total", model="tiny-chat")
        == 30
    )
    usage_after = _usage(appliance, "user")
    assert usage_after["requests"] - usage_before["requests"] == 10
    assert usage_after["completion_tokens"] - usage_before["completion_tokens"] == 30


def test_the_engine_gauges_follow_the_client_with_the_latest_step(
    appliance: ApplianceProcess,
) -> None:
    """vLLM gives each engine step's scheduler figures to one client (issue 26): a stream that
    only worker 1 serves still shows in the owner's /metrics, and so does its end."""
    kv = "appliance_engine_kv_cache_usage_ratio"
    seen: list[float] = []
    started = threading.Event()
    problems: list[str] = []

    def stream_on_worker_1() -> None:
        body = {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {USER}", **JSON}
        try:
            for _ in range(40):  # which process accepts a connection is the kernel's choice
                with (
                    httpx.Client(timeout=300) as client,
                    client.stream(
                        "POST", f"{appliance.url}/v1/chat/completions", json=body, headers=headers
                    ) as reply,
                ):
                    if worker_of(reply) != "1":
                        continue  # closed unread: the owner's client stops generating it
                    started.set()
                    for _line in reply.iter_lines():
                        pass
                    return
            problems.append("no stream landed on worker 1")
        finally:
            started.set()

    streamer = threading.Thread(target=stream_on_worker_1)
    streamer.start()
    started.wait(timeout=300)
    while streamer.is_alive():
        # Each scrape first has every worker send the latest figures its clients got.
        seen.append(value(scrape(appliance), kv, model="tiny-chat"))
    streamer.join()
    assert not problems, problems
    # Mid-stream, the owner's own client got no step's figures: only worker 1's show this.
    assert max(seen, default=0.0) > 0, seen

    # The stream's last step (its blocks freed) went to worker 1 too: the freshest wins.
    def at_rest() -> bool:
        now = scrape(appliance)
        waiting = value(now, "appliance_engine_waiting_requests", model="tiny-chat")
        return now.get((kv, (("model", "tiny-chat"),))) == 0.0 and waiting == 0

    wait_until(at_rest, "the gauges show the stream's end")


def _usage(appliance: ApplianceProcess, key: str) -> dict[str, int]:
    rows = httpx.get(
        f"{appliance.url}/admin/usage",
        params={"key": key},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    ).json()["data"]
    row = next((r for r in rows if r["model"] == "tiny-chat"), None)
    return row or {"requests": 0, "completion_tokens": 0}


def test_the_worker_stops_with_the_appliance(tmp_path_factory: pytest.TempPathFactory) -> None:
    proc = ApplianceProcess(tmp_path_factory.mktemp("workers-stop"), [])
    proc.start("--workers", "2")
    workers: set[int] = set()

    def worker_running() -> bool:
        workers.update(p for p in proc.descendants() if title(p) == "appliance: http worker 1")
        return len(workers) == 1

    wait_until(worker_running, "the worker process is up")
    assert proc.stop() == 0
    assert not any(psutil.pid_exists(pid) for pid in workers)
