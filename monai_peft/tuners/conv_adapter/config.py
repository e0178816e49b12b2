"""Configuration of ConvAdapter (Chen et al. 2022; thesis 001, 3.2.2 and 5.1.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

ACTIVATIONS = ("relu", "gelu", "silu", "leakyrelu", "prelu", "identity")
ADAPTER_CONVS = ("depthwise", "dense")
INSERTIONS = ("parallel", "sequential")
# names accepted from configs saved by earlier versions
_LEGACY_ADAPTER_CONVS = {"full": "dense"}


@dataclass
class ConvAdapterConfig(PeftConfig):
    """Configuration of a :class:`~monai_peft.tuners.conv_adapter.ConvAdapterModel`.

    What is built for a module with ``C`` adapted channels (its input channels for ``"parallel"``, its output
    channels for ``"sequential"``) and ``C_out`` output channels (Chen et al. 2022; thesis 3.2.2, eqs. 3.1-3.2):

    1. down-projection: a ``k x k(x k)`` convolution ``C -> h`` with ``h = max(1, ceil(C / gamma))``. With
       ``adapter_conv="depthwise"`` (the paper's) it has ``groups = gcd(C, h)``: when ``gamma`` divides ``C`` that is
       ``h`` groups and each output channel sees ``gamma`` input channels (the paper's weight of shape
       ``(C / gamma, gamma, k, k)``); for channel counts ``gamma`` does not divide (1, 5, 7, ... channels) the groups
       shrink, down to a dense conv. ``adapter_conv="dense"`` is always one group (``C * h * k^d`` weights). A
       parallel down-projection copies the adapted conv's kernel, stride, padding (also ``"same"``/``"valid"``),
       dilation and padding mode, or is a ``ConvTranspose`` with the adapted transposed conv's kernel, stride,
       padding, output padding and dilation, so its output has the module's shape by construction; a sequential
       one uses stride 1 and ``"same"`` padding. Both have a bias.
    2. the activation;
    3. up-projection: a ``1 x 1(x 1)`` convolution ``h -> C_out`` with bias, **zero-initialised**, so the adapted
       network equals the base network at initialisation;
    4. a per-channel scale ``alpha`` of shape ``(C_out,)``, initialised to ones.

    Where it goes (the paper's four schemes) is set by *what* you target and by ``insertion``:

    - a ``Conv{1,2,3}d`` or ``ConvTranspose{1,2,3}d`` target + ``"parallel"``: ``h = conv(x) + alpha * A(x)``; an
      ``nn.Linear`` target is a 1x1 conv over its features (``A`` runs on ``(..., C)`` viewed as ``(N, C, 1)``);
    - the same + ``"sequential"``: ``h = conv(x); h = h + alpha * A(h)``;
    - a block target (MONAI ``ResBlock``, ``ResidualUnit``, any module taking one tensor and containing convs) +
      ``"parallel"``: ``h = block(x) + alpha * A(x)``; the adapter follows the block's channel change and its
      down- or up-sampling by an integer factor (measured on the ``meta`` device), with the kernel of the block's
      first conv;
    - a block + ``"sequential"``: ``h = block(x); h = h + alpha * A(h)``.

    With several active adapters on one module every adapter reads the same tensor (the module's input, or for
    sequential ones the module's output) and their contributions are summed, so the result does not depend on the
    order in which they are activated.

    Args:
        target_modules (`Optional[Union[list[str], str]]`): module names (exact or suffix) or a regex to adapt,
            as in every peft config. :func:`monai_peft.resolve_targets` builds such lists from selectors.
        exclude_modules (`Optional[Union[list[str], str]]`): names or a regex to leave out.
        gamma (`int`): channel compression factor, ``h = max(1, ceil(C / gamma))``. Default 4.
        insertion (`str`): ``"parallel"`` (default) or ``"sequential"``.
        adapter_conv (`str`): ``"depthwise"`` (default, the paper's grouped down-projection) or ``"dense"`` (one
            group). ``"full"``, the name used before, is read as ``"dense"``.
        kernel_size (`Optional[int]`): kernel of the down-projection; ``None`` (default) copies the adapted conv's
            kernel (for a block: its first conv's kernel). An int uses that kernel with the padding that keeps the
            module's output size; an error says when no padding does.
        activation (`str`): one of ``leakyrelu`` (default; slope 0.01), ``relu``, ``gelu``, ``silu``, ``prelu``,
            ``identity``. Not ReLU by default: the up-projection starts at zero, so an adapter whose ReLU outputs
            are all zero on the data gets no gradient in either projection and never trains. That happens on a
            1-channel stem (one bottleneck channel, positive intensities: dead whenever its kernel sums negative,
            about half the time) and on narrow bottlenecks; leaky ReLU always passes a gradient. Measured on the
            real CT-to-MR task (``benchmarks/real_adaptation.py``, docs/core.md "Learning rates"): the same held-out
            Dice as ReLU at ``gamma=2``, better at ``gamma=4``.
        init_weights (`bool`): zero-initialise the up-projection (default ``True``, identity at init); ``False`` gives
            it PyTorch's default random weights and bias (for tests of the machinery only).
        modules_to_save (`Optional[list[str]]`): modules besides the adapters that train fully and are saved with the
            adapter (e.g. a new segmentation head, or the whole decoder: thesis Table 5.3 "encoder + full decoder").
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (exact or suffix) or a regex of the convs/blocks to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    gamma: int = field(default=4, metadata={"help": "Channel compression factor: h = max(1, ceil(C / gamma))."})
    insertion: str = field(default="parallel", metadata={"help": "'parallel' or 'sequential'."})
    adapter_conv: str = field(
        default="depthwise", metadata={"help": "'depthwise' (grouped, gcd(C, h) groups; the paper's) or 'dense'."}
    )
    kernel_size: Optional[int] = field(
        default=None, metadata={"help": "Down-projection kernel; None copies the adapted module's kernel."}
    )
    activation: str = field(default="leakyrelu", metadata={"help": f"One of {ACTIVATIONS}."})
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
        self.adapter_conv = _LEGACY_ADAPTER_CONVS.get(self.adapter_conv, self.adapter_conv)
        if self.adapter_conv not in ADAPTER_CONVS:
            raise ValueError(f"ConvAdapterConfig.adapter_conv must be one of {ADAPTER_CONVS}, got {self.adapter_conv!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ConvAdapterConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if int(self.gamma) < 1:
            raise ValueError(f"ConvAdapterConfig.gamma must be a positive integer, got {self.gamma!r}.")
        if self.kernel_size is not None and int(self.kernel_size) < 1:
            raise ValueError(f"ConvAdapterConfig.kernel_size must be positive or None, got {self.kernel_size!r}.")
