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


# -- front-end CPU per output token (scripts/bench_cpu.py) ----------------------------------


@pytest.fixture(scope="module")
def bench_cpu() -> ModuleType:
    return load("bench_cpu")


def test_vllm_single_api_server_is_the_server_process(bench_cpu: ModuleType) -> None:
    procs = bench_cpu.classify(
        "vllm",
        "vLLM[bench]",
        100,
        [
            (100, "python -m vllm.entrypoints.openai.api_server --model m"),
            (101, "VLLM::EngineCore"),
        ],
    )
    assert [(p.pid, p.name, p.role) for p in procs] == [
        (100, "API server", bench_cpu.FRONT_END),
        (101, "EngineCore", bench_cpu.ENGINE),
    ]
    assert bench_cpu.front_end_count(procs) == 1


def test_vllm_api_server_count_counts_the_api_servers_not_the_launcher(
    bench_cpu: ModuleType,
) -> None:
    procs = bench_cpu.classify(
        "vllm",
        "vLLM[bench]",
        100,
        [
            (100, "python -m vllm.entrypoints.cli.main serve m --api-server-count 2"),
            (103, "VLLM::APIServer_1"),
            (101, "VLLM::EngineCore"),
            (102, "VLLM::APIServer_0"),
            (104, "python -c from multiprocessing.resource_tracker import main;main(7)"),
        ],
    )
    roles = {p.name: p.role for p in procs}
    assert roles == {
        "launcher": bench_cpu.LAUNCHER,
        "EngineCore": bench_cpu.ENGINE,
        "APIServer_0": bench_cpu.FRONT_END,
        "APIServer_1": bench_cpu.FRONT_END,
        "other": bench_cpu.OTHER,
    }
    assert bench_cpu.front_end_count(procs) == 2


def test_appliance_front_end_is_itself_and_its_http_workers(bench_cpu: ModuleType) -> None:
    procs = bench_cpu.classify(
        "appliance",
        "appliance",
        200,
        [
            (200, "python -m appliance up --config x --workers 2"),
            (201, "VLLM::EngineCore"),
            (202, "VLLM::EngineCore"),
            (203, "appliance: http worker 1"),
        ],
    )
    assert [(p.key, p.role) for p in procs] == [
        ("appliance worker 0", bench_cpu.FRONT_END),
        ("appliance EngineCore", bench_cpu.ENGINE),
        ("appliance EngineCore #2", bench_cpu.ENGINE),  # two engines keep apart
        ("appliance http worker 1", bench_cpu.FRONT_END),
    ]
    # A vLLM-titled API server under the appliance would be an engine-side process, not HTTP.
    assert bench_cpu.classify("appliance", "a", 1, [(1, "x"), (2, "VLLM::APIServer_0")])[
        1
    ].role == (bench_cpu.ENGINE)


def cpu_run(
    types: ModuleType,
    processes: list[tuple[int, str, str, str]],
    start: tuple[float, dict[int, float | None]],
    end: tuple[float, dict[int, float | None]],
    tokens: int,
    model: str = "bench",
    round_: int = 0,
) -> Any:
    def reading(at: tuple[float, dict[int, float | None]]) -> dict[str, Any]:
        return {"unix": at[0], "cpu_s": {str(pid): s for pid, s in at[1].items()}}

    return types.RunResult(
        server=types.APPLIANCE,
        model=model,
        concurrency=16,
        round=round_,
        metrics={},
        completed=1,
        failed=0,
        total_output_tokens=tokens,
        duration=end[0] - start[0],
        start_unix=start[0],
        cpu={
            "processes": [
                {"pid": pid, "server": server, "name": name, "role": role}
                for pid, server, name, role in processes
            ],
            "start": reading(start),
            "end": reading(end),
            "end_hook": "test",
        },
    )


PROCS = [
    (200, "appliance", "worker 0", "front_end"),
    (203, "appliance", "http worker 1", "front_end"),
    (201, "appliance", "EngineCore", "engine"),
]


def test_cpu_per_token_per_process_and_summed(
    bench_cpu: ModuleType, bench_types: ModuleType
) -> None:
    # 10,000 tokens in 5 s; worker 0 used 1.5 s, worker 1 0.5 s, the engine 4 s.
    run_ = cpu_run(
        bench_types,
        PROCS,
        (100.0, {200: 10.0, 203: 2.0, 201: 50.0}),
        (105.0, {200: 11.5, 203: 2.5, 201: 54.0}),
        10_000,
    )
    fig = bench_cpu.run_cpu([run_])
    assert fig["window_s"] == pytest.approx(5.0)
    each = {p["key"]: p for p in fig["processes"]}
    assert each["appliance worker 0"]["ms_per_token"] == pytest.approx(0.15)
    assert each["appliance http worker 1"]["ms_per_token"] == pytest.approx(0.05)
    assert fig["front_end"]["ms_per_token"] == pytest.approx(0.2)
    assert fig["front_end"]["tokens_per_core_s"] == pytest.approx(5000.0)  # 1000 / 0.2
    assert fig["front_end"]["cores"] == pytest.approx(0.4)
    assert fig["front_end"]["count"] == 2
    assert fig["engine"]["ms_per_token"] == pytest.approx(0.4)


def test_two_clients_share_one_window_and_their_tokens(
    bench_cpu: ModuleType, bench_types: ModuleType
) -> None:
    procs = [(200, "appliance", "worker 0", "front_end")]
    a = cpu_run(bench_types, procs, (100.0, {200: 1.0}), (103.0, {200: 2.0}), 3000, "a")
    b = cpu_run(bench_types, procs, (100.5, {200: 1.1}), (104.0, {200: 2.6}), 1000, "b")
    fig = bench_cpu.run_cpu([a, b])
    # From a's start (the first) to b's end (the last): 1.6 s of CPU for 4,000 tokens in 4 s.
    assert fig["window_s"] == pytest.approx(4.0)
    assert fig["front_end"]["ms_per_token"] == pytest.approx(0.4)
    assert fig["front_end"]["cores"] == pytest.approx(0.4)


def test_no_figure_without_readings_or_with_a_vanished_front_end(
    bench_cpu: ModuleType, bench_types: ModuleType
) -> None:
    assert bench_cpu.run_cpu([run(bench_types, "a", 100, 1, 1.0, 0.0)]) is None  # cpu=None
    gone = cpu_run(
        bench_types,
        PROCS,
        (100.0, {200: 1.0, 203: 1.0, 201: 1.0}),
        (101.0, {200: 2.0, 203: None, 201: 2.0}),
        100,
    )
    assert bench_cpu.run_cpu([gone]) is None


def test_summary_takes_the_median_over_rounds(
    bench_cpu: ModuleType, bench_types: ModuleType
) -> None:
    procs = [(200, "appliance", "worker 0", "front_end")]
    runs = [
        cpu_run(bench_types, procs, (0.0, {200: 0.0}), (1.0, {200: cpu}), 1000, round_=i)
        for i, cpu in enumerate((0.1, 0.3, 0.2))
    ]
    summary = bench_cpu.summarize_cpu(runs, [16])
    entry = summary["16"]["appliance"]
    assert entry["rounds"] == 3
    assert entry["front_end"]["ms_per_token"] == pytest.approx(0.2)
    assert entry["processes"]["appliance worker 0"]["ms_per_token"] == pytest.approx(0.2)
    assert "vllm" not in summary["16"]
    assert bench_cpu.summarize_front_end([], [16], [], [16]) is None


def test_server_commands_take_workers_and_api_server_count(bench: ModuleType) -> None:
    settings = bench.settings_from_args(
        bench.build_parser().parse_args(["--vllm-api-server-count", "2"])
    )
    cmd = bench.vllm_command(settings.model, 8000, settings)
    assert cmd[1:5] == ["-c", bench.VLLM_SERVE_CODE, "serve", settings.model.path]
    assert cmd[cmd.index("--api-server-count") + 1] == "2"
    plain = bench.settings_from_args(bench.build_parser().parse_args([]))
    cmd = bench.vllm_command(plain.model, 8000, plain)
    assert "vllm.entrypoints.openai.api_server" in cmd and "--api-server-count" not in cmd
    assert "--workers" not in bench.appliance_command(Path("m.yaml"), 8000)
    assert bench.appliance_command(Path("m.yaml"), 8000, 2)[-2:] == ["--workers", "2"]
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--appliance-workers", "0"])


def test_appliance_workers_refused_when_appliance_up_lacks_the_option(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench, "appliance_has_workers_option", lambda: False)
    with pytest.raises(SystemExit, match="no --workers option"):
        bench.main(["--appliance-workers", "2", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before anything ran or was written


def test_client_and_vllm_serve_code_compile(bench: ModuleType) -> None:
    compile(bench.CLIENT_CODE, "<bench client>", "exec")
    compile(bench.VLLM_SERVE_CODE, "<vllm serve>", "exec")


def test_skip_one_model_and_skip_two_models_together_is_refused(bench: ModuleType) -> None:
    settings = bench.settings_from_args(bench.build_parser().parse_args(["--skip-one-model"]))
    assert settings.skip_one_model and not settings.skip_two_models
    with pytest.raises(SystemExit, match="nothing to run"):
        bench.settings_from_args(
            bench.build_parser().parse_args(["--skip-one-model", "--skip-two-models"])
        )
