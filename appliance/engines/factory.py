"""Builds the engine for a catalogue entry: a local vLLM engine or a remote backend."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.catalogue.ray_settings import RayCluster
from appliance.catalogue.schema import LocalModelSpec, ModelSpec
from appliance.engines.base import Engine, EngineFigureSink, EngineLink, link_of
from appliance.engines.process_env import refuse_unsafe_environment
from appliance.errors import ConfigError
from appliance.host.inventory import DeviceKind, Inventory
from appliance.host.placement import Allocation
from appliance.hub.gguf import GgufCache, check_convertible, default_cache_dir, is_gguf

if TYPE_CHECKING:
    from appliance.engines.ray import RayApps

PACKAGE_PREFIX = "package:"


def resolve_source(spec: ModelSpec, base_dir: Path | None = None) -> str:
    """Where vLLM should load ``spec`` from: a folder on disk, or a hub id left as it is.

    ``package:MODULE/PATH`` names a folder (or a ``.gguf`` file) inside an installed Python
    package (the MiniLM embedding model ships that way); a relative path is taken from the
    catalogue's folder.
    Neither may contain ``..``, and a package source may not leave its package.
    """
    source = spec.source
    if source is None:
        raise ConfigError(f"model {spec.name!r}: has no source; it is served by a backend")
    if ".." in re.split(r"[/\\]", source):
        raise ConfigError(
            f"model {spec.name!r}: field 'source': must not contain '..'", param="source"
        )
    if source.startswith(PACKAGE_PREFIX):
        module, _, inner = source[len(PACKAGE_PREFIX) :].partition("/")
        if not module.isidentifier():
            # A dotted name would import the parent packages (running their code) to find it.
            raise ConfigError(
                f"model {spec.name!r}: field 'source': {module!r} is not a top-level Python "
                "package name (no dots)",
                param="source",
            )
        if inner.startswith("/") or not inner:
            raise ConfigError(
                f"model {spec.name!r}: field 'source': give a folder inside the package, as "
                "package:MODULE/PATH",
                param="source",
            )
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                f"model {spec.name!r}: field 'source': Python package {module!r} is not "
                f"installed (pip install {module.replace('_', '-')})",
                param="source",
            )
        root = Path(next(iter(found.submodule_search_locations))).resolve()
        path = (root / inner).resolve()
        if not path.is_relative_to(root):
            # A link inside the package that points out of it.
            raise ConfigError(
                f"model {spec.name!r}: field 'source': {inner!r} leaves package {module!r}",
                param="source",
            )
        if not path.exists():
            raise ConfigError(
                f"model {spec.name!r}: field 'source': {inner!r} not found in package {module!r}",
                param="source",
            )
        return str(path)
    looks_local = source.startswith((".", "/", "~")) or (base_dir is not None and "/" not in source)
    if looks_local:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            hint = (
                " (build the tiny test models with `python scripts/build_tiny_model.py --all`)"
                if ".models" in source
                else ""
            )
            what = "file" if is_gguf(source) else "folder"
            raise ConfigError(
                f"model {spec.name!r}: field 'source': {what} {str(path)!r} does not exist{hint}",
                param="source",
            )
        return str(path.resolve())
    return source  # a hub id such as meta-llama/Meta-Llama-3-8B-Instruct


def resolve_adapter_source(model: str, name: str, source: str, base_dir: Path | None) -> str:
    """Where vLLM should load adapter ``name`` of ``model`` from: a folder (relative to the
    catalogue's folder) or a hub id left as it is; ``ConfigError`` naming both if a folder is
    missing or the source climbs out with ``..``."""
    if ".." in re.split(r"[/\\]", source):
        raise ConfigError(
            f"model {model!r}: adapter {name!r}: source must not contain '..'", param="adapters"
        )
    if not source.startswith((".", "/", "~")):
        return source  # a hub id such as org/my-lora
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_dir():
        raise ConfigError(
            f"model {model!r}: adapter {name!r}: folder {str(path)!r} does not exist",
            param="adapters",
        )
    return str(path.resolve())


class EngineFactory:
    """Checks entries and makes engines for them; the supervisor calls nothing else of vLLM."""

    def __init__(
        self,
        *,
        base_dir: Path | None = None,
        cpu_kv_cache_gib: int = 1,
        figures: EngineFigureSink | None = None,
        gguf: GgufCache | None = None,
        ray: RayCluster | None = None,
    ) -> None:
        """``gguf``: the cache where ``.gguf`` sources are converted (the fetcher converts; an
        engine here is given the converted folder); default: the default cache folder.
        ``ray``: the cluster of models.yaml's ``ray:``, where entries with ``ray:`` run."""
        from appliance.engines.vllm import EngineArgsBuilder, prepare_process_environment

        # Before anything imports vLLM: it reads these once, at import or first engine.
        prepare_process_environment(os.environ)
        self._base_dir = base_dir
        self._cpu_kv_cache_gib = cpu_kv_cache_gib
        self._figures = figures  # vLLM's engine figures go here when --engine-metrics is on
        self._gguf = gguf or GgufCache(default_cache_dir())
        self._args = EngineArgsBuilder()
        self.ray = _ray_apps(ray)
        # Client processes each engine core serves (``appliance up --workers``); set once the
        # host's devices are known, before any engine starts.
        self.clients = 1

    @property
    def cuda_build(self) -> bool:
        """Whether the installed vLLM is the CUDA build (then a host without GPUs is an error)."""
        from appliance.engines.vllm import vllm_build

        return vllm_build() == "cuda"

    def validate(self, spec: ModelSpec) -> None:
        """Raise ``ConfigError`` naming the model and field if ``spec`` cannot be served."""
        if isinstance(spec, LocalModelSpec):
            source = resolve_source(spec, self._base_dir)
            if is_gguf(source):
                check_convertible(spec.name, Path(source))
            self._args.build(
                spec,
                source,
                adapters=self._adapters(spec),
                base_dir=self._base_dir,
            )

    def adapter_source(self, model: str, name: str, source: str) -> str:
        """``source`` of an adapter loaded at run time, resolved as in ``models.yaml``."""
        return resolve_adapter_source(model, name, source, self._base_dir)

    def _served_source(self, spec: ModelSpec) -> str:
        """What the engine loads: the resolved source, or a GGUF file's converted folder."""
        source = resolve_source(spec, self._base_dir)
        return str(self._gguf.folder_for(Path(source))) if is_gguf(source) else source

    def _adapters(self, spec: LocalModelSpec) -> list[tuple[str, str]]:
        return [
            (a.name, resolve_adapter_source(spec.name, a.name, a.source, self._base_dir))
            for a in spec.adapters
        ]

    def create(
        self,
        spec: ModelSpec,
        allocation: Allocation | None,
        inventory: Inventory,
        *,
        clients: int | None = None,
    ) -> Engine:
        """A new, not yet started, engine for ``spec`` on the devices of ``allocation``.

        ``clients`` > 1 starts its engine cores for that many client processes; this engine is
        client 0, and its ``link()`` lets the others ``attach``. None: ``self.clients``.
        """
        from appliance.engines.vllm import VLLMEngine, cpu_compile_environment

        if isinstance(spec, LocalModelSpec) and spec.ray is not None:
            return self._ray_engine(spec)
        assert allocation is not None, "an engine on this host is placed first"
        env: dict[str, str] = {}
        utilization: float | None = None
        if inventory.kind is DeviceKind.GPU:
            devices = [d for d in inventory.devices if d.index in allocation.devices]
            # NVML numbers GPUs by PCI bus; CUDA's default order may differ, so pass UUIDs
            # (or force PCI order when a UUID is unknown).
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(d.uuid or str(d.index) for d in devices)
            utilization = allocation.memory_share
        else:
            # On CPU the memory set aside for the KV cache is an environment variable that
            # vLLM's engine process reads at spawn; allocation memory bounds it.
            kv = max(1, min(int(allocation.memory_gib), self._cpu_kv_cache_gib))
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv)
            env.update(cpu_compile_environment(os.environ))
        refuse_unsafe_environment(env, where=f"model {spec.name!r}'s engine environment")
        args = self._args.build(
            spec,
            self._served_source(spec),
            gpu_memory_utilization=utilization,
            adapters=self._adapters(spec),
            base_dir=self._base_dir,
        )
        return VLLMEngine(
            spec, args, env=env, figures=self._figures, clients=clients or self.clients
        )

    def _ray_engine(self, spec: LocalModelSpec) -> Engine:
        from appliance.engines.ray import RayEngine

        if self.ray is None:
            raise ConfigError(f"model {spec.name!r}: has ray: but models.yaml names no cluster")
        return RayEngine(spec, self._served_source(spec), self.ray)

    @staticmethod
    def import_client_modules() -> None:
        """Import vLLM's client and serving modules now (an HTTP worker, before serving)."""
        from appliance.engines.vllm import import_client_modules

        import_client_modules()

    @staticmethod
    def link_of(engine: Engine) -> EngineLink | None:
        """What other processes attach to ``engine`` with; None for an engine started for one
        client, one not started, or a remote backend."""
        return link_of(engine)

    def attach(self, link: EngineLink, client_index: int) -> Engine:
        """A new, not yet started, client ``client_index`` of the running engine ``link``
        describes (made by another process's ``create(..., clients=N)``); its ``stop()``
        leaves the engine running."""
        from appliance.engines.vllm import attach_engine

        return attach_engine(link, client_index, figures=self._figures)


def _ray_apps(cluster: RayCluster | None) -> RayApps | None:
    """What the Ray entries share, when models.yaml names a cluster (imports no Ray yet)."""
    if cluster is None:
        return None
    from appliance.engines.ray import RayApps

    return RayApps(cluster)
