"""``appliance registry ...``: run the model registry service."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError

from appliance.errors import ConfigError
from appliance.registry.service import create_registry_app
from appliance.registry.settings import (
    READ_TOKEN_ENV_VAR,
    TOKEN_ENV_VAR,
    RegistrySettings,
    resolve_read_token,
    resolve_token,
)

registry_app = typer.Typer(name="registry", no_args_is_help=True, add_completion=False)


@registry_app.callback()
def registry() -> None:
    """The model registry service: the catalogue the appliances read."""
    # A callback keeps `serve` a named subcommand even while it is the only one.


@registry_app.command()
def serve(
    db: Annotated[Path, typer.Option("--db", help="SQLite database file.")] = Path("registry.db"),
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8100,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help=f"File holding the write token (else ${TOKEN_ENV_VAR}, else one generated "
            "into DB.token; never on the command line, where other users can read it).",
        ),
    ] = None,
    read_token_file: Annotated[
        Path | None,
        typer.Option(
            "--read-token-file",
            help=f"File holding the token reads need (else ${READ_TOKEN_ENV_VAR}; "
            "neither: reads are open).",
        ),
    ] = None,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-hosts",
            help="A name the Host header may carry (repeatable; '*': any). Default: the "
            "names and addresses of this box.",
        ),
    ] = None,
) -> None:
    """Serve the registry API (reads open, writes need the token) until interrupted."""
    try:
        settings = RegistrySettings(
            db_path=db,
            host=host,
            port=port,
            token=resolve_token(None, token_file, os.environ),
            read_token=resolve_read_token(read_token_file, os.environ),
            allowed_hosts=allowed_hosts or None,
        )
    except ConfigError as exc:
        raise typer.BadParameter(exc.message) from exc
    except ValidationError as exc:
        # Field and reason only: the input is a token.
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        reason = str(first["msg"]).removeprefix("Value error, ")
        raise typer.BadParameter(f"{where}: {reason}") from None
    # No-op when the main CLI has configured logging already; else the generated token and
    # the registry's own messages would go nowhere.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_registry_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
