"""Issue 2: at temperature 0 the appliance returns exactly vLLM's own tokens: it adds nothing.

The reference is the session's ``vllm serve`` of the same model with the same engine settings
(``vllm_reference``); the appliance is the shared one, whose two HTTP workers both answer.
"""

from __future__ import annotations

from typing import Any

import pytest
from openai import OpenAI

from tests.integration.vllm_reference import CHAT_MODEL

pytestmark = pytest.mark.integration

PROMPT = "the model serves a request"
MESSAGES: list[Any] = [{"role": "user", "content": "hello appliance"}]
GREEDY: dict[str, Any] = {
    "max_tokens": 16,
    "temperature": 0,
    "extra_body": {"ignore_eos": True, "return_token_ids": True},
}


@pytest.fixture(scope="module")
def vllm(vllm_reference: dict[str, str]) -> OpenAI:
    """The OpenAI SDK pointed at vLLM's own server of the tiny chat model."""
    return OpenAI(base_url=f"{vllm_reference[CHAT_MODEL]}/v1", api_key="unused", max_retries=0)


def test_completion_tokens_match_vllm(client: OpenAI, vllm: OpenAI) -> None:
    theirs = vllm.completions.create(model=CHAT_MODEL, prompt=PROMPT, **GREEDY).choices[0]
    assert len(theirs.model_extra["token_ids"]) == 16
    for _ in range(4):  # every time, whichever HTTP worker answers
        ours = client.completions.create(model=CHAT_MODEL, prompt=PROMPT, **GREEDY).choices[0]
        assert ours.model_extra["token_ids"] == theirs.model_extra["token_ids"]
        assert ours.text == theirs.text


def test_chat_tokens_match_vllm(client: OpenAI, vllm: OpenAI) -> None:
    theirs = vllm.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, **GREEDY).choices[0]
    assert len(theirs.model_extra["token_ids"]) == 16
    for _ in range(4):
        ours = client.chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, **GREEDY
        ).choices[0]
        assert ours.model_extra["token_ids"] == theirs.model_extra["token_ids"]
        assert ours.message.content == theirs.message.content
