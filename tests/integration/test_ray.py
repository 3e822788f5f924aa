"""Issue 23: an entry that runs on a Ray cluster through Ray Serve LLM.

The module starts a two-node Ray cluster on this host itself (``ray.cluster_utils.Cluster``,
every node on 127.0.0.1, each with one ``test_slot`` so that the entry's two replicas must go
on different nodes) and one appliance with keys, and stops both at the end. One deployment is
shared by the tests, which run in file order: answers (the same greedy tokens as vLLM's own
server), both replicas used, a killed replica replaced while requests are answered, keys and
usage and metrics, a route Ray does not serve, an appliance restart that adopts the app, and
last the unload that deletes it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.harness import MODELS_DIR, ApplianceProcess, free_port, wait_until
from tests.integration.vllm_reference import CHAT_MODEL

# Ray turns 127.0.0.1 into the host's interface address unless told this is no multi-host
# cluster, and reads that once, when it is imported: so before the import, for this process
# (the test's driver), the cluster's processes and the appliance (which inherit it). Nothing
# here may listen past loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the extra .[ray] is not installed")
cluster_utils = pytest.importorskip("ray.cluster_utils")
serve = pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

NAME = "ray-chat"
KEYS = {
    "alice": "sk-alice-ray-0123456789abcdef012345",
    "ops": "sk-ops-ray-0123456789abcdef0123456789",
}
DEPLOY_SECONDS = 1800.0  # two engines and an ingress starting on 2 busy cores
MESSAGES = [{"role": "user", "content": "hello there"}]


@dataclass
class RayTest:
    """The module's cluster and appliance."""

    cluster: Any
    appliance: ApplianceProcess


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def app_details() -> dict[str, Any] | None:
    """Ray Serve's own details of the entry's app (what `serve status` shows), or None."""
    from ray.serve.context import _get_global_client

    return (_get_global_client().get_serve_details().get("applications") or {}).get(NAME)


def model_replicas() -> list[dict[str, Any]]:
    """The running replicas of the app's model deployment (not its ingress)."""
    app = app_details()
    if app is None:
        return []
    return [
        replica
        for deployment, detail in app["deployments"].items()
        if deployment.startswith("LLMServer")
        for replica in detail["replicas"]
        if str(replica["state"]).endswith("RUNNING")
    ]


def chat(appliance: ApplianceProcess, key: str = "alice", **extra: Any) -> httpx.Response:
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(
        f"{appliance.url}/v1/chat/completions", json=body, headers=auth(key), timeout=300
    )


def state_of(appliance: ApplianceProcess) -> str:
    answer = httpx.get(f"{appliance.url}/admin/models", headers=auth("ops"), timeout=30)
    return next(m["state"] for m in answer.json()["data"] if m["name"] == NAME)


@pytest.fixture(scope="module")
def ray_test(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTest]:
    workdir = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Ray runs its workers at nice 15: on a busy test box they would get no CPU beside the
        # other engines and take many minutes to start.
        env.setenv("RAY_worker_niceness", "0")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        node = {
            "num_cpus": 4,  # fewer and Ray Serve LLM's ingress replica never schedules
            "resources": {"test_slot": 1},
            "node_ip_address": "127.0.0.1",
            "object_store_memory": 200 * 2**20,
        }
        cluster = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={**node, "include_dashboard": False, "gcs_server_port": free_port()},
        )
        appliance: ApplianceProcess | None = None
        try:
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace="appliance-test", log_to_driver=False)
            keys = workdir / "keys.yaml"
            keys.write_text(
                yaml.safe_dump(
                    {
                        "keys": [
                            {"name": "alice", "key": KEYS["alice"], "role": "user"},
                            {"name": "ops", "key": KEYS["ops"], "role": "admin"},
                        ]
                    }
                )
            )
            keys.chmod(0o600)
            entry = {
                "name": NAME,
                "source": str(MODELS_DIR / "tiny-llama"),
                "task": "generate",
                "engine": {"max_model_len": 512, "dtype": "float32"},
                "ray": {
                    "replicas": 2,
                    "accelerator": "cpu",
                    "resources": {"CPU": 1, "test_slot": 1},
                },
            }
            cluster_settings = {
                "address": cluster.address,
                "serve_port": free_port(),
                "deploy_timeout": DEPLOY_SECONDS,
            }
            appliance = ApplianceProcess(workdir, [entry], ray=cluster_settings)
            appliance.start("--api-keys", str(keys), wait_ready=False)
            appliance.wait_ready(DEPLOY_SECONDS)
            yield RayTest(cluster, appliance)
        finally:
            if appliance is not None:
                appliance.stop()
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()


def test_two_replicas_on_two_nodes_answer_as_vllm_does(
    ray_test: RayTest, module_chat_reference: str
) -> None:
    replicas = model_replicas()
    assert len(replicas) == 2, replicas
    assert len({r["node_id"] for r in replicas}) == 2, "both replicas on one node"
    assert state_of(ray_test.appliance) == "ready"
    answer = chat(ray_test.appliance)
    assert answer.status_code == 200, answer.text
    reference = httpx.post(
        f"{module_chat_reference}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0},
        timeout=300,
    )
    assert reference.status_code == 200, reference.text
    ours, theirs = answer.json(), reference.json()
    assert ours["model"] == NAME
    assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
    assert ours["usage"] == theirs["usage"]


def _ongoing(replica: dict[str, Any]) -> int:
    """Requests the replica has in flight now, as its own actor counts them."""
    actor = ray.get_actor(replica["actor_name"], namespace="serve")
    return int(ray.get(actor.get_num_ongoing_requests.remote(), timeout=30))


def test_requests_reach_both_replicas(ray_test: RayTest) -> None:
    replicas = model_replicas()
    seen = {r["replica_id"]: 0 for r in replicas}

    def both_busy() -> bool:
        for replica in replicas:
            seen[replica["replica_id"]] = max(seen[replica["replica_id"]], _ongoing(replica))
        return all(n > 0 for n in seen.values()) or all(f.done() for f in running)

    # Long requests at once: Ray Serve's router sends each to the less busy of two replicas.
    with ThreadPoolExecutor(8) as pool:
        running = [
            pool.submit(chat, ray_test.appliance, max_tokens=200, ignore_eos=True) for _ in range(8)
        ]
        wait_until(both_busy, f"both replicas had requests in flight: {seen}", timeout=600)
        answers = [f.result() for f in running]
    assert all(n > 0 for n in seen.values()), f"requests in flight per replica: {seen}"
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]


def test_a_killed_replica_is_replaced_while_requests_are_answered(ray_test: RayTest) -> None:
    before = {r["replica_id"]: r for r in model_replicas()}
    victim = next(iter(before.values()))
    os.kill(victim["pid"], signal.SIGKILL)
    answered = 0
    deadline = time.monotonic() + DEPLOY_SECONDS
    while True:
        answer = chat(ray_test.appliance)
        assert answer.status_code == 200, f"after {answered} answers: {answer.text}"
        answered += 1
        now = {r["replica_id"] for r in model_replicas()}
        if len(now) == 2 and victim["replica_id"] not in now:
            break
        assert time.monotonic() < deadline, f"replica not replaced: {now}"
    assert state_of(ray_test.appliance) == "ready"


def test_keys_usage_and_metrics_count_the_ray_entry(ray_test: RayTest) -> None:
    appliance = ray_test.appliance
    refused = httpx.post(
        f"{appliance.url}/v1/chat/completions",
        json={"model": NAME, "messages": MESSAGES, "max_tokens": 2},
        timeout=60,
    )
    assert refused.status_code == 401, refused.text
    answer = chat(appliance, max_tokens=3, ignore_eos=True)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3
    rows = httpx.get(f"{appliance.url}/admin/usage", headers=auth("ops"), timeout=30).json()
    row = next(r for r in rows["data"] if (r["key"], r["model"]) == ("alice", NAME))
    assert row["completion_tokens"] >= 3 and row["requests"] >= 1
    metrics = httpx.get(f"{appliance.url}/metrics", headers=auth("ops"), timeout=30).text
    assert re.search(rf'appliance_requests_total\{{[^}}]*model="{NAME}"', metrics), metrics[:3000]
    assert re.search(rf'appliance_model_state\{{[^}}]*model="{NAME}"', metrics)


def test_a_route_ray_does_not_serve_is_a_400_naming_those_it_does(ray_test: RayTest) -> None:
    answer = httpx.post(
        f"{ray_test.appliance.url}/v1/responses",
        json={"model": NAME, "input": "hello"},
        headers=auth("alice"),
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert "/v1/chat/completions" in message and "/tokenize" in message
    assert chat(ray_test.appliance).status_code == 200  # and the entry is still served


def test_a_restart_adopts_the_running_app(ray_test: RayTest) -> None:
    appliance = ray_test.appliance
    before = sorted(r["replica_id"] for r in model_replicas())
    prefix = app_details()["route_prefix"]  # type: ignore[index]
    assert appliance.stop() == 0
    # The app outlives the appliance, for the next run to adopt.
    assert str(app_details()["status"]).endswith("RUNNING")  # type: ignore[index]
    appliance.start("--api-keys", str(appliance.workdir / "keys.yaml"), wait_ready=False)
    appliance.wait_ready(DEPLOY_SECONDS)
    assert "adopting Ray Serve app" in appliance.tail(400)
    assert sorted(r["replica_id"] for r in model_replicas()) == before  # nothing redeployed
    assert app_details()["route_prefix"] == prefix  # type: ignore[index]
    assert chat(appliance).status_code == 200


def test_unload_removes_the_deployment(ray_test: RayTest) -> None:
    appliance = ray_test.appliance
    answer = httpx.post(
        f"{appliance.url}/admin/models/{NAME}/unload", headers=auth("ops"), timeout=600
    )
    assert answer.status_code == 200, answer.text
    assert state_of(appliance) == "unloaded"
    wait_until(lambda: app_details() is None, "the Ray Serve app is deleted", timeout=300)
    refused = chat(appliance)
    assert refused.status_code == 503, refused.text
