"""Configuration of bottleneck adapters (Houlsby et al. 2019, sequential; He et al. 2022, parallel; lecture 003)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")
INSERTIONS = ("sequential", "parallel")


@dataclass
class BottleneckAdapterConfig(PeftConfig):
    """Configuration of a :class:`~monai_peft.tuners.bottleneck.BottleneckAdapterModel`.

    A bottleneck adapter is ``A(h) = scale * W_up(act(W_down h))`` with ``W_down: D -> m`` and a zero-initialised
    ``W_up: m -> D``, so the adapted network equals the base network at initialisation. Where it reads and writes
    (lecture 003, "Summary" table):

    - ``"sequential"`` (Houlsby et al. 2019): after a branch ``f`` of a transformer block, ``f(x) + A(f(x))``, before
      the residual add; by default after the attention and after the MLP of every block;
    - ``"parallel"`` (He et al. 2022): beside the branch, ``f(x) + A(x)``, reading the branch's input (the normalised
      tokens); by default beside the attention and the MLP of every block.

    Several adapters active on one layer all read the same input and their outputs add up, so the result does not
    depend on the order they were activated in.

    Args:
        target_modules (`Optional[Union[list[str], str]]`): module names (exact or suffix) or a regex, as in every
            peft config. ``None`` (default) takes the attention and MLP branches of every block of a known family
            (:data:`monai_peft.tuners.transformer_blocks.FAMILIES`: ``transformers`` ViT / VideoMAE / Segformer and
            MONAI's ``TransformerBlock``). Explicit targets are ``nn.Linear`` layers (the adapter reads their output
            or input) or those branch modules.
        exclude_modules (`Optional[Union[list[str], str]]`): names or a regex to leave out.
        insertion (`str`): ``"sequential"`` (default, Houlsby) or ``"parallel"`` (He et al.).
        bottleneck_size (`int`): hidden width ``m`` of the adapter. Default 16.
        activation (`str`): one of ``relu`` (default), ``gelu``, ``silu``, ``tanh``, ``identity``.
        scale (`float`): fixed factor on the adapter output (Houlsby: 1; He et al.: 4 on the MLP; AdaptFormer: 0.1).
            Default 1.0.
        init_weights (`bool`): zero-initialise ``W_up`` (default ``True``: identity at init); ``False`` draws it at
            random like ``W_down`` (for tests of the machinery only).
        modules_to_save (`Optional[list[str]]`): modules trained fully and saved with the adapter (e.g. a new head).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Linear layers or attention/MLP branch modules; None: every known block's branches."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    insertion: str = field(default="sequential", metadata={"help": "'sequential' (Houlsby) or 'parallel' (He et al.)."})
    bottleneck_size: int = field(default=16, metadata={"help": "Hidden width m of the adapter."})
    activation: str = field(default="relu", metadata={"help": f"One of {ACTIVATIONS}."})
    scale: float = field(default=1.0, metadata={"help": "Fixed factor on the adapter output."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-init the up-projection (identity at init)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a new head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK_ADAPTER
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.insertion not in INSERTIONS:
            raise ValueError(f"BottleneckAdapterConfig.insertion must be one of {INSERTIONS}, got {self.insertion!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BottleneckAdapterConfig.activation must be one of {ACTIVATIONS}, "
                             f"got {self.activation!r}.")
        if isinstance(self.bottleneck_size, bool) or int(self.bottleneck_size) != self.bottleneck_size \
                or self.bottleneck_size < 1:
            raise ValueError(f"BottleneckAdapterConfig.bottleneck_size must be a positive integer, "
                             f"got {self.bottleneck_size!r}.")
