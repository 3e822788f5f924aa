"""How the suite is spread over pytest-xdist's processes (``make test`` runs two).

Engines are slow to start, so tests that share one must run in the same process: every test
that uses the shared appliance (``serving_appliance``) is in one group, and every other
integration module is a group of its own (its module-scoped appliances start once). Unit tests
have no group: they fill whichever process is free. Without xdist the groups mean nothing."""

from __future__ import annotations

import pytest

# The session-wide appliance: every test that uses it runs in one xdist process.
SHARED_FIXTURES = frozenset({"serving_appliance"})
SHARED_GROUP = "serving-appliance"
# Folders whose modules start real engines (module-scoped fixtures: keep a module together).
ENGINE_FOLDERS = ("tests/integration/", "tests/engines/", "tests/hub/")


def xdist_group_of(nodeid: str, fixturenames: list[str]) -> str | None:
    """The group a test runs in: the shared appliance's, its module's, or none (a unit test,
    scheduled on its own)."""
    if SHARED_FIXTURES.intersection(fixturenames):
        return SHARED_GROUP
    if nodeid.startswith(ENGINE_FOLDERS):
        return nodeid.split("::", 1)[0]
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its xdist group, and put the shared appliance's tests first, then
    the other engine modules, then unit tests: the longest chain starts first and the many
    short unit tests fill the gaps at the end. A module with any test on the shared appliance
    goes wholly into its group (its module fixtures start once). The sort is stable, so every
    xdist process collects the same order (xdist requires it)."""
    shared_modules = {
        item.nodeid.split("::", 1)[0]
        for item in items
        if xdist_group_of(item.nodeid, list(item.fixturenames)) == SHARED_GROUP
    }
    rank: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        group = SHARED_GROUP if module in shared_modules else xdist_group_of(item.nodeid, [])
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        rank[item.nodeid] = 0 if group == SHARED_GROUP else 1 if group else 2
    items.sort(key=lambda item: rank[item.nodeid])
