"""peft method folders of monai-peft (ConvAdapter, SSF), laid out like ``peft/tuners/<method>/``."""
