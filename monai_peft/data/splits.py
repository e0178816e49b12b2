"""Dataset splits of the thesis (4.2.2.1, 4.2.5.2): random 70/20/10, meta.csv's own split, 10%/50% subsets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["random_split", "meta_split", "subset_split", "case_id_of"]

SPLIT_NAMES = ("train", "val", "test")


def case_id_of(item: Any) -> str:
    """The case id of a datalist entry (``item["case_id"]``, else the image's case folder) or of a string."""
    if isinstance(item, Mapping):
        if "case_id" in item:
            return str(item["case_id"])
        if "image" in item:
            return Path(str(item["image"])).parent.name
        raise KeyError(f"datalist entry has neither 'case_id' nor 'image': keys {sorted(item)}")
    return str(item)


def random_split(items: Sequence[Any], fractions: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0) -> dict[str, list]:
    """Shuffle with a seed and cut into train/val/test (thesis 4.2.2.1: 1228 -> 859 / 245 / 124).

    Train and val sizes are rounded down; the test set takes the rest. With 3 or more items every split with a
    non-zero fraction gets at least one (a 4-case phantom folder splits 2 / 1 / 1), which leaves the thesis's
    sizes unchanged.

    Args:
        items: datalist entries or case ids.
        fractions: ``(train, val, test)`` fractions summing to 1.
        seed: numpy random seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}.")
    order = np.random.default_rng(seed).permutation(len(items))
    n = len(items)
    n_train = int(np.floor(fractions[0] * n + 1e-9))
    n_val = int(np.floor(fractions[1] * n + 1e-9))
    if n >= 3:  # tiny folders: one case for each split that asks for any
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n - n_train - n_val, 1 if fractions[2] > 0 else 0)
        n_train = max(min(n_train, n - n_val - n_test), 1 if fractions[0] > 0 else 0)
    picked = [items[i] for i in order]
    return {"train": picked[:n_train], "val": picked[n_train : n_train + n_val], "test": picked[n_train + n_val :]}


def meta_split(items: Sequence[Any], meta: Sequence[Mapping[str, str]] | str | Path) -> dict[str, list]:
    """Split by the ``split`` column of TotalSegmentator's ``meta.csv``.

    Args:
        items: datalist entries or case ids.
        meta: rows from :func:`~monai_peft.data.totalseg.read_meta`, or the dataset root holding ``meta.csv``.

    Raises:
        KeyError: ``meta.csv`` has no ``split`` column or lacks an item's case id (named).
        ValueError: a split value other than train/val/test.
    """
    if isinstance(meta, (str, Path)):
        from monai_peft.data.totalseg import read_meta

        meta = read_meta(meta)
    table = {row["image_id"]: row.get("split") for row in meta}
    if meta and "split" not in meta[0]:
        raise KeyError(f"meta.csv has no 'split' column (columns: {sorted(meta[0])}).")
    out: dict[str, list] = {k: [] for k in SPLIT_NAMES}
    for item in items:
        cid = case_id_of(item)
        if cid not in table:
            raise KeyError(f"meta.csv has no row for case {cid!r}.")
        split = table[cid]
        if split not in out:
            raise ValueError(f"meta.csv: case {cid!r} has split {split!r}, expected one of {SPLIT_NAMES}.")
        out[split].append(item)
    return out


def subset_split(
    splits: Mapping[str, Sequence[Any]], fraction: float, seed: int = 0, train_fraction: float = 0.8
) -> dict[str, list]:
    """The thesis's reduced-data runs (4.2.5.2): a ``fraction`` of train+val, re-split 80/20, same test set.

    The kept count is ``round(fraction * (n_train + n_val))`` and the training share of it is rounded down, so
    the thesis's 859 + 245 cases give 88 / 22 (10 %) and 441 / 111 (50 %), the sizes of Table 5.6.

    Args:
        splits: ``{"train", "val", "test"}`` from :func:`random_split` or :func:`meta_split`.
        fraction: share of the pooled train+val cases kept, e.g. 0.1 or 0.5 (1.0 re-splits everything).
        seed: numpy random seed for the subset and the re-split.
        train_fraction: train share of the kept cases (default 0.8).

    Returns:
        ``{"train", "val", "test"}``; ``test`` is ``splits["test"]`` unchanged.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    missing = [k for k in SPLIT_NAMES if k not in splits]
    if missing:
        raise KeyError(f"splits lacks {missing}.")
    pool = list(splits["train"]) + list(splits["val"])
    rng = np.random.default_rng(seed)
    n_keep = max(2, int(round(fraction * len(pool))))
    kept = [pool[i] for i in rng.permutation(len(pool))[:n_keep]]
    # rounded down like random_split's train and val (552 kept -> 441 / 111, thesis Table 5.6)
    n_train = min(max(1, int(np.floor(train_fraction * len(kept) + 1e-9))), len(kept) - 1)
    return {"train": kept[:n_train], "val": kept[n_train:], "test": list(splits["test"])}
