"""The import rule of the README's layout section, kept: nothing imports upward.

    cli -> registry -> workers -> api -> app -> supervisor -> engines -> host -> catalogue -> base

A module may import modules of its own layer or of layers to its right, never to its left.
Every import counts, those under ``if TYPE_CHECKING:`` included (a type is a dependency too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "appliance"

# Highest first. A module belongs to the first layer with a prefix matching its name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("appliance.cli", "appliance.__main__")),
    ("registry", ("appliance.registry",)),  # the registry service: its own HTTP app
    ("workers", ("appliance.workers",)),  # HTTP worker processes around the api
    ("api", ("appliance.api",)),  # the HTTP edge
    (
        "app",
        (
            "appliance.appliance",
            "appliance.router",
            "appliance.metrics",
            "appliance.engine_metrics",
            "appliance.settings",
            "appliance.usage",
            "appliance.batches",
            "appliance.doctor",
            "appliance.doctor_probes",
            "appliance.request_info",
        ),
    ),
    (
        "supervisor",
        (
            "appliance.supervisor.supervisor",
            "appliance.supervisor.names",
            "appliance.supervisor.room",
            "appliance.supervisor.loading",
            "appliance.supervisor.lending",
            "appliance.supervisor.supervision",
            "appliance.supervisor.presenter",
            "appliance.supervisor.handle",
            "appliance.supervisor.states",
            "appliance.supervisor.lending_board",
            "appliance.supervisor.fair_queue",
            "appliance.supervisor.load_gate",
            "appliance.supervisor.sliding_window",
        ),
    ),
    ("engines", ("appliance.engines", "appliance.hub")),
    ("host", ("appliance.host",)),  # inventory, placement, capacity: host facts and planning
    ("catalogue", ("appliance.catalogue", "appliance.api_keys")),
    (
        "base",
        (
            "appliance.errors",
            "appliance.logs",
            "appliance.config_problems",
            "appliance.admin_key",
            "appliance.runtime_dir",
            "appliance.sqlite_file",
            "appliance.supervisor",  # the package itself (its __init__)
            "appliance",
        ),
    ),
]


def layer_of(module: str) -> int:
    """The index of ``module``'s layer in LAYERS (0 is the top)."""
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README)")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``appliance`` module ``path`` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "appliance":
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "appliance")
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_nothing_imports_upward(path: Path) -> None:
    module = module_name(path)
    own = layer_of(module)
    upward = sorted(
        f"{target} ({LAYERS[layer_of(target)][0]})"
        for target in imports_of(path)
        if layer_of(target) < own
    )
    assert not upward, f"{module} ({LAYERS[own][0]}) imports upward: {', '.join(upward)}"


VLLM_PACKAGE = "appliance.engines.vllm"  # the one package that may import vLLM


def test_only_one_package_imports_vllm() -> None:
    importers = sorted(
        module_name(path)
        for path in MODULES
        if any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            and any(
                name.split(".")[0] == "vllm"
                for name in (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
            )
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    )
    assert importers, f"nothing imports vLLM: is {VLLM_PACKAGE} still the one that does?"
    outside = [m for m in importers if m != VLLM_PACKAGE and not m.startswith(VLLM_PACKAGE + ".")]
    assert not outside, f"only {VLLM_PACKAGE} may import vLLM: {', '.join(outside)} do"


RAY_PACKAGE = "appliance.engines.ray"  # the one package that may import Ray


def _imports_top_level(path: Path, package: str) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] == package for a in node.names
        ):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == package
        ):
            return True
    return False


def test_only_one_package_imports_ray() -> None:
    importers = sorted(module_name(p) for p in MODULES if _imports_top_level(p, "ray"))
    assert importers, f"nothing imports Ray: is {RAY_PACKAGE} still the one that does?"
    outside = [m for m in importers if m != RAY_PACKAGE and not m.startswith(RAY_PACKAGE + ".")]
    assert not outside, f"only {RAY_PACKAGE} may import Ray: {', '.join(outside)} do"
