"""Issue 5: metrics that count exactly, API keys, fuzzing, a bounded soak, client disconnects.
Issue 25 (part A): what one key can do to another: fan-out, grammar bombs, stored responses.

One appliance with API keys, serving one tiny model; tests take metric deltas, so they
need no appliance of their own. The Responses API store is on, as an operator who uses
stored responses runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import BadRequestError, NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import ApplianceProcess, tiny_chat, wait_until

pytestmark = pytest.mark.integration

USER = "sk-user-0123456789abcdef0123456789"
ADMIN = "sk-admin-0123456789abcdef0123456789"
LIMITED = "sk-limited-0123456789abcdef0123456789"
# key B: a user key like USER's, trying its neighbour's
OUTSIDER = "sk-outsider-0123456789abcdef0123456789"
METERED = "sk-metered-0123456789abcdef0123456789"
QUOTA = "sk-quota-0123456789abcdef0123456789"
QUOTA_TOKENS = 100
MODEL = "tiny-chat"
JSON = {"Content-Type": "application/json"}  # POST bodies must say so (issue 13)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """tiny-chat behind API keys: a user, an admin, and a limited key."""
    workdir = tmp_path_factory.mktemp("hardening")
    keys = workdir / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "public": ["health", "metrics"],
                "keys": [
                    {"name": "user", "key": USER},
                    {"name": "ops", "key": ADMIN, "role": "admin"},
                    {
                        "name": "limited",
                        "key": LIMITED,
                        "models": ["other-model"],
                        "requests_per_minute": 3,
                    },
                    {"name": "outsider", "key": OUTSIDER},
                    {"name": "metered", "key": METERED, "requests_per_minute": 10},
                    {"name": "quota", "key": QUOTA},
                ],
            }
        )
    )
    keys.chmod(0o600)
    quotas = workdir / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"quotas": {"quota": {"tokens_per_day": QUOTA_TOKENS}}}))
    # A longer context than the other tests, so that a stream can outlast a disconnect check.
    proc = _StoringAppliance(
        workdir, [tiny_chat(MODEL, engine={"max_model_len": 2048, "dtype": "float32"})]
    )
    proc.start(
        "--api-keys", str(keys), "--quotas", str(quotas), "--engine-metrics", "--workers", "2"
    )
    yield proc
    proc.stop()


class _StoringAppliance(ApplianceProcess):
    """An appliance whose engines keep Responses API results (vLLM's store on)."""

    def env(self) -> dict[str, str]:
        """The usual environment, with the Responses API store on."""
        return {**super().env(), "VLLM_ENABLE_RESPONSES_API_STORE": "1"}


def auth(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def scrape(appliance: ApplianceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels); parsed by prometheus-client."""
    text = httpx.get(f"{appliance.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def engine_running(appliance: ApplianceProcess) -> int:
    """The engine's own count of unfinished requests."""
    body = httpx.get(f"{appliance.url}/admin/models", headers=auth(ADMIN), timeout=10).json()
    return int(next(m for m in body["data"] if m["name"] == MODEL)["engine_running"])


def test_keys(appliance: ApplianceProcess) -> None:
    url = appliance.url
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    chat = f"{url}/v1/chat/completions"
    none = httpx.post(chat, json=body, timeout=30)
    assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(chat, json=body, headers=auth("sk-wrong-000000000"), timeout=30)
    assert wrong.status_code == 401
    assert httpx.post(chat, json=body, headers=auth(USER), timeout=30).status_code == 200
    assert httpx.post(chat, json=body, headers=auth(ADMIN), timeout=30).status_code == 200
    user_admin = httpx.get(f"{url}/admin/models", headers=auth(USER), timeout=10)
    assert user_admin.status_code == 403
    assert httpx.get(f"{url}/admin/models", headers=auth(ADMIN), timeout=10).status_code == 200
    disallowed = httpx.post(chat, json=body, headers=auth(LIMITED), timeout=30)
    assert disallowed.status_code == 403
    assert disallowed.json()["error"]["code"] == "model_not_allowed"
    # The limited key may make 3 requests a minute (the 403 above was one of them).
    statuses = [
        httpx.post(chat, json=body, headers=auth(LIMITED), timeout=30).status_code for _ in range(3)
    ]
    assert statuses == [403, 403, 429]
    limited = httpx.post(chat, json=body, headers=auth(LIMITED), timeout=30)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    # Public routes need no key; the CLI passes the admin key.
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert httpx.get(f"{url}/docs").status_code == 401
    # Keys never reach the log.
    log = appliance.log_path.read_text()
    assert USER not in log and ADMIN not in log and LIMITED not in log
    assert '"key": "limited"' in log


def test_metrics_count_exactly(appliance: ApplianceProcess) -> None:
    client = OpenAI(base_url=f"{appliance.url}/v1", api_key=USER, max_retries=0)
    before = scrape(appliance)
    for _ in range(3):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "count me"}],
            max_tokens=5,
            extra_body={"ignore_eos": True},
        )
    stream = client.completions.create(
        model=MODEL,
        prompt="count me",
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert list(stream)
    missing = httpx.post(
        f"{appliance.url}/v1/chat/completions",
        json={"model": "absent", "messages": []},
        headers=auth(USER),
        timeout=30,
    )
    assert missing.status_code == 404
    # The access line (and metrics) are written after the last byte: wait for the last two.
    last_two = (
        {"model": "", "endpoint": "chat/completions", "status": "404"},
        {"model": MODEL, "endpoint": "completions", "status": "200"},
    )

    def counted() -> bool:
        now = scrape(appliance)
        return all(
            value(now, "appliance_requests_total", **labels)
            > value(before, "appliance_requests_total", **labels)
            for labels in last_two
        )

    wait_until(counted, "the stream and the 404 are counted", timeout=10)
    after = scrape(appliance)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat = {"model": MODEL, "endpoint": "chat/completions"}
    assert delta("appliance_requests_total", status="200", **chat) == 3
    assert delta("appliance_requests_total", model=MODEL, endpoint="completions", status="200") == 1
    assert (
        delta("appliance_requests_total", model="", endpoint="chat/completions", status="404") == 1
    )
    assert delta("appliance_request_duration_seconds_count", **chat) == 3
    assert delta("appliance_generation_tokens_total", model=MODEL) == 3 * 5 + 7
    assert delta("appliance_time_to_first_token_seconds_count", model=MODEL) == 1
    assert delta("appliance_inter_token_latency_seconds_count", model=MODEL) >= 1
    assert value(after, "appliance_model_state", model=MODEL, state="ready") == 1
    assert value(after, "appliance_model_state", model=MODEL, state="failed") == 0
    assert value(after, "appliance_requests_in_flight", model=MODEL) == 0
    assert value(after, "appliance_catalogue_source", source="file") == 1
    assert value(after, "appliance_model_load_duration_seconds_count", model=MODEL) == 1


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
MESSAGES = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                "content": st.one_of(st.text(max_size=40), JSON_VALUES),
            }
        ),
        max_size=3,
    ),
    JSON_VALUES,
)
FIELDS = {
    "max_tokens": st.one_of(st.integers(-5, 8), JSON_SCALARS),
    "temperature": st.one_of(st.floats(-2, 3, allow_nan=False), JSON_SCALARS),
    "top_p": st.one_of(st.floats(-1, 2, allow_nan=False), JSON_SCALARS),
    "n": st.one_of(st.integers(-1, 3), JSON_SCALARS),
    "stop": JSON_VALUES,
    "logprobs": JSON_VALUES,
    "stream": st.booleans(),
    "seed": JSON_SCALARS,
    "unknown_field": JSON_VALUES,
}


def bodies(content_key: str, content: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Request bodies: mostly well-formed around the real model, with wrong pieces mixed in."""
    base = st.fixed_dictionaries(
        {"model": st.sampled_from([MODEL, MODEL, MODEL, "nope", ""]), content_key: content},
        optional=FIELDS,
    )
    return st.one_of(base, base, base, JSON_VALUES)


def test_engine_metrics_expose_vllms_figures(appliance: ApplianceProcess) -> None:
    """--engine-metrics: vLLM's own per-step figures, labelled by model, on /metrics."""
    client = OpenAI(base_url=f"{appliance.url}/v1", api_key=USER, max_retries=0)
    before = scrape(appliance)
    # The same long prompt four times: the later ones find its blocks in the prefix cache.
    prompt = "the same words every time, long enough to fill a few cache blocks. " * 12
    for _ in range(4):
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=3, extra_body={"ignore_eos": True}
        )

    def delta(samples: dict[Any, float], name: str, **labels: str) -> float:
        return value(samples, name, model=MODEL, **labels) - value(
            before, name, model=MODEL, **labels
        )

    after: dict[Any, float] = {}

    def counted() -> bool:
        after.update(scrape(appliance))
        return delta(after, "appliance_vllm_request_queue_time_seconds_count") >= 4

    # vLLM hands the finished requests' stats to its loggers on the step after the last token.
    wait_until(counted, "vLLM's figures for the four requests on /metrics")
    assert delta(after, "appliance_vllm_request_queue_time_seconds_count") == 4
    assert delta(after, "appliance_vllm_request_prefill_time_seconds_count") == 4
    assert delta(after, "appliance_vllm_request_decode_time_seconds_count") == 4
    assert delta(after, "appliance_vllm_request_success_total", finished_reason="length") == 4
    queried = delta(after, "appliance_vllm_prefix_cache_queries_total")
    hits = delta(after, "appliance_vllm_prefix_cache_hits_total")
    assert queried >= 4 * 100  # every prompt token is looked up (about 160 per prompt)
    assert 0 < hits < queried  # the first prompt misses, the three after it hit
    assert delta(after, "appliance_vllm_prompt_tokens_cached_total") == hits
    labelled = {dict(labels).get("model") for name, labels in after if "_vllm_" in name}
    assert labelled == {MODEL}


TEXTS = st.one_of(st.text(max_size=60), JSON_VALUES)
# vLLM's other routes (issue 11): fewer examples each, to keep CI time; each caps its output.
VLLM_ROUTE_CASES = [
    ("/v1/responses", "input", st.one_of(TEXTS, MESSAGES), 60),
    ("/v1/messages", "messages", MESSAGES, 60),
    ("/v1/messages/count_tokens", "messages", MESSAGES, 40),
    ("/tokenize", "prompt", TEXTS, 40),
    (
        "/detokenize",
        "tokens",
        st.one_of(st.lists(st.integers(-5, 400), max_size=5), JSON_VALUES),
        40,
    ),
    ("/rerank", "query", TEXTS, 20),
]


@pytest.mark.parametrize(
    ("path", "content_key", "content", "examples"),
    [
        ("/v1/chat/completions", "messages", MESSAGES, 200),
        ("/v1/completions", "prompt", TEXTS, 200),
        ("/v1/embeddings", "input", TEXTS, 200),
        *VLLM_ROUTE_CASES,
    ],
)
def test_fuzz_never_5xx(
    appliance: ApplianceProcess,
    path: str,
    content_key: str,
    content: st.SearchStrategy[Any],
    examples: int,
) -> None:
    http = httpx.Client(base_url=appliance.url, headers=auth(USER), timeout=60)

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(body=bodies(content_key, content))
    def check(body: Any) -> None:
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = min(body["max_tokens"], 8)  # keep each case fast
        if isinstance(body, dict) and path == "/v1/responses":
            body["max_output_tokens"] = 4  # else it generates up to the context length
        response = http.post(path, content=json.dumps(body), headers=JSON)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert "message" in response.json()["error"]

    check()
    assert httpx.get(f"{appliance.url}/health").status_code == 200
    assert engine_running(appliance) == 0


def test_disconnect_aborts_in_the_engine(appliance: ApplianceProcess) -> None:
    body = {
        "model": MODEL,
        "prompt": "a very long answer",
        "max_tokens": 2000,  # seconds of work for the tiny model: longer than the checks below
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{appliance.url}/v1/completions", json=body, headers=auth(USER), timeout=60
    ) as response:
        # Read by hand: leaving a `for` over iter_lines() closes the connection at once.
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert engine_running(appliance) == 1
        response.close()  # the client goes away mid-stream
    wait_until(lambda: engine_running(appliance) == 0, "the request is aborted", timeout=1.0)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_bounded_soak(appliance: ApplianceProcess) -> None:
    """2,000 mixed requests at concurrency 64: good ones right, bad ones 4xx, nothing hangs."""
    total, concurrency = int(os.environ.get("SOAK_REQUESTS", "2000")), 64
    rng = random.Random(7)
    plan = [
        rng.choice(["good", "good", "stream", "stream", "drop", "bad", "unknown"])
        for _ in range(total)
    ]
    outcomes: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, kind: str) -> str:
        tokens = rng.randint(1, 6)
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": f"soak {rng.random()}",
            "max_tokens": tokens,
            "ignore_eos": True,
        }
        if kind == "good":
            r = await client.post("/v1/completions", json=body)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens
            return "ok" if ok else f"bad-good:{r.status_code}"
        if kind in ("stream", "drop"):
            body.update(
                stream=True,
                max_tokens=tokens + (40 if kind == "drop" else 0),
                stream_options={"include_usage": True},
            )
            events: list[str] = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return f"bad-stream:{r.status_code}"
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: ") :])
                        if kind == "drop" and len(events) == 2:
                            return "ok"  # leave mid-stream
            # Count tokens by the usage event: vLLM may put several tokens in one event.
            done = events[-1:] == ["[DONE]"] and len(events) >= 3
            usage = json.loads(events[-2]).get("usage") if done else None
            ok = usage is not None and usage["completion_tokens"] == tokens
            return "ok" if ok else f"bad-stream:{events[-2:]}"
        if kind == "bad":
            r = await client.post(
                "/v1/completions", content=b'{"model": "tiny-chat", "prompt": ', headers=JSON
            )
            return "ok" if r.status_code == 400 else f"bad-bad:{r.status_code}"
        r = await client.post("/v1/completions", json={**body, "model": "missing"})
        return "ok" if r.status_code == 404 else f"bad-unknown:{r.status_code}"

    async def run() -> None:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=appliance.url, headers=auth(USER), timeout=60, limits=limits
        ) as client:
            gate = asyncio.Semaphore(concurrency)

            async def bounded(kind: str) -> None:
                async with gate:
                    result = await asyncio.wait_for(one(client, kind), 120)
                    outcomes[result] = outcomes.get(result, 0) + 1

            await asyncio.gather(*(bounded(k) for k in plan))

    assert appliance.proc is not None
    asyncio.run(run())  # warm-up round: allocator pools, caches
    rss_before = _rss_kib(appliance.proc.pid)
    outcomes.clear()
    started = time.monotonic()
    asyncio.run(run())
    took = time.monotonic() - started
    assert outcomes == {"ok": total}, outcomes
    wait_until(lambda: engine_running(appliance) == 0, "the engine is idle", timeout=5)
    rss_after = _rss_kib(appliance.proc.pid)
    assert rss_after < rss_before * 1.10 + 20_000, (rss_before, rss_after)
    print(f"soak: {total} requests in {took:.1f}s; RSS {rss_before} -> {rss_after} KiB")


@pytest.mark.parametrize("action", ["load", "unload", "sleep", "wake", "status"])
def test_fuzz_admin_routes_never_5xx(appliance: ApplianceProcess, action: str) -> None:
    """Model names from anywhere (slashes, unicode, dots, long) against the admin API."""
    http = httpx.Client(base_url=appliance.url, headers=auth(ADMIN), timeout=60)
    method = "GET" if action == "status" else "POST"

    names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80).filter(
        lambda n: n not in (MODEL, ".", "..")
    )

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(name=names)
    def check(name: str) -> None:
        response = http.request(method, f"/admin/models/{quote(name, safe='')}/{action}")
        assert response.status_code < 500, (name, response.text)
        assert response.status_code in (400, 404, 405, 501), (name, response.status_code)
        if response.headers.get("content-type", "").startswith("application/json"):
            assert response.json()["error"]["message"]

    check()
    assert httpx.get(f"{appliance.url}/health").status_code == 200


def test_keys_limits_and_metrics_cover_vllms_other_routes(appliance: ApplianceProcess) -> None:
    url = appliance.url
    tokenize = {"model": MODEL, "prompt": "count me"}
    responses = {"model": MODEL, "input": "hi", "max_output_tokens": 3}
    for method, path, body in (
        ("POST", "/tokenize", tokenize),
        ("POST", "/v1/responses", responses),
        ("GET", "/v1/responses/resp_0", None),
        ("POST", "/v2/rerank", {"model": MODEL, "query": "a", "documents": ["b"]}),
    ):
        none = httpx.request(method, f"{url}{path}", json=body, timeout=30)
        assert none.status_code == 401, (path, none.text)
    limited = httpx.post(f"{url}/tokenize", json=tokenize, headers=auth(LIMITED), timeout=30)
    assert limited.status_code in (403, 429)  # not its model; or over its rate by now
    if limited.status_code == 403:
        assert limited.json()["error"]["code"] == "model_not_allowed"
    before = scrape(appliance)
    for _ in range(2):
        ok = httpx.post(f"{url}/tokenize", json=tokenize, headers=auth(USER), timeout=30)
        assert ok.status_code == 200 and ok.headers["x-request-id"]
    answer = httpx.post(f"{url}/v1/responses", json=responses, headers=auth(USER), timeout=60)
    assert answer.status_code == 200, answer.text

    def counted() -> bool:
        after = scrape(appliance)
        tokenized = value(
            after, "appliance_requests_total", model=MODEL, endpoint="tokenize", status="200"
        ) - value(
            before, "appliance_requests_total", model=MODEL, endpoint="tokenize", status="200"
        )
        responded = value(
            after, "appliance_requests_total", model=MODEL, endpoint="responses", status="200"
        ) - value(
            before, "appliance_requests_total", model=MODEL, endpoint="responses", status="200"
        )
        return tokenized == 2 and responded == 1

    wait_until(counted, "the /tokenize and /v1/responses requests counted by endpoint", 10)
    log = appliance.log_path.read_text()
    assert '"path": "/tokenize"' in log and '"key": "user"' in log


# -- issue 25 (part A): keys against each other -----------------------------------------------

GRAMMAR_BOMB = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "pattern": "(a{1,64}){1,64}"} for i in range(32)},
}


def test_one_request_cannot_fan_out_past_the_limits(appliance: ApplianceProcess) -> None:
    url = appliance.url
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    wide = httpx.post(
        f"{url}/v1/completions", json={**completion, "n": 1024}, headers=auth(OUTSIDER), timeout=30
    )
    assert wide.status_code == 400 and wide.json()["error"]["param"] == "n"
    assert "fan_out.max_n" in wide.json()["error"]["message"]
    batch = {
        "model": MODEL,
        "messages": [[{"role": "user", "content": "x"}]] * 1024,
        "max_tokens": 1,
    }
    many = httpx.post(
        f"{url}/v1/chat/completions/batch", json=batch, headers=auth(OUTSIDER), timeout=30
    )
    assert many.status_code == 400 and many.json()["error"]["param"] == "messages"
    # Each sequence counts against the key's requests per minute (10 for this key).
    metered = [
        httpx.post(
            f"{url}/v1/completions", json={**completion, "n": n}, headers=auth(METERED), timeout=60
        )
        for n in (16, 8, 4)
    ]
    assert [r.status_code for r in metered] == [400, 200, 429], [r.text for r in metered]
    assert len(metered[1].json()["choices"]) == 8
    # The quota is checked against n x max_tokens before the request runs.
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    whole = httpx.post(
        f"{url}/v1/chat/completions",
        json={**chat, "n": 4, "max_tokens": 50},
        headers=auth(QUOTA),
        timeout=60,
    )
    assert whole.status_code == 400 and whole.json()["error"]["param"] == "max_tokens"
    served = httpx.post(
        f"{url}/v1/chat/completions",
        json={**chat, "n": 2, "max_tokens": 40},
        headers=auth(QUOTA),
        timeout=60,
    )
    assert served.status_code == 200, served.text

    def counted() -> bool:
        usage = httpx.get(
            f"{url}/admin/usage", params={"key": "quota"}, headers=auth(ADMIN), timeout=30
        ).json()["data"]
        return sum(row["completion_tokens"] for row in usage) >= 80

    wait_until(counted, "the quota key's 80 tokens counted", 20)
    over = httpx.post(
        f"{url}/v1/chat/completions",
        json={**chat, "max_tokens": 20},
        headers=auth(QUOTA),
        timeout=60,
    )
    assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"
    # Everyone else is still served, n included.
    ok = httpx.post(
        f"{url}/v1/completions", json={**completion, "n": 2}, headers=auth(USER), timeout=60
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_a_grammar_bomb_never_reaches_the_engine(appliance: ApplianceProcess) -> None:
    outsider = OpenAI(base_url=f"{appliance.url}/v1", api_key=OUTSIDER, max_retries=0)
    schema = {"name": "bomb", "schema": GRAMMAR_BOMB}
    started = time.monotonic()
    with pytest.raises(BadRequestError) as caught:
        outsider.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            response_format={"type": "json_schema", "json_schema": schema},
        )
    assert "max_regex_repeat" in str(caught.value) and time.monotonic() - started < 5
    for path, body in (
        (
            "/v1/responses",
            {
                "model": MODEL,
                "input": "hi",
                "text": {"format": {"type": "json_schema", **schema}},
            },
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "hi", "structured_outputs": {"regex": "(a{1,64}){1,64}"}},
        ),
    ):
        refused = httpx.post(f"{appliance.url}{path}", json=body, headers=auth(OUTSIDER))
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"]
    # An ordinary schema is served, to the same key and to others.
    ordinary = {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}},
        },
    }
    for key in (OUTSIDER, USER):
        client = OpenAI(base_url=f"{appliance.url}/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            response_format={"type": "json_schema", "json_schema": ordinary},
        )
        assert answer.choices[0].message is not None


def test_stored_responses_belong_to_the_key_that_made_them(appliance: ApplianceProcess) -> None:
    url = appliance.url
    owner = OpenAI(base_url=f"{url}/v1", api_key=USER, max_retries=0)
    made = owner.responses.create(
        model=MODEL, input="hello", max_output_tokens=3, extra_body={"request_id": "resp_mine"}
    )
    rid = made.id
    assert rid != "resp_mine"  # the appliance names stored responses itself
    # Readable by its key whichever worker takes the connection (a new one each time).
    for _ in range(6):
        got = httpx.get(f"{url}/v1/responses/{rid}", headers=auth(USER), timeout=30)
        assert got.status_code == 200 and got.json()["id"] == rid, got.text
    text = got.json()["output"]
    # Key B: not found, as for an id that does not exist; nothing it sends changes A's.
    for method, path in (("GET", f"/v1/responses/{rid}"), ("POST", f"/v1/responses/{rid}/cancel")):
        theirs = httpx.request(method, f"{url}{path}", headers=auth(OUTSIDER), timeout=30)
        assert theirs.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"]["message"] == f"Response with id '{rid}' not found."
    outsider = OpenAI(base_url=f"{url}/v1", api_key=OUTSIDER, max_retries=0)
    with pytest.raises(NotFoundError):
        outsider.responses.create(
            model=MODEL, input="go on", max_output_tokens=3, previous_response_id=rid
        )
    planted = outsider.responses.create(
        model=MODEL, input="planted", max_output_tokens=3, extra_body={"request_id": rid}
    )
    assert planted.id != rid
    again = httpx.get(f"{url}/v1/responses/{rid}", headers=auth(USER), timeout=30)
    assert again.status_code == 200 and again.json()["output"] == text
    # Key A continues its own conversation; B's own response is B's.
    follow = owner.responses.create(
        model=MODEL, input="go on", max_output_tokens=3, previous_response_id=rid
    )
    assert follow.id not in (rid, planted.id)
    assert httpx.get(f"{url}/v1/responses/{planted.id}", headers=auth(OUTSIDER)).status_code == 200
    assert httpx.get(f"{url}/v1/responses/{planted.id}", headers=auth(USER)).status_code == 404
