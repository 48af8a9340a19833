"""Segmentation data sets in their real on-disk layouts.

Every data set returns ``(image, label, name)``: ``image`` a float tensor (3, H, W) normalised by
its transform (ImageNet mean/std by default), ``label`` an int64 tensor (H, W) of train IDs with
255 = ignore, ``name`` a relative path that is unique within the data set (see
:func:`safe_name` for turning it into a file name).

Layouts (``root`` is the folder named in each class):

* GTA5: ``images/00001.png``, ``labels/00001.png`` (palette PNG, index = Cityscapes label ID).
* Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``.
* SYNTHIA RAND_CITYSCAPES: ``RAND_CITYSCAPES/RGB/0000000.png`` and
  ``RAND_CITYSCAPES/GT/LABELS/0000000.png`` (16-bit PNG, class ID in the first channel).
* NTHU Cross-City (Chen et al., ICCV 2017, ``NTHU_Datasets``): ``<City>/Images/{Train,Test}/<id>.jpg``
  (or ``.png``) and ``<City>/Labels/Test/<id>_eval.png`` for City in Rome, Rio, Tokyo, Taipei;
  ids such as ``pano_00002_2_180``. Evaluation labels hold Cityscapes label IDs, of which the
  13 classes road, sidewalk, building, traffic light, traffic sign, vegetation, sky, person,
  rider, car, bus, motorcycle, bicycle are scored; the training images have no labels (the
  loader returns all-255). Checked against the data set's description (13 shared classes, 100
  labelled test images per city) and the public loaders that read the archive
  (ZJULearning/MaxSquareLoss ``datasets/crosscity_Dataset.py`` with its id lists
  ``NTHU_list/<City>/List/{train,test}.txt``: same folders, ``.jpg`` then ``.png``,
  ``<id>_eval.png``, label IDs mapped to the same 13 train IDs).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from . import labels as L
from .io import check_dir, check_file, read_image, read_label_ids, read_label_ids_16bit
from .transforms import build_transforms

__all__ = [
    "Sample", "SegmentationDataset", "GTA5Dataset", "CityscapesDataset", "SynthiaDataset",
    "CrossCityDataset", "PseudoLabelDataset", "build_dataset", "safe_name", "pseudo_label_path",
    "official_pseudo_label_path", "PSEUDO_LABEL_LAYOUTS",
    "read_list", "DATASET_NAMES",
]

DATASET_NAMES = ("gta5", "cityscapes", "synthia", "crosscity", "pseudo")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class Sample:
    """One entry: image path, label path (None: unlabelled) and the sample's name."""

    __slots__ = ("image", "label", "name")

    def __init__(self, image: str, label: Optional[str], name: str):
        self.image, self.label, self.name = image, label, name

    def __repr__(self) -> str:
        return f"Sample(image={self.image!r}, label={self.label!r}, name={self.name!r})"


def safe_name(name: str) -> str:
    """A sample name as a flat file name: '/' replaced by '__'."""
    return name.replace("\\", "/").replace("/", "__")


def pseudo_label_path(label_dir: str, name: str) -> str:
    """Where the pseudo label of sample ``name`` lives: ``<label_dir>/<safe_name stem>.png``.

    Stage 3's pseudo labelling must write its train-ID PNGs to exactly this path.
    """
    return os.path.join(label_dir, os.path.splitext(safe_name(name))[0] + ".png")


def official_pseudo_label_path(label_dir: str, name: str) -> str:
    """Where the official ``test.py --saveres`` puts the prediction of sample ``name``:
    ``<label_dir>/<file name of the sample>`` (``aachen_000000_000019_leftImg8bit.png``, one folder,
    a palette PNG whose indices are the train IDs)."""
    return os.path.join(label_dir, os.path.basename(name.replace("\\", "/")))


PSEUDO_LABEL_LAYOUTS = {"fada_core": pseudo_label_path, "official": official_pseudo_label_path}


def read_list(list_path: str) -> list[str]:
    """Non-empty, stripped lines of a list file (FileNotFoundError naming it if missing)."""
    check_file(list_path, "list file")
    with open(list_path, "r", encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _list_images(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTS))


class SegmentationDataset(Dataset):
    """Base class: a list of :class:`Sample`, a label LUT and a paired transform.

    Args:
        samples: the entries.
        num_classes: number of train IDs.
        lut: uint8 label-ID -> train-ID look-up table (255 = ignore).
        transform: paired transform ``(PIL image, PIL label) -> (tensor, tensor)``; default
            ToTensor + ImageNet Normalize.
        indices: optional index list into ``samples`` (repetition / class-balanced order); the
            data set's length is then ``len(indices)``.
    """

    def __init__(self, samples: Sequence[Sample], num_classes: int, lut: np.ndarray,
                 transform: Optional[Callable] = None, indices: Optional[Sequence[int]] = None):
        self.samples = list(samples)
        self.num_classes = int(num_classes)
        self.lut = lut
        self.transform = transform if transform is not None else build_transforms(train=False)
        self.indices = list(range(len(self.samples))) if indices is None else list(indices)

    @property
    def class_names(self) -> tuple[str, ...]:
        return L.class_names(self.num_classes)

    @property
    def names(self) -> list[str]:
        """Names of the distinct samples (not repeated by ``indices``)."""
        return [s.name for s in self.samples]

    def __len__(self) -> int:
        return len(self.indices)

    def read_label_ids(self, path: str) -> np.ndarray:
        return read_label_ids(path)

    def load_label(self, sample_index: int, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """(H, W) uint8 train IDs of ``samples[sample_index]`` (all 255 if it has no label;
        ``size`` = (W, H) of the image, needed only then)."""
        sample = self.samples[sample_index]
        if sample.label is None:
            if size is None:
                size = read_image(sample.image).size
            return np.full((size[1], size[0]), L.IGNORE_INDEX, dtype=np.uint8)
        return L.encode_labels(self.read_label_ids(sample.label), self.lut)

    def load(self, index: int) -> tuple[Image.Image, Image.Image, str]:
        """Untransformed ``(PIL RGB image, PIL "L" train-ID label, name)`` of item ``index``."""
        sample = self.samples[self.indices[index]]
        image = read_image(sample.image)
        label = Image.fromarray(self.load_label(self.indices[index], image.size), mode="L")
        return image, label, sample.name

    def __getitem__(self, index: int):
        image, label, name = self.load(index)
        image, label = self.transform(image, label)
        return image, label, name

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(samples={len(self.samples)}, length={len(self)}, "
                f"num_classes={self.num_classes})")


def _epoch_indices(num_items: int, num_samples: Optional[int], class_balanced_lists, names,
                   seed: int) -> Optional[list[int]]:
    if class_balanced_lists is not None:
        from .sampling import class_balanced_indices, load_class_lists

        lists = (load_class_lists(class_balanced_lists)
                 if isinstance(class_balanced_lists, (str, os.PathLike)) else class_balanced_lists)
        return class_balanced_indices(lists, names, num_samples or num_items, seed=seed)
    if num_samples is not None:  # the official max_iters behaviour: repeat the list to cover it
        repeats = -(-int(num_samples) // max(1, num_items))
        return (list(range(num_items)) * repeats)[: int(num_samples)]
    return None


def _same_name_samples(image_dir: str, label_dir: str, list_path: Optional[str], num_samples: Optional[int],
                       class_balanced_lists, seed: int) -> tuple[list[Sample], Optional[list[int]]]:
    """The images named in ``list_path`` (default: every image of ``image_dir``), each with the label
    file of the same name in ``label_dir`` (GTA5's and SYNTHIA's layout), and their epoch order."""
    names = read_list(list_path) if list_path is not None else _list_images(image_dir)
    samples = [Sample(os.path.join(image_dir, n), os.path.join(label_dir, n), n) for n in names]
    return samples, _epoch_indices(len(samples), num_samples, class_balanced_lists, names, seed)


class GTA5Dataset(SegmentationDataset):
    """GTA5 (``images/``, ``labels/``), labels in Cityscapes label IDs.

    Args:
        root: the GTA5 folder.
        list_path: file of image names (``00001.png`` per line, as the official
            ``gta5_train_list.txt``); default: every image in ``images/``.
        transform: paired transform.
        class_balanced_lists: path of the lists (JSON of ``make_gta5_class_lists.py`` or the
            official ``gtav_label_info.p``) or their loaded dict: the items are then the official
            class-balanced list for ``num_samples`` images (see :mod:`.sampling`), as the
            official data set builds it (training itself samples through
            :func:`.sampling.source_draw_list`).
        num_samples: images seen per run (official ``max_iters`` = iterations x batch size);
            without class-balanced lists the image list is repeated to this length.
        num_classes: 19 (or 16/13 to keep only the classes of those protocols).
        seed: seed of the class-balanced draw.
    """

    def __init__(self, root: str, list_path: Optional[str] = None,
                 transform: Optional[Callable] = None,
                 class_balanced_lists: Union[str, dict, None] = None,
                 num_samples: Optional[int] = None, num_classes: int = 19, seed: int = 0):
        check_dir(root, "GTA5 root")
        image_dir = check_dir(os.path.join(root, "images"), "GTA5 image folder")
        label_dir = check_dir(os.path.join(root, "labels"), "GTA5 label folder")
        self.root = root
        samples, indices = _same_name_samples(image_dir, label_dir, list_path, num_samples,
                                              class_balanced_lists, seed)
        super().__init__(samples, num_classes, L.cityscapes_lut(num_classes), transform, indices)

    def load(self, index: int):
        image, label, name = super().load(index)
        if label.size != image.size:
            # A few GTA5 frames have labels of another size than their images: align them.
            label = label.resize(image.size, Image.NEAREST)
        return image, label, name


class CityscapesDataset(SegmentationDataset):
    """Cityscapes (``leftImg8bit/``, ``gtFine/`` ``*_labelIds.png``).

    Args:
        root: the Cityscapes folder (holding ``leftImg8bit`` and ``gtFine``).
        split: ``train``, ``val`` or ``test``.
        transform: paired transform.
        list_path: file of ``<city>/<file>_leftImg8bit.png`` lines (as the official
            ``cityscapes_train_list.txt``); default: every image of the split.
        num_classes: 19, 16 (SYNTHIA protocol) or 13.
        load_labels: False returns all-255 labels without reading ``gtFine`` (unlabelled target).
        num_samples: repeat the list to this length (official ``max_iters`` behaviour).
    """

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None,
                 list_path: Optional[str] = None, num_classes: int = 19,
                 load_labels: bool = True, num_samples: Optional[int] = None):
        check_dir(root, "Cityscapes root")
        image_dir = check_dir(os.path.join(root, "leftImg8bit", split),
                              f"Cityscapes image folder for split {split!r}")
        label_dir = os.path.join(root, "gtFine", split)
        if load_labels:
            check_dir(label_dir, f"Cityscapes label folder for split {split!r}")
        self.root, self.split = root, split
        if list_path is not None:
            names = read_list(list_path)
        else:
            names = [f"{city}/{f}" for city in sorted(os.listdir(image_dir))
                     if os.path.isdir(os.path.join(image_dir, city))
                     for f in _list_images(os.path.join(image_dir, city))]
        samples = []
        for n in names:
            label = None
            if load_labels:
                stem = n.split("_leftImg8bit")[0]
                label = os.path.join(label_dir, stem + "_gtFine_labelIds.png")
            samples.append(Sample(os.path.join(image_dir, n), label, n))
        indices = _epoch_indices(len(samples), num_samples, None, names, 0)
        super().__init__(samples, num_classes, L.cityscapes_lut(num_classes), transform, indices)


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA RAND_CITYSCAPES (``RGB/``, ``GT/LABELS/`` 16-bit PNGs, class ID in channel 0).

    Args:
        root: the folder holding ``RAND_CITYSCAPES`` (or ``RAND_CITYSCAPES`` itself).
        num_classes: 16 or 13 (the two SYNTHIA->Cityscapes protocols).
        list_path: file of image names (``0000000.png`` per line); default: all of ``RGB/``.
        transform, class_balanced_lists, num_samples, seed: as :class:`GTA5Dataset`.
    """

    def __init__(self, root: str, num_classes: int = 16, list_path: Optional[str] = None,
                 transform: Optional[Callable] = None,
                 class_balanced_lists: Union[str, dict, None] = None,
                 num_samples: Optional[int] = None, seed: int = 0):
        check_dir(root, "SYNTHIA root")
        base = os.path.join(root, "RAND_CITYSCAPES")
        if not os.path.isdir(base) and os.path.isdir(os.path.join(root, "RGB")):
            base = root
        image_dir = check_dir(os.path.join(base, "RGB"), "SYNTHIA image folder")
        label_dir = check_dir(os.path.join(base, "GT", "LABELS"), "SYNTHIA label folder")
        self.root = root
        samples, indices = _same_name_samples(image_dir, label_dir, list_path, num_samples,
                                              class_balanced_lists, seed)
        super().__init__(samples, num_classes, L.synthia_lut(num_classes), transform, indices)

    def read_label_ids(self, path: str) -> np.ndarray:
        return read_label_ids_16bit(path, channel=0)


class CrossCityDataset(SegmentationDataset):
    """NTHU Cross-City (13 classes): ``<City>/Images/{Train,Test}``, ``<City>/Labels/Test``.

    Args:
        root: the folder holding the city folders (``NTHU_Datasets``).
        city: Rome, Rio, Tokyo or Taipei (any case).
        split: ``train`` (unlabelled: all-255 labels) or ``test`` (``val`` is an alias).
        transform: paired transform.
        list_path: file of image names within the split folder, or of ids without extension
            (the public ``NTHU_list/<City>/List/{train,test}.txt``); default: all images.
        num_samples: repeat the list to this length.
    """

    def __init__(self, root: str, city: str, split: str = "train",
                 transform: Optional[Callable] = None, list_path: Optional[str] = None,
                 num_samples: Optional[int] = None):
        cities = {c.lower(): c for c in L.CROSSCITY_CITIES}
        if city.lower() not in cities:
            raise ValueError(f"city must be one of {L.CROSSCITY_CITIES}, got {city!r}")
        split_dir = {"train": "Train", "test": "Test", "val": "Test"}.get(split.lower())
        if split_dir is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        city = cities[city.lower()]
        check_dir(root, "Cross-City root")
        image_dir = check_dir(os.path.join(root, city, "Images", split_dir),
                              f"Cross-City {city} {split_dir} image folder")
        label_dir = os.path.join(root, city, "Labels", split_dir)
        labelled = split_dir == "Test"
        if labelled:
            check_dir(label_dir, f"Cross-City {city} {split_dir} label folder")
        self.root, self.city, self.split = root, city, split_dir.lower()
        names = ([_with_image_ext(image_dir, n) for n in read_list(list_path)] if list_path is not None
                 else _list_images(image_dir))
        samples = [Sample(os.path.join(image_dir, n),
                          os.path.join(label_dir, os.path.splitext(n)[0] + "_eval.png")
                          if labelled else None,
                          f"{city}/{n}") for n in names]
        indices = _epoch_indices(len(samples), num_samples, None, names, 0)
        super().__init__(samples, 13, L.CROSSCITY_ID_TO_TRAINID, transform, indices)


def _with_image_ext(folder: str, name: str) -> str:
    """``name`` itself if it has an image extension, else ``name.jpg`` or ``name.png``, whichever
    exists in ``folder`` (as the public Cross-City loaders resolve their id lists)."""
    if name.lower().endswith(_IMAGE_EXTS):
        return name
    for ext in (".jpg", ".png"):
        if os.path.isfile(os.path.join(folder, name + ext)):
            return name + ext
    raise FileNotFoundError(f"image {name!r} of the list not found in {folder} (tried .jpg and .png)")


class PseudoLabelDataset(SegmentationDataset):
    """The images of ``image_dataset`` with pseudo labels from ``label_dir`` (self-distillation).

    Pseudo labels are train-ID PNGs (255 = ignore; 8-bit grey or palette, the index being the
    train ID); IDs >= ``num_classes`` become 255. Two folder layouts are read:

    * ``"fada_core"``: :func:`pseudo_label_path` (what stage 3 here writes);
    * ``"official"``: :func:`official_pseudo_label_path`, the official ``test.py --saveres``
      output (``<name>_leftImg8bit.png`` in one folder, Cityscapes palette).

    Args:
        image_dataset: the target data set whose images are used (its samples and order).
        label_dir: folder of the pseudo-label PNGs.
        transform: paired transform (default: ``image_dataset.transform``).
        layout: ``"auto"`` (the layout in which every sample has its label; an error listing a
            missing file otherwise), ``"fada_core"`` or ``"official"``.
    """

    def __init__(self, image_dataset: SegmentationDataset, label_dir: str,
                 transform: Optional[Callable] = None, layout: str = "auto"):
        check_dir(label_dir, "pseudo-label folder")
        if layout not in ("auto", *PSEUDO_LABEL_LAYOUTS):
            raise ValueError(f"layout must be 'auto', 'fada_core' or 'official', got {layout!r}")
        names = [s.name for s in image_dataset.samples]
        if layout == "auto":
            layout = _pseudo_label_layout(label_dir, names)
        path_of = PSEUDO_LABEL_LAYOUTS[layout]
        self.label_dir, self.layout = label_dir, layout
        self.image_dataset = image_dataset
        samples = [Sample(s.image, path_of(label_dir, s.name), s.name) for s in image_dataset.samples]
        k = image_dataset.num_classes
        lut = L.lut_from_dict({i: i for i in range(k)})
        super().__init__(samples, k, lut, transform or image_dataset.transform,
                         image_dataset.indices)


def _pseudo_label_layout(label_dir: str, names: Sequence[str]) -> str:
    """The layout of ``label_dir`` in which every sample has a label file."""
    missing = {}
    for layout, path_of in PSEUDO_LABEL_LAYOUTS.items():
        absent = [path_of(label_dir, n) for n in names if not os.path.isfile(path_of(label_dir, n))]
        if not absent:
            return layout
        missing[layout] = absent
    detail = "; ".join(f"{layout} layout: {len(absent)} missing, e.g. {absent[0]}" for layout, absent in missing.items())
    raise FileNotFoundError(f"pseudo-label folder {label_dir!r} has no label for some of the {len(names)} "
                            f"target images in either layout ({detail})")


def build_dataset(name: str, root: str, split: str = "train",
                  transform: Optional[Callable] = None, **kwargs) -> SegmentationDataset:
    """Build a data set by name: ``gta5``, ``cityscapes``, ``synthia``, ``crosscity`` (needs
    ``city=``) or ``pseudo`` (Cityscapes images of ``split`` under ``root`` with pseudo labels from
    ``label_dir=``). Extra keyword arguments go to the class."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "gta5":
        return GTA5Dataset(root, transform=transform, **kwargs)
    if key == "cityscapes":
        return CityscapesDataset(root, split, transform=transform, **kwargs)
    if key == "synthia":
        return SynthiaDataset(root, transform=transform, **kwargs)
    if key == "crosscity":
        if "city" not in kwargs:
            raise ValueError("build_dataset('crosscity', ...) needs city=Rome|Rio|Tokyo|Taipei")
        return CrossCityDataset(root, kwargs.pop("city"), split, transform=transform, **kwargs)
    if key == "pseudo":
        if "label_dir" not in kwargs:
            raise ValueError("build_dataset('pseudo', ...) needs label_dir=<pseudo-label folder>")
        label_dir = kwargs.pop("label_dir")
        base = CityscapesDataset(root, split, transform=transform, load_labels=False, **kwargs)
        return PseudoLabelDataset(base, label_dir, transform)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASET_NAMES}")
