"""`appliance doctor`: check the install, the driver and the GPUs before the first `up`."""

from __future__ import annotations

from pathlib import Path

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
        help="The catalogue whose placement settings the overheads are compared with.",
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
    from appliance.catalogue.schema import PlacementSettings
    from appliance.doctor import Status, check_gpus, check_install
    from appliance.host.placement import PlacementPolicy

    settings = PlacementSettings()
    if config.exists():
        try:
            settings = load_catalogue_file(config).placement
        except ConfigError as exc:
            out.print(f"[red]{config}: {exc.message}[/]; using the default placement settings")
    policy = PlacementPolicy.from_settings(settings)
    findings = [*check_install(), *check_gpus(policy, measure=measure)]
    table = Table("check", "", "what was seen")
    colour = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "red"}
    for finding in findings:
        table.add_row(
            finding.check, f"[{colour[finding.status]}]{finding.status.value}[/]", finding.detail
        )
    out.print(table)
    if any(f.status is Status.FAIL for f in findings):
        raise typer.Exit(1)
