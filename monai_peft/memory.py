"""Training memory of adapted networks: activation checkpointing of blocks (issue 12, memory lever).

A frozen backbone does not make training lighter by itself: every frozen conv, norm and activation between the
first adapter and the loss still keeps its input for the backward pass (the gradient has to flow through it to the
adapters before it), so a PEFT step stores about what full fine-tuning stores (thesis Table 5.7: 11.75 vs 11.01 GB).
With checkpointing a block keeps only its input; its inner activations are recomputed from that input when the
backward pass reaches it (``torch.utils.checkpoint``, non-reentrant, so adapters inside a block still receive their
gradients and dropout masks repeat). The price is one more forward pass of the checkpointed blocks.

Where the memory is: a 3D U-Net keeps most of its activations at the input resolution (a SegResNet at 64^3 holds
about three quarters of them in the two 16-channel blocks there), while its compute is spread over all levels.
``"full-resolution"`` therefore checkpoints only the blocks whose input has the spatial size of the network's
input: most of the saving for a fraction of the recompute. ``"all"`` checkpoints every block.

What needs no switch: a frozen prefix (the layers before the first adapter, e.g. the stem conv, or the whole
encoder of decoder-only tuning) builds no autograd graph and stores nothing, because PyTorch records operations
only where an input requires a gradient; ``tests/test_memory.py`` asserts that.

Blocks are modules of :data:`CHECKPOINT_BLOCK_TYPES` (MONAI ``ResBlock`` / ``ResidualUnit``, SuPreM UNet3D's
``LUConv``; ``register_checkpoint_block`` adds more, e.g. nnU-Net's blocks), found also inside the adapter wrappers
peft puts around them. A block holding a batch norm that updates running statistics in training (one that trains)
is never checkpointed: the recompute would update them twice. Frozen batch norms keep their statistics fixed
(:mod:`monai_peft.tuners.frozen_norm`), so they recompute exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from monai_peft.tuners.frozen_norm import keeps_statistics
from monai_peft.tuners.module_types import BATCH_NORM_TYPES

__all__ = [
    "ACTIVATION_CHECKPOINTING", "CHECKPOINT_BLOCK_TYPES", "register_checkpoint_block", "checkpoint_mode",
    "enable_activation_checkpointing", "disable_activation_checkpointing", "checkpointed_blocks",
]

ACTIVATION_CHECKPOINTING = ("full-resolution", "all")

_ORIGINAL = "_monai_peft_forward"  # instance attribute: the block's own forward while checkpointing is on
_INPUT_SIZE = "_monai_peft_input_size"  # on the root: spatial size of the last training input


def _default_block_types() -> list[type[nn.Module]]:
    from monai.networks.blocks import ResidualUnit
    from monai.networks.blocks.segresnet_block import ResBlock

    from monai_peft.networks.unet3d import LUConv

    return [ResBlock, ResidualUnit, LUConv]


CHECKPOINT_BLOCK_TYPES: list[type[nn.Module]] = _default_block_types()


def register_checkpoint_block(block_cls: type[nn.Module]) -> None:
    """Let activation checkpointing treat ``block_cls`` as a block (idempotent)."""
    if not (isinstance(block_cls, type) and issubclass(block_cls, nn.Module)):
        raise TypeError(f"register_checkpoint_block: expected an nn.Module subclass, got {block_cls!r}.")
    if block_cls not in CHECKPOINT_BLOCK_TYPES:
        CHECKPOINT_BLOCK_TYPES.append(block_cls)


def checkpoint_mode(value: bool | str | None) -> str | None:
    """The mode of an ``activation_checkpointing`` option: ``None`` (off), ``"full-resolution"`` or ``"all"``.

    ``True`` means ``"full-resolution"``; ``False``/``None``/``"off"`` mean off.

    Raises:
        ValueError: any other value (names the accepted ones).
    """
    if value is None or value is False or value == "off":
        return None
    if value is True:
        return "full-resolution"
    if isinstance(value, str) and value in ACTIVATION_CHECKPOINTING:
        return value
    raise ValueError(f"activation_checkpointing must be True, False, 'off' or one of {ACTIVATION_CHECKPOINTING}, "
                     f"got {value!r}.")


def _blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Outermost blocks, each once; a tuner layer wrapping a block (its ``base_layer``) stands for it.

    A module reachable along two paths (nnU-Net's decoder keeps a reference to the encoder) is visited once, so a
    block is never wrapped twice.
    """
    types = tuple(CHECKPOINT_BLOCK_TYPES)
    seen: set[int] = set()

    def visit(module: nn.Module) -> Iterator[nn.Module]:
        for child in module.children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            inner = child.get_base_layer() if hasattr(child, "get_base_layer") else child
            if isinstance(inner, types):
                yield child
            else:
                yield from visit(child)

    yield from visit(model)


def _updates_statistics(block: nn.Module) -> bool:
    """A batch norm inside would update its running statistics in a training forward (so twice when recomputed)."""
    return any(m.training and m.track_running_stats and not keeps_statistics(m)
               for m in block.modules() if isinstance(m, BATCH_NORM_TYPES))


def _needs_graph(block: nn.Module, args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
        p.requires_grad for p in block.parameters())


def _checkpointed_forward(block: nn.Module, mode: str, root: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = block.__dict__[_ORIGINAL]
    if not (block.training and torch.is_grad_enabled() and _needs_graph(block, args)) or _updates_statistics(block):
        return forward(*args, **kwargs)
    if mode == "full-resolution":
        size = root.__dict__.get(_INPUT_SIZE)
        x = args[0] if args else None
        if size is None or not isinstance(x, torch.Tensor) or tuple(x.shape[2:]) != size:
            return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _record_input_size(root: nn.Module, args: tuple, kwargs: dict) -> None:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(x, torch.Tensor) and x.dim() > 2:
        root.__dict__[_INPUT_SIZE] = tuple(x.shape[2:])


def enable_activation_checkpointing(model: nn.Module, mode: bool | str = "full-resolution") -> int:
    """Recompute the inner activations of ``model``'s blocks in backward instead of storing them.

    Args:
        model: a network or a ``PeftModel`` (its state dict, parameters and adapter files are unchanged).
        mode: ``"full-resolution"`` (or ``True``): the blocks whose input has the spatial size of the model's input;
            ``"all"``: every block. ``False`` / ``"off"`` switch it off (:func:`disable_activation_checkpointing`).

    Returns:
        the number of blocks that checkpoint (when their input qualifies) from now on.

    Raises:
        ValueError: an unknown ``mode``; a model without any block of :data:`CHECKPOINT_BLOCK_TYPES`.
    """
    resolved = checkpoint_mode(mode)
    if resolved is None:
        disable_activation_checkpointing(model)
        return 0
    blocks = list(_blocks(model))
    if not blocks:
        names = ", ".join(t.__name__ for t in CHECKPOINT_BLOCK_TYPES)
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no block to checkpoint (known block "
                         f"types: {names}); register its block class with monai_peft.register_checkpoint_block.")
    disable_activation_checkpointing(model)
    root = model
    for block in blocks:
        block.__dict__[_ORIGINAL] = block.forward
        block.forward = _BoundCheckpoint(block, resolved, root)
    if resolved == "full-resolution":
        root.__dict__["_monai_peft_size_hook"] = root.register_forward_pre_hook(_record_input_size, with_kwargs=True)
    return len(blocks)


class _BoundCheckpoint:
    """``block.forward`` while checkpointing is on (a plain object, so ``copy.deepcopy`` of the model works)."""

    def __init__(self, block: nn.Module, mode: str, root: nn.Module) -> None:
        self.block, self.mode, self.root = block, mode, root

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _checkpointed_forward(self.block, self.mode, self.root, *args, **kwargs)


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_activation_checkpointing`; returns the number of blocks restored."""
    count = 0
    for module in model.modules():
        if _ORIGINAL in module.__dict__:
            del module.__dict__[_ORIGINAL]
            module.__dict__.pop("forward", None)
            count += 1
    hook = model.__dict__.pop("_monai_peft_size_hook", None)
    if hook is not None:
        hook.remove()
    model.__dict__.pop(_INPUT_SIZE, None)
    return count


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that checkpoint (empty when checkpointing is off)."""
    return [name for name, module in model.named_modules() if _ORIGINAL in module.__dict__]
