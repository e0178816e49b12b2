"""Configuration of ConvAdapter (Chen et al. 2022; thesis 001, 3.2.2 and 5.1.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

ACTIVATIONS = ("relu", "gelu", "silu", "leakyrelu", "prelu", "identity")
ADAPTER_CONVS = ("depthwise", "full")
INSERTIONS = ("parallel", "sequential")


@dataclass
class ConvAdapterConfig(PeftConfig):
    """Configuration of a :class:`~monai_peft.tuners.conv_adapter.ConvAdapterModel`.

    The adapter is a bottleneck: a ``k x k(x k)`` convolution reducing ``C_in`` channels to ``C_in / gamma``
    (grouped with ``C_in / gamma`` groups, i.e. one filter per group of ``gamma`` channels, as in the paper, or a full
    convolution), an activation, and a ``1 x 1(x 1)`` convolution restoring ``C_out`` channels. Its output is scaled per
    channel by ``alpha`` (initialised to ones) and added to the adapted module's output (thesis eqs. 3.1-3.2). The
    up-projection is zero-initialised, so the adapted network equals the base network at initialisation.

    Where it goes (the paper's four schemes) is set by *what* you target and by ``insertion``:

    - a ``Conv{1,2,3}d`` target + ``"parallel"``: conv-parallel, ``h = conv(x) + alpha * A(x)``;
    - a ``Conv{1,2,3}d`` target + ``"sequential"``: conv-sequential, ``h = conv(x); h = h + alpha * A(h)``;
    - a residual block target (MONAI ``ResBlock``, ``ResidualUnit``, any block taking one tensor) + ``"parallel"``:
      residual-parallel, ``h = block(x) + alpha * A(x)``; the adapter copies the block's stride and channel change;
    - a residual block + ``"sequential"``: residual-sequential, ``h = block(x); h = h + alpha * A(h)``.

    Args:
        target_modules (`Optional[Union[list[str], str]]`): module names (exact or suffix) or a regex to adapt,
            as in every peft config. :func:`monai_peft.resolve_targets` builds such lists from selectors.
        exclude_modules (`Optional[Union[list[str], str]]`): names or a regex to leave out.
        gamma (`int`): channel compression factor; must divide the adapted module's input channels (parallel) or
            output channels (sequential). Default 4.
        insertion (`str`): ``"parallel"`` (default) or ``"sequential"``.
        adapter_conv (`str`): ``"depthwise"`` (default; grouped, ``C/gamma`` groups) or ``"full"`` (dense k x k conv).
        kernel_size (`Optional[int]`): kernel of the down-projection; ``None`` (default) copies the adapted conv's
            kernel (for a block: its first conv's kernel).
        activation (`str`): one of ``relu`` (default), ``gelu``, ``silu``, ``leakyrelu``, ``prelu``, ``identity``.
        init_weights (`bool`): zero-initialise the up-projection (default ``True``, identity at init); ``False`` gives
            it random weights (for tests of the machinery only).
        modules_to_save (`Optional[list[str]]`): modules besides the adapters that train fully and are saved with the
            adapter (e.g. a new segmentation head, or the whole decoder: thesis Table 5.3 "encoder + full decoder").
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (exact or suffix) or a regex of the convs/blocks to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    gamma: int = field(default=4, metadata={"help": "Channel compression factor of the bottleneck."})
    insertion: str = field(default="parallel", metadata={"help": "'parallel' or 'sequential'."})
    adapter_conv: str = field(default="depthwise", metadata={"help": "'depthwise' (grouped, paper) or 'full'."})
    kernel_size: Optional[int] = field(
        default=None, metadata={"help": "Down-projection kernel; None copies the adapted module's kernel."}
    )
    activation: str = field(default="relu", metadata={"help": f"One of {ACTIVATIONS}."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-init the up-projection (identity at init)."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a new head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.CONV_ADAPTER
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.insertion not in INSERTIONS:
            raise ValueError(f"ConvAdapterConfig.insertion must be one of {INSERTIONS}, got {self.insertion!r}.")
        if self.adapter_conv not in ADAPTER_CONVS:
            raise ValueError(f"ConvAdapterConfig.adapter_conv must be one of {ADAPTER_CONVS}, got {self.adapter_conv!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ConvAdapterConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if int(self.gamma) < 1:
            raise ValueError(f"ConvAdapterConfig.gamma must be a positive integer, got {self.gamma!r}.")
        if self.kernel_size is not None and int(self.kernel_size) < 1:
            raise ValueError(f"ConvAdapterConfig.kernel_size must be positive or None, got {self.kernel_size!r}.")
