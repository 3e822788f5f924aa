"""Issue 13: each attack tried as an outsider would, refused, with everyone else still served.

Two real appliances bound to every address:
- ``box`` serves tiny-chat (real vLLM) and a remote ``garbage`` backend, with one user key and
  no admin key. "The LAN" is this machine's own non-loopback address: a connection to it
  comes from it, not from loopback, so the appliance sees an outsider.
- ``follower`` has no keys and no local model; its catalogue comes from a registry that the
  test plays (anyone who can answer in the registry's place can do the same).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import ApplianceProcess, tiny_chat, wait_until

pytestmark = pytest.mark.integration

USER = "sk-lan-user-0123456789abcdef0123456789"
NO_LOAD = "sk-lan-noload-0123456789abcdef0123456789"
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def lan_address() -> str:
    """A non-loopback IPv4 address of this machine, or skip the module."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    pytest.skip("this machine has no non-loopback address to play the LAN from")


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def serve(handler: type[BaseHTTPRequestHandler], host: str = "0.0.0.0") -> _Server:
    """Start ``handler`` on a free port in a thread."""
    server = _Server((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class GarbageBackend(BaseHTTPRequestHandler):
    """An OpenAI-compatible backend whose usage is garbage."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, b'{"status": "ok"}', "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            events = (
                b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
                b'data: {"choices": [], "usage": {"prompt_tokens": "lots", '
                b'"completion_tokens": -3}}\n\ndata: [DONE]\n\n'
            )
            self._send(200, events, "text/event-stream")
            return
        answer = {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": "lots", "completion_tokens": -3, "total_tokens": [1]},
        }
        self._send(200, json.dumps(answer).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeRegistry(BaseHTTPRequestHandler):
    """Answers the registry's list with whatever ``FakeRegistry.answer`` holds."""

    answer: bytes = b'{"object": "list", "data": []}'

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = FakeRegistry.answer
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def publish(*entries: dict[str, Any]) -> None:
    """What the registry answers from now on."""
    data = [{"name": e["name"], "spec": e} for e in entries]
    FakeRegistry.answer = json.dumps({"object": "list", "data": data}).encode()


@pytest.fixture(scope="module")
def lan() -> str:
    return lan_address()


@pytest.fixture(scope="module")
def backend() -> Iterator[_Server]:
    server = serve(GarbageBackend)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, backend: _Server) -> Iterator[ApplianceProcess]:
    """tiny-chat and a garbage backend, one user key, no admin key, on every address."""
    workdir = tmp_path_factory.mktemp("lan-box")
    keys = workdir / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": "lan-user", "key": USER},
                    {"name": "no-load", "key": NO_LOAD, "may_load": False},
                ]
            }
        )
    )
    keys.chmod(0o600)
    garbage = {"name": "garbage", "backend_url": f"http://127.0.0.1:{backend.server_port}"}
    lazy = tiny_chat("lazy", arch="gpt2", autoload=False, load_on_demand=True, evictable=True)
    # Room for tiny-chat and one of the two on-demand models (1 GiB each), not both.
    rival = tiny_chat(
        "lazy-rival", arch="gpt2", autoload=False, load_on_demand=True, evictable=True
    )
    proc = ApplianceProcess(workdir, [tiny_chat(), garbage, lazy, rival])
    proc.start("--api-keys", str(keys), "--host", "0.0.0.0", "--cpu-memory-gib", "2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def follower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """No keys, no local model; the catalogue comes from the test's registry."""
    registry = serve(FakeRegistry, "127.0.0.1")
    publish()
    proc = ApplianceProcess(
        tmp_path_factory.mktemp("lan-follower"),
        [],
        registry_url=f"http://127.0.0.1:{registry.server_port}",
        registry_ttl=0.3,
    )
    proc.start("--host", "0.0.0.0")
    yield proc
    proc.stop()
    registry.shutdown()


def outsider(lan: str, appliance: ApplianceProcess, key: str | None = None) -> httpx.Client:
    """A client connecting from this machine's LAN address, as another host would."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(
        base_url=f"http://{lan}:{appliance.port}",
        transport=httpx.HTTPTransport(local_address=lan),
        headers=headers,
        timeout=60,
    )


def still_serving(lan: str, box: ApplianceProcess) -> None:
    with outsider(lan, box, USER) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text


# --- admin needs an admin ---------------------------------------------------------------------


def test_admin_from_the_lan_is_refused_with_no_key_or_a_user_key(
    lan: str, box: ApplianceProcess
) -> None:
    for key in (None, USER):
        with outsider(lan, box, key) as client:
            for method, path in (
                ("POST", "/admin/models/tiny-chat/unload"),
                ("GET", "/admin/models"),
            ):
                response = client.request(method, path)
                assert response.status_code == 403, (key, path, response.text)
    # The operator, on the box itself, still can (no admin key is configured).
    assert httpx.get(f"{box.url}/admin/models", timeout=10).status_code == 200
    states = {m["name"]: m["state"] for m in httpx.get(f"{box.url}/admin/models").json()["data"]}
    assert states["tiny-chat"] == "ready"
    still_serving(lan, box)


def test_without_keys_the_lan_gets_only_health(lan: str, follower: ApplianceProcess) -> None:
    with outsider(lan, follower, "unused") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.post("/admin/reload").status_code == 403
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200
    assert httpx.get(f"{follower.url}/v1/models", timeout=10).status_code == 200


# --- no cross-site requests -------------------------------------------------------------------


def test_a_text_plain_post_is_refused(lan: str, box: ApplianceProcess) -> None:
    with outsider(lan, box, USER) as client:
        response = client.post(
            "/v1/chat/completions",
            content=json.dumps(CHAT),
            headers={"Content-Type": "text/plain"},
        )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    # A page's fetch to the box's loopback (its own browser): refused by its Origin.
    unload = httpx.post(
        f"{box.url}/admin/models/tiny-chat/unload", headers={"Origin": "http://evil.example"}
    )
    assert unload.status_code == 403 and unload.json()["error"]["code"] == "cross_origin_refused"
    still_serving(lan, box)


def test_a_foreign_host_is_refused(lan: str, box: ApplianceProcess) -> None:
    with outsider(lan, box, USER) as client:
        rebound = client.post(
            "/v1/chat/completions", json=CHAT, headers={"Host": f"evil.example:{box.port}"}
        )
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
    local = httpx.get(f"{box.url}/admin/models", headers={"Host": "rebind.example"}, timeout=10)
    assert local.status_code == 400
    still_serving(lan, box)


# --- bad bodies ------------------------------------------------------------------------------


def test_nested_json_and_a_huge_model_name_are_400s(lan: str, box: ApplianceProcess) -> None:
    deep = b'{"model": "tiny-chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    huge_name = "x" * 2**20
    with outsider(lan, box, USER) as client:
        nested = client.post(
            "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"}
        )
        named = client.post("/v1/chat/completions", json={**CHAT, "model": huge_name})
        metrics = client.get("/metrics").text
    assert nested.status_code == 400 and "nested" in nested.json()["error"]["message"]
    assert named.status_code == 400 and huge_name not in named.text
    assert "x" * 1000 not in metrics and "x" * 1000 not in box.tail(400)
    still_serving(lan, box)


# --- load storms -----------------------------------------------------------------------------


def test_a_key_that_may_not_load_cannot_start_a_load(lan: str, box: ApplianceProcess) -> None:
    with outsider(lan, box, NO_LOAD) as client:
        refused = client.post("/v1/chat/completions", json={**CHAT, "model": "lazy"})
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "load_refused" and "may not load" in error["message"]
    states = {m["name"]: m["state"] for m in httpx.get(f"{box.url}/admin/models").json()["data"]}
    assert states["lazy"] == "unloaded"
    with outsider(lan, box, NO_LOAD) as client:  # a loaded model still serves this key
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_user_key_cannot_make_two_models_evict_each_other(
    lan: str, box: ApplianceProcess
) -> None:
    lazy = {**CHAT, "model": "lazy"}
    rival = {**CHAT, "model": "lazy-rival"}
    with outsider(lan, box, USER) as client:
        answers: list[httpx.Response] = []

        def lazy_answers() -> bool:  # 503 model_loading while the on-demand load runs
            answers.append(client.post("/v1/chat/completions", json=lazy))
            return answers[-1].status_code != 503

        wait_until(lazy_answers, "lazy loaded on demand", timeout=240)
        assert answers[-1].status_code == 200, answers[-1].text
        # The rival fits only if lazy goes; lazy was loaded moments ago, so it stays.
        refused = client.post("/v1/chat/completions", json=rival)
        assert refused.status_code == 503, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        error = refused.json()["error"]
        assert error["code"] == "eviction_too_soon" and "'lazy'" in error["message"]
        assert client.post("/v1/chat/completions", json=lazy).status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    states = {m["name"]: m["state"] for m in httpx.get(f"{box.url}/admin/models").json()["data"]}
    assert (states["lazy"], states["lazy-rival"], states["tiny-chat"]) == (
        "ready",
        "unloaded",
        "ready",
    )


# --- remote backends are untrusted -----------------------------------------------------------


def scrape(lan: str, box: ApplianceProcess) -> dict[str, float]:
    with outsider(lan, box, USER) as client:
        text = client.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == "garbage":
                samples[sample.name + json.dumps(sample.labels, sort_keys=True)] = sample.value
    return samples


def test_a_backend_with_garbage_usage(lan: str, box: ApplianceProcess) -> None:
    body = {**CHAT, "model": "garbage"}
    with outsider(lan, box, USER) as client:
        plain = client.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200 and plain.json()["usage"]["prompt_tokens"] == "lots"
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert "backend_url" not in listed["garbage"]  # not shown to a user key
    samples = scrape(lan, box)  # the metrics still parse
    assert all(value >= 0 for value in samples.values())
    still_serving(lan, box)


# --- the registry is untrusted -----------------------------------------------------------------


def catalogue(follower: ApplianceProcess) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{follower.url}/admin/models", timeout=10).json()["data"]
    return {m["name"]: m for m in data}


def test_registry_entries_that_reach_into_the_box_are_refused(
    lan: str, follower: ApplianceProcess, backend: _Server
) -> None:
    good = {"name": "good-remote", "backend_url": f"http://{lan}:{backend.server_port}"}
    bad = [
        {"name": "rce", "source": "evil/model", "engine": {"trust_remote_code": True}},
        {"name": "local-path", "source": "/etc"},
        {"name": "traversal", "source": "package:vllm/../../.."},
        {"name": "loopback", "backend_url": f"http://127.0.0.1:{follower.port}"},
        {"name": "metadata", "backend_url": "http://169.254.169.254/latest"},
    ]
    publish(good, *bad)
    wait_until(lambda: "good-remote" in catalogue(follower), "the registry's good entry is served")
    names = set(catalogue(follower))
    assert names == {"good-remote"}, names
    log = follower.tail(400)
    for entry in bad:
        assert f"'{entry['name']}'" in log and "refused" in log, entry["name"]
    reply = httpx.post(
        f"{follower.url}/v1/chat/completions", json={**CHAT, "model": "good-remote"}, timeout=30
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@{lan}:{port}",
        "http://{lan}:{port}/#fragment",
        "http://{lan}:{port}/?next=/admin",
    ],
)
def test_backend_urls_with_credentials_queries_or_fragments_are_refused(
    lan: str, follower: ApplianceProcess, backend: _Server, url: str
) -> None:
    good = {"name": "good-remote", "backend_url": f"http://{lan}:{backend.server_port}"}
    publish(good)
    wait_until(lambda: set(catalogue(follower)) == {"good-remote"}, "only the good entry")
    before = httpx.get(f"{follower.url}/admin/registry", timeout=10).json()["last_error_at"]
    sneaky = {"name": "sneaky", "backend_url": url.format(lan=lan, port=backend.server_port)}
    publish(good, sneaky)

    def refused() -> bool:
        status = httpx.get(f"{follower.url}/admin/registry", timeout=10).json()
        return status["last_error_at"] not in (None, before)

    wait_until(refused, "the registry's answer is refused")
    status = httpx.get(f"{follower.url}/admin/registry", timeout=10).json()
    assert "backend_url" in status["last_error"] and "secret" not in status["last_error"]
    assert set(catalogue(follower)) == {"good-remote"}  # the last good catalogue stays
    reply = httpx.post(
        f"{follower.url}/v1/chat/completions", json={**CHAT, "model": "good-remote"}, timeout=30
    )
    assert reply.status_code == 200
