"""The engine processes of a running appliance: spawned, and blind to the API's socket.

vLLM forks its engine cores unless told otherwise; forked from the appliance's threaded server
they can deadlock and inherit its listening socket. The appliance sets spawn before vLLM is
imported. (vLLM's CPU platform forces spawn too; these tests hold the outcome on any box, the
same checks that scripts/gpu_check.py makes on a GPU.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.harness import ApplianceProcess

pytestmark = pytest.mark.integration


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    return inodes


def _sockets(pid: int) -> set[str]:
    found = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                found.add(target[8:-1])
    except OSError:
        pass
    return found


def test_engine_processes_are_spawned_not_forked(serving_appliance: ApplianceProcess) -> None:
    assert serving_appliance.proc is not None
    parent = _cmdline(serving_appliance.proc.pid)
    children = serving_appliance.descendants()
    assert children, "a running appliance has engine processes"
    forked = {pid: _cmdline(pid) for pid in children if _cmdline(pid) == parent}
    assert forked == {}


def test_no_engine_process_holds_the_listening_socket(
    serving_appliance: ApplianceProcess,
) -> None:
    listening = _listening_inodes(serving_appliance.port)
    assert listening, "the appliance listens"
    assert serving_appliance.proc is not None
    assert _sockets(serving_appliance.proc.pid) & listening  # the check can see it at all
    holders = {pid for pid in serving_appliance.descendants() if _sockets(pid) & listening}
    # The HTTP workers (issue 16) accept from it by design; nothing else may hold it.
    workers = {pid for pid in holders if _cmdline(pid).startswith("appliance: http worker")}
    assert workers, "the shared appliance runs two HTTP workers; the worker holds the socket"
    assert holders - workers == set()
