"""PyTorch tensors to BranchKey's arrays and back, for any adapter that trains a ``torch.nn.Module``.

Framework-neutral: it needs torch, nothing of Lightning, so the Lightning callback and any other torch
adapter (a Hugging Face ``Trainer`` callback) share one definition of which tensors a round exchanges
(:func:`federated_tensors`), how a tensor travels (:func:`to_numpy`: a host copy, bfloat16 and float16 as
float32), how an aggregate is loaded (:func:`load_arrays`: in place, each tensor keeping its device and
dtype), FedProx's gradient term (:func:`add_proximal_gradient`) and SCAFFOLD's (:func:`add_control_correction`).

Example:
    >>> import numpy as np, torch
    >>> layer = torch.nn.Linear(2, 1).to(torch.bfloat16)
    >>> tensors = federated_tensors(layer)
    >>> [(name, to_numpy(t).dtype) for name, t in tensors]
    [('weight', dtype('float32')), ('bias', dtype('float32'))]
    >>> load_arrays(tensors, [np.ones((1, 2), np.float32), np.zeros(1, np.float32)])
    >>> layer.weight.dtype, float(layer.weight.detach().sum())
    (torch.bfloat16, 2.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .core.callback_kit import travels_as_float32

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("branchkey_integrations.torch_tensors needs PyTorch: pip install torch "
                      "(the 'branchkey-integrations[lightning]' extra includes it)") from exc


def federated_tensors(module: torch.nn.Module, buffers: str = "local") -> list[tuple[str, torch.Tensor]]:
    """The tensors a round exchanges, in registration order: trainable parameters, then float buffers
    when ``buffers="average"`` (integer buffers such as ``num_batches_tracked`` are counters, never averaged)."""
    tensors = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if buffers == "average":
        tensors += [(name, b) for name, b in module.named_buffers() if b.is_floating_point()]
    return tensors


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU copy for upload; bfloat16 and float16 travel as float32."""
    tensor = tensor.detach()
    if travels_as_float32(tensor.dtype):
        tensor = tensor.float()
    return tensor.cpu().numpy().copy()


def load_arrays(tensors: list[tuple[str, torch.Tensor]], arrays: list[np.ndarray]) -> None:
    """Copy checked arrays into the same tensor objects, keeping each tensor's device and dtype
    (the optimizer holds references to these Parameters, so they must not be replaced)."""
    with torch.no_grad():
        for (_, tensor), array in zip(tensors, arrays):
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(tensor.device, tensor.dtype))


def add_proximal_gradient(params: list[torch.Tensor], anchors: list[torch.Tensor], optimizer: Any, mu: float) -> None:
    """FedProx's gradient term: ``grad += mu * (w - w_g)`` for each of ``params`` (with ``anchors`` its w_g)
    that ``optimizer`` steps and that has a gradient, in place, in one fused pass per tensor list. The difference
    is taken first (one temporary per step): ``grad + mu*w - mu*w_g`` would cancel away a bf16 gradient."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    pairs = [(p, g) for p, g in zip(params, anchors) if p.grad is not None and id(p) in stepped]
    if not pairs:
        return
    with torch.no_grad():
        weights, anchor = [p for p, _ in pairs], [g for _, g in pairs]
        torch._foreach_add_([p.grad for p in weights], torch._foreach_sub(weights, anchor), alpha=mu)


def add_control_correction(params: list[torch.Tensor], corrections: list[torch.Tensor | None] | None, optimizer: Any,
                           scale: float = 1.0) -> np.ndarray:
    """SCAFFOLD's gradient correction: ``grad += scale * (c - c_i)`` for each of ``params`` that ``optimizer`` steps
    and that has a gradient (``corrections`` aligned with ``params``; None: no correction, only the rates); returns
    each param's learning rate in this step (its group's ``lr``, 0 for one the optimizer does not step), for the
    control update."""
    rates = np.zeros(len(params))
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for index, param in enumerate(params):
            group = group_of.get(id(param))
            if group is None or param.grad is None:
                continue
            rates[index] = float(group.get("lr", 0.0))
            correction = corrections[index] if corrections is not None else None
            if correction is not None:
                param.grad.add_(correction, alpha=scale)
    return rates


def apply_control_step(params: list[torch.Tensor], corrections: list[torch.Tensor | None], rates: np.ndarray) -> None:
    """SCAFFOLD's decoupled step: ``w -= rate * (c - c_i)`` for each of ``params`` with a correction and a rate > 0
    (the sum of its learning rates over the optimizer steps since the last such step)."""
    with torch.no_grad():
        for param, correction, rate in zip(params, corrections, rates):
            if correction is not None and rate > 0:
                param.sub_(correction, alpha=float(rate))


#: what to pass when the final layer is not one calibration can refit (the model's Linear modules are added to it
#: when the model is known)
_PASS_HEAD = "Pass head=<the nn.Linear that makes the logits> (the module, or its name in model.named_modules())"


def check_head(head: Any) -> None:
    """At construction: a module passed as ``head=`` must be a ``torch.nn.Linear`` (a name is looked up, and the
    default found, when fit begins, the first moment the callback sees the model).

    >>> check_head(torch.nn.ReLU())
    Traceback (most recent call last):
    ...
    ValueError: calibrate_head: head=<ReLU> is a ReLU, not a torch.nn.Linear: ... or calibrate_head=False.

    Raises:
        ValueError: ``head`` is neither None, a name nor a ``Linear``; the message names it and what to pass.
    """
    if head is None or isinstance(head, str):
        return
    if not isinstance(head, torch.nn.Module):
        raise ValueError("Expected head to be the nn.Linear that makes the logits, its name in "
                         f"model.named_modules(), or None (the last trainable module). Received: head={head!r}")
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"calibrate_head: head=<{type(head).__name__}> is a {type(head).__name__}, not a "
                         f"torch.nn.Linear: calibration refits the final linear layer. {_PASS_HEAD}, or "
                         "calibrate_head=False.")


def linear_head(module: "torch.nn.Module",
                head: "str | torch.nn.Module | None" = None) -> tuple[str, "torch.nn.Linear"]:
    """The final linear layer calibration refits: ``head`` (a module of ``module``, or its name), or else the last
    module (in registration order) that holds trainable parameters of its own; it must be a ``torch.nn.Linear``.

    >>> linear_head(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)))[0]
    '2'

    Raises:
        ValueError: no such module, or it is not a ``Linear``: the message names it and what to pass.
    """
    modules = dict(module.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    hint = f"{_PASS_HEAD} (this model's Linear modules: {linears}), or calibrate_head=False."
    if head is None:
        trainable = [n for n, m in modules.items() if any(p.requires_grad for p in m.parameters(recurse=False))]
        if not trainable:
            raise ValueError(f"calibrate_head: {type(module).__name__} has no trainable layer to refit. {hint}")
        name = trainable[-1]
        if not isinstance(modules[name], torch.nn.Linear):
            raise ValueError(f"calibrate_head: the last trainable layer of {type(module).__name__} is {name!r}, a "
                             f"{type(modules[name]).__name__}, not a torch.nn.Linear: calibration refits the final "
                             f"linear layer. {hint}")
        return name, modules[name]
    if not isinstance(head, str):
        found = [n for n, m in modules.items() if m is head]
        if not found:
            raise ValueError(f"calibrate_head: head=<{type(head).__name__}> is not a module of "
                             f"{type(module).__name__} (the model trained). {hint}")
        check_head(head)
        return found[0], modules[found[0]]
    if head not in modules:
        raise ValueError(f"calibrate_head: head={head!r} names no module of {type(module).__name__}. {hint}")
    if not isinstance(modules[head], torch.nn.Linear):
        raise ValueError(f"calibrate_head: head={head!r} is a {type(modules[head]).__name__}, not a torch.nn.Linear. "
                         f"{hint}")
    return head, modules[head]


def head_inputs(module: "torch.nn.Module", head: "torch.nn.Linear", batches: Any) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of ``head`` ([N, in_features], float64) and the labels ([N]) over ``batches`` of ``(inputs, ...,
    labels)``, each ``inputs`` passed to ``module`` as its only argument, without gradients.

    Raises:
        ValueError: a batch that is not a tuple or list of inputs and labels, or labels that do not match the rows.
    """
    captured: list[np.ndarray] = []
    hook = head.register_forward_pre_hook(
        lambda _, inputs: captured.append(inputs[0].detach().reshape(-1, head.in_features).double().cpu().numpy()))
    labels: list[np.ndarray] = []
    device = next(module.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("calibrate_head needs training batches of (inputs, labels); received a "
                                     f"{type(batch).__name__}. Make the dataloader yield (inputs, labels) pairs.")
                before = sum(len(c) for c in captured)
                module(batch[0].to(device))
                label = np.asarray(batch[-1].detach().cpu().numpy() if hasattr(batch[-1], "detach") else batch[-1])
                if sum(len(c) for c in captured) - before != label.reshape(-1).shape[0]:
                    raise ValueError("calibrate_head: the head saw a different number of rows than the batch has "
                                     "labels; calibration needs one head input per labelled sample.")
                labels.append(label.reshape(-1))
    finally:
        hook.remove()
    return np.concatenate(captured), np.concatenate(labels)


__all__ = ["federated_tensors", "to_numpy", "load_arrays", "add_proximal_gradient", "add_control_correction",
           "apply_control_step", "check_head", "linear_head", "head_inputs"]
