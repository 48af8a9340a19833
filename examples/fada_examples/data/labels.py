"""Label tables: Cityscapes label IDs -> train IDs, class names, colour palettes.

The Cityscapes table, names and colours are read from ``cityscapesscripts.helpers.labels`` (the
data set's own package), not copied by hand. The 16- and 13-class protocols (SYNTHIA->Cityscapes,
Cityscapes->Cross-City) are subsets of the 19 Cityscapes training classes, selected by name, so
their trainIds follow the Cityscapes order with the dropped classes removed.

Every mapping is a 256-entry ``np.uint8`` look-up table (LUT): ``lut[label_id] = train_id`` and
255 (ignore) everywhere else. :func:`encode_labels` applies a LUT and sends IDs outside it to 255.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS
from PIL import Image

__all__ = [
    "IGNORE_INDEX",
    "CITYSCAPES_ID_TO_TRAINID",
    "CITYSCAPES_ID_TO_TRAINID_16",
    "CITYSCAPES_ID_TO_TRAINID_13",
    "CLASS_NAMES_19",
    "CLASS_NAMES_16",
    "CLASS_NAMES_13",
    "PALETTE_19",
    "PALETTE_16",
    "PALETTE_13",
    "SYNTHIA_ID_NAMES",
    "SYNTHIA_ID_TO_TRAINID_16",
    "SYNTHIA_ID_TO_TRAINID_13",
    "CROSSCITY_ID_TO_TRAINID",
    "CROSSCITY_CITIES",
    "lut_from_dict",
    "lut_to_dict",
    "cityscapes_lut",
    "synthia_lut",
    "class_names",
    "palette",
    "encode_labels",
    "colorize",
]

IGNORE_INDEX = 255


def lut_from_dict(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A ``size``-entry uint8 LUT with ``lut[k] = v`` for each item and 255 elsewhere."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in mapping.items():
        if not 0 <= label_id < size:
            raise ValueError(f"label id {label_id} is outside the LUT range [0, {size})")
        lut[label_id] = train_id
    return lut


def lut_to_dict(lut: np.ndarray) -> dict[int, int]:
    """The non-ignore entries of a LUT as ``{label_id: train_id}``."""
    return {int(i): int(t) for i, t in enumerate(lut) if t != IGNORE_INDEX}


# --- Cityscapes, 19 classes (GTA5 and Cityscapes use the same label IDs) -------------------------
_TRAIN_LABELS = sorted(
    (lab for lab in _CITYSCAPES_LABELS if lab.id >= 0 and 0 <= lab.trainId < IGNORE_INDEX),
    key=lambda lab: lab.trainId,
)
CLASS_NAMES_19: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)
PALETTE_19: np.ndarray = np.array([lab.color for lab in _TRAIN_LABELS], dtype=np.uint8)
CITYSCAPES_ID_TO_TRAINID: np.ndarray = lut_from_dict({lab.id: lab.trainId for lab in _TRAIN_LABELS})
_NAME_TO_ID = {lab.name: lab.id for lab in _TRAIN_LABELS}

# --- 16 / 13-class protocols (subsets of the 19, by name, in Cityscapes order) -------------------
_DROPPED_16 = ("terrain", "truck", "train")
_DROPPED_13 = _DROPPED_16 + ("wall", "fence", "pole")
CLASS_NAMES_16: tuple[str, ...] = tuple(n for n in CLASS_NAMES_19 if n not in _DROPPED_16)
CLASS_NAMES_13: tuple[str, ...] = tuple(n for n in CLASS_NAMES_19 if n not in _DROPPED_13)
PALETTE_16: np.ndarray = PALETTE_19[[CLASS_NAMES_19.index(n) for n in CLASS_NAMES_16]]
PALETTE_13: np.ndarray = PALETTE_19[[CLASS_NAMES_19.index(n) for n in CLASS_NAMES_13]]


def _subset_lut(names: Sequence[str], name_to_id: Mapping[str, int]) -> np.ndarray:
    return lut_from_dict({name_to_id[n]: t for t, n in enumerate(names) if n in name_to_id})


CITYSCAPES_ID_TO_TRAINID_16: np.ndarray = _subset_lut(CLASS_NAMES_16, _NAME_TO_ID)
CITYSCAPES_ID_TO_TRAINID_13: np.ndarray = _subset_lut(CLASS_NAMES_13, _NAME_TO_ID)

# --- SYNTHIA RAND_CITYSCAPES ----------------------------------------------------------------------
# Class IDs stored in the first channel of GT/LABELS/*.png (SYNTHIA's README), named here with the
# Cityscapes name of the class they map to; IDs absent here (void, parking-slot, road-work, terrain,
# truck, train, lanemarking) are ignored, as in the official FADA loader.
SYNTHIA_ID_NAMES: dict[int, str] = {
    1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation", 7: "pole",
    8: "car", 9: "traffic sign", 10: "person", 11: "bicycle", 12: "motorcycle",
    15: "traffic light", 17: "rider", 19: "bus", 21: "wall",
}
_SYNTHIA_NAME_TO_ID = {name: i for i, name in SYNTHIA_ID_NAMES.items()}
SYNTHIA_ID_TO_TRAINID_16: np.ndarray = _subset_lut(CLASS_NAMES_16, _SYNTHIA_NAME_TO_ID)
SYNTHIA_ID_TO_TRAINID_13: np.ndarray = _subset_lut(CLASS_NAMES_13, _SYNTHIA_NAME_TO_ID)

# --- NTHU Cross-City ------------------------------------------------------------------------------
# Its evaluation labels (Labels/Test/*_eval.png) use Cityscapes label IDs; 13 classes are evaluated.
CROSSCITY_CITIES: tuple[str, ...] = ("Rome", "Rio", "Tokyo", "Taipei")
CROSSCITY_ID_TO_TRAINID: np.ndarray = CITYSCAPES_ID_TO_TRAINID_13


def _for_protocol(tables: dict, num_classes: int, what: str = ""):
    """The table of the ``num_classes``-class protocol; ValueError listing the protocols there are."""
    if num_classes not in tables:
        *others, last = [str(k) for k in tables]
        raise ValueError(f"{what}num_classes must be {', '.join(others)} or {last}, got {num_classes}")
    return tables[num_classes]


def cityscapes_lut(num_classes: int = 19) -> np.ndarray:
    """Cityscapes/GTA5 label-ID LUT for the 19-, 16- or 13-class protocol."""
    return _for_protocol({19: CITYSCAPES_ID_TO_TRAINID, 16: CITYSCAPES_ID_TO_TRAINID_16,
                          13: CITYSCAPES_ID_TO_TRAINID_13}, num_classes)


def synthia_lut(num_classes: int = 16) -> np.ndarray:
    """SYNTHIA class-ID LUT for the 16- or 13-class protocol."""
    return _for_protocol({16: SYNTHIA_ID_TO_TRAINID_16, 13: SYNTHIA_ID_TO_TRAINID_13}, num_classes, "SYNTHIA ")


def class_names(num_classes: int = 19) -> tuple[str, ...]:
    """Names of the train IDs for the 19-, 16- or 13-class protocol."""
    return _for_protocol({19: CLASS_NAMES_19, 16: CLASS_NAMES_16, 13: CLASS_NAMES_13}, num_classes)


def palette(num_classes: int = 19) -> np.ndarray:
    """(num_classes, 3) uint8 colours of the train IDs (Cityscapes colours)."""
    return _for_protocol({19: PALETTE_19, 16: PALETTE_16, 13: PALETTE_13}, num_classes)


def encode_labels(label_ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map label IDs to train IDs with ``lut``; IDs outside the LUT (negative or too large) -> 255.

    Args:
        label_ids: integer array of any shape (uint8, uint16, int32, ...).
        lut: 1-D uint8 look-up table (for example :data:`CITYSCAPES_ID_TO_TRAINID`).

    Returns:
        uint8 array of the same shape.
    """
    ids = np.asarray(label_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"label_ids must be an integer array, got dtype {ids.dtype}")
    lut = np.asarray(lut, dtype=np.uint8)
    if ids.dtype == np.uint8 and lut.shape[0] >= 256:
        return lut[ids]
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (ids >= 0) & (ids < lut.shape[0])
    out[valid] = lut[ids[valid]]
    return out


def colorize(train_ids, colors: np.ndarray | None = None) -> Image.Image:
    """RGB image of a train-ID map: class ``c`` gets ``colors[c]``, everything else black.

    Args:
        train_ids: (H, W) integer array or tensor of train IDs (255 = ignore).
        colors: (K, 3) uint8 palette; default :data:`PALETTE_19`.
    """
    if hasattr(train_ids, "detach"):
        train_ids = train_ids.detach().cpu().numpy()
    ids = np.asarray(train_ids)
    if ids.ndim != 2:
        raise ValueError(f"train_ids must be 2-D (H, W), got shape {ids.shape}")
    colors = PALETTE_19 if colors is None else np.asarray(colors, dtype=np.uint8)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(colors)] = colors
    clipped = np.where((ids >= 0) & (ids < len(colors)), ids, 255).astype(np.uint8)
    return Image.fromarray(table[clipped], mode="RGB")
