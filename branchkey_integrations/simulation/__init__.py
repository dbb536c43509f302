"""The machinery behind :mod:`branchkey_integrations.simulate`, one concern per module: ``config`` (the
settings), ``data`` (digits and partitions), ``frameworks`` with ``lightning_model`` and ``keras_model``
(the model and its training, per framework), ``turns`` (the one leaf implementation: a leaf's turn, the
scoring of an aggregate, the baselines), ``backends`` (where turns run: ``process``, with ``leaf`` its worker
process, or ``ray``, in ``ray_backend``), ``local_server`` (the embedded server), ``supervisor`` (child
processes and signals), ``orchestrator`` (one run, round by round), ``progress``, ``report``. Nothing here
is imported by ``import branchkey_integrations``. The simulation's errors (:class:`SimulationError` and its
subclasses) are exported here; their classes live in ``core/errors.py``.
"""

from ..core.errors import (
    SIMULATION_ERRORS, EmbeddedServerError, LeafFailedError, PartitionError, SimulationError, SimulationTerminated,
)

__all__ = [*SIMULATION_ERRORS]
