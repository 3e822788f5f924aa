"""Issue 11: a model's routes come from its engine; a cross-encoder answers as vLLM's does.

The model has no ``task`` in models.yaml: vLLM picks its pooling runner, and its engine serves
``/classify``, ``/score`` and ``/rerank`` (not the generate routes). vLLM's own server and the
appliance serve the same tiny random-weight cross-encoder; the answers are compared as in
``test_differential``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import MODELS_DIR, ApplianceProcess, wait_until_ok
from tests.integration.test_differential import Servers, ask, same_answer
from tests.integration.vllm_reference import VLLMServer

pytestmark = pytest.mark.integration

MODEL = "tiny-rerank"


def build_cross_encoder(out: Path) -> Path:
    """A tiny random-weight cross-encoder (GPT-2 with one label) from the tiny GPT-2."""
    import torch
    import transformers

    source = MODELS_DIR / "tiny-gpt2"
    config = transformers.GPT2Config.from_pretrained(source)
    config.num_labels = 1
    config.architectures = ["GPT2ForSequenceClassification"]
    torch.manual_seed(11)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    workdir = tmp_path_factory.mktemp("cross-encoder")
    model = build_cross_encoder(workdir / "tiny-cross-encoder")
    entry = {
        "name": MODEL,
        "source": str(model),
        "resources": {"memory_gib": 1},
        "engine": {"max_model_len": 512, "dtype": "float32"},
    }
    appliance = ApplianceProcess(workdir, [entry])
    server: VLLMServer | None = None
    try:
        appliance.start(wait_ready=False)
        server = VLLMServer.start(
            workdir, MODEL, str(model), "--max-model-len", "512", "--dtype", "float32"
        )
        wait_until_ok(f"{server.url}/health", server.proc, server.log)
        appliance.wait_ready()
        yield Servers(vllm={MODEL: server.url}, appliance=appliance.url)
    finally:
        if server is not None:
            server.stop()
        appliance.stop()


CASES: list[tuple[str, dict[str, Any]]] = [
    ("/classify", {"model": MODEL, "input": ["a man eats", "stocks fell"]}),
    ("/score", {"model": MODEL, "text_1": "a man eats", "text_2": ["food", "stocks"]}),
    ("/rerank", {"model": MODEL, "query": "a man eats", "documents": ["food", "x"]}),
    ("/v2/rerank", {"model": MODEL, "query": "eats", "documents": ["food"], "top_n": 1}),
    ("/pooling", {"model": MODEL, "input": "a man eats"}),
    ("/tokenize", {"model": MODEL, "prompt": "a man eats"}),
    ("/classify", {"model": MODEL}),
    ("/score", {"model": MODEL, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}),
]


@pytest.mark.parametrize(("path", "body"), CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_cross_encoder_answers_as_vllm_does(
    servers: Servers, path: str, body: dict[str, Any]
) -> None:
    same_answer(servers, path, body, MODEL)


def test_routes_come_from_the_engine_not_the_catalogue(servers: Servers) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answer = ask(servers.appliance, "POST", "/v1/chat/completions", body)
    assert answer.status == 400
    message = answer.body["error"]["message"]
    assert "/classify" in message and "/rerank" in message and "/v1/responses" not in message
