"""Configuration of SSF, Scaling and Shifting your Features (Lian et al. 2022; thesis 001, 3.2.3 and 5.1.3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType


@dataclass
class SSFConfig(PeftConfig):
    """Configuration of a :class:`~monai_peft.tuners.ssf.SSFModel`.

    SSF follows each targeted operation with a per-channel affine map ``y = gamma * op(x) + beta`` (``gamma``
    initialised to ones, ``beta`` to zeros, so the adapted network equals the base network at init; thesis eq. 3.3).
    Because the map is linear, ``merge_and_unload()`` folds it into the preceding layer: ``W' = gamma * W``,
    ``b' = gamma * b + beta``. A conv or linear layer **without a bias gains a bias parameter** when merged (its
    state_dict then has an extra ``bias`` key); a norm layer without affine parameters gains ``weight`` and ``bias``.
    A warning says so at run time. ``safe_merge=True`` computes the merged tensors apart from the layer and refuses
    (``ValueError``, nothing changed) if any is not finite. Unmerging divides by ``gamma`` except where that cannot
    restore the weights (a scale of 0, or merged weights that underflowed): the merge keeps those channels' weights
    and the bias, and unmerging puts them back exactly.

    Several active adapters on one layer combine as ``y = (prod gamma_a) * op(x) + sum beta_a`` (scales multiply,
    shifts add), so the order of the adapters does not matter, for the forward pass and for merging.

    With ``scale=False`` only the shift trains: that is BitFit (bias tuning; lecture 003) expressed as an adapter, so
    it keeps peft's named adapters, disabling and merging.

    Args:
        target_modules (`Optional[Union[list[str], str]]`): module names (exact or suffix) or a regex, as in every
            peft config. Supported: ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (any groups), ``Linear``,
            ``BatchNorm*``, ``InstanceNorm*``, ``GroupNorm``, ``LayerNorm`` (1-D ``normalized_shape``).
        exclude_modules (`Optional[Union[list[str], str]]`): names or a regex to leave out.
        scale (`bool`): learn the per-channel scale (default ``True``).
        shift (`bool`): learn the per-channel shift (default ``True``).
        init_weights (`bool`): ``True`` (default) starts at the identity; ``False`` draws random scale/shift (tests).
        modules_to_save (`Optional[list[str]]`): modules trained fully and saved with the adapter (e.g. a new head).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (exact or suffix) or a regex of the layers to follow with SSF."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    scale: bool = field(default=True, metadata={"help": "Learn a per-channel scale."})
    shift: bool = field(default=True, metadata={"help": "Learn a per-channel shift."})
    init_weights: bool = field(default=True, metadata={"help": "Identity initialisation (scale 1, shift 0)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a new head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SSF
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if not (self.scale or self.shift):
            raise ValueError("SSFConfig needs scale=True or shift=True (both False would train nothing).")
