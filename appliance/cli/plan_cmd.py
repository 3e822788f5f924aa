"""`appliance models plan NAME`: what loading NAME would do now, without doing it."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from appliance.cli.files_view import describe_files
from appliance.cli.models_cmd import KEY_OPTION, URL_OPTION, AdminClient
from appliance.cli.output import JSON_OPTION, print_json

out = Console()


def plan_lines(body: dict[str, Any]) -> list[str]:
    """The dry run as lines: where it goes, what it evicts, whether files must download."""
    name = body.get("name")
    if not body.get("fits"):
        return [f"{name}: would not fit now: {body.get('reason')}"]
    where = ", ".join(
        f"{d['label']} {d['reserved_gib']:.1f} of {d['total_gib']:.1f} GiB"
        for d in body.get("devices", [])
    )
    verb = "is placed on" if body.get("placed_already") else "would load on"
    lines = [f"{name} ({body.get('state')}): {verb} {where}"]
    sleep = body.get("sleep") or []
    if sleep:
        lines.append(
            "sleeps (level 1, weights to host RAM): "
            + ", ".join(
                v["name"] + (f" ({v['memory_gib']:.1f} GiB)" if v.get("memory_gib") else "")
                for v in sleep
            )
        )
    evict = body.get("evict") or []
    lines.append(
        "evicts: "
        + (
            ", ".join(
                f"{v['name']} ({v['state']}"
                + (f", {v['memory_gib']:.1f} GiB" if v.get("memory_gib") else "")
                + ")"
                for v in evict
            )
            if evict
            else "nothing"
        )
    )
    files = body.get("files")
    if files is not None:
        present = describe_files(files)
        lines.append(
            f"files on disk: {present}"
            + ("" if files.get("present") else " (a load downloads them first)")
        )
    return lines


def plan(
    name: str, url: str = URL_OPTION, api_key: str | None = KEY_OPTION, as_json: bool = JSON_OPTION
) -> None:
    """Dry run of loading a model: devices, memory, which models would sleep or be evicted."""
    body = AdminClient(url, api_key).call("GET", f"/admin/models/{name}/plan")
    if as_json:
        print_json(body)
        return
    for line in plan_lines(body):
        out.print(line, highlight=False, soft_wrap=True)
