"""Why a simulation did not finish. All are BranchKeyError, so ``branchkey-local`` prints them as one line."""

from __future__ import annotations

from ..core.errors import BranchKeyError


class SimulationError(BranchKeyError):
    """The simulation could not finish; the message says what failed and where its log is."""


class ServerError(SimulationError):
    """The embedded server did not start, died, or refused an admin call."""


class LeafFailedError(SimulationError):
    """A leaf (or the centralized baseline) process exited before finishing its job."""


class Terminated(SimulationError):
    """The simulation received SIGTERM; raised in the main thread so cleanup runs."""
