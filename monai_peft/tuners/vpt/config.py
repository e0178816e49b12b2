"""Configuration of Visual Prompt Tuning (Jia et al. 2022; lecture 003, "Visual Prompt Tuning")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

VARIANTS = ("shallow", "deep")


@dataclass
class VPTConfig(PeftConfig):
    """Configuration of a :class:`~monai_peft.tuners.vpt.VPTModel`.

    Visual prompts are ``num_tokens`` learnable tokens of the token width ``D`` that the transformer attends to:

    - ``"deep"``: new prompts enter every targeted block and are dropped after it (Jia et al., VPT-deep);
    - ``"shallow"``: prompts enter the first targeted block of each block list (ViT: the first block) and travel with
      the tokens through the following blocks; they are dropped after the last one (VPT-shallow).

    Blocks that take a token sequence (``transformers`` ViT / VideoMAE, MONAI ``TransformerBlock``) get the prompts
    right after the leading class token(s), without position embedding. Segformer's blocks reshape the tokens to a
    spatial map (Mix-FFN, spatial-reduction attention), so there the prompts join the key/value sequence of the
    block's attention: the same effect on the image tokens as VPT-deep's prompts (which only reach them through
    attention); ``"shallow"`` means the first block of each stage only. See docs/transformer_peft.md.

    No prompt is the identity: at init the adapted model differs from the base model (docs: "Initial behaviour").

    Args:
        target_modules (`Optional[Union[list[str], str]]`): module names (exact or suffix) or a regex. ``None``
            (default) takes every block of a known family (Segformer: each block's ``attention``). Explicit targets
            must be such blocks; any other module is an error naming it.
        exclude_modules (`Optional[Union[list[str], str]]`): names or a regex to leave out.
        num_tokens (`int`): prompts per prompted block. Default 10 (Jia et al.'s common choice).
        variant (`str`): ``"deep"`` (default; better than shallow in Jia et al., Table 1) or ``"shallow"``.
        num_prefix_tokens (`Optional[int]`): tokens kept before the prompts (class tokens). ``None`` (default): 1 if
            the model has a parameter named ``cls_token`` (``transformers`` ViT, MONAI ViT with
            ``classification=True``), else 0 (VideoMAE).
        prompt_dropout (`float`): dropout on the prompts while training. Default 0.0.
        init_weights (`Union[bool, str]`): ``True`` (default): uniform in ``+-sqrt(3 / D)`` (Xavier for a
            ``D x D`` map, Jia et al.'s init for ViT-B/16); ``"zeros"``: zero prompts; ``False``: standard normal
            (tests).
        modules_to_save (`Optional[list[str]]`): modules trained fully and saved with the adapter (e.g. a new head;
            Jia et al. train the prompts and the head).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Transformer blocks to prompt; None: every block of a known family."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude."}
    )
    num_tokens: int = field(default=10, metadata={"help": "Prompt tokens per prompted block."})
    variant: str = field(default="deep", metadata={"help": "'deep' (every block) or 'shallow' (first block)."})
    num_prefix_tokens: Optional[int] = field(
        default=None, metadata={"help": "Class tokens kept before the prompts; None: 1 if the model has a cls_token."}
    )
    prompt_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompts while training."})
    init_weights: Union[bool, str] = field(
        default=True, metadata={"help": "True: uniform +-sqrt(3/D); 'zeros': zero prompts; False: normal (tests)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a new head)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.VPT
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.variant not in VARIANTS:
            raise ValueError(f"VPTConfig.variant must be one of {VARIANTS}, got {self.variant!r}.")
        if isinstance(self.num_tokens, bool) or int(self.num_tokens) != self.num_tokens or self.num_tokens < 1:
            raise ValueError(f"VPTConfig.num_tokens must be a positive integer, got {self.num_tokens!r}.")
        if self.num_prefix_tokens is not None and (int(self.num_prefix_tokens) != self.num_prefix_tokens
                                                   or self.num_prefix_tokens < 0):
            raise ValueError(f"VPTConfig.num_prefix_tokens must be None or an integer >= 0, "
                             f"got {self.num_prefix_tokens!r}.")
        if not 0.0 <= float(self.prompt_dropout) < 1.0:
            raise ValueError(f"VPTConfig.prompt_dropout must be in [0, 1), got {self.prompt_dropout!r}.")
        if not (self.init_weights is True or self.init_weights is False or self.init_weights == "zeros"):
            raise ValueError(f"VPTConfig.init_weights must be True, False or 'zeros', got {self.init_weights!r}.")
