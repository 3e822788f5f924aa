"""`appliance export ray-serve`: the ``serve deploy`` file for models.yaml's ``ray:`` entries.

For operators who run Ray Serve themselves: the same mapping the appliance deploys with
(``appliance.engines.ray.mapping``), one application per entry.
"""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from appliance.catalogue.config_file import load_catalogue_file
from appliance.catalogue.schema import LocalModelSpec
from appliance.engines.factory import resolve_source
from appliance.engines.ray.mapping import serve_deploy_config
from appliance.errors import ConfigError
from appliance.settings import Settings

export_app = typer.Typer(
    help="Write configuration for other tools from models.yaml.", no_args_is_help=True
)


def ray_serve_yaml(config_path: Path) -> str:
    """The ``serve deploy`` YAML for the ``ray:`` entries of the catalogue at ``config_path``."""
    catalogue = load_catalogue_file(config_path)
    if catalogue.ray is None:
        raise ConfigError(f"{config_path}: names no Ray cluster (ray: at the top of the file)")
    specs = [s for s in catalogue.models if isinstance(s, LocalModelSpec) and s.ray is not None]
    if not specs:
        raise ConfigError(f"{config_path}: no entry has ray:")
    base = config_path.resolve().parent
    sources = {spec.name: resolve_source(spec, base) for spec in specs}
    return yaml.safe_dump(serve_deploy_config(specs, catalogue.ray, sources), sort_keys=False)


@export_app.command("ray-serve")
def ray_serve(
    config: Path = typer.Option(
        Settings.model_fields["config_path"].default, "--config", help="The catalogue to read."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here instead of standard output."
    ),
) -> None:
    """Write the Ray Serve config (`serve deploy FILE`) for the entries with ray:."""
    try:
        text = ray_serve_yaml(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
