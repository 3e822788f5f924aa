"""The admission queue's ordering (``supervisor.fair_queue``), with simulated arrivals."""

from __future__ import annotations

import asyncio
import heapq

import pytest

from appliance.supervisor.fair_queue import FairQueue, ModelGate, QueueTimeoutError, Ticket


def simulate(fair: bool, *, flood: int, seconds: float = 200.0) -> float:
    """A closed loop: ``flood`` requests of key "flood" always outstanding, one of key
    "chat"; 4 places, each request 1 s in the engine. Returns chat's mean wait for a place.
    Without ``fair`` every request costs the same and has one key: first come first served."""
    queue = FairQueue(4)
    now = 0.0
    done: list[tuple[float, int, Ticket]] = []
    arrived: dict[int, float] = {}
    waits: list[float] = []
    order = 0

    def arrive(key: str) -> None:
        ticket = queue.arrive(key if fair else "all", 0, 100.0)
        ticket.key = key
        arrived[ticket.seq] = now
        if ticket.granted:
            start(ticket)

    def start(ticket: Ticket) -> None:
        nonlocal order
        order += 1
        if ticket.key == "chat":
            waits.append(now - arrived[ticket.seq])
        heapq.heappush(done, (now + 1.0, order, ticket))

    for _ in range(flood):
        arrive("flood")
    arrive("chat")
    while done and now < seconds:
        now, _, ticket = heapq.heappop(done)
        for granted in queue.leave(ticket):
            start(granted)
        arrive(ticket.key)  # each client sends its next request when its last is answered
    return sum(waits) / len(waits)


def test_a_flood_key_does_not_multiply_the_other_keys_wait() -> None:
    alone = simulate(True, flood=0)
    fifo = simulate(False, flood=40)
    fair = simulate(True, flood=40)
    assert alone == 0.0
    # First come first served: chat waits behind the flood's whole backlog (10 rounds).
    assert fifo >= 9.0
    # Fair share: chat waits at most for one place to free (1 s in the engine).
    assert fair <= 1.0
    # Ten times the flood's weight changes nothing for chat's share of waits.
    assert simulate(True, flood=400, seconds=400.0) <= 1.0


def test_priority_goes_before_fair_share() -> None:
    queue = FairQueue(1)
    running = queue.arrive("a", 0, 1)
    late = [queue.arrive("b", 5, 1), queue.arrive("c", 0, 1), queue.arrive("d", -3, 1)]
    assert running.granted and not any(t.granted for t in late)
    order = []
    ticket = running
    for _ in late:
        (ticket,) = queue.leave(ticket)
        order.append(ticket.key)
    assert order == ["d", "c", "b"]


def test_weights_and_costs_set_each_keys_share() -> None:
    queue = FairQueue(1)
    first = queue.arrive("x", 0, 1)
    for _ in range(100):
        queue.arrive("heavy", 0, 100, weight=1.0)
        queue.arrive("light", 0, 100, weight=3.0)
        queue.arrive("big", 0, 300, weight=1.0)  # three times the cost: a third the share
    served = {"heavy": 0, "light": 0, "big": 0}
    ticket = first
    for _ in range(50):
        (ticket,) = queue.leave(ticket)
        served[ticket.key] += 1
    assert served["light"] == pytest.approx(3 * served["heavy"], abs=2)
    assert served["heavy"] == pytest.approx(3 * served["big"], abs=2)


def test_a_key_alone_gets_every_place_and_withdrawn_requests_are_skipped() -> None:
    queue = FairQueue(3)
    tickets = [queue.arrive("solo", 0, 10) for _ in range(5)]
    assert [t.granted for t in tickets] == [True, True, True, False, False]
    queue.withdraw(tickets[3])
    assert queue.waiting == 1
    (next_in,) = queue.leave(tickets[0])
    assert next_in is tickets[4]
    assert queue.leave(tickets[1]) == [] and queue.running == 2


def test_the_gate_lets_in_by_order_and_times_out() -> None:
    asyncio.run(_gate_in_order())


async def _gate_in_order() -> None:
    gate = ModelGate(1, max_wait_seconds=0.05)
    first = await gate.enter("a", 0, 1)
    with pytest.raises(QueueTimeoutError):
        await gate.enter("b", 0, 1)
    assert gate.queue.waiting == 0
    waiter = asyncio.ensure_future(gate.enter("c", 0, 1))
    await asyncio.sleep(0)
    cancelled = asyncio.ensure_future(gate.enter("d", 0, 1))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gate.leave(first)
    second = await asyncio.wait_for(waiter, 1)
    assert second.key == "c" and gate.queue.running == 1 and gate.queue.waiting == 0
