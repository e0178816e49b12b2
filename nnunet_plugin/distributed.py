"""DDP for the PEFT trainers: what nnU-Net 2.8's ``-num_gpus`` does, adapted to frozen backbones (issue 12).

nnU-Net's ``initialize`` wraps the network as ``DDP(convert_sync_batchnorm(network), device_ids=[rank])`` after its
``run_ddp`` has started an NCCL process group; ``__init__`` switches the device to ``cuda:rank`` whenever a process
group exists. For a frozen backbone two things change (:func:`peft_ddp_wrapping`):

- only batch norms that train become ``SyncBatchNorm``. A frozen batch norm normalises with its running statistics
  (:mod:`monai_peft.tuners.frozen_norm`), which are the same on every process, so it needs no synchronisation;
  converting it would drop that behaviour (and SuPreM's ``ContBatchNorm3d``), since the conversion builds new
  modules;
- on CPU (a ``gloo`` process group, e.g. for tests) the model is wrapped without ``device_ids`` (DDP's form for
  CPU modules), batch norms are not converted (``SyncBatchNorm`` runs on GPUs only) and the trainer stays on the
  CPU (``nnUNetTrainerPEFT.__init__``).

DDP itself registers only parameters with ``requires_grad=True``: gradients of the adapters, the seg layers and
fully trained modules are all-reduced, the frozen backbone's tensors never are. Every trainable tensor takes part in
each forward (adapters sit in the forward path, peft freezes the adapters it does not run), so DDP's default
``find_unused_parameters=False`` holds. ``tests/test_ddp.py`` checks both with two gloo processes.

nnU-Net's own launcher (``nnUNetv2_train -num_gpus N``) is CUDA-only (``run_training`` asserts ``device.type ==
'cuda'`` and starts NCCL); the CPU path is reached by starting a gloo process group and calling nnU-Net's
``get_trainer_from_args`` / ``maybe_load_checkpoint`` / ``run_training`` per process, as the tests do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from monai_peft.tuners.module_types import BATCH_NORM_TYPES

__all__ = ["peft_ddp_wrapping", "sync_trainable_batchnorms"]

logger = logging.getLogger(__name__)


def sync_trainable_batchnorms(network: nn.Module, device: torch.device, process_group=None) -> nn.Module:
    """Convert the batch norms of ``network`` that have trainable parameters to ``SyncBatchNorm`` (CUDA only).

    Returns ``network`` (changed in place below the top level) or the converted top module.
    """
    convert = _ORIGINAL_CONVERT.__get__(None, nn.SyncBatchNorm)
    if isinstance(network, BATCH_NORM_TYPES):
        trains = any(p.requires_grad for p in network.parameters())
        return convert(network, process_group) if trains and device.type == "cuda" else network
    trained = [(parent, name, child) for parent in network.modules() for name, child in parent.named_children()
               if isinstance(child, BATCH_NORM_TYPES) and not isinstance(child, nn.SyncBatchNorm)
               and any(p.requires_grad for p in child.parameters())]
    if trained and device.type != "cuda":
        logger.warning("DDP on %s: %d trained batch norm(s) keep per-process statistics (SyncBatchNorm needs CUDA).",
                       device, len(trained))
        return network
    for parent, name, child in trained:
        setattr(parent, name, convert(child, process_group))
    return network


_ORIGINAL_CONVERT = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]  # the classmethod object


@contextmanager
def peft_ddp_wrapping(device: torch.device) -> Iterator[None]:
    """Within this context, nnU-Net's ``initialize`` converts only trained batch norms and wraps CPU modules
    without ``device_ids``. It patches the two names ``initialize`` uses (nnU-Net's ``DDP`` and
    ``SyncBatchNorm.convert_sync_batchnorm``) and restores them on exit."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    original_ddp = trainer_module.DDP

    def ddp(module: nn.Module, device_ids=None, **kwargs):
        return original_ddp(module, device_ids=device_ids if device.type == "cuda" else None, **kwargs)

    def convert(module: nn.Module, process_group=None) -> nn.Module:
        return sync_trainable_batchnorms(module, device, process_group)

    trainer_module.DDP = ddp
    nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(convert)
    try:
        yield
    finally:
        trainer_module.DDP = original_ddp
        nn.SyncBatchNorm.convert_sync_batchnorm = _ORIGINAL_CONVERT
