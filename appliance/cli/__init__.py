"""The `appliance` command line (typer): `up`, `models ...`, `registry ...`."""
