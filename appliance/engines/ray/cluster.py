"""The appliance's one connection to a Ray cluster and its Serve controller.

The only module that imports ``ray`` (lazily: the extra ``.[ray]`` is optional). Every call
here blocks (Ray's client API is synchronous); the engine runs them in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.catalogue.ray_settings import RayCluster
from appliance.errors import ConfigError, EngineError

log = logging.getLogger("appliance.ray")

RUNNING = "RUNNING"
DEPLOYING = "DEPLOYING"
FAILED_STATES = frozenset({"DEPLOY_FAILED", "DELETING"})
"""Application states in which the app is not serving and will not recover by itself."""


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica of an app's model deployment, as Ray Serve reports it."""

    deployment: str
    replica_id: str
    state: str
    node_id: str | None
    pid: int | None
    actor_name: str | None


@dataclass(frozen=True)
class AppInfo:
    """One Serve application: its state, why, where it answers, and its replicas."""

    name: str
    status: str
    message: str
    route_prefix: str | None
    replicas: tuple[ReplicaInfo, ...] = field(default=())

    def running_replicas(self, deployment_prefix: str = "LLMServer") -> list[ReplicaInfo]:
        """The model replicas (not the ingress) that are serving."""
        return [
            r
            for r in self.replicas
            if r.deployment.startswith(deployment_prefix) and r.state == RUNNING
        ]


@contextlib.contextmanager
def _keeping_root_logging() -> Iterator[None]:
    """Undo what Ray does to the root logger: ``ray.init`` adds a handler and Ray Serve LLM's
    import replaces them all with its own JSON one, which would turn every appliance log line
    into Ray's format."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(level)


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # the optional extra is not installed
        raise ConfigError(
            "a models.yaml entry has ray: but Ray is not installed: pip install '.[ray]'"
        ) from None
    return ray


class RayServe:
    """Ray Serve on the operator's cluster, as this appliance uses it (one per process)."""

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster = cluster
        self._lock = threading.Lock()
        self._connected = False
        self.proxy_url: str | None = None  # Ray Serve's HTTP proxy, once connected

    def connect(self) -> str:
        """Join the cluster as a driver and make sure Serve runs with its proxy on
        ``serve_host:serve_port`` (the head node only); the proxy's base URL."""
        with self._lock, _keeping_root_logging():
            if self._connected and self.proxy_url is not None:
                return self.proxy_url
            ray = _ray()
            from ray import serve

            if not ray.is_initialized():
                try:
                    ray.init(
                        address=self.cluster.address,
                        namespace=self.cluster.namespace,
                        log_to_driver=False,
                        # A driver only: this process offers the cluster no CPUs of its own.
                        ignore_reinit_error=True,
                    )
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise EngineError(
                        f"cannot reach the Ray cluster at {self.cluster.address}: {exc}"
                    ) from exc
            # Cluster-wide and fixed once Serve runs: a Serve already started by someone
            # else keeps its own options, so the proxy's address is read back, not assumed.
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": self.cluster.serve_host, "port": self.cluster.serve_port},
            )
            details = self._details()
            http = details.get("http_options") or {}
            host = http.get("host") or self.cluster.serve_host
            port = http.get("port") or self.cluster.serve_port
            if host in ("0.0.0.0", "::"):
                log.warning(
                    "Ray Serve's HTTP proxy listens on %s, every interface: it has no keys; "
                    "restart Serve with http_options.host 127.0.0.1",
                    host,
                )
                host = "127.0.0.1"
            self.proxy_url = f"http://{host}:{port}"
            self._connected = True
            return self.proxy_url

    def _details(self) -> dict[str, Any]:
        from ray.serve.context import _get_global_client

        # Serve's own instance details (what `serve status` prints), as plain data.
        return dict(_get_global_client().get_serve_details())

    def app(self, name: str) -> AppInfo | None:
        """Application ``name`` as Serve reports it now; None when there is none."""
        found = (self._details().get("applications") or {}).get(name)
        if not found:
            return None
        replicas = []
        for deployment, detail in (found.get("deployments") or {}).items():
            for replica in detail.get("replicas") or []:
                replicas.append(
                    ReplicaInfo(
                        deployment=str(deployment),
                        replica_id=str(replica.get("replica_id")),
                        state=str(_value(replica.get("state"))),
                        node_id=replica.get("node_id"),
                        pid=replica.get("pid"),
                        actor_name=replica.get("actor_name"),
                    )
                )
        return AppInfo(
            name=name,
            status=str(_value(found.get("status"))),
            message=str(found.get("message") or ""),
            route_prefix=found.get("route_prefix"),
            replicas=tuple(replicas),
        )

    def deploy(self, name: str, config: dict[str, Any], route_prefix: str) -> None:
        """Deploy (or update in place: same name, no duplicate) app ``name`` from one
        ``LLMConfig`` mapping, without waiting for it to become healthy."""
        with _keeping_root_logging():
            from ray import serve
            from ray.serve.llm import LLMConfig, build_openai_app

            app = build_openai_app({"llm_configs": [LLMConfig(**config)]})
            # serve.run waits for the app to be healthy; its non-waiting form is _run. The
            # wait is the engine's (bounded, and visible as the model's loading state).
            serve._run(app, name=name, route_prefix=route_prefix, _blocking=False)

    def delete(self, name: str) -> None:
        """Delete app ``name`` and its replicas (waits until they are gone)."""
        from ray import serve

        serve.delete(name, _blocking=True)


def _value(state: Any) -> Any:
    """An enum's value, or the thing itself (Serve's details hold either)."""
    return getattr(state, "value", state)
