"""Federated learning with BranchKey as one PyTorch Lightning callback.

The callback only translates: model tensors to NumPy arrays and back, Lightning's hooks, ranks and
checkpoints to :class:`~branchkey_integrations.core.federation.Federation`, where the round logic lives,
what a waiting leaf has to say to Lightning's own output (its progress bar, else its rank-zero logger),
and a signal that ends a round's wait to Lightning's own way of ending a run (``SIGTERMException``,
``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
from typing import Any, cast

import numpy as np

from .core.callback_kit import BUFFER_POLICIES, FederatedCallbackMixin, is_round_epoch, require_framework
from .core.callback_kit import resolve_weighting
from .core.outcome import Outcome
from .core.callback_kit import PendingControls, ScaffoldLeaf

require_framework("lightning", "PyTorch and Lightning", ("torch", "lightning.pytorch"))

import torch  # noqa: E402 - after the check that gives an install hint
from .torch_tensors import add_control_correction, add_proximal_gradient, apply_control_step  # noqa: E402
from .torch_tensors import (check_head, federated_tensors, head_inputs, linear_head, load_arrays,  # noqa: E402
                            to_numpy)
from .core.callback_kit import calibrate  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

#: strategies that shard parameters: rank 0 does not hold the whole model, so it cannot upload it
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def amp_scale_left_in(trainer: Trainer, optimizer: Any) -> float:
    """The loss scale the gradients still carry at ``on_before_optimizer_step``: 1, except under fp16 AMP with an
    optimizer that unscales inside its own step (fused Adam), which Lightning does not unscale before the hook;
    the proximal term must then be scaled alike, since that step divides every gradient by the scale."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled() or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0
    return float(scaler.get_scale())


class BranchKeyCallback(FederatedCallbackMixin, Callback):
    """Federate a LightningModule through BranchKey: every ``every_n_epochs`` epochs, upload the trainable
    parameters, wait for the branch's aggregate and load it in place.

    The round runs at the end of the epoch's last training batch (or in ``on_train_epoch_end`` when the
    data has no length), before validation: validation metrics, ``EarlyStopping`` and ``ModelCheckpoint``
    therefore judge the aggregated model, and training goes on from it.

    Only global rank 0 talks to the platform; the outcome (the aggregate or the error) is broadcast, so
    every DDP rank loads identical weights or raises the same error.

    While a round waits, the callback says what for (round, seconds waited, uploads of how many, the missing
    leaves and refused uploads by name) at the start, on every change and at least every ``log_every_s``,
    through the progress bar's ``print`` (the bar stays intact) or, without a bar, Lightning's rank-zero
    logger, which Lightning itself shows on the console; so does the end of each round. No logging set-up
    is needed.

    SIGTERM (``docker stop``, Kubernetes, SLURM) and Ctrl-C end a waiting round at once. SIGTERM then goes
    on to Lightning's own handler and the callback raises Lightning's ``SIGTERMException``: the trainer
    stops as it does for a SIGTERM between batches (``on_exception`` callbacks such as
    ``OnExceptionCheckpoint`` run, loggers finalize) and the process exits as Lightning's runs do
    after a SIGTERM: with status 0, since ``SIGTERMException`` is a ``SystemExit`` without a code (catch it
    around ``fit`` to exit otherwise). Ctrl-C raises ``KeyboardInterrupt`` as usual (Lightning's graceful
    shutdown, exit status 1). A round whose uploads are all in says nothing until it is late.

    Args:
        credentials: :class:`~branchkey_integrations.Credentials`, a dict, a JSON file path, or None for
            the ``BRANCHKEY_*`` environment variables.
        host: the API host, ``https://app.branchkey.com`` or a ``branchkey-local`` URL.
        every_n_epochs: federate after every n-th training epoch.
        num_samples: this leaf's weighting in the average: an int, a zero-argument callable, or None
            for ``len(trainer.train_dataloader.dataset)``.
        timeout: seconds one round may wait (pause included); None waits forever.
        on_timeout: ``"raise"`` or ``"continue"`` (keep the local weights and train on).
        buffers: ``"local"`` (buffers such as BatchNorm statistics stay local, as in FedBN) or
            ``"average"`` (floating-point buffers are averaged too).
        reset_optimizer: clear the optimizers' state (momentum, Adam moments) after loading an aggregate.
        send_metrics: after a round, send the validation metrics (measured on the aggregated model) as
            ``"test"`` and the epoch's other metrics as ``"train"``, both for that round's aggregate.
        snapshot_dir: write each received aggregate to ``round_<n>.safetensors`` here (named tensors).
        transport: notification transport: ``"auto"``, ``"websocket"`` or ``"amqp"``.
        log_every_s: while waiting, report progress at least this often.
        client_options: further keyword arguments for :class:`~branchkey_integrations.Client`
            (``request_timeout``: seconds for each HTTP request, ...).
        compression, quantize: how uploads travel where the branch advertises codecs (``quantize="int8"``:
            a quarter of the bytes, lossy, error feedback on; docs/guides/slow-links.md); None: the client's default.
        check_every_s: while waiting, ask the platform for the round's progress this often.
        connect_timeout: seconds to wait for the notification channel when training begins.
        proximal_mu: FedProx's ``mu`` (Li et al. 2020), a number >= 0; 0 (the default) turns it off. Local
            training then minimises ``loss(w) + mu/2 * ||w - w_g||^2``, where ``w_g`` is the last global
            model: the trainable parameters as they stand when ``fit`` starts (after a checkpoint is restored),
            then each aggregate as soon as it is loaded (a catch-up included). In ``on_before_optimizer_step``
            the callback adds ``mu * (w - w_g)`` to the gradient of every trainable parameter the stepping
            optimizer holds (parameters without a gradient are left alone), so the loss is not edited and any
            optimizer sees the true FedProx gradient (an adaptive one, such as Adam, rescales it like the rest
            of the gradient). Cost: one more copy of the trainable parameters, on the model's device, for the
            length of ``fit``; none when 0.
        scaffold_correction: how SCAFFOLD's ``c - c_i`` corrects local training in a branch whose strategy is
            ``scaffold`` (the callback reads the branch config at setup; elsewhere nothing changes):
            ``"decoupled"`` (default), a step ``w -= lr * (c - c_i)`` after each optimizer step (taken as the next
            batch starts, and before the round), outside the optimizer's momentum and moments, as Keras does; or
            ``"gradient"``, added to the gradient in ``on_before_optimizer_step`` where FedProx adds its term
            (the paper's ``g - c_i + c``: right for plain SGD, and with Adam it swamps the gradient). Each upload
            then carries the control update, ``c_i`` and ``c`` are part of the checkpoint.
        calibrate_head: refit the final linear layer from the leaves' class statistics (docs/calibration.md):
            False (default), True or ``"end"`` (once, when training ends), ``"every:K"`` (after every K-th round,
            and when training ends). Each time, this leaf sends the per-class count and sum of the features
            entering that layer and one sum of their outer products (over the training dataloader, in eval
            mode) in an analytics round, and every leaf refits the layer identically from the combined
            statistics. Every leaf of the branch must calibrate at the same rounds. The batches must be
            ``(inputs, ..., labels)``, ``inputs`` the module's forward argument. Under DDP, rank 0's data.
        head: the ``nn.Linear`` to refit: the module itself (checked at construction: anything but an
            ``nn.Linear`` is a ``ValueError`` there, naming what to pass) or its name
            (``dict(model.named_modules())``'s key); None: the last module with trainable parameters. A name and
            the default are checked in ``setup``, the first hook that sees the model, before any training step:
            a module that is not an ``nn.Linear`` is a ``ValueError`` there, naming the layer found and the
            Linear modules to choose from.
        min_class_count: a class with fewer samples on this leaf is not sent (its statistics stay here).

    Raises:
        ValueError: an argument is out of range, or ``head`` is a module but not an ``nn.Linear`` (at
            construction); the training data has no length and ``num_samples`` is None, the model has no
            trainable parameters, or calibration's final layer is not an ``nn.Linear`` (at fit start).
        ImportError: ``snapshot_dir`` is given and safetensors is not installed (at construction).
        RuntimeError: the strategy shards parameters (FSDP, DeepSpeed), at setup.
        BranchKeyError: the platform failed; :class:`~branchkey_integrations.core.federation.AggregateMismatchError`
            when an aggregate does not fit the model (the model is then left untouched).

    Example (skipped: it needs a branchkey-local, credentials and a model; tests/lightning runs it for real):
        >>> from lightning.pytorch import Trainer
        >>> from branchkey_integrations.lightning import BranchKeyCallback
        >>> callback = BranchKeyCallback("leaf_1.json", host="http://127.0.0.1:8080")  # doctest: +SKIP
        >>> trainer = Trainer(max_epochs=20, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> trainer.callback_metrics["branchkey/round"]  # doctest: +SKIP
        tensor(20.)
    """

    _install_extra = "lightning"
    _check_head = staticmethod(check_head)  # a module passed as head= is checked at construction
    # round state of this instance; FederatedCallbackMixin.__init__ takes the options
    _last_epoch = -1  # the epoch whose round finished last: a resumed run never repeats it
    _round_id: str | None = None  # the aggregate loaded in this epoch, which its metrics describe
    _validation_names: frozenset[str] = frozenset()  # the metrics validation produced (replaced, never mutated)
    _trained_for_round = False  # this epoch's training went into the round (not so when the leaf caught up)
    _run_stopped = False  # the platform stopped the run during this fit
    _trainer: Trainer | None = None  # the trainer of the running fit: where the callback prints
    _global: list[torch.Tensor] | None = None  # FedProx's w_g, one copy per trainable parameter; None when off
    _trainable: list[torch.Tensor] = []  # the parameters w_g mirrors, in the same order
    _scaffold: ScaffoldLeaf | None = None  # SCAFFOLD's state, in a SCAFFOLD branch (kept across fits, checkpointed)
    _scaffold_on = False  # this fit's branch runs SCAFFOLD (rank 0 asked the branch config; every rank knows)
    _corrections: list[torch.Tensor | None] = []  # c - c_i per federated tensor, on its device and in its dtype
    _federated: list[torch.Tensor] = []  # the federated tensors the corrections align with
    _unapplied: np.ndarray | None = None  # decoupled SCAFFOLD: per tensor, the rates of the steps not yet corrected

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(leaf=self.federation.credentials.id, every_n_epochs=self.every_n_epochs,
                                        buffers=self.buffers)

    def state_dict(self) -> dict[str, Any]:
        state = {**self.federation.state_dict(), "last_epoch": self._last_epoch}
        if state.get("error_feedback"):  # the quantization residual (quantize=), as tensors for the same reason
            state["error_feedback"] = [torch.from_numpy(a) for a in state["error_feedback"]]
        if self._scaffold is not None:  # as tensors: a checkpoint loads with torch.load(weights_only=True)
            state["scaffold"] = {name: None if held is None else [torch.from_numpy(a) for a in held]
                                 for name, held in self._scaffold.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        residual = [t.numpy() if isinstance(t, torch.Tensor) else t for t in state_dict.get("error_feedback") or []]
        self.federation.load_state_dict({**state_dict, "error_feedback": residual})
        self._last_epoch = int(state_dict.get("last_epoch", -1))
        if state_dict.get("scaffold") is not None:  # the leaf's control variate c_i (and the server's c)
            self._scaffold = ScaffoldLeaf()
            self._scaffold.load_state_dict({name: None if held is None else [t.numpy() for t in held]
                                            for name, held in state_dict["scaffold"].items()})

    def __getstate__(self) -> dict[str, Any]:
        # Federation drops its client itself; a pending error holds a traceback, which does not pickle
        # FedProx's copy belongs to one fit, on one device
        dropped = ("_local_error", "_trainer", "_global", "_trainable", "_corrections", "_federated", "_unapplied")
        return {k: v for k, v in self.__dict__.items() if k not in dropped}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        self._trainer = trainer
        if self.settings.calibration.enabled:
            linear_head(pl_module, self.head)  # a model calibration cannot refit fails now, before any training
        self._run_stopped = False
        self._last_epoch = -1  # a new fit starts counting epochs at 0 (a checkpoint, restored after this, overrides)
        if trainer.is_global_zero:
            self.federation.connect()
            self._scaffold_on = self._branch_runs_scaffold()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not federated_tensors(pl_module, self.buffers):
            raise ValueError(f"{type(pl_module).__name__} has no trainable parameters to federate.")
        self._weighting(trainer)  # fail now, not after the first epoch
        self._keep_global_model(pl_module)  # the common starting point is FedProx's first w_g
        self._scaffold_on = bool(trainer.strategy.broadcast(self._scaffold_on, src=0))
        if self._scaffold_on:  # the round starts from the model as it stands (after a checkpoint is restored)
            self._scaffold = self._scaffold or ScaffoldLeaf()
            tensors = federated_tensors(pl_module, self.buffers)
            self._federated = [t for _, t in tensors]
            self._scaffold.start([to_numpy(t) for t in self._federated],
                                 [isinstance(t, torch.nn.Parameter) and t.requires_grad for t in self._federated])
            self._keep_corrections()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # FedProx: Lightning calls this once per optimizer step (after gradient accumulation, in manual
        # optimization too), after the closure's backward (under DDP: after the gradients are all-reduced), after
        # AMP's unscaling (not for optimizers that unscale in their step: amp_scale_left_in) and before gradient
        # clipping (precision.py _after_closure, amp.py optimizer_step). Every DDP rank holds the same w and w_g,
        # so every rank adds the same term.
        if self._global is not None:
            scale = amp_scale_left_in(trainer, optimizer)
            add_proximal_gradient(self._trainable, self._global, optimizer, self.proximal_mu * scale)
        if self._scaffold_on and self._scaffold is not None:  # SCAFFOLD, where FedProx adds its term
            if self.scaffold_correction == "gradient":  # g - c_i + c goes into the optimizer
                rates = add_control_correction(self._federated, self._corrections, optimizer,
                                               amp_scale_left_in(trainer, optimizer))
            else:  # decoupled: the rates only; the step w -= lr (c - c_i) follows the optimizer's (_control_step)
                rates = add_control_correction(self._federated, None, optimizer)
                self._unapplied = rates if self._unapplied is None else self._unapplied + rates
            self._scaffold.step(rates)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._control_step()  # the decoupled SCAFFOLD step of the optimizer steps since the last batch

    def _control_step(self) -> None:
        """Decoupled SCAFFOLD: ``w -= (sum of the rates of the steps since the last call) * (c - c_i)``."""
        if self._unapplied is not None:
            apply_control_step(self._federated, self._corrections, self._unapplied)
            self._unapplied = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The epoch's last optimizer step is done and validation has not run yet: federating here means
        # validation, EarlyStopping and ModelCheckpoint all see (and measure) the aggregated model.
        if batch_idx + 1 == trainer.num_training_batches:
            self._federate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._federate(trainer, pl_module)  # data of unknown length: the last batch was not recognisable
        if self.send_metrics and self._round_id is not None and self._trained_for_round and trainer.is_global_zero:
            self._send(self._metrics(trainer, exclude=self._validation_names), "train")
        self._round_id = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before_validation = self._metrics(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        before, after = getattr(self, "_before_validation", {}), self._metrics(trainer)
        produced = {k for k, v in after.items() if before.get(k) != v}
        self._validation_names = self._validation_names | produced  # a repeated value is still a validation metric
        if self.send_metrics and self._round_id is not None and trainer.is_global_zero:
            self._send({k: v for k, v in after.items() if k in self._validation_names}, "test")

    def _federate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One round, at most once per federating epoch."""
        epoch = trainer.current_epoch
        if not is_round_epoch(epoch, self.every_n_epochs) or epoch <= self._last_epoch:
            return
        tensors = federated_tensors(pl_module, self.buffers)
        self._control_step()  # the epoch's last steps, before the model is uploaded
        scaffold = self._scaffold if self._scaffold_on else None
        pending = scaffold.prepare([to_numpy(t) for _, t in tensors]) if scaffold is not None else None
        # rank 0's outcome, and the signal that ended its wait (if one did): every rank acts on both alike
        sent = ((self._round_on_rank_zero(trainer, tensors, pending), self.interrupted_by) if trainer.is_global_zero
                else None)
        outcome, signum = cast("tuple[Outcome, int | None]", trainer.strategy.broadcast(sent, src=0))
        if signum is not None and outcome.kind == "error":  # failed under a signal: end the run, not raise
            self.__dict__.pop("_local_error", None)
            raise self._end_run(signum)
        self._apply(outcome, trainer, pl_module, tensors, pending)
        if signum is not None:  # a signal came: the outcome is applied, then the run ends
            raise self._end_run(signum)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.settings.calibration.at_end and self.round > 0 and not self._run_stopped:
            self._calibrate(trainer, pl_module, self.round)

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule, number: int) -> None:
        """Calibration after round ``number`` (once): rank 0 sends the statistics and refits; every rank loads
        the refit layer."""
        if number == self._calibrated_round:
            return
        _, head = linear_head(pl_module, self.head)
        refit = None
        if trainer.is_global_zero:
            training = pl_module.training
            pl_module.eval()
            try:
                features, labels = head_inputs(pl_module, head, trainer.train_dataloader)
            finally:
                pl_module.train(training)
            done = calibrate(self.federation, features, labels, to_numpy(head.weight), to_numpy(head.bias),
                             self.settings.calibration, self._say)
            refit = (done.weight, done.bias)
        weight, bias = trainer.strategy.broadcast(refit, src=0)
        load_arrays([("weight", head.weight), ("bias", head.bias)], [weight, bias])
        self._keep_global_model(pl_module)  # FedProx pulls toward the calibrated model from now on
        self._calibrated_round = number

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.federation.close()
            self._trainer = None
            self._global, self._trainable = None, []  # FedProx's copy lives as long as the fit
            self._corrections, self._federated, self._unapplied = [], [], None  # and SCAFFOLD's (c_i is checkpointed)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.federation.close()  # a failed fit may skip teardown; never leave the notification thread behind

    # ----------------------------------------------------- Lightning's output and ending a run
    def _say(self, text: str) -> None:
        """Through the progress bar when there is one (it keeps the bar intact), else Lightning's rank-zero
        logger, which Lightning shows on the console when the application configured no logging."""
        bar = self._trainer.progress_bar_callback if self._trainer is not None else None
        if bar is not None and getattr(bar, "is_enabled", False):
            bar.print(text)
        else:
            rank_zero_info(text)

    def _end_run(self, signum: int) -> BaseException:
        """SIGTERM: Lightning's own ``SIGTERMException``, what its loops raise after a SIGTERM; Ctrl-C:
        ``KeyboardInterrupt``, which Lightning shuts down gracefully."""
        return SIGTERMException() if signum == signal.SIGTERM else super()._end_run(signum)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_strategy(trainer: Trainer) -> None:
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        sharded = names.intersection(UNSUPPORTED_STRATEGIES)
        if sharded:
            raise RuntimeError(
                f"BranchKeyCallback does not support {sorted(sharded)[0]}: it shards parameters, so no rank holds "
                "the whole model to upload. Use strategy='ddp' (or a single device)."
            )

    def _keep_global_model(self, pl_module: LightningModule) -> None:
        """FedProx: copy the trainable parameters into w_g (in place when the copy exists); nothing when off."""
        if not self.proximal_mu:
            return
        trainable = [t for _, t in federated_tensors(pl_module)]
        with torch.no_grad():
            if self._global is not None and [g.shape for g in self._global] == [t.shape for t in trainable]:
                torch._foreach_copy_(self._global, trainable)
            else:
                self._global = [t.detach().clone() for t in trainable]
        self._trainable = trainable

    def _keep_corrections(self) -> None:
        """SCAFFOLD: ``c - c_i`` on each federated tensor's device, in its dtype (None: no correction)."""
        assert self._scaffold is not None
        corrections = self._scaffold.correction() or [None] * len(self._federated)
        self._corrections = [None if c is None else torch.from_numpy(c).to(t.device, t.dtype)
                             for c, t in zip(corrections, self._federated)]

    def _weighting(self, trainer: Trainer) -> float:
        return resolve_weighting(self.num_samples, lambda: self._dataset_length(trainer))

    @staticmethod
    def _dataset_length(trainer: Trainer) -> int:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "BranchKeyCallback weights each leaf by its number of training samples, but the training data "
                f"({type(dataset).__name__}) has no length. Pass num_samples=<int or callable>."
            )
        if len(dataset) == 0:
            raise ValueError("The training dataset is empty: nothing to federate.")
        return len(dataset)

    def _round_on_rank_zero(self, trainer: Trainer, tensors: list[tuple[str, torch.Tensor]],
                            pending: PendingControls | None = None) -> Outcome:
        """Rank 0: one round, as an outcome the other ranks can receive (every failure included)."""
        outcome = self._exchange(lambda: [to_numpy(t) for _, t in tensors], [name for name, _ in tensors],
                                 lambda: self._weighting(trainer), pending.delta if pending is not None else ())
        if outcome.kind == "error":
            self._local_error = outcome.error  # raised here with its traceback; other ranks get a portable copy
        return outcome.portable()

    def _apply(self, outcome: Outcome, trainer: Trainer, pl_module: LightningModule,
               tensors: list[tuple[str, torch.Tensor]], pending: PendingControls | None = None) -> None:
        if outcome.kind == "error":
            local = self.__dict__.pop("_local_error", None)
            raise local if local is not None else outcome.error
        if outcome.kind == "stopped":
            trainer.should_stop = True
            self._run_stopped = True  # no calibration either: its analytics round would wait on a stopped run
            return
        result = outcome.result
        if outcome.kind == "done":
            load_arrays(tensors, result.layers)
            self._keep_global_model(pl_module)  # the aggregate (or the catch-up) is the new w_g
            if self._scaffold_on and self._scaffold is not None:  # c_i moves on (not after a catch-up); c arrives
                self._scaffold.commit(None if result.caught_up else pending, result.controls, result.layers)
                self._keep_corrections()
            if self.reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()
            # rank 0 ran it (and counted a catch-up); the others adopt it
            self.federation.record_round(result.round, result.aggregation_id, result.run_number, result.round_index)
            self._round_id = result.aggregation_id
            self._trained_for_round = not result.caught_up  # a leaf that caught up uploaded nothing this epoch
            if self.settings.calibration.after_round(result.round) and not result.caught_up:
                self._calibrate(trainer, pl_module, result.round)
        self._last_epoch = trainer.current_epoch
        for name, value in (("round", result.round), ("wait_s", result.wait_s), ("upload_mb", result.upload_mb)):
            pl_module.log(f"branchkey/{name}", float(value), on_step=False, on_epoch=True, batch_size=1)

    @staticmethod
    def _metrics(trainer: Trainer, exclude: frozenset[str] = frozenset()) -> dict[str, float]:
        """The scalar metrics Lightning holds now, as floats, without our own ``branchkey/*``."""
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if not k.startswith("branchkey/") and k not in exclude and getattr(v, "numel", lambda: 1)() == 1}

    def _send(self, metrics: dict[str, float], mode: str) -> None:
        """Send metrics of the aggregate of this epoch's round (a refusal is logged, never fatal)."""
        if metrics:
            self.federation.send_metrics(metrics, mode, self._round_id)


__all__ = ["BranchKeyCallback", "federated_tensors", "add_proximal_gradient", "amp_scale_left_in", "BUFFER_POLICIES"]
