"""The in-flight byte budget: waiting uploads are woken in order, and only as many as the room released."""

from __future__ import annotations

import asyncio

import pytest

from branchkey_integrations.server.budget import ByteBudget


def test_room_returns_at_once_while_the_budget_has_room() -> None:
    async def scenario() -> bool:
        budget = ByteBudget(100, wake_unit=10)
        budget.take(50)
        await asyncio.wait_for(budget.room(), 1)
        return budget.spent()

    assert asyncio.run(scenario()) is False


def test_a_release_wakes_waiters_first_come_first_served_one_per_unit_of_room() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        budget = ByteBudget(100, wake_unit=10)
        budget.take(100)  # spent
        woken: list[int] = []

        async def upload(index: int) -> None:
            await budget.room()
            woken.append(index)

        tasks = [asyncio.ensure_future(upload(i)) for i in range(50)]
        await asyncio.sleep(0)  # every upload now waits in turn
        assert woken == []
        budget.release(25)  # room for 25 bytes: three waiters (10 + 10 + 5), not all fifty
        for _ in range(3):
            await asyncio.sleep(0)
        first = list(woken)
        budget.release(75)  # the budget empty: room for ten more
        for _ in range(3):
            await asyncio.sleep(0)
        second = list(woken)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return first, second

    first, second = asyncio.run(scenario())
    assert first == [0, 1, 2]
    assert second == list(range(13))


def test_a_newcomer_waits_behind_those_already_waiting_even_when_there_is_room() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        budget = ByteBudget(100, wake_unit=10)
        budget.take(100)
        order: list[str] = []

        async def upload(name: str) -> None:
            await budget.room()
            order.append(name)

        tasks = [asyncio.ensure_future(upload(name)) for name in ("a", "b")]
        await asyncio.sleep(0)
        budget.release(5)  # room for one: "a"
        tasks.append(asyncio.ensure_future(upload("newcomer")))  # not spent, but "b" waits: it queues
        for _ in range(3):
            await asyncio.sleep(0)
        before = list(order)
        budget.release(5)  # one more turn: "b", not the newcomer
        for _ in range(3):
            await asyncio.sleep(0)
        budget.release(90)
        await asyncio.wait_for(asyncio.gather(*tasks), 1)
        return before, order

    before, order = asyncio.run(scenario())
    assert before == ["a"]
    assert order == ["a", "b", "newcomer"]


def test_a_waiter_cancelled_after_its_turn_passes_the_turn_on() -> None:
    async def scenario() -> bool:
        budget = ByteBudget(100, wake_unit=100)
        budget.take(100)
        first = asyncio.ensure_future(budget.room())
        second = asyncio.ensure_future(budget.room())
        await asyncio.sleep(0)
        budget.release(50)  # one turn: the first waiter's
        first.cancel()  # cancelled before it ran: its turn goes to the next
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, 1)
        return second.done()

    assert asyncio.run(scenario()) is True
