"""The default learning rate of each fine-tuning method: one table that bundles, nnU-Net trainers and the demo read.

Adapters start as the identity (a zero up-projection, a zero LoRA ``B``, SSF's unit scale) and train a few percent
of the parameters; at full fine-tuning's learning rate they barely leave the pretrained network within an ordinary
schedule, and the method looks broken. So each method has its own rate, chosen by measurement on held-out data:

``benchmarks/real_adaptation.py`` pretrains nnU-Net's residual 3D U-Net (MONAI ``DynUNet``) on the organs of the
real example CT and adapts it to the real example MR (thesis 5.2.3.2 in miniature), with AdamW (weight decay 1e-5)
and cosine annealing (thesis 4.2.3). Every method runs at each rate of a small grid; the rate with the best mean
Dice on a validation slab of the MR wins, and its Dice on a disjoint test slab is reported. The winners are the
values below; the grids, their results and the command are in ``benchmarks/README.md`` and
``benchmarks/results/real_adaptation.json`` (a test keeps the two in step).

``bitfit``, ``norm`` and ``decoder`` are not in the benchmark (the network's convs have no bias and its
InstanceNorms no affine parameters, so BitFit and norm tuning would train nothing there): ``bitfit`` takes SSF's
rate (it is SSF's shift alone), ``norm`` SSF's (per-channel affine parameters too), ``decoder`` full fine-tuning's
(it trains whole layers).

The benchmark's schedule is short (a few hundred steps on one volume). For schedules of thousands of steps the
best rates are likely somewhat lower for every method alike; what carries over is the gap between full
fine-tuning and the adapters.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LEARNING_RATES", "default_learning_rate"]

# winners of benchmarks/real_adaptation.py's grids (benchmarks/results/real_adaptation.json); see the docstring
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "full": 1e-2,
    "decoder": 1e-2,
    "head": 3e-2,
    "convadapter": 3e-2,
    "lora": 1e-2,
    "ssf": 1e-1,
    "bitfit": 1e-1,
    "norm": 1e-1,
}


def default_learning_rate(method: str) -> float:
    """The AdamW learning rate to use for ``method`` unless the user sets one.

    Args:
        method: a method of :func:`monai_peft.adapt`: ``full``, ``decoder``, ``head``, ``convadapter``, ``lora``,
            ``ssf``, ``bitfit`` or ``norm``.

    Raises:
        ValueError: ``method`` is not one of them (the message lists them).
    """
    if method not in DEFAULT_LEARNING_RATES:
        raise ValueError(
            f"default_learning_rate: unknown method {method!r}; expected one of {sorted(DEFAULT_LEARNING_RATES)}."
        )
    return DEFAULT_LEARNING_RATES[method]
