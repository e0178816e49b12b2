"""nnU-Net v2 trainers for parameter-efficient fine-tuning (``nnUNetv2_train ... -tr nnUNetTrainerConvAdapter``).

:class:`nnUNetTrainerPEFT` holds all behaviour; the variants below change one setting each (nnU-Net's style for
trainer variants). With ``-pretrained_weights`` (an nnU-Net checkpoint of the same plans architecture) the
backbone is loaded and frozen, the segmentation layers keep a fresh initialisation for the new label count and
train, the adapters train, and the optimizer holds only trainable parameters.

Order of events in nnU-Net 2.8 and where the plugin acts:

1. ``__init__``: settings are merged (class < plans field ``"monai_peft"`` < ``nnUNet_peft_*`` variables) and
   written into the plans, so ``plans.json`` / every checkpoint records them; training length is applied.
2. ``initialize`` -> ``build_network_architecture`` (also called by ``nnUNetv2_predict``): the plain network from
   the plans is adapted by :func:`nnunet_plugin.network.build_peft_network`; ``configure_optimizers``: AdamW on
   trainable parameters.
3. ``-pretrained_weights``: nnU-Net calls ``nnunetv2.run.run_training.load_pretrained_weights``; importing this
   module routes that call, for plugin networks only, to :func:`nnunet_plugin.checkpoints.load_pretrained_backbone`
   (CPU mapping, ``weights_only=True``, clear errors). Other networks go to nnU-Net's own function unchanged.
4. ``save_checkpoint``: nnU-Net's checkpoint (written atomically) plus ``<name>.adapter.safetensors``.
5. ``--c`` / ``--val``: ``load_checkpoint`` reads the file safely and adopts the settings stored in it.
6. ``on_epoch_end``: the run record ``<fold>/results.json`` gets the epoch's history entry (train loss, nnU-Net's
   pseudo Dice per class, lr, seconds), the layout of monai-peft's MONAI workflows, so ``monai-peft curves`` and
   the thesis tables read nnU-Net runs too.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.optim.lr_scheduler import _LRScheduler

from monai_peft.defaults import default_learning_rate

from nnunet_plugin.checkpoints import (
    PRETRAINED_ATTR, PretrainedWeightsError, adapter_path_for, atomic_torch_save, load_pretrained_backbone,
    load_adapter_file, safe_load_checkpoint, save_adapter_file,
)
from nnunet_plugin.distributed import peft_ddp_wrapping
from nnunet_plugin.network import (
    PLAIN_KEYS_ATTR, base_network, build_peft_network, build_suprem_peft_network, unwrap_network,
)
from nnunet_plugin.settings import (
    ENV_VARS, PLANS_FIELD, final_validation_enabled, random_backbone_allowed, resolve_settings, training_length,
)

__all__ = [
    "nnUNetTrainerPEFT", "nnUNetTrainerConvAdapter", "nnUNetTrainerConvAdapterSequential",
    "nnUNetTrainerConvAdapterResidual", "nnUNetTrainerConvAdapterResidualSequential", "nnUNetTrainerLoRA",
    "nnUNetTrainerLoRA16", "nnUNetTrainerLoRADynamic", "nnUNetTrainerSSF", "nnUNetTrainerBitFit",
    "nnUNetTrainerNormTuning", "nnUNetTrainerDecoderOnly", "nnUNetTrainerHeadOnly", "nnUNetTrainerFull",
    "nnUNetTrainerSuPreMPEFT", "nnUNetTrainerSuPreMSegResNetConvAdapter", "nnUNetTrainerSuPreMSegResNetLoRA",
    "nnUNetTrainerSuPreMSegResNetSSF", "nnUNetTrainerSuPreMSegResNetDecoderOnly", "nnUNetTrainerSuPreMSegResNetFull",
    "nnUNetTrainerSuPreMUNet3DConvAdapter", "nnUNetTrainerSuPreMUNet3DLoRA", "nnUNetTrainerSuPreMUNet3DSSF",
    "install_pretrained_loader",
]

logger = logging.getLogger(__name__)


class _TorchReturning:
    """``torch`` as nnU-Net's trainer module sees it, except that ``load`` returns a checkpoint already read."""

    def __init__(self, checkpoint: dict) -> None:
        self._checkpoint = checkpoint

    def load(self, *args: Any, **kwargs: Any) -> dict:
        return self._checkpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextmanager
def _nnunet_reads(checkpoint: dict) -> Iterator[None]:
    """Let ``nnUNetTrainer.load_checkpoint`` restore ``checkpoint`` (read with ``weights_only=True``).

    nnU-Net 2.8's ``load_checkpoint`` reads a path with ``torch.load(weights_only=False)`` and has no branch for a
    dict it is given, so its restore (network, optimizer, AMP scaler, logger, epoch) is reused as it is, with the
    ``torch.load`` of its module answering the checkpoint the plugin read safely.
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    saved = trainer_module.torch
    trainer_module.torch = _TorchReturning(checkpoint)
    try:
        yield
    finally:
        trainer_module.torch = saved


class CosineLRScheduler(_LRScheduler):
    """Cosine annealing from ``initial_lr`` to 0 over ``max_steps`` epochs (thesis 4.2.3: CosineAnnealingLR).

    Same interface as nnU-Net's ``PolyLRScheduler``: the trainer calls ``step(current_epoch)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, max_steps: int) -> None:
        self.initial_lr, self.max_steps, self.ctr = initial_lr, max(1, max_steps), 0
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:  # noqa: D102
        if current_step is None or current_step == -1:
            current_step, self.ctr = self.ctr, self.ctr + 1
        lr = 0.5 * self.initial_lr * (1 + math.cos(math.pi * min(current_step, self.max_steps) / self.max_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:  # noqa: D102
        return self._last_lr


class nnUNetTrainerPEFT(nnUNetTrainer):
    """Base PEFT trainer: frozen backbone, ``peft_method`` adapters, AdamW on trainable parameters.

    Class attributes (what variants change):
        peft_method: a :data:`nnunet_plugin.network.METHODS` entry.
        peft_defaults: defaults for :class:`nnunet_plugin.settings.PEFTSettings` (rank, gamma, placement, target, lr).
    """

    peft_method: str = "convadapter"
    peft_defaults: dict[str, Any] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":  # gloo DDP; nnU-Net assumes CUDA (nnunet_plugin.distributed)
            self.device, self.grad_scaler = device, None
        for attr, value in training_length().items():  # nnUNet_peft_epochs / _iterations / _val_iterations
            setattr(self, attr, value)
        self.peft_settings = resolve_settings(self.settings_defaults(), self.plans_manager.plans)
        self._store_settings()
        self.initial_lr = self.peft_settings.lr
        self.weight_decay = 1e-5  # thesis 4.2.3: AdamW, weight decay 1e-5, cosine annealing
        self._resumed_base_weights: dict[str, str] | None = None  # from the adapter file beside a resumed checkpoint
        self._skip_final_validation = not final_validation_enabled()
        self._just_trained = False

    # -- settings -------------------------------------------------------------------------------------------
    @classmethod
    def settings_defaults(cls) -> dict[str, Any]:
        """``peft_defaults`` plus the method's default learning rate (:mod:`monai_peft.defaults`) unless they set one."""
        return {"lr": default_learning_rate(cls.peft_method), **cls.peft_defaults}

    def _store_settings(self) -> None:
        # the plans dict is also my_init_kwargs["plans"]: checkpoints and plans.json carry the settings
        self.plans_manager.plans[PLANS_FIELD] = {"method": self.peft_method, **self.peft_settings.as_dict()}

    # -- network --------------------------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's network from the plans, adapted for ``cls.peft_method`` with the settings in the plans.

        Called by ``initialize`` and by ``nnUNetv2_predict``: at prediction the ``plans.json`` of the results
        folder is authoritative (environment variables are ignored), so the rebuilt network matches the weights.
        """
        network = nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        stored = plans_manager.plans.get(PLANS_FIELD)
        if stored and stored.get("method", cls.peft_method) != cls.peft_method:
            raise ValueError(
                f"plans field {PLANS_FIELD!r} was written for method {stored.get('method')!r}, but {cls.__name__} "
                f"trains {cls.peft_method!r}; use the matching trainer or remove the field."
            )
        settings = resolve_settings(cls.settings_defaults(), plans_manager.plans, use_env=stored is None)
        return build_peft_network(network, cls.peft_method, settings)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        base_network(self.network).decoder.deep_supervision = enabled

    def configure_optimizers(self):
        params = [p for p in self.network.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{self.__class__.__name__}: the network has no trainable parameters.")
        optimizer = torch.optim.AdamW(params, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, CosineLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self) -> None:
        if self.is_ddp and not self.was_initialized:
            with peft_ddp_wrapping(self.device):  # SyncBatchNorm for trained norms only; CPU modules without ids
                super().initialize()
        else:
            super().initialize()
        n_train = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.network.parameters())
        self.print_to_log_file(
            f"monai-peft: method {self.peft_method}, settings {self.peft_settings.as_dict()}; trainable "
            f"{n_train:,} of {n_all:,} parameters ({100.0 * n_train / max(n_all, 1):.2f}%)")

    def on_train_start(self) -> None:
        if not self.was_initialized:
            self.initialize()
        pretrained = getattr(unwrap_network(self.network), PRETRAINED_ATTR, None)
        if pretrained is not None:
            self.print_to_log_file(
                f"monai-peft: pretrained weights {pretrained['file']}: {pretrained['loaded']} tensors loaded, "
                f"{len(pretrained['skipped'])} skipped ({', '.join(pretrained['skipped'][:4])}), "
                f"{pretrained['left_at_init']} adapter / seg-layer tensors left at their initialisation")
        elif self.peft_method != "full" and self.current_epoch == 0 and self._resumed_base_weights is None:
            # nothing frozen is worth training around unless it holds pretrained weights
            if not random_backbone_allowed():
                raise PretrainedWeightsError(
                    f"{self.__class__.__name__}: no -pretrained_weights given, so the frozen backbone would keep its "
                    "random initialisation and only the adapters would train. Pass -pretrained_weights FILE, or set "
                    f"{ENV_VARS['allow_random_backbone']}=1 to train on a random frozen backbone on purpose."
                )
            self.print_to_log_file(
                f"WARNING: no -pretrained_weights loaded ({ENV_VARS['allow_random_backbone']}=1): the frozen backbone "
                "keeps its random initialisation.")
        super().on_train_start()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _adapter_metadata(self) -> dict[str, Any]:
        return {
            "trainer": self.__class__.__name__,
            "method": self.peft_method,
            "settings": self.peft_settings.as_dict(),
            "configuration": self.configuration_name,
            "plans": self.plans_manager.plans,
            "dataset_json": self.dataset_json,
            "epoch": self.current_epoch,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "base_weights": self._base_weights_info(),
        }

    def _base_weights_info(self) -> dict[str, str] | None:
        pretrained = getattr(unwrap_network(self.network), PRETRAINED_ATTR, None)
        if pretrained is not None:
            return {"file": pretrained["file"], "sha256": pretrained["sha256"]}
        return self._resumed_base_weights

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        atomic_torch_save(None, filename, save_fn=lambda tmp: nnUNetTrainer.save_checkpoint(self, tmp))
        save_adapter_file(self.network, adapter_path_for(filename), self._adapter_metadata())

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """Resume (``--c``) or validate (``--val``): safe load, adopt stored settings, then nnU-Net's restore."""
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            checkpoint = safe_load_checkpoint(filename_or_checkpoint, map_location=self.device)
            adapter_file = adapter_path_for(filename_or_checkpoint)
            if adapter_file.is_file():
                self._resumed_base_weights = load_adapter_file(adapter_file)[1].get("base_weights")
        else:
            checkpoint = filename_or_checkpoint
        stored = ((checkpoint.get("init_args") or {}).get("plans") or {}).get(PLANS_FIELD)
        if stored and stored != self.plans_manager.plans.get(PLANS_FIELD):
            if self.was_initialized:
                raise ValueError(
                    f"checkpoint settings {stored} differ from this trainer's "
                    f"{self.plans_manager.plans.get(PLANS_FIELD)}; load it before initialize()."
                )
            self.print_to_log_file(f"monai-peft: adopting the settings stored in the checkpoint: {stored}")
            self.peft_settings = resolve_settings(self.settings_defaults(), {PLANS_FIELD: stored}, use_env=False)
            self._store_settings()
        if not self.was_initialized:
            self.initialize()
        source = str(filename_or_checkpoint) if isinstance(filename_or_checkpoint, (str, os.PathLike)) else "checkpoint"
        try:
            with _nnunet_reads(checkpoint):
                nnUNetTrainer.load_checkpoint(self, source)
        except RuntimeError as e:  # load_state_dict: another architecture or another method's adapters
            raise PretrainedWeightsError(
                f"{source}: does not match the {self.__class__.__name__} network ({str(e).splitlines()[0]})."
            ) from e
        self.my_init_kwargs["plans"] = self.plans_manager.plans  # with the settings adopted above

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self._just_trained and self._skip_final_validation:
            self.print_to_log_file("monai-peft: nnUNet_peft_final_validation=0: validation skipped (run --val later).")
            return
        super().perform_actual_validation(save_probabilities)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self.local_rank == 0:
            self._write_run_record()

    def _class_names(self, n: int) -> list[str]:
        labels = {str(k): v for k, v in (self.dataset_json.get("labels") or {}).items()}
        names = [k for k, v in sorted(labels.items(), key=lambda kv: str(kv[1])) if v not in (0, "0", [0])]
        return names if len(names) == n else [str(i + 1) for i in range(n)]

    def _write_run_record(self) -> None:
        """``results.json`` beside the checkpoints: parameters and the per-epoch history (nnU-Net's log values)."""
        from monai_peft.handlers.run_record import history_entry
        from monai_peft.workflows.records import update_run_record

        log = self.logger.get_value
        starts, ends = log("epoch_start_timestamps", step=None), log("epoch_end_timestamps", step=None)
        losses, lrs = log("train_losses", step=None), log("lrs", step=None)
        dice, per_class = log("mean_fg_dice", step=None), log("dice_per_class_or_region", step=None)
        history, elapsed = [], 0.0
        for e in range(min(len(starts), len(ends))):
            elapsed += ends[e] - starts[e]
            names = self._class_names(len(per_class[e])) if e < len(per_class) else []
            history.append(history_entry(
                e + 1, losses[e] if e < len(losses) else None, lrs[e] if e < len(lrs) else None, ends[e] - starts[e],
                elapsed, dice[e] if e < len(dice) else None,
                dict(zip(names, map(float, per_class[e]))) if e < len(per_class) else None))
        module = unwrap_network(self.network)
        n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in module.parameters())
        update_run_record(Path(self.output_folder) / "results.json", {
            "method": self.peft_method, "trainer": self.__class__.__name__,
            "backbone": getattr(self, "suprem_backbone", None) or "nnunet",
            "parameters": {"trainable": n_train, "total": n_all, "trainable_percent": 100.0 * n_train / max(n_all, 1)},
            # nnU-Net validates on sampled patches during training ("pseudo Dice"), not on whole volumes
            "evaluation": {"protocol": "nnunet_pseudo_dice", "patch_size": list(self.configuration_manager.patch_size)},
            "history": history,
        })

    def on_train_end(self) -> None:
        self._just_trained = True
        super().on_train_end()
        latest = adapter_path_for(Path(self.output_folder) / "checkpoint_latest.pth")
        if self.local_rank == 0 and latest.is_file():
            latest.unlink()


# -- variants: one setting each ------------------------------------------------------------------------------
class nnUNetTrainerConvAdapter(nnUNetTrainerPEFT):
    """ConvAdapter parallel to every spatial conv of encoder and decoder, gamma 4 (thesis 3.2.2 conv-parallel)."""

    peft_method = "convadapter"
    peft_defaults = {"placement": "conv-parallel", "gamma": 4}


class nnUNetTrainerConvAdapterSequential(nnUNetTrainerConvAdapter):
    """ConvAdapter after every spatial conv (conv-sequential)."""

    peft_defaults = {"placement": "conv-sequential", "gamma": 4}


class nnUNetTrainerConvAdapterResidual(nnUNetTrainerConvAdapter):
    """ConvAdapter parallel to every conv block / residual block (residual-parallel, thesis Table 5.3)."""

    peft_defaults = {"placement": "residual-parallel", "gamma": 4}


class nnUNetTrainerConvAdapterResidualSequential(nnUNetTrainerConvAdapter):
    """ConvAdapter after every conv block / residual block (residual-sequential)."""

    peft_defaults = {"placement": "residual-sequential", "gamma": 4}


class nnUNetTrainerLoRA(nnUNetTrainerPEFT):
    """LoRA rank 8 on every spatial conv of encoder and decoder (thesis 3.2.1, 5.1.1)."""

    peft_method = "lora"
    peft_defaults = {"rank": 8}


class nnUNetTrainerLoRA16(nnUNetTrainerLoRA):
    """LoRA rank 16."""

    peft_defaults = {"rank": 16}


class nnUNetTrainerLoRADynamic(nnUNetTrainerLoRA):
    """LoRA with rank out_channels / 2 per conv (thesis 5.1.1 "dynamic rank")."""

    peft_defaults = {"rank": "dynamic"}


class nnUNetTrainerSSF(nnUNetTrainerPEFT):
    """SSF: per-channel scale and shift after every conv and norm of encoder and decoder (thesis 3.2.3)."""

    peft_method = "ssf"


class nnUNetTrainerBitFit(nnUNetTrainerPEFT):
    """BitFit: biases only (lecture 003), plus the new seg layers."""

    peft_method = "bitfit"


class nnUNetTrainerNormTuning(nnUNetTrainerPEFT):
    """Norm-layer tuning: the affine parameters of every norm layer, plus the new seg layers."""

    peft_method = "norm"


class nnUNetTrainerDecoderOnly(nnUNetTrainerPEFT):
    """Decoder fine-tuning: frozen encoder, decoder and seg layers train fully (thesis 5.1 baseline)."""

    peft_method = "decoder"


class nnUNetTrainerHeadOnly(nnUNetTrainerPEFT):
    """Linear probing: only the new seg layers train."""

    peft_method = "head"


class nnUNetTrainerFull(nnUNetTrainerPEFT):
    """Full fine-tuning (thesis 4.2.4 baseline), also a plain pretraining run: everything trains, no adapters."""

    peft_method = "full"


# -- SuPreM foundation backbones inside nnU-Net's pipeline ------------------------------------------------------
class nnUNetTrainerSuPreMPEFT(nnUNetTrainerPEFT):
    """A SuPreM backbone (thesis 4.2.1) instead of the plans' U-Net; nnU-Net's data, augmentation, loss, inference.

    ``-pretrained_weights`` takes SuPreM's checkpoint (``supervised_suprem_segresnet_2100.pth`` layout). The MONAI
    backbone has one output, so deep supervision is off; the plans' patch size must be divisible by 8. Note that
    nnU-Net normalises CT by its dataset percentiles, not SuPreM's fixed window (thesis Table 4.3).
    ``suprem_backbone`` selects SegResNet (``supervised_suprem_segresnet_2100.pth``) or UNet3D
    (``supervised_suprem_unet_2100.pth``, batch-statistics batch norm, see
    :mod:`monai_peft.tuners.frozen_norm`: frozen ones keep their stored buffers).
    """

    peft_method = "convadapter"
    peft_defaults = {"placement": "residual-parallel", "gamma": 4}  # thesis Table 5.3: ResBlock parallel
    suprem_backbone = "segresnet"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        from monai_peft.networks import suprem_backbone

        if num_input_channels != 1:
            raise ValueError(f"{cls.__name__}: SuPreM backbones take 1 input channel, the dataset has "
                             f"{num_input_channels} (dataset.json channel_names).")
        bad = [s for s in configuration_manager.patch_size if s % 8]
        if bad:
            raise ValueError(f"{cls.__name__}: patch_size {configuration_manager.patch_size} in the plans must be "
                             f"divisible by 8 for SuPreM's {cls.suprem_backbone} (3 downsamplings).")
        stored = plans_manager.plans.get(PLANS_FIELD)
        settings = resolve_settings(cls.settings_defaults(), plans_manager.plans, use_env=stored is None)
        network = suprem_backbone(cls.suprem_backbone, num_output_channels)
        return build_suprem_peft_network(network, cls.peft_method, settings, cls.suprem_backbone)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:  # one-output MONAI network
        return None


class nnUNetTrainerSuPreMSegResNetConvAdapter(nnUNetTrainerSuPreMPEFT):
    """SuPreM SegResNet + ConvAdapter parallel to every ResBlock (thesis Table 5.3)."""


class nnUNetTrainerSuPreMSegResNetLoRA(nnUNetTrainerSuPreMPEFT):
    """SuPreM SegResNet + LoRA rank 16 on spatial convs (thesis Table 5.2)."""

    peft_method = "lora"
    peft_defaults = {"rank": 16}


class nnUNetTrainerSuPreMSegResNetSSF(nnUNetTrainerSuPreMPEFT):
    """SuPreM SegResNet + SSF after convs and norms."""

    peft_method = "ssf"
    peft_defaults = {}


class nnUNetTrainerSuPreMSegResNetDecoderOnly(nnUNetTrainerSuPreMPEFT):
    """SuPreM SegResNet, decoder + head fine-tuned."""

    peft_method = "decoder"
    peft_defaults = {}


class nnUNetTrainerSuPreMSegResNetFull(nnUNetTrainerSuPreMPEFT):
    """SuPreM SegResNet fully fine-tuned (thesis 4.2.4 baseline)."""

    peft_method = "full"
    peft_defaults = {}


class nnUNetTrainerSuPreMUNet3DConvAdapter(nnUNetTrainerSuPreMPEFT):
    """SuPreM UNet3D + ConvAdapter parallel to both LUConv convs of every transition (thesis Table 5.4)."""

    suprem_backbone = "unet"
    peft_defaults = {"placement": "conv-parallel", "gamma": 4}


class nnUNetTrainerSuPreMUNet3DLoRA(nnUNetTrainerSuPreMPEFT):
    """SuPreM UNet3D + LoRA rank 16 on its spatial convs (thesis Table 5.1)."""

    suprem_backbone = "unet"
    peft_method = "lora"
    peft_defaults = {"rank": 16}


class nnUNetTrainerSuPreMUNet3DSSF(nnUNetTrainerSuPreMPEFT):
    """SuPreM UNet3D + SSF after its convs and norms."""

    suprem_backbone = "unet"
    peft_method = "ssf"
    peft_defaults = {}


# -- -pretrained_weights routing -----------------------------------------------------------------------------
def install_pretrained_loader() -> None:
    """Route ``nnunetv2.run.run_training.load_pretrained_weights`` to the plugin's loader for plugin networks.

    nnU-Net's own function loads without ``map_location`` (a GPU-saved file crashes on CPU machines) and cannot
    map plain keys onto an adapted network. Networks not built by the plugin still go to nnU-Net's function.
    """
    try:
        from nnunetv2.run import run_training
    except ImportError:  # nnU-Net without the training entry point: nothing to route
        return
    original = run_training.load_pretrained_weights
    if getattr(original, "_nnunet_plugin", False):
        return

    def load_pretrained_weights(network: nn.Module, fname: str, verbose: bool = False):
        if getattr(unwrap_network(network), PLAIN_KEYS_ATTR, None) is not None:
            load_pretrained_backbone(network, fname, verbose=verbose)  # the trainer logs the report at train start
            return None
        return original(network, fname, verbose=verbose)

    load_pretrained_weights._nnunet_plugin = True  # type: ignore[attr-defined]
    load_pretrained_weights.__wrapped__ = original  # type: ignore[attr-defined]
    run_training.load_pretrained_weights = load_pretrained_weights


install_pretrained_loader()
