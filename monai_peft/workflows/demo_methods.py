"""The demo's methods and their learning rates, in a module without torch so that ``monai-peft demo --help`` lists
them at once."""

from __future__ import annotations

from typing import Any

__all__ = ["DEMO_METHODS", "PRETRAIN_LR"]

# method -> adapt() options and AdamW learning rate. PEFT methods also train the new head (thesis 4.2.5).
# Learning rates: the best validation Dice of a grid per method (benchmarks/demo_learning_rates.py; the grid and its
# figures are in docs/monai_workflows_and_bundles.md). Adapters start at the identity and take larger steps than
# the weights full fine-tuning moves: full fine-tuning peaks at 1e-2, the adapters at 3e-2 to 1e-1.
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "full": {"options": {}, "lr": 1e-2},
    "convadapter": {"options": {"train_fully": "head"}, "lr": 3e-2},
    "lora": {"options": {"train_fully": "head", "r": 4}, "lr": 3e-2},
    "ssf": {"options": {"train_fully": "head"}, "lr": 1e-1},
}
# the foundation model's pretraining from scratch: 5e-3 beat 3e-3 and 1e-2 over 200 steps (all organs learnt)
PRETRAIN_LR = 5e-3
