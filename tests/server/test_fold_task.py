"""One fold task per branch: uploads that arrive while it runs make it go round again, not queue;
each upload's answer waits for the pass that folds it, never for an aggregation."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from branchkey_integrations.server.rounds import Rounds
from branchkey_integrations.server.workers import Workers


def test_uploads_during_a_fold_make_the_running_task_go_round_again_once() -> None:
    async def scenario() -> tuple[list[str], list[bool]]:
        workers = Workers(ThreadPoolExecutor(1))
        rounds = Rounds(None, None, workers, deadline_check_interval_s=1.0)  # type: ignore[arg-type]
        calls: list[str] = []
        release = asyncio.Event()
        aggregating = asyncio.Event()

        async def fold(branch_id: str) -> None:
            calls.append(f"fold {branch_id}")
            if calls.count("fold b") == 2 and calls[-1] == "fold b":
                states.append(any(f.done() for f in later))  # not answered before the pass that folds them
            if len(calls) == 1:
                await release.wait()  # the first pass is still folding when the next uploads commit

        async def aggregate_if_ready(branch_id: str, *, deadline: bool = False) -> None:
            calls.append(f"aggregate {branch_id}")
            if branch_id == "b" and calls.count("aggregate b") == 2:
                await aggregating.wait()  # a slow aggregation after the second pass

        states: list[bool] = []
        later: list[asyncio.Future[None]] = []
        rounds.fold, rounds.aggregate_if_ready = fold, aggregate_if_ready  # type: ignore[method-assign]
        first = rounds._fold_soon("b")
        await asyncio.sleep(0)  # the first task is inside its first fold
        later += [rounds._fold_soon("b") for _ in range(5)]  # five more uploads commit meanwhile: no new task
        rounds._fold_soon("other")  # another branch has its own task
        await asyncio.sleep(0)
        states += [first.done(), any(f.done() for f in later)]  # nothing folded yet: no answer
        release.set()
        await asyncio.gather(first, *later)  # answered after the second pass, while its aggregation still runs
        states.append(aggregating.is_set())
        aggregating.set()
        await workers.wait_for_tasks(5)
        await rounds._fold_soon("b")  # after it ended, a new upload starts a new task
        await workers.wait_for_tasks(5)
        workers.shutdown()
        return calls, states

    calls, states = asyncio.run(scenario())
    assert calls == ["fold b", "fold other", "aggregate other", "aggregate b", "fold b", "aggregate b",
                     "fold b", "aggregate b"]
    assert states == [False, False, False, False]
