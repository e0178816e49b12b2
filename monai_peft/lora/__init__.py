"""What monai-peft adds to peft's own LoRA for CNNs (thesis 001, 3.2.1 and 5.1.1, Tables 5.1-5.2; issue 12).

- :func:`lora_config`: a ``LoraConfig`` for selected convs, with ``r="dynamic"`` (``out_channels // 2`` per conv);
- :func:`init_lora_pca_`: ``A`` from the principal components of the pretrained filters (per group), ``B = 0``;
- :func:`use_fused_conv_lora` (``fused=True``): train each LoRA conv as one conv with the merged kernel.

LoRA merges into every conv peft wraps, 1x1(x1) included: the peft 0.21 bugs that broke this are patched in
:mod:`monai_peft._peft_compat` while the installed peft needs it.
"""

from monai_peft.lora.config import dynamic_rank, lora_config
from monai_peft.lora.fused import FUSED_LORA_CONV_LAYERS, FusedConvLoraMixin, use_fused_conv_lora
from monai_peft.lora.pca import init_lora_pca_, principal_filter_directions

__all__ = [
    "lora_config", "dynamic_rank", "init_lora_pca_", "principal_filter_directions", "use_fused_conv_lora",
    "FusedConvLoraMixin", "FUSED_LORA_CONV_LAYERS",
]
