"""How engines are started and woken, checked against vLLM 0.32's own code paths.

The spawn method and the spawn window are process-wide facts, so the first test runs in a child
interpreter; the rest use vLLM's real modules where they can and a recording stand-in for
vLLM's engine client where a GPU would be needed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.catalogue.schema import LocalModelSpec
from appliance.engines.vllm import VLLMEngine, prepare_process_environment, spawn
from appliance.engines.vllm.spawn import SpawnWindow, install_spawn_hook
from appliance.errors import ConfigError, EngineError

REPO = Path(__file__).resolve().parents[2]


def test_engines_are_spawned_and_vllm_is_told_before_it_is_imported() -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from appliance.engines.factory import EngineFactory

        EngineFactory(base_dir=Path("."))
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules), "vllm early"
        assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        import vllm.envs as envs
        from vllm.utils.system_utils import get_mp_context
        assert envs.VLLM_WORKER_MULTIPROC_METHOD == "spawn"
        assert get_mp_context().get_start_method() == "spawn"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_fork_asked_for_by_the_operator_is_refused() -> None:
    environ = {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}
    with pytest.raises(ConfigError, match="must be spawned"):
        prepare_process_environment(environ)
    environ = {}
    prepare_process_environment(environ)
    assert environ == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@pytest.mark.parametrize(
    ("backend", "why"),
    [
        ("torchcodec", "names no video backend of this vLLM"),  # not in vLLM 0.32's registry
        ("", "names no video backend of this vLLM"),
        ("pynvvideocodec", "decodes on the GPU"),
        ("deepstream", "names no video backend"),  # a GPU codec name vLLM has no loader for
    ],
)
def test_a_video_backend_vllm_cannot_use_here_is_refused_at_start(backend: str, why: str) -> None:
    environ = {"VLLM_VIDEO_LOADER_BACKEND": backend}
    with pytest.raises(ConfigError, match=why) as refused:
        prepare_process_environment(environ)
    message = refused.value.message
    assert "VLLM_VIDEO_LOADER_BACKEND" in message and "\n" not in message
    assert "opencv" in message or "GPU" in message  # says what would do instead


def test_a_cpu_video_backend_of_vllm_is_kept() -> None:
    for backend in ("opencv", "opencv_dynamic"):
        environ = {"VLLM_VIDEO_LOADER_BACKEND": backend}
        prepare_process_environment(environ)
        assert environ["VLLM_VIDEO_LOADER_BACKEND"] == backend


def test_the_engine_factory_refuses_a_bad_video_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory is built at start (``Appliance``), in the owner and every HTTP worker."""
    from appliance.engines.factory import EngineFactory

    monkeypatch.setenv("VLLM_VIDEO_LOADER_BACKEND", "no-such-decoder")
    with pytest.raises(ConfigError, match="'no-such-decoder' names no video backend"):
        EngineFactory()


# -- the spawn window --------------------------------------------------------------------------


def test_the_window_applies_an_engines_environment_and_restores_all_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEPT", "before")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    before = dict(os.environ)
    window = SpawnWindow()
    with window.open({"CUDA_VISIBLE_DEVICES": "GPU-1", "KEPT": "during"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-1"
        assert os.environ["KEPT"] == "during"
        # What vLLM writes while building a config belongs to that engine only.
        os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"
        assert window.held
    assert dict(os.environ) == before
    assert not window.held


def test_the_window_closes_at_spawn_so_the_next_engine_need_not_wait_for_readiness() -> None:
    window = SpawnWindow()
    spawned = threading.Event()
    may_finish = threading.Event()
    second_entered = threading.Event()

    def first() -> None:
        with window.open({"APPLIANCE_TEST_ENGINE": "first"}):
            window.spawned()  # what the hook does once vLLM started the process
            spawned.set()
            may_finish.wait(10)  # the engine is still loading

    def second() -> None:
        spawned.wait(10)
        with window.open({"APPLIANCE_TEST_ENGINE": "second"}):
            assert os.environ["APPLIANCE_TEST_ENGINE"] == "second"
            second_entered.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    try:
        assert second_entered.wait(10), "the second engine waited for the first to be ready"
    finally:
        may_finish.set()
        for thread in threads:
            thread.join(10)
    assert "APPLIANCE_TEST_ENGINE" not in os.environ


def test_the_hook_closes_the_window_after_vllms_process_manager_starts_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.v1.engine import utils as engine_utils

    seen: list[str | None] = []

    class FakeProcManager:
        """Stands in for vLLM's CoreEngineProcManager: records the env at 'spawn'."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.append(os.environ.get("APPLIANCE_TEST_SPAWN"))
            if kwargs.get("fail"):
                raise RuntimeError("spawn failed")

    monkeypatch.setattr(engine_utils, "CoreEngineProcManager", FakeProcManager)
    window = SpawnWindow()
    monkeypatch.setattr(spawn, "SPAWN_WINDOW", window)
    install_spawn_hook()
    hooked = engine_utils.CoreEngineProcManager
    assert issubclass(hooked, FakeProcManager)
    install_spawn_hook()  # idempotent
    assert engine_utils.CoreEngineProcManager is hooked
    with window.open({"APPLIANCE_TEST_SPAWN": "1"}):
        hooked()
        assert not window.held  # closed at spawn, before the block ends
        assert "APPLIANCE_TEST_SPAWN" not in os.environ
    with window.open({"APPLIANCE_TEST_SPAWN": "2"}):
        with pytest.raises(RuntimeError):
            hooked(fail=True)
        assert not window.held
    assert seen == ["1", "2"]


def test_device_capability_cache_is_dropped_for_each_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vllm.platforms

    cleared: list[bool] = []

    class Platform:
        @staticmethod
        def get_device_capability(device_id: int = 0) -> None:
            return None

    Platform.get_device_capability.cache_clear = lambda: cleared.append(True)  # type: ignore[attr-defined]
    monkeypatch.setattr(vllm.platforms, "current_platform", Platform())
    spawn.forget_device_caches()
    assert cleared == [True]


# -- sleep and wake ----------------------------------------------------------------------------


class RecordingClient:
    """Records what the engine asks of vLLM's AsyncLLM; answers as a GPU engine would."""

    def __init__(self, *, stays_asleep: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.asleep = False
        self.stays_asleep = stays_asleep
        self.errored = False

    async def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))
        self.asleep = True

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        if tags is None or "kv_cache" in tags:
            self.asleep = self.stays_asleep
        return not self.asleep

    async def collective_rpc(self, method: str, **kwargs: Any) -> list[Any]:
        self.calls.append(("collective_rpc", method))
        return [None]

    async def is_sleeping(self) -> bool:
        self.calls.append(("is_sleeping",))
        return self.asleep


def engine_with(client: RecordingClient, source: str = "org/model") -> VLLMEngine:
    spec = LocalModelSpec(name="m", source=source)
    engine = VLLMEngine(spec, argparse.Namespace(model=source))
    engine._engine = client
    return engine


def test_level_two_wakes_the_documented_way() -> None:
    client = RecordingClient()
    engine = engine_with(client)

    async def main() -> None:
        await engine.sleep(2)
        await engine.wake_up()

    asyncio.run(main())
    assert client.calls == [
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("collective_rpc", "reload_weights"),
        ("wake_up", ["kv_cache"]),
        ("is_sleeping",),
    ]


def test_level_one_wakes_everything_at_once() -> None:
    client = RecordingClient()
    engine = engine_with(client)

    async def main() -> None:
        await engine.sleep(1)
        await engine.wake_up()
        # A second sleep at level 1 after a level-2 cycle is still woken as level 1.
        await engine.sleep(2)
        await engine.wake_up()
        client.calls.clear()
        await engine.sleep(1)
        await engine.wake_up()

    asyncio.run(main())
    assert client.calls == [("sleep", 1), ("wake_up", None), ("is_sleeping",)]


def test_a_wake_vllm_does_not_complete_is_an_error() -> None:
    engine = engine_with(RecordingClient(stays_asleep=True))

    async def main() -> None:
        await engine.sleep(1)
        await engine.wake_up()

    with pytest.raises(EngineError, match="still reports the engine asleep"):
        asyncio.run(main())


def test_weights_are_measured_from_the_weight_files(tmp_path: Path) -> None:
    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 2**20)
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 5 * 2**20)
    engine = engine_with(RecordingClient(), source=str(tmp_path))
    assert engine.weights_gib() == pytest.approx(4 / 1024)
    assert engine_with(RecordingClient()).weights_gib() is None  # a hub id not downloaded


# -- weights before the engine-ready timeout -----------------------------------------------------


def test_hub_weights_are_downloaded_before_the_engine_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub
    from vllm.model_executor.model_loader import weight_utils

    calls: list[tuple[str, list[str]]] = []

    def download(source: str, cache_dir: str | None, allow_patterns: list[str], **kw: Any) -> str:
        calls.append((source, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(weight_utils, "download_weights_from_hf", download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    engine = engine_with(RecordingClient(), source="org/model")
    engine._download_weights()
    assert calls == [("org/model", ["*.safetensors", "*.bin", "*.pt"])]
    assert engine._weights_folder == str(tmp_path)

    calls.clear()
    engine_with(RecordingClient(), source=str(tmp_path))._download_weights()  # a local folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    engine_with(RecordingClient(), source="org/model")._download_weights()  # offline
    assert calls == []
