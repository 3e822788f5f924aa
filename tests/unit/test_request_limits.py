"""Issue 25 part A, pure logic: fan-out caps, structured-output limits, stored-response owners."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.api.request_limits import (
    RequestCost,
    check_request,
    default_request_limits,
)
from appliance.api.stored_responses import (
    ResponseNotFoundError,
    ResponseOwners,
    keeps_stored_response,
    store_enabled,
)
from appliance.api.structured_limits import check_constraints, repetition_of
from appliance.engines.vllm.response_store import forget_stored
from appliance.errors import InvalidRequestError
from appliance.settings import StoredResponseLimits, StructuredOutputLimits
from appliance.supervisor.lending_board import KeyLimits

LIMITS = default_request_limits()
STRUCTURED = StructuredOutputLimits()
CHAT = "/v1/chat/completions"

# The issue's attack: 32 string properties, each pattern repeating 64 x 64 times.
BOMB = {
    "type": "object",
    "properties": {f"p{i}": {"type": "string", "pattern": "(a{1,64}){1,64}"} for i in range(32)},
}

# Schemas of the kind the existing tests and vLLM's docs send: all accepted.
ORDINARY = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
    {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "car": {"enum": ["sedan", "SUV", "truck"]},
        },
        "required": ["date"],
    },
]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def refused(path: str, body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        check_request(path, body, LIMITS)
    return caught.value


# -- fan-out -----------------------------------------------------------------------------


def test_n_and_best_of_over_the_cap_are_refused_naming_the_limit() -> None:
    error = refused("/v1/completions", {"model": "m", "prompt": "x", "n": 1024})
    assert error.param == "n" and "fan_out.max_n" in error.message and "16" in error.message
    assert refused("/v1/completions", {"model": "m", "prompt": "x", "best_of": 17}).param == (
        "best_of"
    )
    generate = {"model": "m", "token_ids": [1], "sampling_params": {"n": 100}}
    assert refused("/inference/v1/generate", generate).param == "sampling_params.n"


def test_batch_items_over_the_cap_are_refused() -> None:
    batch = {"model": "m", "messages": [[{"role": "user", "content": "x"}]] * 1024}
    error = refused("/v1/chat/completions/batch", batch)
    assert error.param == "messages" and "fan_out.max_batch_items" in error.message
    prompts = {"model": "m", "prompt": ["x"] * 33}
    assert refused("/v1/completions", prompts).param == "prompt"


def test_the_cost_counts_every_sequence_and_its_tokens() -> None:
    assert check_request(CHAT, chat(), LIMITS) == RequestCost(1, None)
    assert check_request(CHAT, chat(n=4, max_completion_tokens=10), LIMITS) == RequestCost(4, 10)
    batch = {"model": "m", "messages": [[{"role": "user", "content": "x"}]] * 3, "max_tokens": 5}
    assert check_request("/v1/chat/completions/batch", batch, LIMITS) == RequestCost(3, 5)
    prompts = {"model": "m", "prompt": [[1, 2], [3]], "n": 2}
    assert check_request("/v1/completions", prompts, LIMITS) == RequestCost(4, 16)  # vLLM's 16
    one_token_prompt = {"model": "m", "prompt": [1, 2, 3]}
    assert check_request("/v1/completions", one_token_prompt, LIMITS).sequences == 1
    responses = {"model": "m", "input": "x", "max_output_tokens": 7}
    assert check_request("/v1/responses", responses, LIMITS) == RequestCost(1, 7)
    assert RequestCost(4, None).tokens(512) == 2048 and RequestCost(4, 10).tokens(512) == 40
    for path in ("/v1/embeddings", "/tokenize", "/v1/chat/completions/render"):
        assert check_request(path, chat(), LIMITS).tokens(512) == 0  # generates nothing


def test_wrong_types_are_left_to_the_engine() -> None:
    for value in (0, -1, "3", True, None, 2.5):
        assert check_request(CHAT, chat(n=value), LIMITS).sequences == 1


def test_a_rate_window_admits_several_at_once() -> None:
    now = [0.0]
    limits = KeyLimits(requests_per_minute=5, max_concurrent=None, clock=lambda: now[0])
    assert limits.try_admit_more(3) is None
    assert limits.try_admit_more(3) == 60.0  # six would not fit until the first leaves
    now[0] = 10.0
    assert limits.try_admit_more(2) is None
    assert limits.try_admit_more(1) == 50.0  # the first three expire at 60
    now[0] = 61.0
    assert limits.try_admit_more(4) == 9.0 and limits.try_admit_more(3) is None


def test_a_keys_other_sequences_are_charged_or_refused_whole() -> None:
    now = [0.0]
    limits = KeyLimits(requests_per_minute=10, max_concurrent=1, clock=lambda: now[0])
    assert limits.try_acquire() is None and limits.requests_per_minute == 10
    assert limits.try_admit_more(7) is None  # 8 of 10 used; concurrency still one
    assert limits.try_admit_more(3) == 60.0  # refused, and nothing charged
    assert limits.try_admit_more(2) is None
    assert KeyLimits(requests_per_minute=None, max_concurrent=None).try_admit_more(99) is None


# -- structured outputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "product", "weight"),
    [
        ("(a{1,64}){1,64}", 4096, 4096),
        ("a{1,64}", 64, 64),
        (r"\d{4}-\d{2}-\d{2}", 4, 8),
        ("a*b+c?", 1, 0),
        ("a{5,}", 5, 5),
        ("x{3}", 3, 3),
        ("((ab){2,3}c){4}", 12, 12),
        ("a{1,10}|b{1,20}", 20, 30),
        (r"\{1,999\}", 1, 0),  # escaped braces: literals
        ("[{1,999}]", 1, 0),  # braces in a class: literals
        (r"\p{L}{2}", 2, 2),
        ("a{x}", 1, 0),  # no quantifier: a literal brace
        ("(a{1,8}", 8, 8),  # unbalanced: still measured
    ],
)
def test_repetition_of_a_regex(pattern: str, product: int, weight: int) -> None:
    assert repetition_of(pattern) == (product, weight)


def test_the_issues_grammar_bomb_is_refused_in_every_field() -> None:
    schema = {"name": "bomb", "schema": BOMB}
    bodies = [
        chat(response_format={"type": "json_schema", "json_schema": schema}),
        chat(structured_outputs={"json": BOMB}),
        chat(structured_outputs={"json": json.dumps(BOMB)}),
        {"model": "m", "input": "x", "text": {"format": {"type": "json_schema", **schema}}},
        chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": BOMB}}],
            tool_choice="required",
        ),
        {"model": "m", "messages": [], "tools": [{"name": "f", "input_schema": BOMB}]},
        {"model": "m", "token_ids": [1], "sampling_params": {"structured_outputs": {"json": BOMB}}},
        chat(structured_outputs={"regex": "(a{1,64}){1,64}"}),
    ]
    for body in bodies:
        with pytest.raises(InvalidRequestError) as caught:
            check_constraints(body, STRUCTURED)
        assert "max_regex_repeat" in caught.value.message and caught.value.param, body


def test_many_small_repetitions_add_up_to_the_request_total() -> None:
    # Each pattern is under the per-regex limit (256), 32 of them are not (8192 > 2048).
    small = {"type": "string", "pattern": "(a{1,16}){1,16}"}
    many = {"type": "object", "properties": {f"p{i}": small for i in range(32)}}
    with pytest.raises(InvalidRequestError, match="max_repeat_total"):
        check_constraints(chat(structured_outputs={"json": many}), STRUCTURED)


def test_ordinary_schemas_regexes_and_choices_pass() -> None:
    for schema in ORDINARY:
        named = {"name": "x", "schema": schema}
        check_request(
            CHAT, chat(response_format={"type": "json_schema", "json_schema": named}), LIMITS
        )
        check_request(CHAT, chat(structured_outputs={"json": schema}), LIMITS)
    check_request(CHAT, chat(structured_outputs={"regex": r"\w+@\w+\.com"}), LIMITS)
    check_request(CHAT, chat(structured_outputs={"choice": ["yes", "no"]}), LIMITS)
    grammar = 'root ::= "a" | "b" digit{1,3}\ndigit ::= [0-9]'
    check_request(CHAT, chat(structured_outputs={"grammar": grammar}), LIMITS)
    check_request(CHAT, chat(response_format={"type": "json_object"}), LIMITS)


def test_size_depth_nodes_choices_and_grammars_have_limits() -> None:
    def refused_for(constraint: dict[str, Any]) -> str:
        with pytest.raises(InvalidRequestError) as caught:
            check_constraints(chat(structured_outputs=constraint), STRUCTURED)
        return caught.value.message

    big = {"type": "object", "description": "x" * 40_000}
    assert "max_schema_bytes" in refused_for({"json": big})
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    assert "max_schema_depth" in refused_for({"json": deep})
    wide = {"enum": [0] * 5000}  # 10 kB, 5,001 nodes
    assert "max_schema_nodes" in refused_for({"json": wide})
    assert "max_choices" in refused_for({"choice": [str(i) for i in range(300)]})
    nested_rules = 'root ::= a{1,64}\na ::= "x"{1,64}'  # bounds in two rules still multiply
    assert "max_regex_repeat" in refused_for({"grammar": nested_rules})
    assert "max_schema_bytes" in refused_for({"regex": "a" * 40_000})


# -- stored responses ----------------------------------------------------------------------


class _Serving:
    def __init__(self) -> None:
        self.response_store: dict[str, object] = {}
        self.msg_store: dict[str, object] = {}
        self.event_store: dict[str, object] = {}


def owners(**limits: Any) -> tuple[ResponseOwners, list[tuple[str, list[str]]], list[float]]:
    forgotten: list[tuple[str, list[str]]] = []
    now = [0.0]
    table = ResponseOwners(
        StoredResponseLimits(**limits),
        lambda entry, ids: forgotten.append((entry, ids)),
        clock=lambda: now[0],
    )
    return table, forgotten, now


def test_a_stored_response_is_its_owners_only() -> None:
    table, _, _ = owners()
    rid = table.new_id()
    assert rid.startswith("resp_") and rid != table.new_id()
    table.add(rid, "alice", "tiny-chat")
    assert table.check(rid, "alice") == "tiny-chat"
    for caller in ("bob", ""):
        with pytest.raises(ResponseNotFoundError) as caught:
            table.check(rid, caller, "previous_response_id")
        assert caught.value.status_code == 404 and caught.value.param == "previous_response_id"
        assert caught.value.message == f"Response with id '{rid}' not found."  # as vLLM says
    with pytest.raises(ResponseNotFoundError):
        table.check("resp_unknown", "alice")


def test_the_store_is_capped_in_count_per_key_and_age() -> None:
    table, forgotten, now = owners(max_stored=3, max_per_key=2, max_age_seconds=100)
    table.add("a1", "alice", "m")
    table.add("a2", "alice", "m")
    table.add("a3", "alice", "m")  # alice's oldest goes
    assert forgotten == [("m", ["a1"])] and len(table) == 2
    table.add("b1", "bob", "m")
    table.add("c1", "carol", "m")  # past 3 in all: the oldest (a2) goes
    assert forgotten[-1] == ("m", ["a2"]) and len(table) == 3
    now[0] = 150.0
    with pytest.raises(ResponseNotFoundError):
        table.check("b1", "bob")
    assert len(table) == 0 and sorted(forgotten[-1][1]) == ["a3", "b1", "c1"]
    table.add("d1", "dave", "m")
    table.discard("d1")
    assert len(table) == 0


def test_forgetting_drops_every_store_of_vllms_serving_layer() -> None:
    serving = _Serving()
    for store in (serving.response_store, serving.msg_store, serving.event_store):
        store["r1"] = store["r2"] = object()
    assert forget_stored(serving, ["r1", "nope"]) == 1
    assert set(serving.response_store) == set(serving.msg_store) == {"r2"}
    assert forget_stored(None, ["r2"]) == 0


def test_which_requests_use_the_store() -> None:
    assert keeps_stored_response("/v1/responses", {"input": "x"})
    assert not keeps_stored_response("/v1/responses", {"input": "x", "store": False})
    assert keeps_stored_response("/v1/responses", {"store": False, "previous_response_id": "r"})
    assert not keeps_stored_response("/v1/chat/completions", {})
    assert store_enabled({"VLLM_ENABLE_RESPONSES_API_STORE": "1"})
    assert not store_enabled({}) and not store_enabled({"VLLM_ENABLE_RESPONSES_API_STORE": "x"})
