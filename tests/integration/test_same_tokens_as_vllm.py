"""Issue 2: at temperature 0 the appliance returns exactly vLLM's own tokens: it adds nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from openai import OpenAI

from tests.integration.harness import MODELS_DIR

pytestmark = pytest.mark.integration

PROMPT = "the model serves a request"
MESSAGES = [{"role": "user", "content": "hello appliance"}]

# vLLM's offline LLM, same model and engine settings as the appliance's tiny-chat entry. It
# runs in its own process (vLLM spawns engine processes: the script needs a __main__ guard).
REFERENCE = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model, prompt, messages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(model=model, max_model_len=512, dtype="float32")
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        text = llm.generate([prompt], params)[0].outputs[0]
        chat = llm.chat(messages, params)[0].outputs[0]
        print("RESULT " + json.dumps({
            "completion_ids": list(text.token_ids), "completion_text": text.text,
            "chat_ids": list(chat.token_ids), "chat_text": chat.text,
        }))
    """
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    script = tmp_path_factory.mktemp("reference") / "reference.py"
    script.write_text(REFERENCE)
    done = subprocess.run(
        [sys.executable, str(script), str(MODELS_DIR / "tiny-llama"), PROMPT, json.dumps(MESSAGES)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
        cwd=Path(script).parent,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


def test_completion_tokens_match_vllm(client: OpenAI, reference: dict[str, object]) -> None:
    reply = client.completions.create(
        model="tiny-chat",
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = reply.choices[0]
    assert choice.model_extra["token_ids"] == reference["completion_ids"]
    assert choice.text == reference["completion_text"]


def test_chat_tokens_match_vllm(client: OpenAI, reference: dict[str, object]) -> None:
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = reply.choices[0]
    assert choice.model_extra["token_ids"] == reference["chat_ids"]
    assert choice.message.content == reference["chat_text"]
