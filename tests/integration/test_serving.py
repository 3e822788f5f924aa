"""Issue 2: the real request path, end to end, through the OpenAI SDK and plain HTTP."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.integration.harness import ApplianceProcess, wait_until

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hello appliance"}]


def test_models_lists_the_catalogue(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-chat", "minilm"}
    assert models["tiny-chat"].owned_by == "local"
    assert models["minilm"].model_extra["task"] == "embed"


def test_chat_completion(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert reply.model == "tiny-chat"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.choices[0].finish_reason == "length"


def test_chat_stream_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6 and usage.prompt_tokens > 0
    # The streamed text equals the non-streamed one at temperature 0.
    whole = client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert whole.choices[0].message.content == text


def test_completion_and_stream(client: OpenAI) -> None:
    whole = client.completions.create(
        model="tiny-chat", prompt="the model", max_tokens=5, temperature=0
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    stream = client.completions.create(
        model="tiny-chat",
        prompt="the model",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_rank_paraphrase_above_unrelated(client: OpenAI) -> None:
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
    ]
    reply = client.embeddings.create(model="minilm", input=sentences)
    vectors = [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
    assert all(len(v) == 384 for v in vectors)
    paraphrase = _cosine(vectors[0], vectors[1])
    unrelated = _cosine(vectors[0], vectors[2])
    assert paraphrase > 0.6 > unrelated + 0.3, (paraphrase, unrelated)
    assert reply.usage.prompt_tokens > 0


def test_request_id_echoed_or_generated(serving_appliance: ApplianceProcess) -> None:
    given = httpx.get(f"{serving_appliance.url}/health", headers={"X-Request-Id": "req-42"})
    assert given.headers["x-request-id"] == "req-42"
    made = httpx.get(f"{serving_appliance.url}/health")
    assert len(made.headers["x-request-id"]) >= 16
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2}
    chat = httpx.post(
        f"{serving_appliance.url}/v1/chat/completions",
        json=body,
        headers={"X-Request-Id": "chat-7"},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.headers["x-request-id"] == "chat-7"

    # The access log has one JSON line for that request, with its id, model and tokens. It is
    # written once the last byte has gone out, so it may land just after the client has it.
    def access_lines() -> list[dict[str, object]]:
        lines = [
            json.loads(line)
            for line in serving_appliance.log_path.read_text().splitlines()
            if line.startswith("{") and '"chat-7"' in line
        ]
        return [entry for entry in lines if entry.get("event") == "request"]

    wait_until(lambda: bool(access_lines()), "the access line of chat-7", timeout=5)
    access = access_lines()
    assert len(access) == 1
    assert access[0]["model"] == "tiny-chat" and access[0]["status"] == 200
    assert access[0]["completion_tokens"] == 2 and access[0]["latency_ms"] > 0


def test_docs_and_openapi(serving_appliance: ApplianceProcess) -> None:
    assert httpx.get(f"{serving_appliance.url}/docs").status_code == 200
    paths = httpx.get(f"{serving_appliance.url}/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in paths


def test_32_concurrent_streams_complete(serving_appliance: ApplianceProcess) -> None:
    prompts = [f"stream number {i}" for i in range(4)]

    async def one(client: AsyncOpenAI, prompt: str) -> tuple[list[str], list[int], int]:
        stream = await client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            # Forbid early stops so every stream is exactly 12 tokens long.
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        deltas: list[str] = []
        token_ids: list[int] = []
        usage = 0
        async for chunk in stream:
            if chunk.choices:
                deltas.append(chunk.choices[0].delta.content or "")
                token_ids += chunk.choices[0].model_extra.get("token_ids") or []
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return deltas, token_ids, usage

    async def run() -> tuple[list[tuple[list[str], list[int], int]], list[tuple]]:
        client = AsyncOpenAI(
            base_url=f"{serving_appliance.url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        # Each prompt alone first: at temperature 0 this is what every concurrent copy must get.
        alone = [await one(client, p) for p in prompts]
        together = await asyncio.gather(*(one(client, prompts[i % 4]) for i in range(32)))
        return alone, together

    alone, together = asyncio.run(run())
    assert len(together) == 32
    for i, (deltas, token_ids, usage) in enumerate(together):
        expected_deltas, expected_ids, _ = alone[i % 4]
        assert usage == 12
        # Every token exactly once, in order. Under load vLLM may put several tokens in one
        # chunk (its output processor merges what the client has not read yet), so the chunk
        # count is between 1 and 12; the tokens and the text are what must match exactly.
        assert len(token_ids) == 12 and token_ids == expected_ids
        assert "".join(deltas) == "".join(expected_deltas)
        assert 1 < len(deltas) <= 13  # the role chunk, then one chunk per 1+ tokens
    assert httpx.get(f"{serving_appliance.url}/ready").status_code == 200
