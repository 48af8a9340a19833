"""Data: label tables, paired transforms, data sets in their on-disk layouts, class-balanced
sampling and the synthetic default data."""

from .datasets import (DATASET_NAMES, CityscapesDataset, CrossCityDataset, GTA5Dataset,
                       PseudoLabelDataset, SegmentationDataset, SynthiaDataset, build_dataset,
                       official_pseudo_label_path, pseudo_label_path, safe_name)
from .io import ImageReadError
from .labels import (CITYSCAPES_ID_TO_TRAINID, CLASS_NAMES_19, IGNORE_INDEX, PALETTE_19,
                     class_names, colorize, encode_labels, palette)
from .sampling import (ClassBalancedSampler, class_balanced_indices, compute_class_lists,
                       load_class_lists, save_class_lists)
from .synthetic import make_synthetic_data
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = [
    "DATASET_NAMES", "CityscapesDataset", "CrossCityDataset", "GTA5Dataset", "PseudoLabelDataset",
    "SegmentationDataset", "SynthiaDataset", "build_dataset", "official_pseudo_label_path",
    "pseudo_label_path", "safe_name", "ImageReadError", "CITYSCAPES_ID_TO_TRAINID", "CLASS_NAMES_19", "IGNORE_INDEX", "PALETTE_19",
    "class_names", "colorize", "encode_labels", "palette", "ClassBalancedSampler",
    "class_balanced_indices", "compute_class_lists", "load_class_lists", "save_class_lists",
    "make_synthetic_data", "IMAGENET_MEAN", "IMAGENET_STD", "build_transforms",
]
