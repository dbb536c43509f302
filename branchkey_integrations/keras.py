"""Federated learning with BranchKey as one Keras 3 callback, on any Keras backend.

The callback only translates: Keras variables to NumPy arrays and back, Keras's hooks and ``logs`` to
:class:`~branchkey_integrations.core.federation.Federation`, where the round logic lives, and what a waiting
leaf has to say to Keras's own printing (silent under ``verbose=0``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .core.callback_kit import BUFFER_POLICIES, CallbackSettings, FederatedCallbackMixin, NumSamples, is_round_epoch
from .core.callback_kit import require_framework, resolve_weighting, rounds_before, travels_as_float32
from .core.credentials import CredentialsLike
from .core.federation import RoundResult
from .core.callback_kit import ScaffoldLeaf

require_framework("keras", "Keras 3 and a backend (TensorFlow, PyTorch or JAX)", ("keras",))

import keras  # noqa: E402 - after the check that gives an install hint
from .core.callback_kit import calibrate  # noqa: E402
from .keras_head import check_head, dense_head, dense_inputs, head_arrays, load_head  # noqa: E402

if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the environment
    raise ImportError(f"branchkey_integrations.keras needs Keras 3; found keras {keras.__version__}: "
                      "pip install 'branchkey-integrations[keras]'")


logger = logging.getLogger(__name__)

LOG_KEYS = ("branchkey_round", "branchkey_wait_s", "branchkey_upload_mb")
#: the fit verbosities that draw a progress bar, whose line is still open when ``on_epoch_end`` runs
_BAR_VERBOSITIES = (1, "auto")


def federated_variables(model: keras.Model, buffers: str = "local") -> list[keras.Variable]:
    """The variables a round exchanges, in the model's order: ``model.trainable_weights``, then, with
    ``buffers="average"``, the floating-point non-trainable weights of layers that are not frozen
    (BatchNorm moving statistics). A frozen layer's weights are never sent: they are not trained."""
    variables = list(model.trainable_weights)
    if buffers == "average":
        frozen = {id(v) for layer in _nested_layers(model) if not layer.trainable for v in layer.weights}
        variables += [v for v in model.non_trainable_weights
                      if id(v) not in frozen and "float" in str(v.dtype)]
    return variables


def _nested_layers(model: keras.Model) -> list[keras.layers.Layer]:
    # Keras has no public recursive walk; _flatten_layers is what Model.layers itself uses in Keras 3.
    return list(model._flatten_layers(include_self=False, recursive=True))


def to_numpy(variable: keras.Variable) -> np.ndarray:
    """A host copy for upload; bfloat16 and float16 travel as float32."""
    array = np.array(keras.ops.convert_to_numpy(variable), copy=True)
    return array.astype(np.float32) if travels_as_float32(array.dtype) else array


def load_arrays(variables: list[keras.Variable], arrays: list[np.ndarray]) -> None:
    """Assign checked arrays to the same variables, each cast back to its own dtype. ``assign`` keeps the
    variable object (the optimizer tracks it) and, under ``tf.distribute``, reaches every replica."""
    for variable, array in zip(variables, arrays):
        variable.assign(keras.ops.cast(array, variable.dtype))


class BranchKeyKerasCallback(FederatedCallbackMixin, keras.callbacks.Callback):
    """Federate a Keras 3 model through BranchKey: every ``every_n_epochs`` epochs, upload the trainable
    weights, wait for the branch's aggregate and assign it to the model's variables.

    Each round adds ``branchkey_round`` (rounds this leaf has completed), ``branchkey_wait_s`` and
    ``branchkey_upload_mb`` to the epoch's ``logs`` (every epoch, so ``History`` stays aligned), plus
    ``branchkey_test_<metric>`` when ``validation_data`` is given.

    Round numbers resume with the epochs: a ``fit`` that starts at epoch ``e`` (``initial_epoch=e``, or
    restored by ``BackupAndRestore``) counts ``e // every_n_epochs`` rounds as done, so round numbers and
    snapshot files continue instead of starting over; one instance may serve several ``fit`` calls.

    Other callbacks (their order in ``callbacks=[...]`` matters, since they all see the same epoch end):

    - ``ModelCheckpoint`` / ``BackupAndRestore``: put them *after* this callback so that they save the
      aggregate; before it they save the local model of that epoch.
    - ``EarlyStopping``: the ``val_*`` metrics of the epoch's logs were measured on the local model,
      before the aggregate was loaded. To judge the federated model, give ``validation_data`` and monitor
      ``branchkey_test_loss`` with ``mode="min"`` (Keras cannot tell the direction of a metric it did not
      compile, and raises without it). The ``branchkey_test_*`` values are those of the latest aggregate:
      they are repeated in the epochs between rounds and appear from the first round's epoch on (epoch
      ``every_n_epochs - 1``; before it there is no aggregate to judge, and Keras's monitors warn that the
      metric is missing). With ``restore_best_weights=True`` (and this callback first) the weights
      restored are the best *aggregate*. Stopping early ends this leaf's part in the run: a branch that
      waits for every leaf then waits for it until its round deadline.
    - ``tf.distribute.MirroredStrategy``: callbacks run once per process, so one client talks to the
      platform and ``assign`` updates every replica. ``MultiWorkerMirroredStrategy`` is refused.

    While a round waits, the callback prints what for (round, seconds waited, uploads of how many, the
    missing leaves and refused uploads by name) at the start, on every change and at least every
    ``log_every_s``, and the end of each round, the way Keras's own callbacks print (``fit(verbose=0)``
    silences it). No logging set-up is needed.

    SIGTERM (``docker stop``, Kubernetes, SLURM) and Ctrl-C end a waiting round at once. Ctrl-C raises
    ``KeyboardInterrupt`` as Python always does; SIGTERM raises ``SystemExit(143)``: ``fit`` unwinds, the
    ``finally`` blocks of the training script run, the client closes, and the process exits with 143,
    the status a shell, ``docker`` or Kubernetes report for a process ended by SIGTERM.

    Args:
        credentials: :class:`~branchkey_integrations.Credentials`, a dict, a JSON file path, or None for
            the ``BRANCHKEY_*`` environment variables.
        host: the API host, ``https://app.branchkey.com`` or a ``branchkey-local`` URL.
        num_samples: this leaf's weighting in the average, required: an int, or a zero-argument callable
            (called at every round, for data that grows). Keras cannot count the samples honestly (``steps``
            times ``batch_size`` overcounts a partial last batch, and a dataset may repeat), so pass
            ``len(x_train)``.
        every_n_epochs: federate after every n-th training epoch.
        timeout: seconds one round may wait (pause included); None waits forever.
        on_timeout: ``"raise"`` or ``"continue"`` (keep the local weights and train on).
        buffers: ``"local"`` (non-trainable weights such as BatchNorm moving statistics stay local, as
            in FedBN) or ``"average"`` (their floating-point ones are averaged too; frozen layers never are).
        reset_optimizer: zero the optimizer's slots (momentum, Adam moments; not ``iterations``, which
            drives learning-rate schedules) after loading an aggregate.
        send_metrics: after a round, send the epoch's logs (local training, which produced the upload)
            as ``"train"`` metrics and the aggregate's evaluation on ``validation_data`` as ``"test"``
            metrics, both for that round's aggregate.
        validation_data: what ``model.evaluate`` takes (an ``(x, y)`` tuple or a dataset): the aggregate
            is evaluated on it right after loading, logged as ``branchkey_test_<metric>``.
        snapshot_dir: write each received aggregate to ``round_<n>.safetensors`` here, named by
            ``variable.path``.
        transport: notification transport: ``"auto"``, ``"websocket"`` or ``"amqp"``.
        log_every_s: while waiting, report progress at least this often.
        client_options: further keyword arguments for :class:`~branchkey_integrations.Client`
            (``request_timeout``: seconds for each HTTP request, ...).
        compression, quantize: how uploads travel where the branch advertises codecs (``quantize="int8"``:
            a quarter of the bytes, lossy, error feedback on; docs/guides/slow-links.md); None: the client's default.
        check_every_s: while waiting, ask the platform for the round's progress this often.
        connect_timeout: seconds to wait for the notification channel when training begins.
        proximal_mu: FedProx's ``mu`` (Li et al. 2020), a number >= 0; 0 (the default) turns it off. It pulls
            local training toward ``w_g``, the last global model: the trainable weights as they stand when the
            first epoch of ``fit`` begins (after ``BackupAndRestore`` restored them), then each aggregate as
            soon as it is assigned (a catch-up included). Keras has no gradient hook on every backend, so
            after each training batch the callback takes the proximal step itself:
            ``w <- w - lr * mu * (w - w_g)``, with ``lr`` the optimizer's learning rate at
            ``optimizer.iterations`` (a schedule is evaluated there), capped at ``lr * mu = 1`` (``w = w_g``),
            and compounded over the ``steps_per_execution`` steps of one call. For plain SGD that is the
            FedProx gradient step up to a term in ``lr**2``; for momentum and adaptive optimizers (Adam) it is
            decoupled, as AdamW's weight decay is: the pull is not fed to the momentum or rescaled by the
            moments, unlike Lightning's ``proximal_mu``, which adds ``mu * (w - w_g)`` to the gradient. Cost:
            one more copy of the trainable weights, on the variables' device, while ``fit`` runs, and a few
            tensor operations per weight and batch (on JAX also a sync of the trainer's state per batch);
            none when 0.

    ``scaffold_correction``: ``"decoupled"`` only (the step below); Lightning's ``"gradient"`` is refused.

    ``calibrate_head``, ``head``, ``min_class_count``: as the Lightning callback's (docs/calibration.md). The
    final layer must be a ``Dense`` with a linear or softmax activation: ``head`` the layer itself (checked at
    construction) or its name, and by default the last layer with trainable weights (both checked in
    ``on_train_begin``, the first hook that sees the model, before any training step); else ``ValueError``,
    naming the layer found and what to pass. ``calibration_data=(x, y)``, this leaf's training inputs and
    integer labels, is then required (at construction), since a Keras callback does not see the data ``fit``
    trains on.

    SCAFFOLD (Karimireddy et al. 2020) runs by itself in a branch whose strategy is ``scaffold`` (the callback
    reads the branch config when ``fit`` begins): before each training batch (and once more before the round)
    the callback takes the control-variate step of the optimizer steps since the last one,
    ``w <- w - k * lr * (c - c_i)`` (``k`` steps by ``optimizer.iterations``, ``lr`` as for FedProx), which for
    plain SGD is SCAFFOLD's corrected gradient step and for momentum and Adam a decoupled one, as FedProx's;
    each upload carries the leaf's control update, each aggregate the server's ``c``. A batch-begin hook, as
    Keras calls it synchronously whatever the other callbacks (batch-end hooks may run asynchronously). The
    leaf's control variate ``c_i`` stays in the callback across ``fit`` calls; across processes, save
    :meth:`state_dict` with the model and give it back with :meth:`load_state_dict` before ``fit``.

    Raises:
        ValueError: an argument is out of range, or ``head`` is a layer calibration cannot refit (at
            construction); the model has no trainable weights, or calibration's final layer is not a linear
            ``Dense`` (at ``fit`` start).
        ImportError: ``snapshot_dir`` is given and safetensors is not installed (at construction).
        RuntimeError: the model is trained with ``MultiWorkerMirroredStrategy`` (at ``fit`` start).
        BranchKeyError: the platform failed; ``RequestRejectedError`` names the local variable when this
            leaf's model differs from the branch's;
            :class:`~branchkey_integrations.core.federation.AggregateMismatchError` when an aggregate does
            not fit the model (the model is then left untouched);
            ``AggregationTimeoutError`` on timeout with ``on_timeout="raise"``.

    Example (skipped: it needs a branchkey-local and credentials; tests/keras runs it for real):
        >>> import numpy as np, keras
        >>> from branchkey_integrations.keras import BranchKeyKerasCallback
        >>> x, y = np.random.rand(64, 4), np.random.rand(64, 1)
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> model.compile("sgd", "mse")
        >>> callback = BranchKeyKerasCallback("leaf_1.json", "http://127.0.0.1:8080",
        ...                                   num_samples=len(x))  # doctest: +SKIP
        >>> history = model.fit(x, y, epochs=3, callbacks=[callback], verbose=0)  # doctest: +SKIP
        >>> history.history["branchkey_round"]  # doctest: +SKIP
        [1.0, 2.0, 3.0]
    """

    _num_samples_required = True  # Keras cannot count samples honestly: see num_samples above
    _install_extra = "keras"
    _check_head = staticmethod(check_head)  # a layer passed as head= is checked at construction

    def __init__(
        self,
        credentials: CredentialsLike | None,
        host: str = CallbackSettings.host,
        *,
        num_samples: NumSamples,
        every_n_epochs: int = CallbackSettings.every_n_epochs,
        timeout: float | None = CallbackSettings.timeout,
        on_timeout: str = CallbackSettings.on_timeout,
        buffers: str = CallbackSettings.buffers,
        reset_optimizer: bool = CallbackSettings.reset_optimizer,
        send_metrics: bool = CallbackSettings.send_metrics,
        proximal_mu: float = CallbackSettings.proximal_mu,
        validation_data: Any = None,
        snapshot_dir: str | Path | None = CallbackSettings.snapshot_dir,
        transport: str = CallbackSettings.transport,
        log_every_s: float = CallbackSettings.log_every_s,
        client_options: dict[str, Any] | None = CallbackSettings.client_options,
        check_every_s: float = CallbackSettings.check_every_s,
        connect_timeout: float = CallbackSettings.connect_timeout,
        scaffold_correction: str = CallbackSettings.scaffold_correction,
        calibrate_head: bool | str = CallbackSettings.calibrate_head,
        head: str | keras.layers.Layer | None = CallbackSettings.head,
        min_class_count: int = CallbackSettings.min_class_count,
        calibration_data: Any = None,
        compression: str | None = CallbackSettings.compression,
        quantize: str | None = CallbackSettings.quantize,
    ) -> None:
        # every argument spelled out, for IDEs and inspect.signature; the shared ones are the mixin's to check
        if scaffold_correction == "gradient":
            raise ValueError("Expected scaffold_correction='decoupled' on Keras, which has no gradient hook on "
                             "every backend (the Lightning callback has 'gradient'). "
                             "Received: scaffold_correction='gradient'")
        super().__init__(credentials, host, num_samples=num_samples, every_n_epochs=every_n_epochs, timeout=timeout,
                         on_timeout=on_timeout, buffers=buffers, reset_optimizer=reset_optimizer,
                         send_metrics=send_metrics, proximal_mu=proximal_mu, snapshot_dir=snapshot_dir,
                         transport=transport, log_every_s=log_every_s, client_options=client_options,
                         check_every_s=check_every_s, connect_timeout=connect_timeout,
                         scaffold_correction=scaffold_correction, calibrate_head=calibrate_head, head=head,
                         min_class_count=min_class_count, compression=compression, quantize=quantize)
        if self.settings.calibration.enabled and not (isinstance(calibration_data, (tuple, list))
                                                      and len(calibration_data) == 2):
            raise ValueError("calibrate_head needs calibration_data=(x, y): this leaf's training inputs and integer "
                             "labels (Keras does not show a callback the data fit trains on). Received: "
                             f"calibration_data={type(calibration_data).__name__}")
        self.calibration_data = calibration_data
        if validation_data is not None and isinstance(validation_data, (str, bytes, int, float)):
            raise ValueError("Expected validation_data to be what model.evaluate takes: an (x, y) tuple or a "
                             f"dataset. Received: validation_data={validation_data!r}")
        self.validation_data = validation_data
        self._first_epoch: int | None = None  # the first epoch of the current fit, once it started
        self._test_scores: dict[str, float] = {}  # branchkey_test_* of the latest aggregate, repeated until the next
        self._bar_open = False  # Keras's progress bar line has no line break yet: the next print needs one
        self._global: list[Any] | None = None  # FedProx's w_g, one tensor per trainable weight, while fit runs
        self._trainable: list[keras.Variable] = []  # the weights w_g mirrors, in the same order
        self._last_step = -1  # the batch index of the last proximal step in this epoch
        self._scaffold: ScaffoldLeaf | None = None  # SCAFFOLD's state, in a SCAFFOLD branch (kept across fits)
        self._scaffold_on = False  # this fit's branch runs SCAFFOLD
        self._run_stopped = False  # the platform stopped the run during this fit
        self._corrected_at = 0  # optimizer.iterations at the last SCAFFOLD step
        self._corrections: list[Any] = []  # c - c_i per federated variable (None: not trained), while fit runs
        if self.proximal_mu:  # only then: a batch hook of its own costs Keras its asynchronous callback dispatch
            self.on_train_batch_end = self._proximal_step

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._first_epoch = None  # per fit: the first epoch this fit runs tells how many rounds came before
        self._run_stopped = False
        self._check_strategy()
        if not federated_variables(self.model, self.buffers):
            raise ValueError(f"{type(self.model).__name__} {self.model.name!r} has no trainable weights to federate.")
        resolve_weighting(self.num_samples)  # a broken callable fails now, not after the first epoch
        if self.settings.calibration.enabled:
            dense_head(self.model, self.head)  # a model calibration cannot refit fails now, before any training
        self.federation.connect()
        self._scaffold_on = self._branch_runs_scaffold()
        if self._scaffold_on:  # a batch-begin hook: Keras never dispatches those asynchronously
            self._scaffold = self._scaffold or ScaffoldLeaf()
            self.on_train_batch_begin = self._control_step

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._last_step = -1
        if self._first_epoch is None:
            self._first_epoch = epoch
            self._resume_round_count(epoch)
            # FedProx's first w_g: the common starting point, after every on_train_begin (BackupAndRestore's
            # restore included, wherever it stands in the list); SCAFFOLD's x likewise
            self._keep_global_model()
            if self._scaffold_on:
                self._start_scaffold()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs if logs is not None else {}
        if not is_round_epoch(epoch, self.every_n_epochs):
            logs.update(branchkey_round=float(self.round), branchkey_wait_s=0.0, branchkey_upload_mb=0.0,
                        **self._test_scores)
            return
        self._bar_open = self._verbose() in _BAR_VERBOSITIES
        try:
            if self._scaffold_on:
                self._control_step(None)  # the epoch's last batches, before their model is uploaded
            self._federate(logs)
        except BaseException:
            self.federation.close()  # Keras has no on_exception hook: never leave the notification thread behind
            self._global, self._trainable = None, []  # nor FedProx's copy of the weights
            raise
        finally:
            self._bar_open = False

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        try:
            if self.settings.calibration.at_end and self.round > 0 and not self._run_stopped:
                self._calibrate(self.round)
        finally:
            self.federation.close()
        self._global, self._trainable = None, []  # FedProx's copy lives as long as the fit
        self._corrections = []  # SCAFFOLD's too (c_i stays, in the callback)
        self.__dict__.pop("on_train_batch_begin", None)  # the next fit asks the branch config again

    def state_dict(self) -> dict[str, Any]:
        """What resumes this leaf in another process: the round state and SCAFFOLD's ``c_i`` and ``c`` (NumPy
        float64 arrays, None before the first round; absent outside SCAFFOLD branches)."""
        state: dict[str, Any] = self.federation.state_dict()
        if self._scaffold is not None:
            state["scaffold"] = self._scaffold.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before ``fit``)."""
        self.federation.load_state_dict(state)
        if state.get("scaffold") is not None:
            self._scaffold = ScaffoldLeaf()
            self._scaffold.load_state_dict(state["scaffold"])

    def _start_scaffold(self, fresh: bool = True) -> None:
        """SCAFFOLD's round starts from the model as it stands (``fresh``: at fit start; else the aggregate that
        :meth:`ScaffoldLeaf.commit` started it from) and its corrections are made for the variables' devices."""
        assert self._scaffold is not None
        variables = federated_variables(self.model, self.buffers)
        if fresh:
            self._scaffold.start([to_numpy(v) for v in variables], [v.trainable for v in variables])
        self._corrected_at = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        corrections = self._scaffold.correction() or [None] * len(variables)
        self._corrections = [None if c is None else keras.ops.convert_to_tensor(c, v.dtype)
                             for c, v in zip(corrections, variables)]

    def _control_step(self, batch: int | None, logs: dict[str, Any] | None = None) -> None:
        """SCAFFOLD after the optimizer steps since the last call: ``w <- w - k * lr * (c - c_i)``; the rates go
        into the control update."""
        if self._scaffold is None or not self._corrections:
            return
        if hasattr(self.model, "jax_state_sync"):  # JAX: the trainer holds the weights; the next batch re-reads them
            self.model.jax_state_sync()
        optimizer = self.model.optimizer
        now = int(keras.ops.convert_to_numpy(optimizer.iterations))
        steps, self._corrected_at = now - self._corrected_at, now
        if steps < 1:
            return
        rate = steps * float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        variables = federated_variables(self.model, self.buffers)
        for variable, correction in zip(variables, self._corrections):
            if correction is not None:
                variable.assign_sub(keras.ops.cast(rate, variable.dtype) * correction)
        self._scaffold.step([rate if trained else 0.0 for trained in self._scaffold.trained])

    def _proximal_step(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """FedProx after the optimizer steps up to ``batch``: ``k`` proximal steps of size ``s = min(lr * mu, 1)``
        toward w_g, compounded into one: ``w <- w - (1 - (1 - s)**k) * (w - w_g)``."""
        steps, self._last_step = batch - self._last_step, batch
        if self._global is None or steps < 1:
            return
        if hasattr(self.model, "jax_state_sync"):  # JAX: the trainer holds the weights; the next batch re-reads them
            self.model.jax_state_sync()
        ops = keras.ops
        rate = ops.minimum(ops.cast(self.model.optimizer.learning_rate, "float32") * self.proximal_mu, 1.0)
        pull = 1.0 - (1.0 - rate) ** steps
        for variable, anchor in zip(self._trainable, self._global):
            current = ops.stop_gradient(ops.convert_to_tensor(variable))
            variable.assign_sub(ops.cast(pull, variable.dtype) * (current - anchor))

    def _keep_global_model(self) -> None:
        """FedProx: copy the trainable weights into w_g; nothing when off."""
        if self.proximal_mu:
            self._trainable = list(self.model.trainable_weights)
            self._global = [keras.ops.copy(keras.ops.stop_gradient(keras.ops.convert_to_tensor(v)))
                            for v in self._trainable]

    # ---------------------------------------------------------------- Keras's output
    def _verbose(self) -> Any:
        return (self.params or {}).get("verbose", 1)  # fit's verbose: 0, 1, 2 or "auto"; no params outside fit

    def _say(self, text: str) -> None:
        """As Keras's own callbacks print (its ``print_msg``, not public API: stdout, or logging when
        ``keras.config.disable_interactive_logging()`` is in force); nothing under ``verbose=0``."""
        if self._verbose() == 0:
            return
        if self._bar_open:  # on_epoch_end runs before the progress bar ends its line
            text, self._bar_open = "\n" + text, False
        if not keras.config.is_interactive_logging_enabled():
            logger.info("%s", text)
            return
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        sys.stdout.write(text.encode(encoding, errors="replace").decode(encoding) + "\n")  # a cp1252 console
        sys.stdout.flush()

    # ---------------------------------------------------------------- helpers
    def _check_strategy(self) -> None:
        if keras.backend.backend() != "tensorflow":
            return
        strategy = getattr(self.model, "distribute_strategy", None)
        in_multi_worker = getattr(getattr(strategy, "extended", None), "_in_multi_worker_mode", lambda: False)
        if in_multi_worker():
            raise RuntimeError(
                f"BranchKeyKerasCallback does not support {type(strategy).__name__}: every worker would upload. "
                "Use MirroredStrategy (one process, several devices) or a single device.")

    def _resume_round_count(self, epoch: int) -> None:
        done = rounds_before(epoch, self.every_n_epochs)
        if self.round < done:
            logger.info("fit starts at epoch %d: counting %d earlier rounds as done", epoch, done)
            self.federation.record_round(done)

    def _federate(self, logs: dict[str, Any]) -> None:
        variables = federated_variables(self.model, self.buffers)
        arrays = [to_numpy(v) for v in variables]
        pending = self._scaffold.prepare(arrays) if self._scaffold_on and self._scaffold is not None else None
        started = time.monotonic()
        outcome = self._exchange(arrays, [v.path for v in variables], controls=pending.delta if pending else ())
        if self.interrupted_by is not None and outcome.kind == "error":  # failed under a signal: end the run
            raise self._end_run(self.interrupted_by)
        if outcome.kind == "error":
            raise outcome.error
        logs.update(self._test_scores)  # the latest aggregate's, unless this round loads a new one
        if outcome.kind == "stopped":
            self.model.stop_training = True
            self._run_stopped = True  # no calibration either: its analytics round would wait on a stopped run
            logs.update(branchkey_round=float(self.round), branchkey_wait_s=time.monotonic() - started,
                        branchkey_upload_mb=0.0)
        else:
            result = outcome.result
            if outcome.kind == "done":
                if self.send_metrics and not result.caught_up:  # the epoch's training produced this round's upload
                    self._send(_scalars(logs), "train", result.aggregation_id)
                self._load(variables, result, logs)
                if self.settings.calibration.after_round(result.round) and not result.caught_up:
                    self._calibrate(result.round)
                if pending is not None:  # c_i moves on (not after a catch-up), c arrives, x is the aggregate
                    assert self._scaffold is not None
                    self._scaffold.commit(None if result.caught_up else pending, result.controls, result.layers)
                    self._start_scaffold(fresh=False)
            logs.update(branchkey_round=float(result.round), branchkey_wait_s=result.wait_s,
                        branchkey_upload_mb=result.upload_mb)
        if self.interrupted_by is not None:  # a signal came: its outcome applied, now end
            raise self._end_run(self.interrupted_by)

    def _calibrate(self, number: int) -> None:
        """Calibration after round ``number`` (once): send this leaf's class statistics, load the refit layer."""
        if number == self._calibrated_round:
            return
        head = dense_head(self.model, self.head)
        x, y = self.calibration_data
        weight, bias = head_arrays(head)
        refit = calibrate(self.federation, dense_inputs(self.model, head, x), np.asarray(y), weight, bias,
                          self.settings.calibration, self._say)
        load_head(head, refit.weight, refit.bias)
        self._keep_global_model()  # FedProx pulls toward the calibrated model from now on
        self._calibrated_round = number

    def _load(self, variables: list[keras.Variable], result: RoundResult, logs: dict[str, Any]) -> None:
        """Assign the aggregate (already saved as a snapshot when asked) and evaluate it on validation_data."""
        load_arrays(variables, result.layers)
        self._keep_global_model()  # the aggregate (or the catch-up) is the new w_g
        if self.reset_optimizer:
            self._reset_optimizer()
        if self.validation_data is not None:
            scores = self._evaluate()
            self._test_scores = {f"branchkey_test_{k}": v for k, v in scores.items()}
            logs.update(self._test_scores)
            if self.send_metrics:
                self._send(scores, "test", result.aggregation_id)

    def _evaluate(self) -> dict[str, float]:
        data = self.validation_data
        args = data if isinstance(data, tuple) else (data,)
        return _scalars(self.model.evaluate(*args, verbose=0, return_dict=True))

    def _reset_optimizer(self) -> None:
        optimizer = self.model.optimizer
        if optimizer is None:
            return
        iterations = id(optimizer.iterations)
        for variable in optimizer.variables:
            if id(variable) != iterations:
                variable.assign(keras.ops.zeros(variable.shape, variable.dtype))

    def _send(self, metrics: dict[str, float], mode: str, aggregation_id: str | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if not k.startswith("branchkey_")}
        if metrics:
            self.federation.send_metrics(metrics, mode, aggregation_id)


def _scalars(logs: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of Keras logs as plain floats (what the metrics endpoint can carry)."""
    scalars = {}
    for key, value in logs.items():
        try:
            scalars[key] = float(value)
        except (TypeError, ValueError):
            logger.debug("Metric %r is not a scalar: not sent", key)
    return scalars


__all__ = ["BranchKeyKerasCallback", "federated_variables", "BUFFER_POLICIES", "LOG_KEYS"]
