"""SIGTERM and Ctrl-C end a waiting leaf: the signal wiring both training callbacks share.

This module owns :class:`InterruptOnSignals`, a context manager that, for the duration of one round (upload
and wait), installs handlers for ``SIGTERM`` and ``SIGINT`` which interrupt the round's wait at once and then
hand the signal on to the handler that was installed before, so that the framework reacts to the signal as it
always does (Lightning's own ``SIGTERM`` handler sets ``trainer.received_sigterm``; Python's Ctrl-C handler
raises ``KeyboardInterrupt``). What the process does next is the callback's decision, made with
:attr:`InterruptOnSignals.received`:

- a previous handler that is a Python function is called (chained) after the wait was interrupted;
- ``SIG_DFL`` is not chained: for ``SIGTERM`` it would kill the process on the spot, skipping every ``finally``
  block, the framework's shutdown and the notification thread's close. The callback ends the run itself, in
  the framework's way (:func:`exit_status` gives the status a shell shows for a process ended by the signal);
- ``SIG_IGN`` (the program chose to ignore the signal) is kept: that signal is not watched at all.

Ending quickly: a process that SIGTERM or Ctrl-C ends has little time (Kubernetes gives 30 s in all, and
users expect a Ctrl-C to be obeyed at once), yet with torch and Lightning loaded the interpreter's exit alone
spends about 1.5 s of CPU in the garbage collector's final passes over every object the frameworks allocated.
The handler therefore calls :func:`gc.freeze` in a script (not in an interactive session, where a caught
``KeyboardInterrupt`` is followed by more work): the objects alive at that moment are no longer scanned,
while everything still freed by its reference count is freed as before.

Handlers can only be installed from the main thread; elsewhere (a callback run in a worker thread) the context
manager watches nothing and says so at DEBUG. Outside the context the previous handlers are back in place,
unless something else replaced ours meanwhile (then that one stays).

Example:
    >>> import signal
    >>> reasons = []
    >>> with InterruptOnSignals(reasons.append, (signal.SIGUSR1,)) as signals:
    ...     signal.raise_signal(signal.SIGUSR1)
    >>> reasons, signals.received == signal.SIGUSR1
    (['SIGUSR1 received'], True)
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

#: the signals that end a waiting leaf: a scheduler's or container's stop (SIGTERM) and Ctrl-C (SIGINT)
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, ...; the number itself when the platform has no name for it."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def interactive() -> bool:
    """Whether this is an interactive session (a Python prompt, IPython or a Jupyter kernel); a script that
    merely imported IPython (Keras does) is not."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    return get_ipython is not None and get_ipython() is not None


def exit_status(signum: int) -> int:
    """The exit status a shell shows for a process ended by ``signum``: 128 + the signal number (143 for
    SIGTERM, 130 for SIGINT), what ``docker``, Kubernetes and SLURM read as "terminated by the signal"."""
    return 128 + int(signum)


class InterruptOnSignals:
    """While inside the context, ``signals`` call ``interrupt(reason)`` and then the previous handler.

    Args:
        interrupt: what interrupts the round's wait, e.g. :meth:`Federation.interrupt`; called in the signal
            handler with a reason such as ``"SIGTERM received"``. It must be safe to call there (it only sets
            a flag and wakes the waiting thread).
        signals: the signals to watch; default :data:`STOP_SIGNALS`.

    Attributes:
        received: the first watched signal that arrived inside the context, or None.
    """

    def __init__(self, interrupt: Callable[[str], None], signals: Sequence[int] = STOP_SIGNALS) -> None:
        self._interrupt = interrupt
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    def __enter__(self) -> InterruptOnSignals:
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            logger.debug("Not in the main thread: signals cannot interrupt this round's wait")
            return self
        for signum in self._signals:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN or previous is None:  # ignored on purpose, or installed outside Python
                continue
            signal.signal(signum, self._handle)
            self._previous[signum] = previous
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:  # else someone replaced ours meanwhile: theirs stays
                signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            if signum in STOP_SIGNALS and not interactive():
                gc.freeze()  # the process is ending: spare its exit the collector's passes (see the module docstring)
        self._interrupt(f"{signal_name(signum)} received")
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)  # Lightning's SIGTERM handler; Python's Ctrl-C raises KeyboardInterrupt here


__all__ = ["STOP_SIGNALS", "InterruptOnSignals", "exit_status", "signal_name"]
