"""How big a structured-output constraint may be before an engine compiles it.

vLLM compiles a request's JSON schema, regex, grammar or choice list into a grammar in the
engine core (xgrammar), where no timeout applies and the cost grows with the model's
vocabulary. A bounded repetition is compiled by copying what it repeats, so nested bounds
multiply: a 2 KB schema whose string properties carry ``pattern: "(a{1,64}){1,64}"`` (4,096
copies each) takes seconds and tens of megabytes on a 512-token vocabulary, and minutes on a
real one. These checks measure each constraint a request carries (its size, depth and node
count, and the repetition bounds of every regex in it) and refuse one past a limit, before
any engine sees it. Pure functions over the parsed body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidRequestError
from appliance.settings import StructuredOutputLimits

# Keys of a JSON schema (or a structural tag) whose value is a regex, or whose keys are.
_REGEX_VALUE_KEYS = frozenset({"pattern", "regex", "whitespace_pattern"})
_REGEX_KEYS_OF = frozenset({"patternProperties"})
_GRAMMAR_KEYS = frozenset({"grammar"})


@dataclass(frozen=True)
class Constraint:
    """One structured-output constraint of a request: where it is (``param``, as the error's
    ``param`` names it), what it is (``kind``) and its value as sent."""

    param: str
    kind: str  # "schema" (a JSON schema or structural tag), "regex", "grammar" or "choice"
    value: Any


def constraints_of(body: dict[str, Any]) -> Iterator[Constraint]:
    """Every constraint ``body`` carries, in every field vLLM 0.32 compiles one from: chat,
    completions and batch (``structured_outputs``, ``response_format``, tool ``parameters``),
    responses (``text.format``, tools), messages (tools' ``input_schema``, ``output_config``,
    ``output_format``) and the token route (``sampling_params.structured_outputs``)."""
    yield from _structured_outputs("structured_outputs", body.get("structured_outputs"))
    sampling = body.get("sampling_params")
    if isinstance(sampling, dict):
        yield from _structured_outputs(
            "sampling_params.structured_outputs", sampling.get("structured_outputs")
        )
    for name in ("response_format", "output_config", "output_format"):
        if isinstance(body.get(name), dict):
            yield Constraint(name, "schema", body[name])
    text = body.get("text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        yield Constraint("text.format", "schema", text["format"])
    tools = body.get("tools")
    if isinstance(tools, list):
        # A tool's parameters become a grammar when the tool is forced (tool_choice
        # "required" or named); every tool is measured, forced or not, as it may be.
        for index, tool in enumerate(tools):
            if isinstance(tool, dict):
                yield Constraint(f"tools[{index}]", "schema", tool)


def _structured_outputs(param: str, given: Any) -> Iterator[Constraint]:
    if not isinstance(given, dict):
        return
    for key, kind in (
        ("json", "schema"),
        ("structural_tag", "schema"),
        ("regex", "regex"),
        ("whitespace_pattern", "regex"),
        ("grammar", "grammar"),
        ("choice", "choice"),
    ):
        value = given.get(key)
        if value is None:
            continue
        if kind == "schema" and isinstance(value, str):
            # vLLM takes a schema as JSON text too; measure what it will parse.
            try:
                value = json.loads(value)
            except ValueError:
                kind = "grammar"  # not JSON: vLLM refuses it; still bounded by size
        yield Constraint(f"{param}.{key}", kind, value)


def check_constraints(body: dict[str, Any], limits: StructuredOutputLimits) -> None:
    """Raise ``InvalidRequestError`` (400, ``param`` naming the field) if a constraint in
    ``body`` is past one of ``limits``; the message names the limit and the setting."""
    total = 0
    for constraint in constraints_of(body):
        total += _check_one(constraint, limits)
        if total > limits.max_repeat_total:
            raise InvalidRequestError(
                f"the structured-output constraints of this request repeat {total} times in "
                f"all (bounded repetitions, nested ones multiplied), more than the limit of "
                f"{limits.max_repeat_total} (structured_outputs.max_repeat_total)",
                param=constraint.param,
            )


def _check_one(constraint: Constraint, limits: StructuredOutputLimits) -> int:
    """Check one constraint; return its repetition weight (for the request's total)."""
    param, value = constraint.param, constraint.value
    size = len(value.encode()) if isinstance(value, str) else _json_size(value)
    if size > limits.max_schema_bytes:
        _refuse(param, f"is {size} bytes", f"{limits.max_schema_bytes} bytes", "max_schema_bytes")
    if constraint.kind == "regex":
        return _check_regex(param, value, limits) if isinstance(value, str) else 0
    if constraint.kind == "grammar":
        return _check_grammar(param, value, limits) if isinstance(value, str) else 0
    if constraint.kind == "choice":
        if isinstance(value, list) and len(value) > limits.max_choices:
            _refuse(param, f"has {len(value)} choices", str(limits.max_choices), "max_choices")
        return 0
    return _check_schema(param, value, limits)


def _check_schema(param: str, schema: Any, limits: StructuredOutputLimits) -> int:
    """Depth and node count of a JSON schema (or structural tag), then its regexes."""
    nodes = 0
    weight = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_schema_nodes:
            _refuse(param, "has more nodes", f"{limits.max_schema_nodes} nodes", "max_schema_nodes")
        if depth > limits.max_schema_depth:
            _refuse(
                param, "is nested deeper", f"{limits.max_schema_depth} levels", "max_schema_depth"
            )
        if isinstance(value, dict):
            for key, child in value.items():
                if key in _REGEX_VALUE_KEYS and isinstance(child, str):
                    weight += _check_regex(param, child, limits)
                elif key in _GRAMMAR_KEYS and isinstance(child, str):
                    weight += _check_grammar(param, child, limits)
                elif key in _REGEX_KEYS_OF and isinstance(child, dict):
                    for pattern in child:
                        weight += _check_regex(param, pattern, limits)
                stack.append((child, depth + 1))
        elif isinstance(value, list):
            stack.extend((child, depth + 1) for child in value)
    return weight


def _check_regex(param: str, pattern: str, limits: StructuredOutputLimits) -> int:
    product, weight = repetition_of(pattern)
    if product > limits.max_regex_repeat:
        _refuse(
            param,
            f"has a regex whose nested repetition bounds multiply to {product}",
            str(limits.max_regex_repeat),
            "max_regex_repeat",
        )
    return weight


def _check_grammar(param: str, grammar: str, limits: StructuredOutputLimits) -> int:
    # A grammar's rules refer to each other, so which bounds nest is not known from the
    # text alone: every bound in it is taken to nest in every other (an over-estimate).
    product = 1
    for bound in _bounds(grammar):
        product *= bound
        if product > limits.max_regex_repeat:
            _refuse(
                param,
                "has bounded repetitions that multiply (taken as nested) past the limit",
                str(limits.max_regex_repeat),
                "max_regex_repeat",
            )
    return product if product > 1 else 0


def _refuse(param: str, what: str, limit: str, setting: str) -> None:
    raise InvalidRequestError(
        f"the structured-output constraint in '{param}' {what}, more than the limit of "
        f"{limit} (structured_outputs.{setting})",
        param=param,
    )


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError):
        return 0


@dataclass
class _Group:
    product: int = 1  # the largest product of nested bounds inside the group so far
    weight: int = 0  # the copies its bounded repetitions add, nested ones multiplied
    last_product: int = 1  # the last atom's (what a quantifier right after applies to)
    last_weight: int = 0


def repetition_of(pattern: str) -> tuple[int, int]:
    """``(product, weight)`` of a regex's bounded repetitions: ``product`` is the largest
    product of nested bounds (``(a{1,64}){1,64}``: 4096), ``weight`` the copies they add in
    all (``a{2}b{3}``: 5). ``*``, ``+`` and ``?`` are loops, not copies, and count 1; an
    unbounded ``{m,}`` counts ``m``. Scanned by hand rather than by ``re``'s parser, so that
    any dialect's text is measured (a brace that is no quantifier is a literal)."""
    stack = [_Group()]
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            i = _after_escape(pattern, i)
            _atom(stack[-1], 1, 0)
            continue
        if char == "[":
            i = _after_class(pattern, i)
            _atom(stack[-1], 1, 0)
            continue
        if char == "(":
            stack.append(_Group())
        elif char == ")" and len(stack) > 1:
            inner = stack.pop()
            _atom(stack[-1], inner.product, inner.weight)
        elif char == "{":
            bound, end = _quantifier(pattern, i)
            if bound is not None:
                group = stack[-1]
                product = group.last_product * bound
                weight = bound * max(1, group.last_weight)
                group.product = max(group.product, product)
                group.weight += weight - group.last_weight
                group.last_product, group.last_weight = product, weight
                i = end
                continue
            _atom(stack[-1], 1, 0)
        elif char not in "|*+?)":
            _atom(stack[-1], 1, 0)
        i += 1
    while len(stack) > 1:  # unbalanced: close what is open (the engine will refuse it)
        inner = stack.pop()
        _atom(stack[-1], inner.product, inner.weight)
    return stack[0].product, stack[0].weight


def _atom(group: _Group, product: int, weight: int) -> None:
    group.product = max(group.product, product)
    group.weight += weight
    group.last_product, group.last_weight = product, weight


def _after_escape(pattern: str, i: int) -> int:
    """The index after the escape at ``i`` (``\\p{L}``, ``\\x{41}`` and ``\\u{41}`` whole)."""
    if i + 2 < len(pattern) and pattern[i + 1] in "pPxuN" and pattern[i + 2] == "{":
        close = pattern.find("}", i + 3)
        return close + 1 if close != -1 else len(pattern)
    return i + 2


def _after_class(pattern: str, i: int) -> int:
    """The index after the character class opening at ``i``."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1  # a ']' first in the class is a literal
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _quantifier(pattern: str, i: int) -> tuple[int | None, int]:
    """The bound of the quantifier ``{m}``, ``{m,}``, ``{m,n}`` or ``{,n}`` at ``i`` (its
    largest count, ``m`` if unbounded) and the index after it; None if it is no quantifier."""
    close = pattern.find("}", i + 1, i + 42)
    if close == -1:
        return None, i + 1
    low, comma, high = pattern[i + 1 : close].partition(",")
    low, high = low.strip(), high.strip()
    if not (low or high) or (low and not low.isdigit()) or (high and not high.isdigit()):
        return None, i + 1
    bound = int(high) if comma and high else int(low) if low else 1
    return max(bound, 1), close + 1


def _bounds(grammar: str) -> Iterator[int]:
    """Every quantifier's bound in ``grammar`` (EBNF or Lark, where ``x{m,n}`` repeats)."""
    i = grammar.find("{")
    while i != -1:
        bound, end = _quantifier(grammar, i)
        if bound is not None and bound > 1:
            yield bound
        i = grammar.find("{", end if bound is not None else i + 1)
