"""What the framework callbacks share, framework-free: their settings, their round rules, their common surface.

The Lightning and the Keras callback take the same options with the same meaning (``every_n_epochs``,
``num_samples``, ``buffers``, ``snapshot_dir``, ...). This module owns them once: :class:`CallbackSettings`
checks every option when the callback is constructed (with the same messages for both callbacks; the round's
options, with their defaults, are :class:`~.leaf_options.LeafOptions`') and builds the
:class:`~branchkey_integrations.core.federation.Federation`; :class:`FederatedCallbackMixin` gives both callbacks
the same read-only options, ``round`` and ``repr``; the functions below fix the weighting, the round epochs and
the dtypes that travel as float32. What remains in ``lightning.py`` and ``keras.py`` is translation only: tensors
or variables to arrays and back, each framework's hooks to
:meth:`~branchkey_integrations.core.federation.Federation.exchange`, and the framework's own output and way to
end a run.

What a waiting leaf says, and where: the mixin turns every :class:`~.progress.WaitProgress` report (round,
seconds waited, uploads of how many, missing and refused leaves by name) and the end of each round (done,
caught up, timed out, run stopped) into one line, and hands it to the callback's ``_say``: Lightning prints it
through its progress bar (or its rank-zero logger when there is no bar), Keras through its own printing,
silent under ``verbose=0``. Why the framework's output and not a logging handler: a library that configures
logging fights the application's own configuration, and a user looks for news of training where the framework
prints it, without any set-up. The core's log records (INFO and up) remain, unchanged, for applications that
configure logging; its warnings reach stderr even without configuration, as Python's always do.

Signals: each round runs inside :class:`~.signals.InterruptOnSignals`, so SIGTERM or Ctrl-C interrupts the
round's wait at once and then reaches the handler installed before (the framework's); ``interrupted_by`` tells
the callback which signal ended the round, and the callback ends the run the framework's way.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import os
import signal
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union

from .credentials import CredentialsLike
from .errors import BranchKeyError
from .federation import Federation
from .head_calibration import CalibrationPlan, calibrate
from .outcome import Layers, Outcome, Weighting, layer_names_in
from .progress import WaitProgress, round_label
from .scaffold import PendingControls, ScaffoldLeaf, runs_scaffold
from .leaf_options import LeafOptions
from .signals import InterruptOnSignals, exit_status, signal_name
from .snapshots import require_safetensors

logger = logging.getLogger(__name__)

#: ``"local"``: state that is not trained (BatchNorm statistics) stays on the leaf, as in FedBN;
#: ``"average"``: its floating-point part is averaged like the parameters.
BUFFER_POLICIES = ("local", "average")

#: how a callback applies SCAFFOLD's correction ``c - c_i``: ``"decoupled"``, a step ``w -= lr (c - c_i)`` after each
#: optimizer step (outside the optimizer: its momentum and moments never see it); ``"gradient"``, added to the
#: gradient before the step (the paper's ``g - c_i + c``; Lightning only). Why decoupled is the default: the control
#: variates are measured in the units of the optimizer's steps (``(x - y) / sum(lr)``), which under Adam or momentum
#: are not the gradient's; fed to Adam as a gradient, the correction swamps the gradient
#: (docs/guides/strategies.md: SCAFFOLD).
SCAFFOLD_CORRECTIONS = ("decoupled", "gradient")

#: dtype names NumPy cannot carry (bfloat16) or that would lose precision in the average (float16): the
#: upload sends them as float32, and the aggregate is cast back to each parameter's own dtype. Matched by
#: name, so that one rule serves ``torch.bfloat16``, a Keras ``"bfloat16"`` and an ``ml_dtypes`` array alike.
TRAVEL_AS_FLOAT32 = ("bfloat16", "float16")

NumSamples = Union[int, Callable[[], int], None]


def require_framework(extra: str, needs: str, modules: Sequence[str]) -> None:
    """Import ``modules``, or raise ImportError saying that ``branchkey_integrations.<extra>`` needs ``needs``
    and which extra installs it: a callback module calls this before its framework imports."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(
                f"branchkey_integrations.{extra} needs {needs}: pip install 'branchkey-integrations[{extra}]'"
            ) from exc


def travels_as_float32(dtype: Any) -> bool:
    """Whether values of ``dtype`` (a torch, Keras or NumPy dtype, or its name) are uploaded as float32."""
    name = getattr(dtype, "name", None) or str(dtype)
    return name.rsplit(".", 1)[-1] in TRAVEL_AS_FLOAT32  # "torch.bfloat16" -> "bfloat16"


def check_every_n_epochs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected every_n_epochs >= 1. Received: every_n_epochs={value!r}")
    return value


def check_num_samples(value: Any, *, required: bool) -> NumSamples:
    """An int > 0 or a zero-argument callable; None only where the framework can count the samples itself."""
    ok = callable(value) or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if ok or (value is None and not required):
        return value
    allowed = "an int > 0 or a callable returning one" if required else \
        "an int > 0, a callable returning one, or None"
    raise ValueError(f"Expected num_samples to be {allowed}. Received: num_samples={value!r}")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"Expected {name} in {tuple(allowed)}. Received: {name}={value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected {name} to be True or False. Received: {name}={value!r}")
    return value


def check_proximal_mu(value: Any) -> float:
    """FedProx's ``mu``: a finite number >= 0, where 0 (the default) turns the proximal term off."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ValueError("Expected proximal_mu to be a number >= 0 (0 turns FedProx off). "
                         f"Received: proximal_mu={value!r}")
    return float(value)


def resolve_weighting(num_samples: NumSamples, fallback: Callable[[], float] | None = None) -> float:
    """This leaf's weighting in the average: ``num_samples`` (called if callable), else ``fallback()``.

    A callable is checked on every call: it may count data that grows between rounds.
    """
    if callable(num_samples):
        value = num_samples()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"Expected num_samples() to return a number > 0. Received: {value!r}")
        return float(value)
    if num_samples is not None:
        return float(num_samples)
    if fallback is None:
        raise ValueError("Expected num_samples to be an int > 0 or a callable returning one. Received: num_samples=None")
    return float(fallback())


def is_round_epoch(epoch: int, every_n_epochs: int) -> bool:
    """Whether the 0-based ``epoch`` ends with a round: epochs n-1, 2n-1, ..."""
    return (epoch + 1) % every_n_epochs == 0


def rounds_before(epoch: int, every_n_epochs: int) -> int:
    """Rounds that the epochs before the 0-based ``epoch`` took part in: what a run resumed at ``epoch`` has done."""
    return epoch // every_n_epochs


@dataclass(frozen=True, eq=False)
class CallbackSettings:
    """Every option the callbacks share, checked in the constructor, and the :class:`Federation` they build.

    The arguments mean what the callbacks' docstrings say; ``num_samples_required`` says whether the framework
    cannot count samples itself (Keras), so that None is refused; ``install_extra`` names the pip extra of the
    callback, for the install hint when ``snapshot_dir`` is given without safetensors.

    Raises:
        ValueError: an option is out of range; the message names the value received and what is allowed.
        CredentialsError: a credential field is missing or malformed.
        ImportError: ``snapshot_dir`` is given and safetensors is not installed.

    Example (skipped: it reads a credentials file):
        >>> settings = CallbackSettings("leaf_1.json", "http://127.0.0.1:8080", every_n_epochs=2)  # doctest: +SKIP
        >>> settings.federation.round  # doctest: +SKIP
        0
    """

    credentials: CredentialsLike | None = field(repr=False)
    host: str = LeafOptions.host
    every_n_epochs: int = 1
    num_samples: NumSamples = None
    num_samples_required: bool = False
    timeout: float | None = LeafOptions.timeout
    on_timeout: str = LeafOptions.on_timeout
    buffers: str = "local"
    reset_optimizer: bool = False
    send_metrics: bool = True
    snapshot_dir: str | Path | None = None
    transport: str = LeafOptions.transport
    log_every_s: float = LeafOptions.log_every_s
    client_options: dict[str, Any] | None = field(default=LeafOptions.client_options, repr=False)
    compression: str | None = LeafOptions.compression
    quantize: str | None = LeafOptions.quantize
    proximal_mu: float = 0.0
    scaffold_correction: str = "decoupled"
    calibrate_head: bool | str = False
    head: Any = None  # a name, or the framework's layer object (which the callback checks), or None
    min_class_count: int = 1
    install_extra: str | None = None
    check_every_s: float = LeafOptions.check_every_s
    connect_timeout: float = LeafOptions.connect_timeout
    federation: Federation = field(init=False, repr=False)
    calibration: CalibrationPlan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", CalibrationPlan.of(self.calibrate_head, self.min_class_count))
        # a layer object is the framework callback's to check (_check_head), before these settings are made
        if (self.head == "") if isinstance(self.head, str) else isinstance(self.head, numbers.Number):
            raise ValueError("Expected head to be the final linear layer, its name, or None (the last trainable "
                             f"one). Received: head={self.head!r}")
        check_every_n_epochs(self.every_n_epochs)
        check_num_samples(self.num_samples, required=self.num_samples_required)
        check_choice("buffers", self.buffers, BUFFER_POLICIES)
        check_choice("scaffold_correction", self.scaffold_correction, SCAFFOLD_CORRECTIONS)
        check_flag("reset_optimizer", self.reset_optimizer)
        check_flag("send_metrics", self.send_metrics)
        object.__setattr__(self, "proximal_mu", check_proximal_mu(self.proximal_mu))  # frozen: settled once, here
        if self.snapshot_dir is not None:
            if not isinstance(self.snapshot_dir, (str, os.PathLike)):
                raise TypeError("Expected snapshot_dir to be a directory path or None. "
                                f"Received: snapshot_dir={self.snapshot_dir!r}")
            snapshot_dir = Path(self.snapshot_dir)
            require_safetensors(snapshot_dir, self.install_extra)
            object.__setattr__(self, "snapshot_dir", snapshot_dir)  # frozen: settled once, here
        # the round's options are LeafOptions' to check, once; the federation is made of them
        leaf = LeafOptions(**{name: getattr(self, name) for name in LEAF_OPTION_NAMES})
        object.__setattr__(self, "federation", Federation.from_options(self.credentials, leaf))


#: the options of :class:`LeafOptions`, which every callback takes too
LEAF_OPTION_NAMES = tuple(f.name for f in fields(LeafOptions) if f.init)


def _setting(name: str) -> property:
    return property(lambda self: getattr(self.settings, name), doc=f"The callback's ``{name}`` (read-only).")


class FederatedCallbackMixin:
    """What both callbacks share: the one constructor signature, the options as read-only attributes, ``round``,
    ``repr`` and one round as an :class:`~branchkey_integrations.core.outcome.Outcome`.

    The constructor takes the options of :class:`CallbackSettings` (documented on each callback) and keeps the
    checked settings in ``settings``, and their :class:`~branchkey_integrations.core.federation.Federation`,
    which holds the round state, in ``federation``. A callback that adds options of its own overrides
    ``__init__`` with those, and passes the rest on. Class attributes say what differs between frameworks:
    ``_num_samples_required`` (the framework cannot count samples itself) and ``_install_extra`` (the pip
    extra named in install hints).
    """

    _num_samples_required: ClassVar[bool] = False
    _install_extra: ClassVar[str | None] = None

    def __init__(
        self,
        credentials: CredentialsLike | None,
        host: str = CallbackSettings.host,
        *,
        every_n_epochs: int = CallbackSettings.every_n_epochs,
        num_samples: NumSamples = CallbackSettings.num_samples,
        timeout: float | None = CallbackSettings.timeout,
        on_timeout: str = CallbackSettings.on_timeout,
        buffers: str = CallbackSettings.buffers,
        reset_optimizer: bool = CallbackSettings.reset_optimizer,
        send_metrics: bool = CallbackSettings.send_metrics,
        snapshot_dir: str | Path | None = CallbackSettings.snapshot_dir,
        transport: str = CallbackSettings.transport,
        log_every_s: float = CallbackSettings.log_every_s,
        client_options: dict[str, Any] | None = CallbackSettings.client_options,
        proximal_mu: float = CallbackSettings.proximal_mu,
        check_every_s: float = CallbackSettings.check_every_s,
        connect_timeout: float = CallbackSettings.connect_timeout,
        scaffold_correction: str = CallbackSettings.scaffold_correction,
        calibrate_head: bool | str = CallbackSettings.calibrate_head,
        head: Any = CallbackSettings.head,
        min_class_count: int = CallbackSettings.min_class_count,
        compression: str | None = CallbackSettings.compression,
        quantize: str | None = CallbackSettings.quantize,
    ) -> None:
        super().__init__()  # the framework's Callback
        self._check_head(head)
        self.settings = CallbackSettings(
            credentials, host, every_n_epochs=every_n_epochs, num_samples=num_samples, timeout=timeout,
            on_timeout=on_timeout, buffers=buffers, reset_optimizer=reset_optimizer, send_metrics=send_metrics,
            snapshot_dir=snapshot_dir, transport=transport, log_every_s=log_every_s, client_options=client_options,
            proximal_mu=proximal_mu, check_every_s=check_every_s, connect_timeout=connect_timeout,
            scaffold_correction=scaffold_correction, calibrate_head=calibrate_head, head=head,
            min_class_count=min_class_count, num_samples_required=self._num_samples_required, install_extra=self._install_extra,
            compression=compression, quantize=quantize)
        self.federation: Federation = self.settings.federation
        self.federation.add_progress_listener(self._on_progress)
        self.interrupted_by: int | None = None  # the signal (SIGTERM, SIGINT) that ended the last round, if any

    every_n_epochs = _setting("every_n_epochs")
    num_samples = _setting("num_samples")
    buffers = _setting("buffers")
    reset_optimizer = _setting("reset_optimizer")
    send_metrics = _setting("send_metrics")
    snapshot_dir = _setting("snapshot_dir")
    proximal_mu = _setting("proximal_mu")
    scaffold_correction = _setting("scaffold_correction")
    calibrate_head = _setting("calibrate_head")
    head = _setting("head")
    min_class_count = _setting("min_class_count")
    _calibrated_round = -1  # the round after which this leaf last calibrated (never twice after one round)

    @staticmethod
    def _check_head(head: Any) -> None:
        """A framework callback checks a layer object passed as ``head=`` here, at construction (the model itself,
        and so a name or the default, is known only when fit begins); here only names and None are known."""
        if head is not None and not isinstance(head, str):
            raise ValueError(f"Expected head to be a layer's name or None. Received: head={head!r}")

    @property
    def round(self) -> int:
        """Rounds this leaf has completed."""
        return self.federation.round

    def _exchange(self, layers: Layers, names: Sequence[str], weighting: Weighting | None = None,
                  controls: Layers = ()) -> Outcome:
        """One round of ``layers`` (snapshot included), weighted by ``weighting``, by default ``num_samples``;
        ``controls``: SCAFFOLD's control update, in SCAFFOLD branches.

        SIGTERM and Ctrl-C interrupt its wait (:class:`~.signals.InterruptOnSignals`); ``interrupted_by`` then
        holds the signal, whatever the outcome, and the callback ends the run (see :meth:`_end_run`).
        The end of the round is said through ``_say``.
        """
        if weighting is None:
            weighting = lambda: resolve_weighting(self.num_samples)  # noqa: E731 - called inside the round
        federation = self.federation
        self._round_names = tuple(names)  # to name the layers a refusal mentions, while the round waits
        federation.clear_interrupt()  # an earlier interrupt (a caught Ctrl-C in a notebook) is over
        with InterruptOnSignals(federation.interrupt) as signals:
            outcome = federation.exchange(layers, weighting, names, snapshot_dir=self.snapshot_dir, controls=controls)
        self.interrupted_by = signals.received
        self._say_outcome(outcome)
        return outcome

    # ------------------------------------------------------------------ what the leaf says
    def _say(self, text: str) -> None:
        """Show ``text`` to the user in the framework's own output; each callback overrides this."""
        logger.info("%s", text)

    def _on_progress(self, progress: WaitProgress) -> None:
        if progress.final:  # the end of the wait is said by _say_outcome, with what it came to
            return
        complete = progress.known and progress.required is not None and len(progress.uploaded) >= progress.required
        if complete and not progress.refused and progress.waited_s < self.settings.log_every_s:
            return  # every upload is in: the aggregate is moments away (said if it is late, at log_every_s)
        self._say(f"BranchKey: {progress.line(local_layer_names(progress, self._round_names))}")

    _round_names: tuple[str, ...] = ()

    def _say_outcome(self, outcome: Outcome) -> None:
        if outcome.kind != "error" or self.interrupted_by is not None:  # an error is raised: it speaks for itself
            pull = (f" Local training pulls toward it (FedProx, proximal_mu={self.proximal_mu:g})."
                    if outcome.kind == "done" and self.proximal_mu and self.interrupted_by is None else "")
            self._say(f"BranchKey: {describe_outcome(outcome, self.interrupted_by)}{pull}")

    def _branch_runs_scaffold(self) -> bool:
        """Whether this leaf's branch runs SCAFFOLD (its branch config's ``service.algorithm``), asked once per fit;
        a platform without the call (2.x) runs FedAvg. Said once, so that the user knows training is corrected."""
        try:
            scaffold = runs_scaffold(self.federation.client.get_branch_config())
        except BranchKeyError as exc:
            logger.debug("No branch config (%s): the branch is taken not to run SCAFFOLD", exc)
            return False
        if scaffold:
            self._say("BranchKey: the branch runs SCAFFOLD: local steps are corrected by the control variates "
                      "(c - c_i), and each upload carries this leaf's control update.")
        return scaffold

    def _end_run(self, signum: int) -> BaseException:
        """The exception that ends the run after ``signum`` interrupted a round, the framework's way.

        Default: ``KeyboardInterrupt`` for Ctrl-C, as Python raises it, and for any other signal
        ``SystemExit`` with the status a shell shows for a process ended by it (143 for SIGTERM), so that
        ``finally`` blocks still run. A callback overrides this where its framework has its own (Lightning).
        """
        if signum == signal.SIGINT:
            return KeyboardInterrupt()
        return SystemExit(exit_status(signum))

    def __repr__(self) -> str:
        fedprox = f", proximal_mu={self.proximal_mu:g}" if self.proximal_mu else ""
        return (f"{type(self).__name__}(leaf={self.federation.credentials.name!r}, "
                f"every_n_epochs={self.every_n_epochs}, buffers={self.buffers!r}{fedprox}, round={self.round})")




def local_layer_names(progress: WaitProgress, names: Sequence[str]) -> str:
    """What this leaf calls the ``layer_<i>`` that refusals of other leaves' uploads mention, as a suffix for the
    progress line (``"; on this leaf layer_0 is 'stem.weight'"``), or ``""``: the server only knows positions.

    Example:
        >>> from branchkey_integrations.core.progress import RefusedUpload
        >>> progress = WaitProgress(1, "aggregate", 3.0, refused=(RefusedUpload("leaf_2", "layer_0: expected ..."),))
        >>> local_layer_names(progress, ["stem.weight", "stem.bias"])
        "; on this leaf layer_0 is 'stem.weight'"
    """
    local = layer_names_in((refusal.reason for refusal in progress.refused), names)
    return f"; on this leaf {local}" if local else ""


def describe_outcome(outcome: Outcome, interrupted_by: int | None = None) -> str:
    """One line on how a round ended, for the user: done, caught up, timed out, stopped, failed or interrupted."""
    if interrupted_by is not None:
        return f"{signal_name(interrupted_by)} received: ending training."
    result = outcome.result
    if outcome.kind == "stopped":
        return f"{outcome.error} Stopping training."
    if outcome.kind == "error" or result is None:
        return f"the round failed: {type(outcome.error).__name__}: {outcome.error}"
    if outcome.kind == "timeout":
        why = ("the platform could not be reached" if result.skipped == "unreachable" else
               f"no aggregate after {result.wait_s:.0f} s")
        where = round_label(result.round + 1, result.run_number, result.round_index)
        return f"round {where}: {why}; training goes on with the local model (on_timeout='continue')."
    where = round_label(result.round, result.run_number, result.round_index)
    if result.caught_up:
        return (f"this leaf was behind its branch (resumed from an older checkpoint?): it loaded the branch's "
                f"latest aggregate {result.aggregation_id} instead of uploading, and is now at round {where}.")
    return f"round {where} done: aggregate {result.aggregation_id} after {result.wait_s:.1f} s."


__all__ = ["describe_outcome", "local_layer_names", "LEAF_OPTION_NAMES", "BUFFER_POLICIES", "SCAFFOLD_CORRECTIONS",
           "ScaffoldLeaf", "PendingControls", "CalibrationPlan", "calibrate",
           "TRAVEL_AS_FLOAT32", "NumSamples", "CallbackSettings", "FederatedCallbackMixin",
           "require_framework", "travels_as_float32", "check_every_n_epochs", "check_num_samples", "check_choice", "check_flag", "check_proximal_mu",
           "resolve_weighting", "is_round_epoch", "rounds_before"]
