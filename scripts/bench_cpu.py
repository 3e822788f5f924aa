"""Front-end CPU per output token (scripts/bench.py): which processes, and the arithmetic.

The benchmark measures the HTTP front end apart from the engines: the CPU time (user + system,
from ``psutil``) each API-side process spent inside a client's measured window, divided by the
output tokens generated in that window.

Which processes are the front end:

- ``vllm serve`` with one API server: the server process itself (its engine-core child,
  titled ``VLLM::EngineCore``, is not front end). With ``--api-server-count N`` > 1 the
  server process only launches and watches; its children titled ``VLLM::APIServer_<i>``
  serve HTTP and are the front end, the launcher is reported apart and not counted.
- ``appliance up``: the process itself (it owns the model table and serves HTTP as worker 0)
  and, with ``--workers K``, its children titled ``appliance: http worker <i>``. The engine
  processes vLLM starts for it (``VLLM::...``) and any other children are not front end.

The CPU counters are read by the benchmark client itself (``bench.py``'s ``CLIENT_CODE``) right
when vLLM's client starts its clock and right after its last request completes, so warm-ups and
the ``/metrics`` fetches vLLM's client makes before and after are outside the window. Counters
tick in 10 ms steps (``USER_HZ``), which is negligible over runs of seconds.

Imports neither ``bench.py`` nor ``bench_report.py``; the classification and arithmetic are
pure functions, tested in ``tests/unit/test_bench_figures.py``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench_types import APPLIANCE, VLLM, RunResult

FRONT_END = "front_end"
LAUNCHER = "launcher"  # vllm serve's own process when --api-server-count > 1: not front end
ENGINE = "engine"  # vLLM's engine core and worker processes
OTHER = "other"  # anything else in the tree (resource trackers, ...)

APPLIANCE_WORKER_TITLE = "appliance: http worker"
# vLLM titles its processes "<prefix>::<name>" (vllm.utils.system_utils.set_process_title).
VLLM_TITLE_PREFIX = os.environ.get("VLLM_PROCESS_NAME_PREFIX", "VLLM") + "::"
VLLM_API_SERVER_TITLE = VLLM_TITLE_PREFIX + "APIServer"

DEFINITION = (
    "CPU time (user + system) a process spent in the measured window / output tokens of "
    "every client in that window; tokens/s per core = output tokens / CPU seconds (= 1000 / "
    "ms per token): the output rate one fully busy core would sustain at this cost. Per "
    "process over all tokens, so the processes' figures add up to the front end's; median "
    "over rounds"
)


@dataclass(frozen=True)
class ServerProcess:
    """One process of a server under test, with its part in serving.

    ``server`` is the server's label (``vLLM[bench]``, ``appliance``), ``name`` what the
    process is within it (``API server``, ``APIServer_1``, ``worker 0``, ``http worker 1``,
    ``EngineCore``, ...), ``role`` one of ``FRONT_END``, ``LAUNCHER``, ``ENGINE``, ``OTHER``.
    """

    pid: int
    server: str
    name: str
    role: str

    @property
    def key(self) -> str:
        """Stable across rounds (pids are not): ``"<server> <name>"``."""
        return f"{self.server} {self.name}"


def _vllm_name(title: str) -> str:
    """``VLLM::APIServer_1 ...`` -> ``APIServer_1``."""
    return title.split()[0][len(VLLM_TITLE_PREFIX) :]


def classify(
    kind: str, server: str, root_pid: int, processes: Iterable[tuple[int, str]]
) -> list[ServerProcess]:
    """Say which of a server's processes are its front end.

    ``kind``: ``VLLM`` or ``APPLIANCE``; ``processes``: ``(pid, title)`` of the server process
    (``root_pid``) and all its descendants, the title as ``ps`` shows it (setproctitle's).
    Names repeated within the server (two engines' ``EngineCore``) get ``#2``, ``#3``, ... in
    pid order, so that every process keeps one key across rounds.
    """
    listed = sorted(processes)
    api_children = [
        pid for pid, title in listed if pid != root_pid and title.startswith(VLLM_API_SERVER_TITLE)
    ]
    out: list[ServerProcess] = []
    seen: dict[str, int] = {}
    for pid, title in listed:
        if pid == root_pid:
            if kind == APPLIANCE:
                name, role = "worker 0", FRONT_END
            elif api_children:
                name, role = "launcher", LAUNCHER
            else:
                name, role = "API server", FRONT_END
        elif kind == APPLIANCE and title.startswith(APPLIANCE_WORKER_TITLE):
            name, role = " ".join(title.removeprefix("appliance: ").split()[:3]), FRONT_END
        elif kind == VLLM and title.startswith(VLLM_API_SERVER_TITLE):
            name, role = _vllm_name(title), FRONT_END
        elif title.startswith(VLLM_TITLE_PREFIX):
            name, role = _vllm_name(title), ENGINE
        else:
            name, role = "other", OTHER
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name} #{seen[name]}"
        out.append(ServerProcess(pid, server, name, role))
    return out


def process_title(proc: Any) -> str:
    """A ``psutil.Process``'s title as ``ps`` shows it (setproctitle rewrites its cmdline)."""
    with contextlib.suppress(Exception):
        cmdline = proc.cmdline()
        if cmdline:
            return " ".join(cmdline)
    with contextlib.suppress(Exception):
        return str(proc.name())
    return ""


def discover(kind: str, server: str, root_pid: int) -> list[ServerProcess]:
    """The server process ``root_pid`` and its descendants, classified (``classify``)."""
    import psutil

    root = psutil.Process(root_pid)
    entries: list[tuple[int, str]] = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            entries.append((proc.pid, process_title(proc)))
    return classify(kind, server, root_pid, entries)


def front_end_count(processes: Sequence[ServerProcess]) -> int:
    """How many of ``processes`` are front end."""
    return sum(p.role == FRONT_END for p in processes)


# -- per run --------------------------------------------------------------------------------


def _reading(run: RunResult, which: str) -> dict[str, Any] | None:
    cpu = run.cpu or {}
    reading = cpu.get(which)
    return reading if isinstance(reading, dict) and "unix" in reading else None


def _figures(cpu_s: float, tokens: int, window_s: float) -> dict[str, float]:
    nan = float("nan")
    return {
        "cpu_s": cpu_s,
        "ms_per_token": 1000.0 * cpu_s / tokens if tokens else nan,
        "tokens_per_core_s": tokens / cpu_s if cpu_s > 0 else nan,
        "cores": cpu_s / window_s if window_s > 0 else nan,
    }


def run_cpu(runs: Sequence[RunResult]) -> dict[str, Any] | None:
    """Front-end CPU per output token over one round's clients (one or two, run at once).

    The window runs from the earliest client's start reading to the latest client's end
    reading; the tokens are all clients' output tokens. Every process's CPU is its counter at
    the end minus at the start. Returns None when a client took no readings (no psutil, or a
    report from before this measurement) or a front-end process vanished during the run.
    """
    starts = [(_reading(r, "start"), r) for r in runs]
    ends = [(_reading(r, "end"), r) for r in runs]
    if not runs or any(s is None for s, _ in starts) or any(e is None for e, _ in ends):
        return None
    start, first = min(((s, r) for s, r in starts if s is not None), key=lambda x: x[0]["unix"])
    end, _ = max(((e, r) for e, r in ends if e is not None), key=lambda x: x[0]["unix"])
    window = float(end["unix"]) - float(start["unix"])
    tokens = sum(r.total_output_tokens for r in runs)
    processes = [ServerProcess(**p) for p in (first.cpu or {}).get("processes", [])]
    per_process: list[dict[str, Any]] = []
    role_cpu: dict[str, float] = {}
    for proc in processes:
        before = start["cpu_s"].get(str(proc.pid))
        after = end["cpu_s"].get(str(proc.pid))
        if before is None or after is None:
            if proc.role == FRONT_END:
                return None
            continue
        used = float(after) - float(before)
        per_process.append({**asdict(proc), "key": proc.key, **_figures(used, tokens, window)})
        role_cpu[proc.role] = role_cpu.get(proc.role, 0.0) + used
    return {
        "window_s": window,
        "output_tokens": tokens,
        "processes": per_process,
        "front_end": {
            **_figures(role_cpu.get(FRONT_END, 0.0), tokens, window),
            "count": sum(p.role == FRONT_END for p in processes),
        },
        "engine": _figures(role_cpu.get(ENGINE, 0.0), tokens, window),
    }


# -- over rounds ----------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _median_figures(figures: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = ("cpu_s", "ms_per_token", "tokens_per_core_s", "cores")
    return {key: _median([float(f[key]) for f in figures]) for key in keys}


def summarize_cpu(runs: Sequence[RunResult], concurrencies: Sequence[int]) -> dict[str, Any]:
    """Per concurrency and server kind: front-end CPU per output token, median over rounds.

    For each: ``front_end`` (all front-end processes summed), ``processes`` (each process, by
    ``ServerProcess.key``, front end first), ``engine`` (vLLM's engine processes summed, for
    scale), ``rounds`` (how many rounds had readings) and ``per_round`` front-end ms/token.
    """
    out: dict[str, Any] = {}
    for c in concurrencies:
        row: dict[str, Any] = {}
        for kind in (VLLM, APPLIANCE):
            mine = [r for r in runs if r.concurrency == c and r.server == kind]
            per_round = [
                run_cpu([r for r in mine if r.round == round_])
                for round_ in sorted({r.round for r in mine})
            ]
            measured = [f for f in per_round if f is not None]
            if not measured:
                continue
            keys: dict[str, dict[str, str]] = {}
            for figures in measured:
                for p in figures["processes"]:
                    keys.setdefault(p["key"], {"role": p["role"], "server": p["server"]})
            order = sorted(keys, key=lambda k: (keys[k]["role"] != FRONT_END, k))
            row[kind] = {
                "front_end": {
                    **_median_figures([f["front_end"] for f in measured]),
                    "count": max(int(f["front_end"]["count"]) for f in measured),
                },
                "engine": _median_figures([f["engine"] for f in measured]),
                "processes": {
                    key: {
                        **keys[key],
                        **_median_figures(
                            [p for f in measured for p in f["processes"] if p["key"] == key]
                        ),
                    }
                    for key in order
                },
                "rounds": len(measured),
                "per_round_ms_per_token": [f["front_end"]["ms_per_token"] for f in measured],
            }
        if row:
            out[str(c)] = row
    return out


def summarize_front_end(
    runs: Sequence[RunResult],
    concurrencies: Sequence[int],
    two_runs: Sequence[RunResult],
    two_concurrencies: Sequence[int],
) -> dict[str, Any] | None:
    """The report's ``front_end_cpu`` section: one model and two models; None if unmeasured."""
    single = summarize_cpu(runs, concurrencies)
    two = summarize_cpu(two_runs, two_concurrencies)
    if not single and not two:
        return None
    return {"definition": DEFINITION, "single_model": single, "two_models": two}


def describe_front_end(figures: dict[str, Any] | None) -> str:
    """One run's front-end CPU as a progress line; ``""`` when it was not measured."""
    if figures is None:
        return ""
    front = figures["front_end"]
    each = ", ".join(
        f"{p['key']} {p['ms_per_token']:.3f}"
        for p in figures["processes"]
        if p["role"] == FRONT_END
    )
    return (
        f"front end {front['ms_per_token']:.3f} ms CPU/token = "
        f"{front['tokens_per_core_s']:,.0f} tok/s per core ({each})"
    )
