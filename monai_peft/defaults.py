"""The default AdamW learning rate of each CNN fine-tuning method: the one table bundles and nnU-Net trainers read.

Adapters start as the identity (a zero up-projection, a zero LoRA ``B``, SSF's unit scale) and train a few percent
of the parameters; at full fine-tuning's learning rate they barely leave the pretrained network within an ordinary
schedule, and the method looks broken. So each method has its own rate, chosen by measurement on held-out data:

``benchmarks/real_adaptation.py`` pretrains nnU-Net's residual 3D U-Net (MONAI ``DynUNet``) on the organs of the
real example CT and adapts it to the real example MR (thesis 5.2.3.2 in miniature), with AdamW (weight decay 1e-5)
and cosine annealing (thesis 4.2.3), 300 steps per run. Every method runs at each rate of its grid; the grids,
the Dice of every grid point on two held-out slabs of the MR and the command are in ``docs/core.md`` ("Learning
rates") and ``benchmarks/results/real_adaptation.json`` (a test keeps this table and that file in step). The value below is
the rate with the best mean Dice over both held-out slabs (the file's ``default_lr``).

``bitfit``, ``norm`` and ``decoder`` are not in the benchmark (its convs have no bias and its InstanceNorms no affine
parameters, so BitFit and norm tuning would train nothing there): ``bitfit`` and ``norm`` take SSF's rate (per-channel
shifts and scales, as SSF trains), ``decoder`` full fine-tuning's (it trains whole layers).

The transformer methods (``vpt``, ``bottleneck``) have rates measured on the echo EF comparison instead
(:data:`monai_peft.echo.video.METHOD_DEFAULTS`, ``docs/echo.md``); :func:`default_learning_rate` refuses them.

The benchmark's schedule is short (a few hundred steps on one volume). Over schedules of thousands of steps (the
thesis's 1e-4, nnU-Net's 250 000 iterations) the best rates are likely lower for every method alike; what carries
over is the ratio between full fine-tuning and the adapters. Pass an explicit rate to change it.
"""

from __future__ import annotations

__all__ = ["DEFAULT_LEARNING_RATES", "default_learning_rate"]

# the default_lr of each method in benchmarks/results/real_adaptation.json; see the docstring for the other three
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "full": 3e-3,
    "decoder": 3e-3,
    "head": 1.0,  # linear probing: flat from 0.3 (validation Dice 0.100 at 0.3, 0.096 at 1)
    "convadapter": 1e-1,  # leaky ReLU (the default) with gamma=2; gamma=4 peaked at 1e-1 too, ReLU at 3e-2-1e-1
    "lora": 3e-2,
    "ssf": 3e-1,  # 3e-2-3e-1 within 0.03 of each other
    "bitfit": 3e-1,
    "norm": 3e-1,
}
# methods whose rates come from the transformer (echo EF) comparison, not from this table
_TRANSFORMER_METHODS = ("vpt", "bottleneck")


def default_learning_rate(method: str) -> float:
    """The AdamW learning rate to use for ``method`` unless the user sets one.

    Args:
        method: a CNN method of :func:`monai_peft.adapt`: ``full``, ``decoder``, ``head``, ``convadapter``,
            ``lora``, ``ssf``, ``bitfit`` or ``norm``.

    Raises:
        ValueError: ``method`` is not one of them (the message lists them, and for ``vpt`` / ``bottleneck`` names
            the table that has their rates).
    """
    if method in _TRANSFORMER_METHODS:
        raise ValueError(f"default_learning_rate: {method!r} is a transformer method; its learning rate is in "
                         f"monai_peft.echo.video.METHOD_DEFAULTS, not in {sorted(DEFAULT_LEARNING_RATES)}.")
    if method not in DEFAULT_LEARNING_RATES:
        raise ValueError(
            f"default_learning_rate: unknown method {method!r}; expected one of {sorted(DEFAULT_LEARNING_RATES)}."
        )
    return DEFAULT_LEARNING_RATES[method]
