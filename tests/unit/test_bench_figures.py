"""The benchmark's own arithmetic: the figures BENCHMARKS.md quotes.

scripts/bench.py (command line, settings) and scripts/bench_report.py (summary).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as running ``scripts/bench.py`` does: scripts/ on sys.path."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load("bench")


@pytest.fixture(scope="module")
def bench_report() -> ModuleType:
    return load("bench_report")


@pytest.fixture(scope="module")
def bench_types() -> ModuleType:
    return load("bench_types")


def run(
    types: ModuleType, model: str, tokens: int, completed: int, duration: float, start: float | None
) -> Any:
    return types.RunResult(
        server=types.APPLIANCE,
        model=model,
        concurrency=16,
        round=0,
        metrics={"output_throughput": tokens / duration},
        completed=completed,
        failed=0,
        total_output_tokens=tokens,
        duration=duration,
        start_unix=start,
    )


def test_aggregate_is_both_clients_tokens_over_the_common_window(
    bench_report: ModuleType, bench_types: ModuleType
) -> None:
    # One client ends after 1 s, the other after 4 s: 2 servers did 5,000 tokens in 4 s, not
    # 4,000 + 250 tok/s as the sum of their own rates would say.
    runs = [
        run(bench_types, "a", 4000, 60, 1.0, 100.0),
        run(bench_types, "b", 1000, 20, 4.0, 100.0),
    ]
    agg = bench_report.two_model_aggregate(runs)
    assert agg["output_throughput"] == pytest.approx(5000 / 4.0)
    assert agg["request_throughput"] == pytest.approx(80 / 4.0)
    assert agg["window_s"] == pytest.approx(4.0)
    assert agg["start_skew_s"] == pytest.approx(0.0)


def test_aggregate_window_spans_starts_that_drift_apart(
    bench_report: ModuleType, bench_types: ModuleType
) -> None:
    runs = [
        run(bench_types, "a", 1000, 10, 2.0, 100.0),
        run(bench_types, "b", 1000, 10, 2.0, 101.0),
    ]
    agg = bench_report.two_model_aggregate(runs)
    assert agg["window_s"] == pytest.approx(3.0)
    assert agg["start_skew_s"] == pytest.approx(1.0)
    assert agg["output_throughput"] == pytest.approx(2000 / 3.0)


def test_aggregate_without_start_times_uses_the_longer_duration(
    bench_report: ModuleType, bench_types: ModuleType
) -> None:
    runs = [run(bench_types, "a", 1000, 10, 2.0, None), run(bench_types, "b", 3000, 30, 3.0, None)]
    agg = bench_report.two_model_aggregate(runs)
    assert agg["output_throughput"] == pytest.approx(4000 / 3.0)
    assert math.isnan(agg["start_skew_s"])
    assert math.isnan(bench_report.two_model_aggregate([])["output_throughput"])


def test_default_prompt_counts(bench: ModuleType) -> None:
    settings = bench.settings_from_args(bench.build_parser().parse_args([]))
    assert [settings.prompts_for(c) for c in (1, 16, 64)] == [64, 256, 1024]
    quick = bench.settings_from_args(bench.build_parser().parse_args(["--quick"]))
    assert quick.prompts_for(4) == 8


def test_cpu_lists_must_be_cpus_this_process_may_use(bench: ModuleType) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert bench.parse_cpus(str(allowed[0])) == [allowed[0]]
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_cpus(str(max(allowed) + 1))
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_cpus("zero")
