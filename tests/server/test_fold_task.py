"""One fold task per branch: uploads that arrive while it runs make it go round again, not queue;
what they owe the byte budget holds receipt back until the pass that folds them is over."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from branchkey_integrations.server.budget import ByteBudget
from branchkey_integrations.server.rounds import Rounds
from branchkey_integrations.server.workers import Workers


def test_uploads_during_a_fold_make_the_running_task_go_round_again_and_owe_the_budget_until_folded() -> None:
    async def scenario() -> tuple[list[str], list[int]]:
        workers = Workers(ThreadPoolExecutor(1))
        rounds = Rounds(None, None, workers, deadline_check_interval_s=1.0)  # type: ignore[arg-type]
        budget = ByteBudget.of_running_loop()
        calls: list[str] = []
        owed: list[int] = []  # what the budget is owed as each pass starts
        hold = {"b": asyncio.Event(), "other": asyncio.Event()}

        async def fold(branch_id: str) -> None:
            calls.append(f"fold {branch_id}")
            owed.append(budget.owed)
            if branch_id in hold:  # the first pass of each branch is still folding while others commit
                await hold.pop(branch_id).wait()

        async def aggregate_if_ready(branch_id: str, *, deadline: bool = False) -> None:
            calls.append(f"aggregate {branch_id}")

        async def settle() -> None:
            for _ in range(10):
                await asyncio.sleep(0)

        rounds.fold, rounds.aggregate_if_ready = fold, aggregate_if_ready  # type: ignore[method-assign]
        releases = dict(hold)
        rounds._fold_soon("b", 3)
        await settle()  # the first task is inside its first fold
        for _ in range(5):  # five more uploads of 10 bytes commit meanwhile: no new task
            rounds._fold_soon("b", 10)
        assert budget.owed == 53 and not budget.spent()
        rounds._fold_soon("other", budget.capacity)  # another branch has its own task
        await settle()
        room = asyncio.ensure_future(budget.room())
        await settle()
        assert budget.spent() and not room.done()  # receipt waits while that upload is not folded
        releases["other"].set()
        await settle()
        assert room.done() and budget.owed == 53
        releases["b"].set()
        await workers.wait_for_tasks(5)
        assert budget.owed == 0 and budget.used == 0
        rounds._fold_soon("b", 7)  # after it ended, a new upload starts a new task
        await workers.wait_for_tasks(5)
        assert budget.owed == 0
        workers.shutdown()
        return calls, owed

    calls, owed = asyncio.run(scenario())
    assert calls == ["fold b", "fold other", "aggregate other", "aggregate b", "fold b", "aggregate b",
                     "fold b", "aggregate b"]
    assert owed == [3, 53 + (16 << 20), 50, 7]


def test_a_failing_fold_still_repays_what_it_owed() -> None:
    async def scenario() -> int:
        workers = Workers(ThreadPoolExecutor(1))
        rounds = Rounds(None, None, workers, deadline_check_interval_s=1.0)  # type: ignore[arg-type]

        async def fold(branch_id: str) -> None:
            raise RuntimeError("the disk went away")

        rounds.fold = fold  # type: ignore[method-assign]
        rounds._fold_soon("b", 1 << 30)
        assert ByteBudget.of_running_loop().spent()
        await workers.wait_for_tasks(5)
        workers.shutdown()
        return ByteBudget.of_running_loop().owed

    assert asyncio.run(scenario()) == 0


def test_receipt_resumes_only_when_half_the_budget_is_free_again() -> None:
    async def scenario() -> list[tuple[int, bool, bool]]:
        budget = ByteBudget(100)
        budget.take(30)  # bodies in memory
        budget.owe(70)  # uploads not yet folded
        assert budget.spent()
        room = asyncio.ensure_future(budget.room())
        states = []
        for give_back, count in ((budget.repay, 20), (budget.release, 20), (budget.release, 10), (budget.repay, 1)):
            give_back(count)
            for _ in range(3):
                await asyncio.sleep(0)
            states.append((budget.used + budget.owed, budget.spent(), room.done()))
        return states

    assert asyncio.run(scenario()) == [(80, False, False), (60, False, False), (50, False, False), (49, False, True)]
