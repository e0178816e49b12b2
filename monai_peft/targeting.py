"""Composable module selectors: ``Region("encoder") & ModuleType(nn.Conv3d)`` instead of 40 hand-written names.

A selector decides, for each ``(name, module)`` of ``model.named_modules()``, whether it is selected;
:func:`resolve_targets` turns a selector into the list of module names that peft's ``target_modules`` takes.
Selectors combine with ``&`` (both), ``|`` (either) and ``~`` (not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Union

from torch import nn

from monai_peft.regions import module_in_region, regions_of
from monai_peft.tuners._common import exact_names_regex
from monai_peft.tuners.module_types import ANY_CONV_TYPES, CONV_TYPES, NORM_TYPES
from monai_peft.tuners.wrappers import WRAPPED_PARTS, is_wrapper_internal, user_network

__all__ = [
    "Selector", "ModuleType", "NameRegex", "Region", "KernelSize", "Names", "resolve_targets", "as_selector",
    "CONV_TYPES", "NORM_TYPES", "SPATIAL_CONV", "SPATIAL_OR_TRANSPOSED_CONV", "exact_names_regex",
]


class Selector:
    """Base class: subclasses implement :meth:`matches`."""

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        raise TypeError(f"{type(self).__name__} must implement matches()")

    def __and__(self, other: Selector) -> Selector:
        return _Combined("&", self, as_selector(other))

    def __or__(self, other: Selector) -> Selector:
        return _Combined("|", self, as_selector(other))

    def __invert__(self) -> Selector:
        return _Not(self)


class _Combined(Selector):
    def __init__(self, op: str, left: Selector, right: Selector) -> None:
        self.op, self.left, self.right = op, left, right

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        if self.op == "&":
            return self.left.matches(model, name, module) and self.right.matches(model, name, module)
        return self.left.matches(model, name, module) or self.right.matches(model, name, module)

    def __repr__(self) -> str:
        return f"({self.left!r} {self.op} {self.right!r})"


class _Not(Selector):
    def __init__(self, inner: Selector) -> None:
        self.inner = inner

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        return not self.inner.matches(model, name, module)

    def __repr__(self) -> str:
        return f"~{self.inner!r}"


class ModuleType(Selector):
    """Modules that are instances of any of ``types`` (e.g. ``ModuleType(nn.Conv3d)``, ``ModuleType(ResBlock)``)."""

    def __init__(self, *types: type[nn.Module]) -> None:
        if not types or not all(isinstance(t, type) for t in types):
            raise TypeError(f"ModuleType takes one or more classes, got {types!r}.")
        self.types = types

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    def __repr__(self) -> str:
        return f"ModuleType({', '.join(t.__name__ for t in self.types)})"


class NameRegex(Selector):
    """Modules whose full name matches ``pattern`` (``re.fullmatch``), e.g. ``NameRegex(r"up_layers\\.\\d+\\.\\d+")``."""

    def __init__(self, pattern: str) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"NameRegex: invalid regex {pattern!r}: {e}") from e

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        return self.regex.fullmatch(name) is not None

    def __repr__(self) -> str:
        return f"NameRegex({self.regex.pattern!r})"


class Names(Selector):
    """Exactly these module names (an error names any that the model lacks)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"Names({list(self.names)!r})"


class Region(Selector):
    """Modules inside a named region of the architecture (see :mod:`monai_peft.regions`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        return bool(name) and module_in_region(model, name, self.name)

    def __repr__(self) -> str:
        return f"Region({self.name!r})"


class KernelSize(Selector):
    """Convolutions (transposed ones too) whose largest kernel extent is at least ``min_size`` (``KernelSize(3)``
    skips 1x1x1 convs)."""

    def __init__(self, min_size: int = 2) -> None:
        self.min_size = int(min_size)

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        ks = getattr(module, "kernel_size", None)
        if ks is None or not isinstance(module, ANY_CONV_TYPES):
            return False
        ks = (ks,) if isinstance(ks, int) else tuple(ks)
        return max(ks) >= self.min_size

    def __repr__(self) -> str:
        return f"KernelSize({self.min_size})"


SelectorLike = Union[Selector, str, Sequence[str]]


def as_selector(target: SelectorLike) -> Selector:
    """``Selector`` as is; a string is a region name when the string names no module path (no dot, not a regex),
    else a regex; a list of strings is exact module names."""
    if isinstance(target, Selector):
        return target
    if isinstance(target, str):
        return _RegionOrRegex(target)
    if isinstance(target, (list, tuple, set, frozenset)):
        items = list(target)
        if all(isinstance(t, Selector) for t in items) and items:
            sel = items[0]
            for t in items[1:]:
                sel = sel | t
            return sel
        if all(isinstance(t, str) for t in items):
            return Names(items)
    raise TypeError(f"cannot interpret {target!r} as a module selector (Selector, region name, regex or list of names).")


class _RegionOrRegex(Selector):
    def __init__(self, text: str) -> None:
        self.text = text
        self.regex = NameRegex(text)

    def matches(self, model: nn.Module, name: str, module: nn.Module) -> bool:
        if self.text in regions_of(model):
            return bool(name) and module_in_region(model, name, self.text)
        return self.regex.matches(model, name, module)

    def __repr__(self) -> str:
        return repr(self.text)


#: spatial (k > 1) convs, not transposed: what every method can wrap (peft's LoRA has no ConvTranspose)
SPATIAL_CONV: Selector = ModuleType(*CONV_TYPES) & KernelSize(2)
#: spatial convs and transposed convs (up-sampling layers): ConvAdapter's per-conv placement
SPATIAL_OR_TRANSPOSED_CONV: Selector = ModuleType(*ANY_CONV_TYPES) & KernelSize(2)


def logical_named_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``named_modules()`` of the network as the user wrote it, also after peft has wrapped parts of it.

    Returns ``{logical name: (real name, original module)}``: a tuner layer stands for its base layer under its own
    name, ``base_layer``/``original_module`` segments are dropped from names, and adapter internals (LoRA matrices,
    trained copies, ...) are left out. So adding a second adapter to a ``PeftModel`` selects the same modules as the
    first one did, and the real names are what peft's ``target_modules`` must match.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    out: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        parts = name.split(".") if name else []
        if is_wrapper_internal(name):
            continue
        if parts and parts[-1] in WRAPPED_PARTS:
            continue  # represented by the wrapper that holds it
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif isinstance(module, AuxiliaryTrainingWrapper):
            module = getattr(module, "original_module", module)
        logical = ".".join(p for p in parts if p not in WRAPPED_PARTS)
        out.setdefault(logical, (name, module))
    return out


def resolve_targets(model: nn.Module, target: SelectorLike, *, outermost: bool = False) -> list[str]:
    """Module names of ``model`` selected by ``target``, in ``named_modules()`` order.

    Args:
        model: the network (a ``PeftModel`` is unwrapped to the user's network).
        target: a :class:`Selector`, a region name, a regex, or a list of exact module names.
        outermost: drop names nested inside another selected name (for whole-module methods such as
            "train this region fully").

    Raises:
        ValueError: nothing matched (the message shows the selector, the model class and its regions), or an exact
            name in a list does not exist in the model.
    """
    model = user_network(model)
    selector = as_selector(target)
    logical = logical_named_modules(model)  # logical name -> (real name, module as the user wrote it)
    modules = {n: m for n, (_, m) in logical.items()}
    if isinstance(selector, Names):
        missing = [n for n in selector.names if n not in modules]
        if missing:
            raise ValueError(f"module(s) {missing} do not exist in {type(model).__name__}.")
    names = [n for n, m in modules.items() if n and selector.matches(model, n, m)]
    names = [logical[n][0] for n in names]
    if outermost:
        names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if not names:
        raise ValueError(
            f"target {selector!r} matched no module of {type(model).__name__} "
            f"(regions declared: {sorted(regions_of(model)) or 'none'})."
        )
    return names
