"""MONAI workflows for PEFT models: trainer/evaluator factories, test-set evaluation, run records, export.

Names are resolved lazily (PEP 562) because the handlers import :mod:`monai_peft.workflows.records`
while the engine factories import the handlers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_evaluator": "engines",
    "build_inferer": "engines",
    "build_loss": "engines",
    "build_lr_scheduler": "engines",
    "build_optimizer": "engines",
    "build_post_transforms": "engines",
    "build_test_evaluator": "engines",
    "build_trainer": "engines",
    "trainable_parameters": "engines",
    "atomic_write_json": "records",
    "read_run_record": "records",
    "update_run_record": "records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
