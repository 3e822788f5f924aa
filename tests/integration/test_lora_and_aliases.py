"""Issue 12: a LoRA adapter and an alias are names of their own in the model table.

One appliance serves the tiny Llama with a tiny LoRA adapter (built offline, fixed seed) and an
alias. The adapter's greedy tokens differ from the base model's and equal vLLM's own offline
answer with the same adapter; a second adapter loads at run time while a stream on the base
model goes on, and that stream ends whole.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.integration.harness import MODELS_DIR, ApplianceProcess, tiny_chat, wait_until
from tests.integration.vllm_reference import reference_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "appliance", "adapters"]
PROMPT = "the model serves a request"
GREEDY: dict[str, Any] = {
    "max_tokens": 12,
    "temperature": 0,
    "extra_body": {"ignore_eos": True, "return_token_ids": True},
}

# vLLM's offline LLM with the same adapter: base and adapter tokens for PROMPT.
REFERENCE = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    if __name__ == "__main__":
        model, adapter, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
        llm = LLM(model=model, max_model_len=512, dtype="float32", enable_lora=True)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        base = llm.generate([prompt], params)[0].outputs[0]
        lora = llm.generate([prompt], params, lora_request=LoRARequest("tiny-sql", 1, adapter))
        print("RESULT " + json.dumps({
            "base": list(base.token_ids), "lora": list(lora[0].outputs[0].token_ids),
        }))
    """
)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "tiny-llama-lora"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_tiny_lora.py"), "--out", str(out)],
        check=True,
        cwd=REPO,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def reference(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    script = tmp_path_factory.mktemp("lora-reference") / "reference.py"
    script.write_text(REFERENCE)
    done = subprocess.run(
        [sys.executable, str(script), str(MODELS_DIR / "tiny-llama"), str(adapter), PROMPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=reference_env(),
        cwd=script.parent,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def box(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    entry = tiny_chat(
        aliases=["gpt-4o-mini"], adapters=[{"name": "tiny-sql", "source": str(adapter)}]
    )
    # Run from another folder than models.yaml's: a relative adapter folder is models.yaml's,
    # in every HTTP process.
    proc = ApplianceProcess(
        tmp_path_factory.mktemp("lora-box"), [entry], cwd=tmp_path_factory.mktemp("elsewhere")
    )
    proc.start("--list-aliases", "--workers", "2")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(box: ApplianceProcess) -> OpenAI:
    return OpenAI(base_url=f"{box.url}/v1", api_key="unused", max_retries=0)


def token_ids(client: OpenAI, model: str) -> tuple[list[int], str]:
    reply = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    return reply.choices[0].model_extra["token_ids"], reply.model


def streamed_ids(client: OpenAI, model: str) -> tuple[list[int], set[str]]:
    ids: list[int] = []
    models: set[str] = set()
    for chunk in client.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY):
        models.add(chunk.model)
        for choice in chunk.choices:
            ids.extend(choice.model_extra.get("token_ids") or [])
    return ids, models


def test_adapter_tokens_differ_from_the_base_and_equal_vllms(
    client: OpenAI, reference: dict[str, list[int]]
) -> None:
    base, base_model = token_ids(client, "tiny-chat")
    lora, lora_model = token_ids(client, "tiny-sql")
    assert base == reference["base"] and base_model == "tiny-chat"
    assert lora == reference["lora"] and lora_model == "tiny-sql"
    assert lora != base
    assert streamed_ids(client, "tiny-sql") == (reference["lora"], {"tiny-sql"})


def test_an_alias_is_the_base_model_under_its_name(
    client: OpenAI, reference: dict[str, list[int]]
) -> None:
    assert token_ids(client, "gpt-4o-mini") == (reference["base"], "tiny-chat")
    assert streamed_ids(client, "gpt-4o-mini") == (reference["base"], {"tiny-chat"})


def test_names_are_listed_and_labelled(client: OpenAI, box: ApplianceProcess) -> None:
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed["tiny-sql"]["parent"] == "tiny-chat"
    assert listed["gpt-4o-mini"]["alias_of"] == "tiny-chat"
    metrics = httpx.get(f"{box.url}/metrics", timeout=10).text
    assert 'appliance_requests_total{endpoint="completions",model="tiny-sql",status="200"}' in (
        metrics
    )
    status = httpx.get(f"{box.url}/admin/models/tiny-chat/status", timeout=10).json()
    assert status["aliases"] == ["gpt-4o-mini"]
    assert [a["name"] for a in status["adapters"]] == ["tiny-sql"]


def test_an_adapter_loads_at_run_time_without_dropping_a_stream(
    client: OpenAI, box: ApplianceProcess, adapter: Path, reference: dict[str, list[int]]
) -> None:
    first_chunk = threading.Event()
    result: dict[str, Any] = {}

    def long_stream() -> None:
        ids: list[int] = []
        stream = client.completions.create(
            model="tiny-chat",
            prompt=PROMPT,
            stream=True,
            max_tokens=200,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        for chunk in stream:
            first_chunk.set()
            for choice in chunk.choices:
                ids.extend(choice.model_extra.get("token_ids") or [])
        result["ids"] = ids

    reader = threading.Thread(target=long_stream)
    reader.start()
    assert first_chunk.wait(120), "the base model's stream did not start"
    loaded = subprocess.run(
        [*CLI, "load", "tiny-chat", "tiny-sql-2", str(adapter), "--url", box.url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    reader.join(300)
    assert len(result["ids"]) == 200  # the stream on the base model ended whole
    assert token_ids(client, "tiny-sql-2") == (reference["lora"], "tiny-sql-2")
    listed = subprocess.run(
        [*CLI, "list", "tiny-chat", "--url", box.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "tiny-sql-2" in listed.stdout
    unloaded = subprocess.run(
        [*CLI, "unload", "tiny-chat", "tiny-sql-2", "--url", box.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unloaded.returncode == 0, unloaded.stderr
    gone = httpx.post(
        f"{box.url}/v1/completions", json={"model": "tiny-sql-2", "prompt": "x"}, timeout=30
    )
    assert gone.status_code == 404


def test_a_runtime_adapter_from_a_relative_folder_answers_alike_from_every_worker(
    box: ApplianceProcess, adapter: Path, reference: dict[str, list[int]]
) -> None:
    shutil.copytree(adapter, box.workdir / "adapters" / "tiny-rel")
    loaded = subprocess.run(
        [*CLI, "load", "tiny-chat", "tiny-rel", "./adapters/tiny-rel", "--url", box.url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    answers: dict[str, list[int]] = {}

    def both_workers_answered() -> bool:
        # A new connection each time, so the kernel hands requests to either process.
        reply = httpx.post(
            f"{box.url}/v1/completions",
            json={
                "model": "tiny-rel",
                "prompt": PROMPT,
                "max_tokens": GREEDY["max_tokens"],
                "temperature": 0,
                **GREEDY["extra_body"],
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        answers[reply.headers["x-appliance-worker"]] = reply.json()["choices"][0]["token_ids"]
        return len(answers) == 2

    wait_until(both_workers_answered, "both HTTP workers answered the adapter", timeout=120)
    assert answers["0"] == answers["1"] == reference["lora"]
    assert reference["lora"] != reference["base"]
    unloaded = subprocess.run(
        [*CLI, "unload", "tiny-chat", "tiny-rel", "--url", box.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unloaded.returncode == 0, unloaded.stderr
