"""A server optimizer's step in a round: from the run's previous aggregate and stored moments toward the mean.

The round state machine (:mod:`~branchkey_integrations.server.rounds`) calls :func:`optimizer_step` in a
worker thread after writing the round's FedAvg mean; the arithmetic is
:func:`~branchkey_integrations.server.strategies.apply_optimizer`'s. What this module owns is finding the
step's inputs in the store and what to do when one is gone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..core import wire
from .records import Branch, StateUpdate
from .store import Store
from .strategies import apply_optimizer, uses_moments

logger = logging.getLogger(__name__)


def optimizer_step(store: Store, branch: Branch, run_number: int, round_index: int, specs: list[wire.LayerSpec],
                   mean: Path, temps: list[Path]) -> tuple[str, str | None, StateUpdate | None, tuple[int, str] | None]:
    """Step the branch's server optimizer from the run's previous aggregate toward ``mean`` (in a worker thread).

    Returns (what aggregated, a note, the new state, the aggregate's size and digest); the aggregate is
    ``temps[-1]`` (appended here, with the state's temporary files). A run's first round has no
    previous aggregate: the mean is its aggregate and the note says so. A file the step needs that is
    gone from the store (removed by hand, a damaged disk) is said in the note, not retried forever:
    without the previous aggregate the mean is the aggregate; without the moments they start from zero.
    """
    name, params = branch.algorithm, branch.params
    previous = store.previous_aggregate(branch.id, run_number, round_index)
    if previous is None:
        return "fedavg", f"first round of run {run_number}: {name} starts from the FedAvg mean", None, None
    if not previous[1].exists():
        note = (f"the aggregate of round {previous[0]} of run {run_number}, which {name} steps from, is missing "
                f"from the store ({previous[1].name}): this round's aggregate is the FedAvg mean")
        logger.error("branch %s run %d round %d: %s", branch.id, run_number, round_index, note)
        return "fedavg", note, None, None
    state_in = store.optimizer_state(branch.id, run_number, previous[0], name, params)
    lost = [path.name for path in state_in or () if path is not None and not path.exists()]
    note = None
    if lost:
        note = (f"the {name} state after round {previous[0]} of run {run_number} is missing from the store "
                f"({', '.join(lost)}): its moments start again from zero")
        logger.error("branch %s run %d round %d: %s", branch.id, run_number, round_index, note)
        state_in = None
    destination = store.new_temp_path()
    m_out, v_out = (store.new_state_temp_path() if used else None for used in uses_moments(name))
    temps += [path for path in (m_out, v_out) if path] + [destination]
    stepped = apply_optimizer(name, params, mean, previous[1], state_in, destination, m_out, v_out, specs)
    return name, note, StateUpdate(name, params, m_out, v_out), stepped
