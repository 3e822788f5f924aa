"""Which processes a local engine names for its stop to wait on, read from vLLM's client as
``BackgroundResources`` (v1/engine/core_client.py) holds them."""

from __future__ import annotations

from types import SimpleNamespace

from appliance.engines.vllm.processes import core_process_ids


def proc(pid: int, exitcode: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, exitcode=exitcode)


def client(*procs: SimpleNamespace, coordinator: SimpleNamespace | None = None) -> SimpleNamespace:
    resources = SimpleNamespace(
        engine_manager=SimpleNamespace(processes=list(procs)),
        coordinator=SimpleNamespace(proc=coordinator) if coordinator else None,
    )
    return SimpleNamespace(engine_core=SimpleNamespace(resources=resources))


def test_one_client_names_its_cores_and_the_coordinator() -> None:
    assert core_process_ids(client(proc(100), proc(101), coordinator=proc(99))) == (100, 101, 99)


def test_an_owner_of_several_clients_names_the_cores_it_launched() -> None:
    cores = SimpleNamespace(manager=SimpleNamespace(processes=[proc(200)]), coordinator=None)
    assert core_process_ids(SimpleNamespace(engine_core=None), cores) == (200,)


def test_an_attached_client_or_no_engine_names_none() -> None:
    assert core_process_ids(client(proc(100)), attached=True) == ()
    assert core_process_ids(None) == ()


def test_a_core_that_has_exited_is_not_named_its_pid_may_be_reused() -> None:
    assert core_process_ids(client(proc(100, exitcode=-9), proc(101))) == (101,)
