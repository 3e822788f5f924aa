"""The `appliance` entry point: composes the sub-commands."""

from __future__ import annotations

import typer

from appliance.cli.adapters_cmd import adapters_app
from appliance.cli.doctor_cmd import doctor
from appliance.cli.export_cmd import export_app
from appliance.cli.models_cmd import models_app
from appliance.cli.plan_cmd import plan
from appliance.cli.pull_cmd import pull
from appliance.cli.rm_cmd import rm
from appliance.cli.up_cmd import up
from appliance.cli.usage_cmd import usage

app = typer.Typer(
    name="appliance",
    help="An all-in-one LLM inference appliance: several vLLM engines, one OpenAI API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("up")(up)
app.command("doctor")(doctor)
models_app.command("pull")(pull)
models_app.command("rm")(rm)
models_app.command("plan")(plan)
app.add_typer(models_app, name="models")
app.add_typer(adapters_app, name="adapters")
app.command("usage")(usage)
app.add_typer(export_app, name="export")


def _add_registry() -> None:
    try:
        from appliance.cli.registry_cmd import registry_app
    except ImportError:  # the registry service is optional at install time
        return
    app.add_typer(registry_app, name="registry")


_add_registry()


def main() -> None:
    """Run the CLI."""
    app()
