"""TotalSegmentator data for the thesis experiments: class groups, reader + label cache, splits, transforms,
and synthetic phantoms. One definition of each, imported by bundles, the nnU-Net converter and analyses."""

from __future__ import annotations

from monai_peft.data.class_maps import (
    CLASS_GROUPS,
    MR_ORGANS_29,
    ORGANS_17,
    VERTEBRAE_25,
    class_group,
    label_names,
    task_id_map,
)
from monai_peft.data.example import EXAMPLE_SCANS, ExampleScan, example_scan
from monai_peft.data.modality import dataset_modality, group_modality, resolve_modality
from monai_peft.data.phantoms import PHANTOM_ORGANS, make_phantom, write_phantom_dataset
from monai_peft.data.splits import case_id_of, meta_split, random_split, subset_split
from monai_peft.data.totalseg import (
    cached_label_map,
    image_file,
    import_multilabel_case,
    list_cases,
    merge_structures,
    read_meta,
    remap_label_map,
    totalseg_datalist,
    write_case,
)
from monai_peft.data.transforms import INTENSITY_FOR_MODALITY, preprocess_transforms, train_transforms, val_transforms

__all__ = [
    "CLASS_GROUPS",
    "EXAMPLE_SCANS",
    "INTENSITY_FOR_MODALITY",
    "ExampleScan",
    "example_scan",
    "group_modality",
    "MR_ORGANS_29",
    "ORGANS_17",
    "PHANTOM_ORGANS",
    "VERTEBRAE_25",
    "cached_label_map",
    "case_id_of",
    "class_group",
    "dataset_modality",
    "image_file",
    "import_multilabel_case",
    "label_names",
    "list_cases",
    "make_phantom",
    "merge_structures",
    "meta_split",
    "preprocess_transforms",
    "random_split",
    "read_meta",
    "remap_label_map",
    "resolve_modality",
    "subset_split",
    "task_id_map",
    "totalseg_datalist",
    "train_transforms",
    "val_transforms",
    "write_case",
    "write_phantom_dataset",
]
