"""What the benchmark (scripts/bench.py) and its report (scripts/bench_report.py) share.

The server kinds, the metrics taken from vLLM's benchmark client, and the data classes for the
settings of a run and what it measured. Imports neither of the two, so both can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VLLM = "vllm"
APPLIANCE = "appliance"

# (key in vLLM's benchmark result, label, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("output_throughput", "output tokens/s", True),
    ("request_throughput", "requests/s", True),
    ("median_ttft_ms", "TTFT p50 (ms)", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("median_itl_ms", "ITL p50 (ms)", False),
    ("p99_itl_ms", "ITL p99 (ms)", False),
    ("median_e2el_ms", "E2E latency p50 (ms)", False),
)


@dataclass(frozen=True)
class Model:
    """A model under test: the name clients ask for and the folder (or hub id) it loads from."""

    name: str
    path: str


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, from the command line."""

    model: Model
    model2: Model
    engine: dict[str, Any]
    memory_share: float | None
    concurrencies: list[int]
    two_model_concurrencies: list[int]
    num_prompts: int | None
    input_len: int
    output_len: int
    rounds: int
    warmups: int | None  # None: min(concurrency, 4)
    seed: int
    skip_two_models: bool
    server_cpus: tuple[int, ...] | None  # CPUs every server process is confined to; None: all
    client_cpus: tuple[int, ...] | None  # CPUs every benchmark client is confined to
    startup_timeout: float
    run_timeout: float
    out_dir: Path
    stamp: str
    skip_one_model: bool = False
    appliance_workers: int | None = None  # `appliance up --workers K`; None: not passed
    vllm_api_server_count: int | None = None  # `vllm serve --api-server-count N`; None: not passed

    @property
    def log_dir(self) -> Path:
        """Where server and client logs of this run go."""
        return self.out_dir / f"bench-{self.stamp}-logs"

    def prompts_for(self, concurrency: int) -> int:
        """Prompts per benchmark run at ``concurrency``: 16 x concurrency, at least 64.

        ``--num-prompts`` (or ``--quick``: 8) sets one count for every run instead.
        """
        if self.num_prompts is not None:
            return self.num_prompts
        return max(64, 16 * concurrency)


@dataclass
class RunResult:
    """One benchmark client run against one server (one model).

    ``duration`` is vLLM's measured window in seconds, ``start_unix`` the wall-clock time it
    started (None where the client did not say: reports from older versions of bench.py).
    ``cpu``: the servers' processes and their CPU counters at the window's start and end, as
    the client read them (``bench_cpu.run_cpu`` turns them into figures); None: not read.
    """

    server: str
    model: str
    concurrency: int
    round: int
    metrics: dict[str, float]
    completed: int
    failed: int
    total_output_tokens: int = 0
    duration: float = float("nan")
    start_unix: float | None = None
    cpu: dict[str, Any] | None = None


@dataclass
class Measurements:
    """Everything measured, per server kind (``vllm`` / ``appliance``)."""

    runs: list[RunResult] = field(default_factory=list)
    startups: dict[str, list[float]] = field(default_factory=lambda: {VLLM: [], APPLIANCE: []})
    two_runs: list[RunResult] = field(default_factory=list)
    two_startups: dict[str, list[float]] = field(default_factory=lambda: {VLLM: [], APPLIANCE: []})
