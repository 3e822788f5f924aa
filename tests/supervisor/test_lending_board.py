"""The lending board: admissions every HTTP process counts alike, exact under concurrency."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from appliance.supervisor.lending_board import KeyLimits, LendingBoard


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_is_lent_only_under_the_generation_it_was_opened_with() -> None:
    board = LendingBoard.private()
    assert not board.lend(3, 0, 10, None)  # never opened
    first = board.open(3)
    assert board.lend(3, first, 10, None)
    board.close(3)
    assert not board.lend(3, first, 10, None)  # draining: the owner answers
    second = board.open(3)
    assert second != first
    assert not board.lend(3, first, 10, None)  # a restarted engine: learn the new one
    assert board.lend(3, second, 10, None)
    assert board.count(3) == 2 and board.in_workers(3) == 2


def test_the_queue_limit_counts_the_owner_and_workers_together() -> None:
    board = LendingBoard.private()
    generation = board.open(0)
    assert board.reserve(0, 3)  # the owner's request
    assert board.lend(0, generation, 3, None)
    assert board.lend(0, generation, 3, None)
    assert not board.lend(0, generation, 3, None)
    assert not board.reserve(0, 3)
    board.give_back(0, None)
    assert board.reserve(0, 3)
    assert board.count(0) == 3 and board.in_workers(0) == 1


def test_a_refused_lend_charges_neither_the_entry_nor_the_key() -> None:
    board = LendingBoard.private([2])
    key = KeyLimits(requests_per_minute=2, max_concurrent=5, cells=board.key_cells(0))
    generation = board.open(1)
    assert board.lend(1, generation, 1, key)
    assert not board.lend(1, generation, 1, key)  # the entry's queue is full
    assert key.in_flight == 1
    board.give_back(1, key)
    assert key.in_flight == 0
    assert board.lend(1, generation, 1, key)  # the second of two a minute
    board.give_back(1, key)
    assert not board.lend(1, generation, 1, key)  # the key's rate is spent
    assert board.count(1) == 0


def test_the_rate_window_slides() -> None:
    clock = FakeClock()
    limits = KeyLimits(requests_per_minute=2, max_concurrent=None, clock=clock)
    assert limits.try_acquire() is None
    clock.now += 30
    assert limits.try_acquire() is None
    assert limits.try_acquire() == pytest.approx(30)
    clock.now += 30  # the first admission leaves the window
    assert limits.try_acquire() is None
    assert limits.try_acquire() == pytest.approx(30)


def test_a_changed_table_is_seen_by_every_reader(tmp_path: Path) -> None:
    owner = LendingBoard.create(tmp_path / "board", [1])
    worker = LendingBoard.attach(tmp_path / "board", [1])
    before = worker.table_generation
    owner.table_changed()
    assert worker.table_generation == before + 1
    generation = owner.open(7)
    assert worker.lend(7, generation, 4, None)
    assert owner.in_workers(7) == 1 and owner.last_used(7) > 0


def _lend_many(path: Path, generation: int, tries: int, out: multiprocessing.Queue[int]) -> None:
    board = LendingBoard.attach(path, [0])
    key = KeyLimits(requests_per_minute=None, max_concurrent=50, cells=board.key_cells(0))
    lent = 0
    for _ in range(tries):
        if board.lend(0, generation, 1000, key):
            lent += 1
    out.put(lent)


def test_processes_charging_at_once_never_pass_a_limit(tmp_path: Path) -> None:
    path = tmp_path / "board"
    board = LendingBoard.create(path, [0])
    generation = board.open(0)
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = context.Queue()
    children = [
        context.Process(target=_lend_many, args=(path, generation, 200, out)) for _ in range(3)
    ]
    for child in children:
        child.start()
    lent = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    # Each lend holds its key slot: 50 in flight at most, whoever took them.
    assert sum(lent) == 50
    assert board.count(0) == 50 and board.in_workers(0) == 50
    assert (
        KeyLimits(requests_per_minute=None, max_concurrent=50, cells=board.key_cells(0)).in_flight
        == 50
    )


def test_more_sequences_of_one_request_take_more_of_the_rate() -> None:
    clock = FakeClock()
    limits = KeyLimits(requests_per_minute=4, max_concurrent=1, clock=clock)
    assert limits.try_acquire() is None
    assert limits.try_admit_more(2) is None  # 3 of 4 used
    assert limits.try_admit_more(2) == pytest.approx(60)  # nothing charged
    clock.now += 10
    assert limits.try_admit_more(1) is None  # 4 of 4
    assert limits.in_flight == 1  # the extra sequences took no concurrency
    limits.release()
    assert limits.try_acquire() == pytest.approx(50)
    clock.now += 50  # the first three leave the window
    assert limits.try_admit_more(3) is None


def test_a_key_whose_window_does_not_fit_its_cells_is_refused() -> None:
    board = LendingBoard.private([2, 5])
    with pytest.raises(ValueError, match="does not fit"):
        KeyLimits(requests_per_minute=3, max_concurrent=None, cells=board.key_cells(0))
    KeyLimits(requests_per_minute=5, max_concurrent=None, cells=board.key_cells(1))
