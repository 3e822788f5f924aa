"""Issue 2: bad input gets a clear 4xx in the OpenAI envelope, never a 500, and serving goes on."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.harness import ApplianceProcess

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
GOOD_CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}

CASES = [
    # (path, raw body or JSON, expected status, expected code or None)
    (CHAT, b"{not json", 400, "invalid_request"),
    (CHAT, b"", 400, "invalid_request"),
    (CHAT, b"[1, 2]", 400, "invalid_request"),
    (CHAT, {"messages": GOOD_CHAT["messages"]}, 400, "invalid_request"),
    (CHAT, {"model": 17, "messages": []}, 400, "invalid_request"),
    (CHAT, {"model": "no-such-model", "messages": GOOD_CHAT["messages"]}, 404, "model_not_found"),
    (CHAT, {"model": "tiny-chat", "messages": "hello"}, 400, "invalid_request"),
    (CHAT, {**GOOD_CHAT, "max_tokens": "many"}, 400, "invalid_request"),
    (CHAT, {**GOOD_CHAT, "temperature": -1}, 400, None),
    (CHAT, {**GOOD_CHAT, "top_p": 7}, 400, None),
    (CHAT, {**GOOD_CHAT, "n": 0}, 400, None),
    (CHAT, {**GOOD_CHAT, "max_tokens": 100000}, 400, None),
    (
        CHAT,
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "word " * 2000}]},
        400,
        None,
    ),
    (CHAT, {"model": "minilm", "messages": GOOD_CHAT["messages"]}, 400, "unsupported_task"),
    (COMPLETIONS, {"model": "tiny-chat"}, 400, None),
    (COMPLETIONS, {"model": "tiny-chat", "prompt": "hi", "logprobs": 99}, 400, None),
    (COMPLETIONS, {"model": "tiny-chat", "prompt": "word " * 2000}, 400, None),
    (EMBEDDINGS, {"model": "minilm"}, 400, None),
    (EMBEDDINGS, {"model": "minilm", "input": 5.5}, 400, None),
    (EMBEDDINGS, {"model": "minilm", "input": "long " * 1000}, 400, None),
    (EMBEDDINGS, {"model": "tiny-chat", "input": "hi"}, 400, "unsupported_task"),
    (EMBEDDINGS, {"model": "nope", "input": "hi"}, 404, "model_not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), CASES)
def test_bad_request_is_a_clear_4xx(
    serving_appliance: ApplianceProcess,
    path: str,
    body: bytes | dict[str, object],
    status: int,
    code: str | None,
) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(
        f"{serving_appliance.url}{path}",
        headers={"content-type": "application/json"},
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    # Still serving.
    ok = httpx.post(
        f"{serving_appliance.url}{CHAT}", json={**GOOD_CHAT, "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200


def test_unknown_route_and_method(serving_appliance: ApplianceProcess) -> None:
    missing = httpx.get(f"{serving_appliance.url}/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(f"{serving_appliance.url}{CHAT}")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_body_over_the_limit_is_413(serving_appliance: ApplianceProcess) -> None:
    huge = b'{"model": "tiny-chat", "prompt": "' + b"x" * (9 * 2**20) + b'"}'
    response = httpx.post(
        f"{serving_appliance.url}{COMPLETIONS}",
        content=huge,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
