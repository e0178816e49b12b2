"""Frozen batch norms stay frozen: while adapters train, a batch norm whose parameters are frozen normalises with
its running statistics (eval-mode statistics) and does not update them.

Why eval-mode statistics rather than saving updated statistics with the adapter: PyTorch updates a batch norm's
running mean and variance in every training-mode forward, also when its weight and bias are frozen. Those buffers
belong to the frozen backbone, not to the adapter file, so "base checkpoint + adapter file" would silently give a
different network than the one trained. Keeping them fixed makes the adapter file complete, lets one frozen backbone
serve any number of named adapters (per-adapter statistics would not), and removes the train/eval mismatch of batch
statistics computed on the 1-2 volumes of a 3D batch. The adapters (and SSF's per-channel affine map) learn the
target domain's shift instead. A batch norm that trains (a ``modules_to_save`` copy, the ``norm`` method's copies,
any with ``requires_grad=True`` parameters) keeps PyTorch's usual behaviour, and its statistics are saved with it.

SuPreM's ``ContBatchNorm3d`` always normalises with the batch statistics (its design); here it only stops updating
its unused running buffers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from monai_peft.tuners.module_types import BATCH_NORM_TYPES

__all__ = ["keep_frozen_batchnorm_statistics", "is_frozen", "keeps_statistics", "running_statistics_if_frozen"]

_WAS_TRAINING = "_monai_peft_was_training"


def is_frozen(module: nn.Module) -> bool:
    """No parameter of ``module`` itself (not its children) requires a gradient (also true without parameters)."""
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def _use_running_statistics(module: nn.Module, args: Any) -> None:
    if module.training and is_frozen(module):
        module.training = False
        setattr(module, _WAS_TRAINING, True)


def _restore_training_flag(module: nn.Module, args: Any, output: Any) -> None:
    if module.__dict__.pop(_WAS_TRAINING, False):
        module.training = True


def keeps_statistics(module: nn.Module) -> bool:
    """``module`` is a batch norm made to keep its running statistics (hooked here) and is frozen now."""
    return (isinstance(module, BATCH_NORM_TYPES) and is_frozen(module)
            and any(h is _use_running_statistics for h in module._forward_pre_hooks.values()))


@contextmanager
def running_statistics_if_frozen(module: nn.Module) -> Iterator[None]:
    """Decide "frozen" now, for a call that swaps other tensors in for the parameters (``functional_call``).

    SSF folds its scale into a norm's weight (:mod:`monai_peft.tuners.ssf.layer`); the swapped-in weight requires a
    gradient, so the forward hook would take the frozen batch norm for a trained one. Within this context a hooked,
    frozen batch norm in training mode runs with ``training=False`` (running statistics, none updated), exactly as
    the hook would run it with its own parameters.
    """
    switch = module.training and keeps_statistics(module)
    if switch:
        module.training = False
    try:
        yield
    finally:
        if switch:
            module.training = True


def keep_frozen_batchnorm_statistics(model: nn.Module, enabled: bool = True) -> int:
    """Make the frozen batch norms of ``model`` use and keep their running statistics also in training mode.

    The check "frozen" happens at every forward, so a batch norm unfrozen later trains normally again.
    ``model.training`` and each module's ``training`` flag are left as the caller set them (the flag is switched off
    only for the duration of the batch norm's own forward). Idempotent.

    Args:
        model: any module (a ``PeftModel`` or the network inside it).
        enabled: ``False`` removes the behaviour again (PyTorch's default: batch statistics while training).

    Returns:
        the number of batch norm layers changed by this call (newly hooked, or unhooked when ``enabled=False``).
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, BATCH_NORM_TYPES):
            continue
        pre = [k for k, h in module._forward_pre_hooks.items() if h is _use_running_statistics]
        post = [k for k, h in module._forward_hooks.items() if h is _restore_training_flag]
        if enabled and not pre:
            module.register_forward_pre_hook(_use_running_statistics)
            module.register_forward_hook(_restore_training_flag)
            count += 1
        elif not enabled and pre:
            for k in pre:
                del module._forward_pre_hooks[k]
            for k in post:
                del module._forward_hooks[k]
            count += 1
    return count
