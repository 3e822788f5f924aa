"""How the suite is spread over pytest-xdist's processes (``make test`` runs two).

Engines are slow to start, so tests that share one must run in the same process: the modules
that use the shared appliance (``serving_appliance``) are one group, every other module that
starts engines is a group of its own (its module-scoped appliances start once), and unit tests
have no group: they fill whichever process is free. The groups are made by a scheduler of our
own (xdist's ``loadgroup`` marks do not work with pytest 9: xdist renames the test ids it
schedules, which pytest 9 no longer lets a plugin do). Without xdist none of this matters."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import pytest

# The modules on the session-wide appliance. A module that starts using it must be listed:
# collection refuses it otherwise (it would start a second shared appliance in another process).
SHARED_MODULES = frozenset(
    {
        "tests/integration/test_bad_input.py",
        "tests/integration/test_differential.py",
        "tests/integration/test_engine_processes.py",
        "tests/integration/test_ollama_api.py",
        "tests/integration/test_same_tokens_as_vllm.py",
        "tests/integration/test_serving.py",
    }
)
SHARED_FIXTURES = frozenset(
    {"serving_appliance", "vllm_reference", "vllm_chat_reference", "vllm_embed_reference"}
)
SHARED_GROUP = "serving-appliance"
# Folders whose modules start real engines (module-scoped fixtures: keep a module together).
ENGINE_FOLDERS = ("tests/integration/", "tests/engines/", "tests/hub/")


def module_of(nodeid: str) -> str:
    """The test file part of a test id."""
    return nodeid.split("::", 1)[0]


def group_of(nodeid: str) -> str:
    """The unit of work a test is scheduled in: the shared appliance's group, its engine
    module, or itself (a unit test)."""
    module = module_of(nodeid)
    if module in SHARED_MODULES:
        return SHARED_GROUP
    if module.startswith(ENGINE_FOLDERS):
        return module
    return nodeid


def rank_of(nodeid: str) -> int:
    """Scheduling order: the shared appliance's chain first (the longest), then the other
    engine modules, then the short unit tests that fill the gaps at the end."""
    group = group_of(nodeid)
    return 0 if group == SHARED_GROUP else 1 if group != nodeid else 2


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a module that uses the shared appliance without being listed, and sort the
    tests by :func:`rank_of` (stable: every xdist process collects the same order)."""
    for item in items:
        module = module_of(item.nodeid)
        if SHARED_FIXTURES.intersection(item.fixturenames) and module not in SHARED_MODULES:
            raise pytest.UsageError(
                f"{module} uses the shared appliance: add it to SHARED_MODULES in tests/conftest.py"
            )
    items.sort(key=lambda item: rank_of(item.nodeid))


# What stops the shared modules' engines, and whether they have been stopped.
_SHARED_STOPS = pytest.StashKey[list[Callable[[], object]]]()
_SHARED_ENDED = pytest.StashKey[bool]()


def stop_when_the_shared_modules_end(config: pytest.Config, stop: Callable[[], object]) -> None:
    """Call ``stop`` once the last test of :data:`SHARED_MODULES` in this process has run
    (they run one after another: one unit of work, first in order), rather than at the end of
    the session: their engines would hold memory while the rest of the suite runs."""
    config.stash.setdefault(_SHARED_STOPS, []).append(stop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    """After the last shared test's own teardown, stop the shared engines."""
    yield
    if module_of(item.nodeid) not in SHARED_MODULES:
        return
    if nextitem is not None and module_of(nextitem.nodeid) in SHARED_MODULES:
        return
    for stop in reversed(item.config.stash.get(_SHARED_STOPS, [])):
        stop()
    item.config.stash[_SHARED_STOPS] = []
    item.config.stash[_SHARED_ENDED] = True


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Refuse a shared test scheduled after the shared engines were stopped (it would get a
    stopped appliance): the grouping above went wrong."""
    if item.config.stash.get(_SHARED_ENDED, False) and SHARED_FIXTURES.intersection(
        item.fixturenames
    ):
        raise pytest.UsageError(f"{item.nodeid}: the shared engines were already stopped")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduler, with :func:`group_of` as the scope, in collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class EngineGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False
    return EngineGroupScheduling(config, log)
