"""`appliance doctor`: check the install, the driver and the GPUs before the first `up`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from appliance.errors import ConfigError

out = Console()


def doctor(
    config: Path = typer.Option(
        Path("models.yaml"),
        "--config",
        "-c",
        help="The catalogue placed on this host's inventory (each model: fits or why not), "
        "and whose placement settings the overheads are compared with.",
    ),
    measure: bool = typer.Option(
        True, help="Start a CUDA context (and NCCL) in a child process to measure overheads."
    ),
) -> None:
    """Check what `appliance up` relies on: vLLM's build, the driver, GPUs, FlashInfer, overheads.

    Exits 1 when a check fails. On a GPU box, run it first; the README's GPU section says what
    each line should look like.
    """
    from appliance.catalogue.config_file import load_catalogue_file
    from appliance.catalogue.file_settings import PlacementSettings
    from appliance.doctor import Status, check_catalogue, check_gpus, check_install
    from appliance.host import tp_overheads
    from appliance.host.inventory import cpu_inventory, scan_gpus
    from appliance.host.placement import PlacementPolicy
    from appliance.settings import Settings

    settings = PlacementSettings()
    models: list[Any] = []
    if config.exists():
        try:
            catalogue = load_catalogue_file(config)
            settings, models = catalogue.placement, list(catalogue.models)
        except ConfigError as exc:
            out.print(f"[red]{config}: {exc.message}[/]; using the default placement settings")
    policy = PlacementPolicy.from_settings(settings)

    def record(measured: tp_overheads.TpOverhead) -> str:
        # Beside the catalogue, where `appliance up --config` reads it back for placement.
        path = tp_overheads.record_path(config)
        try:
            tp_overheads.save(path, measured)
        except OSError as exc:
            out.print(f"[yellow]cannot record the tensor-parallel overhead in {path}: {exc}[/]")
            return ""
        return str(path)

    findings = [*check_install(), *check_gpus(policy, measure=measure, record=record)]
    if models:
        scan = scan_gpus(os.environ)
        inventory = scan.inventory or cpu_inventory(Settings().cpu_memory_budget_gib)
        policy = tp_overheads.policy_for(policy, config, inventory)
        findings.extend(check_catalogue(models, inventory, policy))
    table = Table("check", "", "what was seen")
    colour = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "red"}
    for finding in findings:
        table.add_row(
            finding.check, f"[{colour[finding.status]}]{finding.status.value}[/]", finding.detail
        )
    out.print(table)
    if any(f.status is Status.FAIL for f in findings):
        raise typer.Exit(1)
