"""Tests of the examples' data layer: label mappings, loaders on files written in each data set's
real layout, paired transforms, synthetic data, class lists and class-balanced sampling."""

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

_EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
if _EXAMPLES not in sys.path:  # conftest.py does this too; kept for running this file alone
    sys.path.insert(0, _EXAMPLES)

from fada_examples.data import labels as L  # noqa: E402
from fada_examples.data import transforms as TR  # noqa: E402
from fada_examples.data.datasets import (CityscapesDataset, CrossCityDataset,  # noqa: E402
                                         GTA5Dataset, PseudoLabelDataset, SynthiaDataset,
                                         build_dataset, pseudo_label_path, safe_name)
from fada_examples.data.io import ImageReadError, write_png_uint16  # noqa: E402
from fada_examples.data.sampling import (ClassBalancedSampler, class_balanced_draws,  # noqa: E402
                                         compute_class_lists, load_class_lists)
from fada_examples.data.synthetic import make_synthetic_data  # noqa: E402

# The official FADA tables (core/datasets/gta5.py, cityscapes.py, synthia.py).
OFFICIAL_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
OFFICIAL_CITYSCAPES_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9,
                          24: 10, 25: 11, 26: 12, 28: 13, 32: 14, 33: 15}
OFFICIAL_SYNTHIA_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10,
                       17: 11, 8: 12, 19: 13, 12: 14, 11: 15}
CROSSCITY_13 = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10,
                32: 11, 33: 12}
MEAN = torch.tensor(TR.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(TR.IMAGENET_STD).view(3, 1, 1)


def unnormalize(image: torch.Tensor) -> np.ndarray:
    return ((image * STD + MEAN) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def random_label_ids(rng, h, w, ids):
    lab = np.full((h, w), rng.choice(ids), dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        lab[y:y + rng.integers(2, h), x:x + rng.integers(2, w)] = rng.choice(ids)
    return lab


def random_rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ mappings
def test_cityscapes_mapping_is_the_official_one():
    assert L.lut_to_dict(L.CITYSCAPES_ID_TO_TRAINID) == OFFICIAL_19
    assert L.CITYSCAPES_ID_TO_TRAINID.dtype == np.uint8 and L.CITYSCAPES_ID_TO_TRAINID.shape == (256,)
    assert L.lut_to_dict(L.CITYSCAPES_ID_TO_TRAINID_16) == OFFICIAL_CITYSCAPES_16
    assert L.CLASS_NAMES_19[0] == "road" and L.CLASS_NAMES_19[10] == "sky" and len(L.CLASS_NAMES_19) == 19
    assert L.PALETTE_19.shape == (19, 3) and tuple(L.PALETTE_19[0]) == (128, 64, 128)


def test_synthia_and_crosscity_mappings():
    assert L.lut_to_dict(L.SYNTHIA_ID_TO_TRAINID_16) == OFFICIAL_SYNTHIA_16
    # 13 classes: the 16 without wall, fence, pole, renumbered in order.
    dropped = {L.CLASS_NAMES_16.index(n) for n in ("wall", "fence", "pole")}
    kept = [c for c in range(16) if c not in dropped]
    expected_13 = {k: kept.index(v) for k, v in OFFICIAL_SYNTHIA_16.items() if v in kept}
    assert L.lut_to_dict(L.SYNTHIA_ID_TO_TRAINID_13) == expected_13
    assert L.lut_to_dict(L.CROSSCITY_ID_TO_TRAINID) == CROSSCITY_13
    assert L.lut_to_dict(L.CITYSCAPES_ID_TO_TRAINID_13) == CROSSCITY_13
    assert L.CLASS_NAMES_13 == ("road", "sidewalk", "building", "traffic light", "traffic sign",
                                "vegetation", "sky", "person", "rider", "car", "bus",
                                "motorcycle", "bicycle")
    with pytest.raises(ValueError):
        L.synthia_lut(19)


def test_encode_labels_sends_unknown_ids_to_ignore():
    ids = np.array([[7, 0, 33, 34], [255, 26, 1, 23]], dtype=np.uint8)
    out = L.encode_labels(ids, L.CITYSCAPES_ID_TO_TRAINID)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 255, 18, 255], [255, 13, 255, 10]])
    wide = np.array([3, 300, 65535, -1, 21], dtype=np.int32)
    np.testing.assert_array_equal(L.encode_labels(wide, L.SYNTHIA_ID_TO_TRAINID_16),
                                  [0, 255, 255, 255, 3])
    with pytest.raises(TypeError):
        L.encode_labels(np.zeros(3, np.float32), L.CITYSCAPES_ID_TO_TRAINID)


def test_colorize():
    img = np.asarray(L.colorize(np.array([[0, 13], [255, 18]])))
    assert img.shape == (2, 2, 3)
    assert tuple(img[0, 0]) == (128, 64, 128) and tuple(img[0, 1]) == (0, 0, 142)
    assert tuple(img[1, 0]) == (0, 0, 0) and tuple(img[1, 1]) == tuple(L.PALETTE_19[18])


# ------------------------------------------------------------------ loaders
def write_gta5(root, rng, n=3, size=(24, 16)):
    w, h = size
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    ids = [0, 7, 8, 11, 21, 23, 26, 34]
    out = {}
    for i in range(n):
        name = f"{i + 1:05d}.png"
        img = random_rgb(rng, h, w)
        lab = random_label_ids(rng, h, w, ids)
        Image.fromarray(img).save(root / "images" / name)
        p = Image.fromarray(lab, mode="P")
        p.putpalette(list(range(256)) * 3)
        p.save(root / "labels" / name)
        out[name] = (img, lab)
    return out


def check_item(item, img, lab_ids, lut):
    image, label, name = item
    assert image.dtype == torch.float32 and image.shape == (3,) + img.shape[:2]
    assert label.dtype == torch.int64 and label.shape == img.shape[:2]
    np.testing.assert_array_equal(unnormalize(image), img)
    np.testing.assert_array_equal(label.numpy(), L.encode_labels(lab_ids, lut))
    return name


def test_gta5_loader(tmp_path):
    rng = np.random.default_rng(0)
    files = write_gta5(tmp_path, rng)
    ds = GTA5Dataset(str(tmp_path))
    assert len(ds) == 3 and ds.names == sorted(files)
    for i, name in enumerate(sorted(files)):
        assert check_item(ds[i], *files[name], L.CITYSCAPES_ID_TO_TRAINID) == name
    # a list file selects and orders; num_samples repeats it
    (tmp_path / "list.txt").write_text("00003.png\n00001.png\n\n")
    ds = GTA5Dataset(str(tmp_path), list_path=str(tmp_path / "list.txt"), num_samples=5)
    assert len(ds) == 5 and [ds[i][2] for i in range(5)] == ["00003.png", "00001.png"] * 2 + ["00003.png"]
    # labels of another size than their image are aligned to it (a known GTA5 quirk)
    Image.fromarray(np.full((8, 12), 7, np.uint8)).save(tmp_path / "labels" / "00002.png")
    assert GTA5Dataset(str(tmp_path))[1][1].shape == (16, 24)


def test_missing_and_unreadable_files_name_the_path(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GTA5Dataset(str(tmp_path / "nowhere"))
    write_gta5(tmp_path, rng, n=2)
    with pytest.raises(FileNotFoundError, match="nolist.txt"):
        GTA5Dataset(str(tmp_path), list_path=str(tmp_path / "nolist.txt"))
    (tmp_path / "list.txt").write_text("00001.png\n00009.png\n")
    ds = GTA5Dataset(str(tmp_path), list_path=str(tmp_path / "list.txt"))
    with pytest.raises(FileNotFoundError, match="00009.png"):
        ds[1]
    (tmp_path / "images" / "00002.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageReadError, match="00002.png"):
        GTA5Dataset(str(tmp_path))[1]
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesDataset(str(tmp_path), "train")
    with pytest.raises(ValueError, match="unknown data set"):
        build_dataset("kitti", str(tmp_path))


def write_cityscapes(root, rng, split, cities, per_city=2, size=(20, 12)):
    w, h = size
    out = {}
    for city in cities:
        os.makedirs(root / "leftImg8bit" / split / city)
        os.makedirs(root / "gtFine" / split / city)
        for i in range(per_city):
            stem = f"{city}_{i:06d}_000019"
            img, lab = random_rgb(rng, h, w), random_label_ids(rng, h, w, [1, 7, 11, 22, 23, 27, 33])
            Image.fromarray(img).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(lab, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            out[f"{city}/{stem}_leftImg8bit.png"] = (img, lab)
    return out


def test_cityscapes_loader(tmp_path):
    rng = np.random.default_rng(2)
    files = write_cityscapes(tmp_path, rng, "val", ["frankfurt", "lindau"])
    ds = CityscapesDataset(str(tmp_path), "val")
    assert ds.names == sorted(files) and len(ds) == 4
    for i, name in enumerate(sorted(files)):
        assert check_item(ds[i], *files[name], L.CITYSCAPES_ID_TO_TRAINID) == name
        assert "/" not in safe_name(name)
    ds16 = CityscapesDataset(str(tmp_path), "val", num_classes=16)
    check_item(ds16[0], *files[sorted(files)[0]], L.CITYSCAPES_ID_TO_TRAINID_16)
    (tmp_path / "l.txt").write_text(sorted(files)[3] + "\n")
    ds = build_dataset("cityscapes", str(tmp_path), "val", list_path=str(tmp_path / "l.txt"))
    assert ds.names == [sorted(files)[3]]
    unlabelled = CityscapesDataset(str(tmp_path), "val", load_labels=False)
    assert (unlabelled[0][1] == 255).all()


def write_synthia(root, rng, n=2, size=(14, 10)):
    """RAND_CITYSCAPES/RGB and GT/LABELS (16-bit RGB PNGs: class ID, instance ID, 7)."""
    w, h = size
    base = root / "RAND_CITYSCAPES"
    os.makedirs(base / "RGB")
    os.makedirs(base / "GT" / "LABELS")
    files = {}
    for i in range(n):
        name = f"{i:07d}.png"
        img = random_rgb(rng, h, w)
        cls = random_label_ids(rng, h, w, [0, 1, 2, 3, 5, 7, 13, 16, 18, 21, 22]).astype(np.uint16)
        gt = np.stack([cls, rng.integers(0, 60000, (h, w)).astype(np.uint16),
                       np.full((h, w), 7, np.uint16)], -1)
        Image.fromarray(img).save(base / "RGB" / name)
        write_png_uint16(str(base / "GT" / "LABELS" / name), gt)
        files[name] = (img, cls)
    return base, files


def test_synthia_loader_reads_16bit_first_channel(tmp_path):
    base, files = write_synthia(tmp_path, np.random.default_rng(3))
    name, cls = sorted(files)[-1], files[sorted(files)[-1]][1]
    for k, lut in ((16, L.SYNTHIA_ID_TO_TRAINID_16), (13, L.SYNTHIA_ID_TO_TRAINID_13)):
        ds = SynthiaDataset(str(tmp_path), num_classes=k)
        for i, name in enumerate(sorted(files)):
            assert check_item(ds[i], *files[name], lut) == name
    # RAND_CITYSCAPES itself as root works too, and build_dataset knows it
    assert len(build_dataset("synthia", str(base), num_classes=13)) == 2
    # Pillow alone would read these class IDs as 0 (it keeps the high bytes of 16-bit RGB)
    assert not np.array_equal(np.asarray(Image.open(base / "GT" / "LABELS" / name))[..., 0], cls)
    (base / "GT" / "LABELS" / name).write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageReadError, match=name):
        SynthiaDataset(str(tmp_path))[1]


def test_crosscity_loader(tmp_path):
    rng = np.random.default_rng(4)
    h, w = 12, 16
    for split in ("Train", "Test"):
        os.makedirs(tmp_path / "Rome" / "Images" / split)
    os.makedirs(tmp_path / "Rome" / "Labels" / "Test")
    img = random_rgb(rng, h, w)
    Image.fromarray(img).save(tmp_path / "Rome" / "Images" / "Train" / "a.jpg", quality=100)
    Image.fromarray(img).save(tmp_path / "Rome" / "Images" / "Test" / "b.png")
    lab = random_label_ids(rng, h, w, [7, 12, 19, 24, 27, 33])
    Image.fromarray(lab, mode="L").save(tmp_path / "Rome" / "Labels" / "Test" / "b_eval.png")
    test = CrossCityDataset(str(tmp_path), "rome", "test")
    assert check_item(test[0], img, lab, L.CROSSCITY_ID_TO_TRAINID) == "Rome/b.png"
    train = build_dataset("crosscity", str(tmp_path), "train", city="Rome")
    image, label, name = train[0]
    assert name == "Rome/a.jpg" and image.shape == (3, h, w) and (label == 255).all()
    with pytest.raises(ValueError, match="city"):
        CrossCityDataset(str(tmp_path), "Paris", "test")
    with pytest.raises(FileNotFoundError, match="Tokyo"):
        CrossCityDataset(str(tmp_path), "Tokyo", "test")


def test_crosscity_published_layout_with_id_lists(tmp_path):
    """Files as in the released NTHU_Datasets archive and the public id lists
    (NTHU_list/<City>/List/{train,test}.txt: ids without extension, .jpg images)."""
    rng = np.random.default_rng(11)
    root = tmp_path / "NTHU_Datasets"
    ids = ["pano_00002_2_180", "pano_00010_3_0"]
    for split in ("Train", "Test"):
        os.makedirs(root / "Rio" / "Images" / split)
    os.makedirs(root / "Rio" / "Labels" / "Test")
    os.makedirs(tmp_path / "NTHU_list" / "Rio" / "List")
    labels = {}
    for i in ids:
        Image.fromarray(random_rgb(rng, 10, 14)).save(root / "Rio" / "Images" / "Test" / f"{i}.jpg")
        Image.fromarray(random_rgb(rng, 10, 14)).save(root / "Rio" / "Images" / "Train" / f"{i}.jpg")
        labels[i] = random_label_ids(rng, 10, 14, [0, 7, 8, 11, 12, 19, 21, 26, 33])
        Image.fromarray(labels[i], mode="L").save(root / "Rio" / "Labels" / "Test" / f"{i}_eval.png")
    (tmp_path / "NTHU_list" / "Rio" / "List" / "test.txt").write_text("\n".join(ids[::-1]) + "\n")
    test = CrossCityDataset(str(root), "Rio", "test", list_path=str(tmp_path / "NTHU_list/Rio/List/test.txt"))
    assert test.names == [f"Rio/{i}.jpg" for i in ids[::-1]]
    # the 13 classes and their order as the public loaders (label IDs 12 wall and 0 -> ignore)
    expected_ids = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
    for k, i in enumerate(ids[::-1]):
        want = np.vectorize(lambda v: expected_ids.get(int(v), 255))(labels[i])
        np.testing.assert_array_equal(test[k][1].numpy(), want)
    assert test.class_names == ("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                                "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle")
    (tmp_path / "bad.txt").write_text("pano_99999_0_0\n")
    with pytest.raises(FileNotFoundError, match="pano_99999_0_0"):
        CrossCityDataset(str(root), "Rio", "test", list_path=str(tmp_path / "bad.txt"))
    train = CrossCityDataset(str(root), "Rio", "train")
    assert len(train) == 2 and (train[0][1] == 255).all()


def test_pseudo_label_dataset(tmp_path):
    rng = np.random.default_rng(5)
    files = write_cityscapes(tmp_path / "cs", rng, "train", ["aachen"])
    base = CityscapesDataset(str(tmp_path / "cs"), "train", load_labels=False)
    label_dir = tmp_path / "pseudo"
    os.makedirs(label_dir)
    pseudo = {}
    for name in base.names:
        t = rng.integers(0, 21, size=(12, 20)).astype(np.uint8)
        t[0, 0] = 255
        Image.fromarray(t, mode="L").save(pseudo_label_path(str(label_dir), name))
        pseudo[name] = t
    assert os.path.basename(pseudo_label_path("d", "aachen/x_leftImg8bit.png")) == "aachen__x_leftImg8bit.png"
    ds = PseudoLabelDataset(base, str(label_dir))
    assert ds.layout == "fada_core"
    for i, name in enumerate(base.names):
        image, label, n = ds[i]
        assert n == name
        np.testing.assert_array_equal(unnormalize(image), files[name][0])
        expected = np.where(pseudo[name] < 19, pseudo[name], 255)
        np.testing.assert_array_equal(label.numpy(), expected)
    via_build = build_dataset("pseudo", str(tmp_path / "cs"), "train", label_dir=str(label_dir))
    assert torch.equal(via_build[1][1], ds[1][1])


def test_pseudo_labels_of_the_official_test_py_saveres(tmp_path):
    """Official stage-3 labels: palette PNGs <file name>_leftImg8bit.png in one folder (test.py
    --saveres with get_color_pallete(pred, "city")); index = train ID."""
    from fada_examples.data import official_pseudo_label_path

    rng = np.random.default_rng(9)
    write_cityscapes(tmp_path / "cs", rng, "train", ["aachen", "bochum"])
    base = CityscapesDataset(str(tmp_path / "cs"), "train", load_labels=False)
    label_dir = tmp_path / "soft_labels" / "inference" / "cityscapes_train"
    os.makedirs(label_dir)
    expected = {}
    for name in base.names:
        t = rng.integers(0, 19, size=(12, 20)).astype(np.uint8)
        mask = Image.fromarray(t).convert("P")
        mask.putpalette(list(L.PALETTE_19.reshape(-1)) + [0] * (768 - 57))
        mask.save(label_dir / name.split("/")[1])                       # the official file name
        expected[name] = t
    assert official_pseudo_label_path("d", "aachen/x_leftImg8bit.png") == os.path.join("d", "x_leftImg8bit.png")
    ds = PseudoLabelDataset(base, str(label_dir))
    assert ds.layout == "official"
    for i, name in enumerate(base.names):
        np.testing.assert_array_equal(ds[i][1].numpy(), expected[name])
    os.remove(label_dir / base.names[0].split("/")[1])
    with pytest.raises(FileNotFoundError, match="official layout: 1 missing"):
        PseudoLabelDataset(base, str(label_dir))


# ------------------------------------------------------------------ transforms
IDS = np.array([0, 60, 120, 180], np.uint8)  # spaced label IDs: an interpolated label shows
BLUE = np.array([20, 90, 160, 230], np.uint8)  # the image's blue channel is derived from the label


def transform_pair(seed, transform=None):
    """Draw a label of small random blocks, derive an image from it (blue = the label's colour,
    red/green = the source x/y coordinate as linear ramps, which bicubic resampling preserves),
    and transform both with random scale, crop (with padding) and flip."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
    cell = int(rng.integers(4, 7))
    grid = rng.integers(0, 4, size=(h // cell + 1, w // cell + 1))
    cls = np.repeat(np.repeat(grid, cell, 0), cell, 1)[:h, :w]
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([np.round(xx * 255 / (w - 1)), np.round(yy * 255 / (h - 1)), BLUE[cls]], -1)
    crop = (int(rng.integers(20, 80)), int(rng.integers(20, 80)))
    # (scales near 0.5 put every output pixel on a rounding tie of the check: start at 0.6)
    t = transform or TR.build_transforms(True, scale=(0.6, 1.5), crop=crop, flip=0.5)
    img_t, lab_t = t(Image.fromarray(image.astype(np.uint8)), Image.fromarray(IDS[cls], mode="L"))
    return IDS[cls], img_t, lab_t, crop


def misaligned_share(src_label, img_t, lab_t):
    """Share of checkable output pixels whose label is not the source label at the source
    position read from the image's coordinate ramps."""
    h, w = src_label.shape
    img, lab = unnormalize(img_t).astype(np.float64), lab_t.numpy()
    x, y = img[..., 0] * (w - 1) / 255, img[..., 1] * (h - 1) / 255
    # checkable: labelled, away from the borders (where resampling clamps the ramps) and not
    # within reading precision (< 0.13 px at these sizes) of a rounding tie
    ok = (lab != 255) & (x > 4) & (x < w - 5) & (y > 4) & (y < h - 5)
    ok &= (np.abs(x - np.floor(x) - 0.5) > 0.2) & (np.abs(y - np.floor(y) - 0.5) > 0.2)
    xs, ys = np.clip(np.round(x), 0, w - 1).astype(int), np.clip(np.round(y), 0, h - 1).astype(int)
    assert ok.sum() > 50
    return (src_label[ys, xs][ok] != lab[ok]).mean()


@pytest.mark.parametrize("seed", range(12))
def test_paired_transforms_keep_image_and_label_aligned(seed):
    src_label, img_t, lab_t, crop = transform_pair(seed)
    assert img_t.shape == (3, crop[1], crop[0]) and lab_t.shape == (crop[1], crop[0])
    assert lab_t.dtype == torch.int64 and img_t.dtype == torch.float32
    lab = lab_t.numpy()
    assert set(np.unique(lab).tolist()) <= set(IDS.tolist()) | {255}  # nearest: no new IDs
    assert misaligned_share(src_label, img_t, lab_t) == 0.0
    img = unnormalize(img_t)
    # the label-derived channel agrees away from label boundaries
    pad = np.pad(lab, 1, mode="edge")
    hh, ww = lab.shape
    interior = (lab != 255) & np.all([pad[1 + a:hh + 1 + a, 1 + b:ww + 1 + b] == lab
                                      for a in (-1, 0, 1) for b in (-1, 0, 1)], axis=0)
    expected_blue = BLUE[np.searchsorted(IDS, np.where(interior, lab, 0))]
    assert (np.abs(img[..., 2].astype(int) - expected_blue)[interior] <= 35).mean() > 0.9
    # padding: label 255 exactly where the image was padded with black
    assert (img[lab == 255] <= 1).all()


def test_alignment_check_detects_a_one_pixel_shift():
    def shifted_crop(image, label):  # crops the label one pixel right of the image
        w, h = image.size
        top, left = int(torch.randint(0, h - 20, ())), int(torch.randint(0, w - 21, ()))
        return TR.F.crop(image, top, left, 20, 20), TR.F.crop(label, top, left + 1, 20, 20)

    shares = []
    for seed in range(4):
        t = TR.Compose([TR.RandomScale((0.6, 1.5)), shifted_crop, TR.ToTensor(),
                        TR.Normalize()])
        src_label, img_t, lab_t, _ = transform_pair(seed, t)
        shares.append(misaligned_share(src_label, img_t, lab_t))
    assert min(shares) > 0.05


def test_build_transforms_eval_and_normalisation():
    img = Image.fromarray(np.full((8, 10, 3), 255, np.uint8))
    lab = Image.fromarray(np.full((8, 10), 3, np.uint8), mode="L")
    x, y = TR.build_transforms(False, resize=(5, 4))(img, lab)
    assert x.shape == (3, 4, 5) and y.shape == (8, 10)  # label kept full size for evaluation
    torch.testing.assert_close(x[:, 0, 0], (1 - MEAN.flatten()) / STD.flatten())
    x, y = TR.build_transforms(True, resize=(5, 4))(img, lab)
    assert x.shape == (3, 4, 5) and y.shape == (4, 5) and (y == 3).all()
    x, _ = TR.build_transforms(False, mean=(103.939, 116.779, 123.68), std=(1, 1, 1),
                               to_bgr255=True)(img, lab)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([255 - 103.939, 255 - 116.779, 255 - 123.68]))
    # colour jitter changes the image only
    torch.manual_seed(0)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 10, 3), dtype=np.uint8))
    t = TR.build_transforms(True, jitter=(0.5, 0.5, 0.5, 0.2))
    x1, y1 = t(rgb, lab)
    x0, y0 = TR.build_transforms(True)(rgb, lab)
    assert not torch.equal(x1, x0) and torch.equal(y1, y0)


# ------------------------------------------------------------------ synthetic data
SMALL = dict(num_source=4, num_target_train=3, num_target_val=2, size=(48, 32))


def all_bytes(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_synthetic_data_is_deterministic_and_written_once(tmp_path):
    a = make_synthetic_data(str(tmp_path / "a"), seed=3, **SMALL)
    b = make_synthetic_data(str(tmp_path / "b"), seed=3, **SMALL)
    c = make_synthetic_data(str(tmp_path / "c"), seed=4, **SMALL)
    bytes_a = all_bytes(tmp_path / "a")
    assert bytes_a == all_bytes(tmp_path / "b")
    assert bytes_a != all_bytes(tmp_path / "c")
    assert len([k for k in bytes_a if k.endswith(".png")]) == 2 * 4 + 2 * (3 + 2)
    marker = tmp_path / "a" / "synthetic.json"
    before = {p: os.stat(os.path.join(tmp_path / "a", p)).st_mtime_ns for p in bytes_a}
    again = make_synthetic_data(str(tmp_path / "a"), seed=3, **SMALL)
    assert again == a and marker.exists()
    assert before == {p: os.stat(os.path.join(tmp_path / "a", p)).st_mtime_ns for p in bytes_a}
    with pytest.raises(ValueError, match="already holds"):
        make_synthetic_data(str(tmp_path / "a"), seed=5, **SMALL)
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_synthetic_data(str(tmp_path / "busy"), **SMALL)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert b["source"] != a["source"] and c["target"].endswith("cityscapes")


def test_synthetic_data_concurrent_callers_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: make_synthetic_data(str(tmp_path / "s"), **SMALL),
                                range(3)))
    assert results[0] == results[1] == results[2]
    assert os.listdir(tmp_path) == ["s"]  # no temporary folder left behind
    make_synthetic_data(str(tmp_path / "ref"), **SMALL)
    assert all_bytes(tmp_path / "s") == all_bytes(tmp_path / "ref")


def test_synthetic_data_loads_with_the_real_loaders_and_has_a_domain_shift(tmp_path):
    paths = make_synthetic_data(str(tmp_path / "syn"), **SMALL)
    with pytest.warns(UserWarning, match="never drawn"):  # not all 19 classes are synthesised
        src = GTA5Dataset(paths["source"], class_balanced_lists=paths["class_lists"], num_samples=7)
    tgt = CityscapesDataset(paths["target"], "train")
    val = CityscapesDataset(paths["target"], "val")
    assert (len(src), len(tgt), len(val)) == (3000, 3, 2)  # the official class-balanced list length
    _, lab, _ = val[0]
    assert lab.shape == (32, 48) and (lab[-1] == 255).all()  # ego vehicle band -> ignore
    src_labels = torch.stack([GTA5Dataset(paths["source"])[i][1] for i in range(4)])
    present = set(torch.unique(src_labels).tolist())
    assert {0, 1, 2, 10, 13} <= present  # road, sidewalk, building, sky, car
    # the same class looks different in the two domains
    def mean_colour(ds, cls):
        xs = [x[:, y == cls] for x, y, _ in (ds[i] for i in range(len(ds.samples)))]
        return torch.cat(xs, 1).mean(1)
    for cls in (0, 2, 10):
        assert (mean_colour(GTA5Dataset(paths["source"]), cls) - mean_colour(tgt, cls)).abs().max() > 0.3


# ------------------------------------------------------------------ class lists and sampling
def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_gta5_class_lists", os.path.join(_EXAMPLES, "make_gta5_class_lists.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_list_script(tmp_path, capsys):
    rng = np.random.default_rng(6)
    files = write_gta5(tmp_path / "gta5", rng, n=5)
    out = load_script().main(["--root", str(tmp_path / "gta5"), "--output",
                              str(tmp_path / "lists.json"), "--workers", "1", "--quiet"])
    assert out == str(tmp_path / "lists.json") and "wrote" in capsys.readouterr().out
    lists = load_class_lists(out)
    assert lists["num_classes"] == 19 and lists["class_names"] == list(L.CLASS_NAMES_19)
    for name, (_, lab) in files.items():
        expected = sorted(int(c) for c in np.unique(L.encode_labels(lab, L.CITYSCAPES_ID_TO_TRAINID)) if c < 19)
        assert lists["file_to_labels"][name] == expected
        for c in range(19):
            assert (name in lists["label_to_files"][c]) == (c in expected)
    # the multi-process path gives the same lists
    ds = GTA5Dataset(str(tmp_path / "gta5"))
    assert compute_class_lists(ds, num_workers=2) == lists


def test_class_list_script_on_synthia(tmp_path):
    base, files = write_synthia(tmp_path, np.random.default_rng(7), n=3)
    out = load_script().main(["--dataset", "synthia", "--root", str(tmp_path), "--num-classes",
                              "13", "--workers", "1", "--quiet"])
    assert out == os.path.join(str(tmp_path), "class_lists_13.json")
    lists = load_class_lists(out)
    assert lists["num_classes"] == 13 and lists["class_names"] == list(L.CLASS_NAMES_13)
    for name, (_, cls) in files.items():
        ids = L.encode_labels(cls.astype(np.int32), L.SYNTHIA_ID_TO_TRAINID_13)
        assert lists["file_to_labels"][name] == sorted(int(c) for c in np.unique(ids) if c < 13)


def test_datasets_work_in_dataloader_workers(tmp_path):
    write_gta5(tmp_path, np.random.default_rng(8), n=4)
    ds = GTA5Dataset(str(tmp_path), transform=TR.build_transforms(
        True, scale=(0.5, 1.5), crop=(16, 12), flip=0.5, jitter=(0.5, 0.5, 0.5, 0.2)))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    image, label, names = batches[0]
    assert image.shape == (2, 3, 12, 16) and label.shape == (2, 12, 16) and list(names) == ds.names[:2]


def test_class_balanced_sampling_picks_images_containing_the_class():
    names = [f"{i:05d}.png" for i in range(12)]
    # class 0 everywhere, class 1 in one image, class 2 in three, class 3 nowhere
    file_to = {n: [0] for n in names}
    file_to[names[5]] = [0, 1]
    for n in names[8:11]:
        file_to[n] = [0, 2]
    lists = {"format": "fada-class-lists-v1", "num_classes": 4, "files": names,
             "file_to_labels": file_to,
             "label_to_files": [[n for n in names if c in file_to[n]] for c in range(4)]}
    with pytest.warns(UserWarning, match=r"classes \[3\]"):
        draws = class_balanced_draws(lists, names, 2999, seed=1)
    assert len(draws) == 3000
    for c, index in draws:
        assert c in file_to[names[index]]
    classes = np.bincount([c for c, _ in draws], minlength=4)
    assert classes[3] == 0 and classes[1] > 300  # the rare class is drawn often
    with pytest.warns(UserWarning):
        again = class_balanced_draws(lists, names, 2999, seed=1)
    assert again == draws
    sampler = ClassBalancedSampler(lists, names, 50, seed=0)
    with pytest.warns(UserWarning):
        first = list(sampler)
    sampler.set_epoch(1)
    with pytest.warns(UserWarning):
        assert len(first) == 3000 and list(sampler) != first


def test_data_roots_synthetic_only_when_none_given(tmp_path, capsys):
    from fada_examples.config import load_config
    from fada_examples.data.roots import uses_synthetic_data
    from fada_examples.engine.trainer import prepare_data

    assert uses_synthetic_data({"source_root": "", "target_root": "", "test_root": ""})
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match=r"datasets.source_root=.*empty"):
        uses_synthetic_data({"source_root": str(tmp_path / "empty"), "target_root": str(tmp_path / "full")})
    with pytest.raises(FileNotFoundError, match="datasets.target_root"):
        uses_synthetic_data({"source_root": str(tmp_path / "full"), "target_root": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="datasets.target_root is empty"):
        uses_synthetic_data({"source_root": str(tmp_path / "full"), "target_root": ""})
    assert not uses_synthetic_data({"source_root": str(tmp_path / "full"), "target_root": str(tmp_path / "full")})
    # a shipped real-data config names the official locations: without the data, an error naming the key
    configs = os.path.join(_EXAMPLES, "configs")
    for name in ("deeplabv2_r101_src.yaml", "deeplabv2_vgg16_adv_synthia.yaml", "deeplabv2_r101_src_crosscity.yaml"):
        cfg = load_config(os.path.join(configs, name), [f"output_dir={tmp_path / 'out'}"])
        with pytest.raises(FileNotFoundError, match="datasets.source_root"):
            prepare_data(cfg)
    # no root at all: the synthetic data, announced
    cfg = load_config(None, [f"output_dir={tmp_path / 'syn' / 'src'}", "datasets.synthetic.num_source=2",
                             "datasets.synthetic.num_target_train=1", "datasets.synthetic.num_target_val=1",
                             "datasets.synthetic.size=[32,24]"])
    out = prepare_data(cfg)
    assert "no data root given" in capsys.readouterr().out
    assert os.path.isdir(out["datasets"]["source_root"])



@pytest.mark.parametrize("lookup, bad, message, table_13", [
    (L.cityscapes_lut, 7, "num_classes must be 19, 16 or 13, got 7", L.CITYSCAPES_ID_TO_TRAINID_13),
    (L.class_names, 12, "num_classes must be 19, 16 or 13, got 12", L.CLASS_NAMES_13),
    (L.palette, 0, "num_classes must be 19, 16 or 13, got 0", L.PALETTE_13),
    (L.synthia_lut, 19, "SYNTHIA num_classes must be 16 or 13, got 19", L.SYNTHIA_ID_TO_TRAINID_13),
])
def test_protocol_tables_name_the_protocols_there_are(lookup, bad, message, table_13):
    with pytest.raises(ValueError) as info:
        lookup(bad)
    assert str(info.value) == message
    assert lookup(13) is table_13
