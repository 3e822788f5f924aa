"""The lifecycle state machine: the table, the guarded swap, the callback, the waiters."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from appliance.errors import LifecycleError
from appliance.supervisor.states import (
    TRANSITIONS,
    IllegalTransitionError,
    Lifecycle,
    ModelState,
    Transition,
)

S = ModelState

LEGAL = sorted(
    ((old, new) for old, targets in TRANSITIONS.items() for new in targets),
    key=lambda pair: (pair[0].value, pair[1].value),
)
ILLEGAL = [
    (old, new)
    for old, new in itertools.product(ModelState, ModelState)
    if new not in TRANSITIONS[old]
]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_lifecycle(
    state: ModelState = S.UNLOADED,
    on_transition: Callable[[Transition], None] | None = None,
    clock: FakeClock | None = None,
) -> Lifecycle:
    return Lifecycle(
        "tiny-llama",
        on_transition,
        clock or FakeClock(),
        wall_clock=lambda: 1_700_000_000.0,
        initial=state,
    )


def test_table_covers_every_state_and_has_no_self_loops() -> None:
    assert set(TRANSITIONS) == set(ModelState)
    assert all(state not in targets for state, targets in TRANSITIONS.items())
    # The chosen edges, spelt out so a change to the table is a deliberate test change.
    assert {(o.value, n.value) for o, n in LEGAL} == {
        ("unloaded", "loading"),
        ("unloaded", "downloading"),
        ("downloading", "loading"),
        ("downloading", "failed"),
        ("downloading", "unloaded"),
        ("loading", "ready"),
        ("loading", "failed"),
        ("loading", "unloaded"),
        ("ready", "draining"),
        ("ready", "sleeping"),
        ("ready", "failed"),
        ("sleeping", "loading"),
        ("sleeping", "draining"),
        ("sleeping", "failed"),
        ("draining", "unloaded"),
        ("draining", "failed"),
        ("failed", "loading"),
        ("failed", "downloading"),
        ("failed", "unloaded"),
        ("ready", "unavailable"),  # a remote backend's breaker opened
        ("unavailable", "ready"),  # and closed again
    }


def test_every_state_value_is_its_lowercase_name() -> None:
    assert [s.value for s in ModelState] == [
        "unloaded",
        "downloading",
        "loading",
        "ready",
        "sleeping",
        "draining",
        "failed",
        "unavailable",
    ]


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=lambda s: s.value)
def test_legal_transition(old: ModelState, new: ModelState) -> None:
    seen: list[Transition] = []
    clock = FakeClock(100.0)
    life = make_lifecycle(old, seen.append, clock)
    clock.now = 107.5

    transition = life.swap(old, new, "because")

    assert life.state is new
    assert life.since == 107.5
    assert seen == [transition]
    assert transition == Transition(
        model="tiny-llama",
        old=old,
        new=new,
        reason="because",
        at=1_700_000_000.0,
        seconds_in_old=7.5,
    )


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=lambda s: s.value)
def test_illegal_transition_is_refused_and_changes_nothing(
    old: ModelState, new: ModelState
) -> None:
    seen: list[Transition] = []
    life = make_lifecycle(old, seen.append)
    since = life.since

    with pytest.raises(IllegalTransitionError) as info:
        life.swap(old, new, "operator asked")

    assert life.state is old
    assert life.since == since
    assert seen == []
    assert isinstance(info.value, LifecycleError)
    assert info.value.status_code == 409
    assert "not a legal transition" in info.value.message


def test_refused_when_state_is_not_the_expected_one() -> None:
    life = make_lifecycle(S.READY)

    with pytest.raises(IllegalTransitionError) as info:
        life.swap((S.UNLOADED, S.FAILED), S.LOADING, "load")

    err = info.value
    assert (err.model, err.current, err.new) == ("tiny-llama", S.READY, S.LOADING)
    assert err.message == (
        "model tiny-llama: cannot change to loading (load): it is ready; "
        "expected unloaded or failed"
    )
    assert life.state is S.READY


def test_expected_may_be_one_state_or_several() -> None:
    life = make_lifecycle(S.FAILED)
    life.swap([S.UNLOADED, S.FAILED], S.LOADING, "restart")
    life.swap(S.LOADING, S.READY, "up")
    life.swap({S.READY, S.SLEEPING}, S.DRAINING, "unload")
    assert life.state is S.DRAINING


def test_durations_follow_the_clock_through_a_whole_life() -> None:
    seen: list[Transition] = []
    clock = FakeClock(0.0)
    life = make_lifecycle(S.UNLOADED, seen.append, clock)
    steps = [
        (3.0, S.UNLOADED, S.LOADING),
        (45.0, S.LOADING, S.READY),
        (600.0, S.READY, S.SLEEPING),
        (30.0, S.SLEEPING, S.LOADING),
        (2.0, S.LOADING, S.READY),
        (100.0, S.READY, S.DRAINING),
        (4.0, S.DRAINING, S.UNLOADED),
    ]
    for wait, old, new in steps:
        clock.now += wait
        life.swap(old, new, "step")
    assert [(t.seconds_in_old, t.old, t.new) for t in seen] == steps


def test_a_failing_callback_does_not_undo_the_change(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Transition) -> None:
        raise RuntimeError("metrics down")

    life = make_lifecycle(S.UNLOADED, broken)
    life.swap(S.UNLOADED, S.LOADING, "load")
    assert life.state is S.LOADING
    assert "on_transition failed" in caplog.text


def test_wait_returns_at_once_when_already_there() -> None:
    async def main() -> ModelState:
        return await make_lifecycle(S.READY).wait_for({S.READY}, timeout=0)

    assert asyncio.run(main()) is S.READY


def test_many_waiters_wake_on_one_transition() -> None:
    async def main() -> None:
        life = make_lifecycle(S.LOADING)
        waiters = [
            asyncio.create_task(life.wait_for({S.READY, S.FAILED}, timeout=5)) for _ in range(20)
        ]
        await asyncio.sleep(0)  # let every waiter reach its await
        life.swap(S.LOADING, S.READY, "up")
        results = await asyncio.wait_for(asyncio.gather(*waiters), timeout=1)
        assert results == [S.READY] * 20

    asyncio.run(main())


def test_waiter_ignores_transitions_to_other_states() -> None:
    async def main() -> None:
        life = make_lifecycle(S.READY)
        waiter = asyncio.create_task(life.wait_for({S.UNLOADED}, timeout=5))
        await asyncio.sleep(0)
        life.swap(S.READY, S.DRAINING, "unload")
        await asyncio.sleep(0)
        assert not waiter.done()
        life.swap(S.DRAINING, S.UNLOADED, "stopped")
        assert await asyncio.wait_for(waiter, timeout=1) is S.UNLOADED

    asyncio.run(main())


def test_wait_times_out_with_the_current_state() -> None:
    async def main() -> None:
        life = make_lifecycle(S.UNLOADED)
        waiter = asyncio.create_task(life.wait_for({S.READY}, timeout=0.05))
        await asyncio.sleep(0)
        life.swap(S.UNLOADED, S.LOADING, "load")
        # Still loading when the time is up: the waiter gets "loading", not an exception.
        assert await asyncio.wait_for(waiter, timeout=1) is S.LOADING

    asyncio.run(main())


def test_wait_without_timeout_waits_until_the_state_comes() -> None:
    async def main() -> None:
        life = make_lifecycle(S.LOADING)
        waiter = asyncio.create_task(life.wait_for(S.FAILED, timeout=None))
        await asyncio.sleep(0)
        life.swap(S.LOADING, S.FAILED, "out of memory")
        assert await asyncio.wait_for(waiter, timeout=1) is S.FAILED

    asyncio.run(main())


def test_of_two_concurrent_loads_exactly_one_wins() -> None:
    async def main() -> None:
        seen: list[Transition] = []
        life = make_lifecycle(S.UNLOADED, seen.append)
        start = asyncio.Event()

        async def load(who: str) -> str:
            await start.wait()
            try:
                life.swap(S.UNLOADED, S.LOADING, f"load by {who}")
            except IllegalTransitionError:
                return "refused"
            return "won"

        tasks = [asyncio.create_task(load(who)) for who in ("a", "b")]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.gather(*tasks)
        assert sorted(results) == ["refused", "won"]
        assert life.state is S.LOADING
        assert len(seen) == 1

    asyncio.run(main())


def test_repr_names_model_and_state() -> None:
    assert repr(make_lifecycle(S.SLEEPING)) == "Lifecycle(model='tiny-llama', state=sleeping)"
