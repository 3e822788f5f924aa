"""Issue 15: per-key usage and quotas, and the status page driven in headless Chromium.

One appliance for the module (one engine, tiny-chat; ``spare`` is in the catalogue but not
loaded), with keys (alice and bob: user; ops: admin) and a daily token quota for bob. The
tests run in file order: usage, quota, restart, then the page, which unloads tiny-chat last.

Token counts are exact by construction: prompts are lists of token ids, and ``ignore_eos``
makes every request generate exactly ``max_tokens``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.browser import Browser, find_chromium
from tests.integration.harness import REPO, ApplianceProcess, tiny_chat

pytestmark = pytest.mark.integration

KEYS = {
    "alice": "sk-alice-0123456789abcdef0123456789",
    "bob": "sk-bob-0123456789abcdef0123456789",
    "ops": "sk-ops-0123456789abcdef0123456789",
}
PROMPT = [11, 12, 13, 14, 15]  # five prompt tokens
BOB_QUOTA = 15  # two requests of 5 + 5 tokens pass (0 and 10 used before), the third is over
SCREENSHOTS = REPO / "test-artifacts" / "status-page"


class KeyedAppliance(ApplianceProcess):
    """The module's appliance, with its start options kept for the restart."""

    args: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedAppliance]:
    """tiny-chat autoloads; spare stays unloaded; keys on; /metrics public for the page."""
    workdir = tmp_path_factory.mktemp("status")
    keys = workdir / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "public": ["health", "metrics"],
                "keys": [
                    {"name": "alice", "key": KEYS["alice"], "role": "user"},
                    {"name": "bob", "key": KEYS["bob"], "role": "user"},
                    {"name": "ops", "key": KEYS["ops"], "role": "admin"},
                ],
            }
        )
    )
    keys.chmod(0o600)
    quotas = workdir / "quotas.yaml"
    quotas.write_text(yaml.safe_dump({"quotas": {"bob": {"tokens_per_day": BOB_QUOTA}}}))
    models = [tiny_chat("tiny-chat"), tiny_chat("spare", "gpt2", autoload=False)]
    proc = KeyedAppliance(workdir, models)
    proc.args = ("--api-keys", str(keys), "--quotas", str(quotas))
    proc.start(*proc.args)
    yield proc
    proc.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def complete(
    appliance: ApplianceProcess, key: str, max_tokens: int, **extra: Any
) -> httpx.Response:
    """A completion of PROMPT generating exactly ``max_tokens`` tokens."""
    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    body.update(extra)
    return httpx.post(f"{appliance.url}/v1/completions", json=body, headers=auth(key), timeout=120)


def chat(appliance: ApplianceProcess, key: str, max_tokens: int, **extra: Any) -> httpx.Response:
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    body.update(extra)
    return httpx.post(
        f"{appliance.url}/v1/chat/completions", json=body, headers=auth(key), timeout=120
    )


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an SSE answer."""
    found = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            found.append(json.loads(line[6:]))
    return found


def usage_of(appliance: ApplianceProcess, **params: str) -> dict[tuple[str, str], dict[str, int]]:
    """``GET /admin/usage`` as {(key, model): row}."""
    answer = httpx.get(
        f"{appliance.url}/admin/usage", params=params, headers=auth("ops"), timeout=30
    )
    assert answer.status_code == 200, answer.text
    return {(row["key"], row["model"]): row for row in answer.json()["data"]}


def key_series(appliance: ApplianceProcess) -> dict[tuple[str, str, str], float]:
    """The per-key counters of /metrics as {(name, key, model): value}."""
    # The per-key series are the operator's: an admin key (a user key sees none).
    admin = {"Authorization": f"Bearer {KEYS['ops']}"}
    text = httpx.get(f"{appliance.url}/metrics", headers=admin, timeout=30).text
    assert "_created" not in text
    assert "appliance_vllm_" not in text  # vLLM's engine figures only with --engine-metrics
    return {
        (s.name, s.labels["key"], s.labels["model"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("appliance_key_")
        for s in family.samples
    }


def test_usage_per_key_is_exact_after_a_mixed_run(appliance: ApplianceProcess) -> None:
    # Non-streamed: 5 prompt + 3 generated.
    plain = complete(appliance, "alice", 3)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["completion_tokens"] == 3
    # Streamed without asking for usage: counted all the same, and the client sees no usage.
    hidden = complete(appliance, "alice", 4, stream=True)
    assert hidden.status_code == 200
    assert all("usage" not in e or e["usage"] is None for e in events(hidden)), hidden.text
    assert hidden.text.rstrip().endswith("data: [DONE]")
    # Streamed asking for usage: the client gets it.
    asked = complete(appliance, "alice", 6, stream=True, stream_options={"include_usage": True})
    assert events(asked)[-1]["usage"]["completion_tokens"] == 6
    # A chat, streamed, prompt length learnt from the same chat unstreamed.
    chat_plain = chat(appliance, "alice", 2)
    chat_prompt = chat_plain.json()["usage"]["prompt_tokens"]
    chat_stream = chat(appliance, "alice", 5, stream=True)
    assert chat_stream.status_code == 200
    finishing = [
        e for e in events(chat_stream) if e["choices"] and e["choices"][0].get("finish_reason")
    ]
    assert finishing and not any(e.get("usage") for e in events(chat_stream))
    # Errors count as requests, never as tokens.
    bad = complete(appliance, "alice", -1)
    assert bad.status_code == 400
    # ops uses the model too; a request without a key is refused before any model is touched.
    assert complete(appliance, "ops", 2).status_code == 200
    anonymous = httpx.post(
        f"{appliance.url}/v1/completions",
        json={"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 1},
        timeout=30,
    )
    assert anonymous.status_code == 401

    rows = usage_of(appliance)
    alice = rows[("alice", "tiny-chat")]
    assert alice["requests"] == 6
    assert alice["errors"] == 1
    assert alice["prompt_tokens"] == 3 * len(PROMPT) + 2 * chat_prompt
    assert alice["completion_tokens"] == 3 + 4 + 6 + 2 + 5
    ops = rows[("ops", "tiny-chat")]
    assert (ops["requests"], ops["prompt_tokens"], ops["completion_tokens"]) == (1, 5, 2)
    assert set(rows) == {("alice", "tiny-chat"), ("ops", "tiny-chat")}
    assert usage_of(appliance, key="ops").keys() == {("ops", "tiny-chat")}

    series = key_series(appliance)
    assert series[("appliance_key_requests_total", "alice", "tiny-chat")] == 6
    assert (
        series[("appliance_key_prompt_tokens_total", "alice", "tiny-chat")]
        == (alice["prompt_tokens"])
    )
    assert series[("appliance_key_generation_tokens_total", "alice", "tiny-chat")] == 20

    table = subprocess.run(
        [sys.executable, "-m", "appliance", "usage", "--key", "alice", "--since", "today"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "COLUMNS": "200",
            "APPLIANCE_URL": appliance.url,
            "APPLIANCE_ADMIN_KEY": KEYS["ops"],
        },
    )
    assert table.returncode == 0, table.stderr
    line = next(row for row in table.stdout.splitlines() if "alice" in row)
    # Not a terminal: plain columns (issue 28), one value a column.
    figures = line.split()
    total = alice["prompt_tokens"] + 20
    assert figures == [
        "alice",
        "tiny-chat",
        "6",
        "1",
        str(alice["prompt_tokens"]),
        "20",
        str(total),
    ]


def test_quota_refuses_the_request_after_the_one_that_crossed_it(
    appliance: ApplianceProcess,
) -> None:
    assert complete(appliance, "bob", 5).status_code == 200  # 0 used before: 10 after
    assert complete(appliance, "bob", 5).status_code == 200  # 10 used before: 20 after
    refused = complete(appliance, "bob", 5)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert f"quota of {BOB_QUOTA} tokens per day" in error["message"]
    assert "resets at" in error["message"] and "T00:00:00Z" in error["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    # Other keys are not affected, and the refusal counted as an error without tokens.
    assert complete(appliance, "alice", 1).status_code == 200
    bob = usage_of(appliance, key="bob")[("bob", "tiny-chat")]
    assert (bob["requests"], bob["errors"], bob["prompt_tokens"], bob["completion_tokens"]) == (
        3,
        1,
        10,
        10,
    )


def test_usage_and_quota_survive_a_restart(appliance: KeyedAppliance) -> None:
    before = usage_of(appliance)
    assert appliance.stop() == 0
    appliance.start(*appliance.args)
    assert usage_of(appliance) == before
    assert complete(appliance, "bob", 1).status_code == 429


# -- the status page -----------------------------------------------------------------------

ROWS = """[...document.querySelectorAll('#models tbody tr')]
    .map(r => [r.dataset.model, r.dataset.state])"""


def admin_models(appliance: ApplianceProcess) -> dict[str, Any]:
    return httpx.get(f"{appliance.url}/admin/models", headers=auth("ops"), timeout=30).json()


@pytest.fixture
def browser() -> Iterator[Browser]:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "headless Chromium is not installed (Debian: apt-get install chromium; "
            "`make browser` does it where it may)"
        )
    found = Browser(chromium)
    yield found
    found.close()


def test_status_page_in_chromium(appliance: ApplianceProcess, browser: Browser) -> None:
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()  # what is there after the run is this run's
    browser.goto(f"{appliance.url}/")
    # Without a key the page lists the models and their states from /metrics.
    rows = browser.wait_for(f"{ROWS}.length === 2 && {ROWS}", 60, "both models listed")
    assert sorted(rows) == [["spare", "unloaded"], ["tiny-chat", "ready"]]
    badge = browser.js("document.querySelector('tr[data-model=\"tiny-chat\"] .state').textContent")
    assert badge == "ready"
    assert "admin key" in browser.js("document.getElementById('notice').textContent")
    browser.screenshot(SCREENSHOTS / "1-without-key.png")

    # Unload without the key: the page asks for it and sends nothing.
    browser.js(
        'document.querySelector(\'button[data-model="tiny-chat"][data-action="unload"]\').click()'
    )
    assert browser.wait_for("document.getElementById('key-dialog').open", 10, "key dialog")
    browser.screenshot(SCREENSHOTS / "2-asks-for-key.png")
    browser.js("document.getElementById('key-cancel').click()")
    state = {m["name"]: m["state"] for m in admin_models(appliance)["data"]}
    assert state == {"tiny-chat": "ready", "spare": "unloaded"}
    assert "POST /admin/models/tiny-chat/unload" not in appliance.log_path.read_text()

    # With the key (asked once): devices and memory bars, as /admin/models says.
    browser.js("document.getElementById('key-button').click()")
    browser.js(
        f"document.getElementById('key-input').value = {json.dumps(KEYS['ops'])};"
        "document.getElementById('key-save').click()"
    )
    bars = browser.wait_for(
        """(() => { const d = [...document.querySelectorAll('#devices .device')];
            return d.length > 0 && d.map(x => [x.dataset.device, Number(x.dataset.reserved),
                                              Number(x.dataset.total)]); })()""",
        30,
        "memory bars",
    )
    admin = admin_models(appliance)
    expected = []
    for device in admin["devices"]:
        reserved = sum(
            m["reserved_gib"][m["devices"].index(device["index"])]
            for m in admin["data"]
            if device["index"] in m.get("devices", [])
        )
        expected.append([device["label"], round(reserved, 2), round(device["total_gib"], 2)])
    assert bars == expected
    assert expected[0][1] > 0  # tiny-chat holds memory
    memory = browser.js(
        "document.querySelector('tr[data-model=\"tiny-chat\"] td:nth-child(4)').textContent"
    )
    tiny = next(m for m in admin["data"] if m["name"] == "tiny-chat")
    assert memory == f"{tiny['memory_gib']:.1f} GiB"

    # The chart draws the tokens generated while the page watches.
    browser.wait_for("Number(document.getElementById('chart').dataset.samples) >= 1", 30)
    assert complete(appliance, "alice", 8).status_code == 200
    browser.wait_for("Number(document.getElementById('chart').dataset.maxRate) > 0", 30, "a rate")
    # ... as a line in the first series colour (#2563eb), not only axes and labels.
    browser.wait_for(
        """(() => { const c = document.getElementById('chart');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4)
                if (px[i] < 80 && px[i + 1] < 140 && px[i + 2] > 200 && px[i + 3] > 200) n++;
            return n > 50; })()""",
        30,
        "the tokens/s line drawn",
    )
    # The usage table shows alice's figures.
    browser.wait_for("document.querySelector('#usage tr[data-key=\"alice\"]') !== null", 30)
    browser.screenshot(SCREENSHOTS / "3-with-key.png")

    # Unload with the key: the model unloads, and the page shows it.
    browser.js(
        'document.querySelector(\'button[data-model="tiny-chat"][data-action="unload"]\').click()'
    )
    browser.wait_for(
        "document.querySelector('tr[data-model=\"tiny-chat\"]').dataset.state === 'unloaded'",
        120,
        "tiny-chat unloaded on the page",
    )
    state = {m["name"]: m["state"] for m in admin_models(appliance)["data"]}
    assert state == {"tiny-chat": "unloaded", "spare": "unloaded"}
    browser.screenshot(SCREENSHOTS / "4-unloaded.png")
    # The access log's line for the page's unload (the path is a field of its own).
    unloads = [
        line
        for line in appliance.log_path.read_text().splitlines()
        if '"path": "/admin/models/tiny-chat/unload"' in line
    ]
    assert any('"method": "POST"' in line and '"status": 200' in line for line in unloads)
    assert sorted(p.name for p in SCREENSHOTS.glob("*.png")) == [
        "1-without-key.png",
        "2-asks-for-key.png",
        "3-with-key.png",
        "4-unloaded.png",
    ]
