"""Evaluation and CCD analysis of the examples (fada_examples.{evaluation,analysis}); the plots are fada_core.plot's.

Independent of the example models/training: tiny stand-in modules (a conv feature extractor and
a 1x1 classifier) and tiny data written here.
"""
from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from fada_examples import analysis, evaluation  # noqa: E402

K = 5


# ------------------------------------------------------------------------------ stand-ins
class TinyFeatures(nn.Module):
    def __init__(self, channels=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TinyClassifier(nn.Module):
    def __init__(self, channels=6, num_classes=K, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features, size=None):
        out = self.conv(features)
        if size is not None:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_items(n=5, image_hw=(12, 20), label_hw=(24, 40), num_classes=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.randn(3, *image_hw, generator=g)
        label = torch.randint(0, num_classes, label_hw, generator=g)
        label[: label_hw[0] // 6] = 255  # an ignored band
        items.append((image, label, f"city{i % 2}/img_{i:03d}.png"))
    return items


def official_counts(pred, target, k, ignore=255):
    """Intersection / union / target areas by histogram, as the official misc.intersectionAndUnion."""
    pred = pred.reshape(-1).copy()
    target = target.reshape(-1)
    pred[target == ignore] = ignore
    inter = pred[pred == target]
    a_i = np.histogram(inter, bins=np.arange(k + 1))[0]
    a_p = np.histogram(pred, bins=np.arange(k + 1))[0]
    a_t = np.histogram(target, bins=np.arange(k + 1))[0]
    return a_i, a_p + a_t - a_i, a_t


# ------------------------------------------------------------------------------ scores
def test_confusion_and_scores_match_official_histograms():
    rng = np.random.RandomState(0)
    pred = rng.randint(0, K, size=(3, 17, 23))
    target = rng.randint(0, K, size=(3, 17, 23))
    target[rng.rand(*target.shape) < 0.2] = 255
    conf = evaluation.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), K)
    assert conf.dtype == torch.int64 and conf.shape == (K, K)
    assert int(conf.sum()) == int((target != 255).sum())
    res = evaluation.scores_from_confusion(conf)
    inter, union, tgt = official_counts(pred, target, K)
    np.testing.assert_allclose(res.iou, inter / union, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.acc, inter / tgt, rtol=0, atol=1e-12)
    assert res.miou == pytest.approx(np.mean(inter / union), abs=1e-12)
    assert res.macc == pytest.approx(np.mean(inter / tgt), abs=1e-12)
    assert res.allacc == pytest.approx(inter.sum() / tgt.sum(), abs=1e-12)


def test_scores_hand_example_and_absent_classes():
    # rows gt, cols pred; class 2 never occurs, class 3 only predicted
    conf = np.array([[3, 1, 0, 0], [0, 2, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
    res = evaluation.scores_from_confusion(conf)
    assert res.iou[0] == pytest.approx(3 / 4)
    assert res.iou[1] == pytest.approx(2 / 5)
    assert np.isnan(res.iou[2])
    assert res.iou[3] == 0.0
    assert res.miou == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert res.acc[1] == pytest.approx(0.5) and np.isnan(res.acc[3])
    assert res.macc == pytest.approx((0.75 + 0.5) / 2)
    assert res.allacc == pytest.approx(5 / 8)
    assert evaluation.subset_miou(res, ["a", "b", "c", "d"], ["a", "c", "d"]) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="zz"):
        evaluation.subset_miou(res, ["a", "b", "c", "d"], ["zz"])
    d = res.as_dict(["a", "b", "c", "d"])
    assert d["mIoU"] == res.miou and d["IoU/a"] == pytest.approx(0.75) and np.isnan(d["IoU/c"])
    table = evaluation.format_table(res, ["a", "b", "c", "d"])
    assert "IoU (%)" in table and " 75.00" in table and "n/a" in table and "mIoU 38.33 %" in table


def test_confusion_rejects_out_of_range_predictions():
    with pytest.raises(ValueError, match="predictions"):
        evaluation.confusion_matrix(torch.tensor([0, 7]), torch.tensor([0, 1]), 3)


# ------------------------------------------------------------------------------ inference
def _manual_probs(fe, clf, image, size, flip, scales):
    outs = []
    h, w = image.shape[-2:]
    for s in scales:
        x = F.interpolate(image, size=(int(h * s), int(w * s)), mode="bilinear", align_corners=True)
        inputs = [x, torch.flip(x, [3])] if flip else [x]
        for j, xi in enumerate(inputs):
            logits = F.interpolate(clf(fe(xi)), size=size, mode="bilinear", align_corners=True)
            p = torch.softmax(logits, 1)
            outs.append(torch.flip(p, [3]) if j == 1 else p)
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("scales", [(1.0,), evaluation.MULTI_SCALES])
def test_predict_probabilities_matches_official_recipe(flip, scales):
    fe, clf = TinyFeatures().eval(), TinyClassifier().eval()
    image = torch.randn(2, 3, 14, 22)
    size = (29, 43)
    with torch.no_grad():
        got = evaluation.predict_probabilities(fe, clf, image, size, flip=flip, scales=scales)
        want = _manual_probs(fe, clf, image, size, flip, scales)
    assert got.shape == (2, K, *size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, *size), rtol=0, atol=1e-5)
    if flip or len(scales) > 1:  # the options change the answer
        with torch.no_grad():
            plain = evaluation.predict_probabilities(fe, clf, image, size)
        assert (got - plain).abs().max() > 1e-4


def test_predict_probabilities_bf16_autocast_close_to_fp32():
    fe, clf = TinyFeatures().eval(), TinyClassifier().eval()
    image = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        ref = evaluation.predict_probabilities(fe, clf, image, (32, 48), flip=True)
        low = evaluation.predict_probabilities(fe, clf, image, (32, 48), flip=True, amp="bf16")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0, atol=3e-2)
    assert (low.argmax(1) == ref.argmax(1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="amp"):
        evaluation.predict_probabilities(fe, clf, image, (32, 48), amp="int8")


def test_evaluate_matches_manual_loop_and_saves_images(tmp_path):
    fe, clf = TinyFeatures(), TinyClassifier()
    fe.train()
    clf.eval()
    items = make_items()
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=2)
    res = evaluation.evaluate(fe, clf, loader, K, device="cpu", output_dir=str(tmp_path),
                              num_images_to_save=3, progress=False)
    assert fe.training and not clf.training  # modes restored
    fe.eval()
    inter = np.zeros(K)
    union = np.zeros(K)
    tgt = np.zeros(K)
    with torch.no_grad():
        for image, label, _ in items:
            logits = F.interpolate(clf(fe(image[None])), size=label.shape, mode="bilinear", align_corners=True)
            pred = logits.argmax(1)[0].numpy()
            a, b, c = official_counts(pred, label.numpy(), K)
            inter += a
            union += b
            tgt += c
    np.testing.assert_allclose(res.iou, inter / union, atol=1e-12)
    assert res.allacc == pytest.approx(inter.sum() / tgt.sum())
    assert res.num_images == len(items)
    saved = sorted(os.listdir(tmp_path / "predictions"))
    assert saved == ["city0__img_000.png", "city0__img_002.png", "city1__img_001.png"]
    img = Image.open(tmp_path / "predictions" / saved[0])
    assert img.mode == "P" and img.size == (40, 24)
    rgb = np.asarray(img.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) >= 2
    # CSV
    names = [f"n{i}" for i in range(K)]
    path = evaluation.write_results_csv(res, names, str(tmp_path / "res.csv"))
    rows = list(csv.reader(open(path)))
    assert rows[0][:3] == ["class_id", "class", "iou"] and rows[1][1] == "n0"
    assert float(rows[1][2]) == pytest.approx(res.iou[0], abs=1e-6)
    assert rows[K + 1][1] == "mIoU" and float(rows[K + 1][2]) == pytest.approx(res.miou, abs=1e-6)


def test_perfect_model_scores_one():
    class Oracle(nn.Module):  # the "image" carries the one-hot label at the label resolution
        def forward(self, x):
            return x

    class Identity(nn.Module):
        def forward(self, f, size=None):
            return f * 20

    g = torch.Generator().manual_seed(3)
    items = []
    for _ in range(3):
        label = torch.randint(0, K, (9, 13), generator=g)
        items.append((F.one_hot(label, K).permute(2, 0, 1).float(), label, "x"))
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=3)
    res = evaluation.evaluate(Oracle(), Identity(), loader, K, device="cpu", flip=True, progress=False)
    assert res.miou == pytest.approx(1.0) and res.allacc == pytest.approx(1.0) and res.macc == pytest.approx(1.0)


# ------------------------------------------------------------------------------ Cityscapes agreement
cs_labels = pytest.importorskip("cityscapesscripts.helpers.labels")


def _cs_luts():
    id_to_train = np.full(256, 255, dtype=np.uint8)
    train_to_id = np.zeros(19, dtype=np.uint8)
    for lab in cs_labels.labels:
        if lab.id >= 0 and 0 <= lab.trainId < 19:
            id_to_train[lab.id] = lab.trainId
            train_to_id[lab.trainId] = lab.id
    names = [cs_labels.trainId2label[i].name for i in range(19)]
    return id_to_train, train_to_id, names


@pytest.fixture
def cs_eval(monkeypatch, tmp_path):
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    monkeypatch.setattr(ev.args, "evalInstLevelScore", False)
    monkeypatch.setattr(ev.args, "JSONOutput", False)
    monkeypatch.setattr(ev.args, "quiet", True)
    monkeypatch.setattr(ev.args, "predictionPath", None)
    monkeypatch.setattr(ev.args, "predictionWalk", None)
    monkeypatch.setattr(ev.args, "exportFile", str(tmp_path / "cs.json"))
    return ev


def _write_cityscapes_gt(root, n=4, hw=(24, 40), seed=0):
    """Tiny gtFine label-ID PNGs: random blocks of label IDs, including ones ignored in eval."""
    rng = np.random.RandomState(seed)
    valid_ids = [lab.id for lab in cs_labels.labels if lab.id >= 0]
    # leave out 'train' (31) and 'motorcycle' (32) entirely: those classes must give NaN / 0
    valid_ids = [i for i in valid_ids if i not in (31, 32)]
    files = []
    for i in range(n):
        gt = np.array(rng.choice(valid_ids, size=(hw[0] // 4, hw[1] // 4)), dtype=np.uint8)
        gt = np.kron(gt, np.ones((4, 4), dtype=np.uint8))
        city = "aachen" if i < 2 else "bremen"
        d = root / "gtFine" / "val" / city
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{city}_{i:06d}_000019_gtFine_labelIds.png"
        Image.fromarray(gt).save(path)
        files.append(str(path))
    return files


def test_iou_agrees_with_cityscapesscripts(tmp_path, cs_eval):
    id_to_train, train_to_id, names = _cs_luts()
    gt_files = _write_cityscapes_gt(tmp_path)
    rng = np.random.RandomState(1)
    pred_files = []
    conf = torch.zeros(19, 19, dtype=torch.int64)
    for f in gt_files:
        gt = np.array(Image.open(f))
        # a noisy prediction: the true trainId on 60% of pixels, else random (never 'train' = 16)
        pred_train = id_to_train[gt].astype(np.int64)
        noise = rng.choice([t for t in range(19) if t != 16], size=gt.shape)
        pred_train = np.where((rng.rand(*gt.shape) < 0.6) & (pred_train != 255), pred_train, noise)
        path = tmp_path / "results" / (os.path.basename(f).replace("gtFine_labelIds", "pred"))
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(train_to_id[pred_train]).save(path)
        pred_files.append(str(path))
        conf += evaluation.confusion_matrix(torch.from_numpy(pred_train), torch.from_numpy(id_to_train[gt].astype(np.int64)), 19)
    ours = evaluation.scores_from_confusion(conf)
    theirs = cs_eval.evaluateImgLists(pred_files, gt_files, cs_eval.args)
    for t, name in enumerate(names):
        ref = theirs["classScores"][name]
        if np.isnan(ref):
            assert np.isnan(ours.iou[t]), name
        else:
            assert ours.iou[t] == pytest.approx(ref, abs=1e-6), name
    assert np.isnan(ours.iou[16])  # 'train': nowhere
    assert ours.iou[17] == 0.0      # 'motorcycle': predicted but never in the ground truth
    assert ours.miou == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)


@pytest.mark.parametrize("source", ["tensors", "cityscapes_dataset"])
def test_evaluate_label_id_outputs_agree_with_cityscapesscripts(tmp_path, cs_eval, monkeypatch, source):
    """evaluate() writes Cityscapes submission PNGs; the official script finds them by name and
    scores them exactly like evaluate()'s own confusion matrix. With ``cityscapes_dataset`` the
    data come from fada_examples' CityscapesDataset reading leftImg8bit/gtFine files (image
    resized to half size, label kept at full size, as the official test)."""
    id_to_train, train_to_id, names = _cs_luts()
    gt_files = _write_cityscapes_gt(tmp_path, n=3)
    rng = np.random.RandomState(0)
    items = []
    for f in gt_files:
        gt = np.array(Image.open(f))
        city, rest = os.path.basename(f).split("_", 1)
        name = f"{city}/{city}_{rest.replace('gtFine_labelIds', 'leftImg8bit')}"
        rgb = rng.randint(0, 256, size=gt.shape + (3,), dtype=np.uint8)
        image_path = tmp_path / "leftImg8bit" / "val" / name
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(image_path)
        image = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - 0.45) / 0.225
        items.append((image, torch.from_numpy(id_to_train[gt].astype(np.int64)), name))
    if source == "tensors":
        dataset = ListDataset(items)
    else:
        datasets = pytest.importorskip("fada_examples.data.datasets")
        transforms = pytest.importorskip("fada_examples.data.transforms")
        dataset = datasets.CityscapesDataset(str(tmp_path), "val",
                                             transform=transforms.build_transforms(False, resize=(20, 12)))
        assert len(dataset) == 3
        image, label, name = dataset[0]
        assert image.shape == (3, 12, 20) and label.shape == (24, 40) and name == items[0][2]
        torch.testing.assert_close(label, items[0][1])  # the data set's LUT is Cityscapes' own
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    out = tmp_path / "label_ids"
    res = evaluation.evaluate(TinyFeatures().eval(), TinyClassifier(num_classes=19), loader, 19, device="cpu",
                              flip=True, label_id_dir=str(out), trainid_to_labelid=train_to_id,
                              progress=False)
    assert res.num_images == 3
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(out))
    pred_files = [cs_eval.getPrediction(cs_eval.args, f) for f in gt_files]
    assert all(p.startswith(str(out)) for p in pred_files)
    theirs = cs_eval.evaluateImgLists(pred_files, gt_files, cs_eval.args)
    assert np.isfinite(res.iou).sum() >= 10
    for t, name in enumerate(names):
        ref = theirs["classScores"][name]
        assert (np.isnan(ref) and np.isnan(res.iou[t])) or res.iou[t] == pytest.approx(ref, abs=1e-6), name
    assert res.miou == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    if source == "cityscapes_dataset":
        np.testing.assert_array_equal(evaluation.invert_lut(dataset.lut, 19), train_to_id)
    cs_eval.args.predictionPath = "/sentinel"
    helper = evaluation.cityscapes_official_scores(str(out), gt_files)
    assert helper["mIoU"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-12)
    assert cs_eval.args.predictionPath == "/sentinel"  # the module's settings are restored


def test_palette_is_cityscapes():
    _, _, _ = _cs_luts()
    pal = evaluation.default_palette(19)
    assert pal.shape == (19, 3) and pal.dtype == np.uint8
    assert tuple(pal[0]) == tuple(cs_labels.trainId2label[0].color)   # road
    assert tuple(pal[13]) == tuple(cs_labels.trainId2label[13].color)  # car
    img = evaluation.colorize_prediction(np.array([[0, 13], [255, 1]]), pal)
    rgb = np.asarray(img.convert("RGB"))
    assert tuple(rgb[0, 1]) == tuple(pal[13]) and tuple(rgb[1, 0]) == (0, 0, 0)


# ------------------------------------------------------------------------------ CCD analysis
def _direct_ccd(fe, items, k):
    feats, labs = [], []
    with torch.no_grad():
        for image, label, _ in items:
            f = fe(image[None]).double()[0]
            lab = F.interpolate(label[None, None].float(), size=f.shape[-2:], mode="nearest")[0, 0].long()
            feats.append(f.reshape(f.shape[0], -1).T)
            labs.append(lab.reshape(-1))
    x = torch.cat(feats)
    y = torch.cat(labs)
    mu, var, counts = {}, {}, np.zeros(k)
    for c in range(k):
        s = x[y == c]
        counts[c] = len(s)
        if len(s):
            mu[c] = s.mean(0)
            var[c] = ((s - mu[c]) ** 2).sum(1).mean()
    per = np.full(k, np.nan)
    for i in mu:
        per[i] = np.mean([float(var[i] / ((mu[i] - mu[j]) ** 2).sum()) for j in mu if j != i])
    return per, counts


def test_class_center_analysis_streams_exactly(tmp_path):
    fe = TinyFeatures()
    items = make_items(n=5)
    # class 4 absent everywhere
    items = [(im, torch.where(lab == 4, torch.full_like(lab, 255), lab), n) for im, lab, n in items]
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=2)
    r = analysis.class_center_analysis(fe, loader, K, device="cpu", backend="eager", progress=False)
    fe.eval()
    per, counts = _direct_ccd(fe, items, K)
    np.testing.assert_allclose(r.per_class.numpy(), per, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(r.counts.numpy(), counts)
    assert not bool(r.present[4]) and np.isnan(float(r.per_class[4]))
    assert r.mean == pytest.approx(np.nanmean(per), rel=1e-6)

    names = [f"c{i}" for i in range(K)]
    p = analysis.write_ccd_csv(r, names, str(tmp_path / "ccd.csv"))
    rows = list(csv.reader(open(p)))
    assert rows[0] == ["class_id", "class", "count", "present", "ccd"]
    assert rows[1][1] == "c0" and int(rows[1][2]) == counts[0] and float(rows[1][4]) == pytest.approx(per[0], rel=1e-5)
    assert rows[5][3] == "0" and rows[5][4] == "nan"
    assert rows[-1][1] == "mean" and float(rows[-1][4]) == pytest.approx(r.mean, rel=1e-5)
    m = analysis.write_ccd_matrix_csv(r, names, str(tmp_path / "ccd_matrix.csv"))
    rows = list(csv.reader(open(m)))
    assert rows[0] == ["class"] + names and len(rows) == K + 1 and rows[1][1] == "nan"
    assert float(rows[1][2]) == pytest.approx(float(r.matrix[0, 1]), rel=1e-5)
    cmp_path = analysis.write_ccd_comparison_csv({"a": r, "b": r}, names, str(tmp_path / "cmp.csv"))
    rows = list(csv.reader(open(cmp_path)))
    assert rows[0] == ["class_id", "class", "a", "b"] and rows[-1][1] == "mean"
    table = analysis.format_ccd_comparison({"src": r, "fada": r}, names, counts_from="src")
    assert "src" in table and "fada" in table and "mean CCD" in table and "n/a" in table


def _nontrivial_png(path, min_size=(300, 200)):
    assert os.path.isfile(path) and os.path.getsize(path) > 5000
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1]
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


# ------------------------------------------------------------------------------ DDP (2 x gloo)
def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        items = make_items(n=5)
        loader = evaluation.build_eval_loader(ListDataset(items), batch_size=2, num_workers=0, distributed=True)
        res = evaluation.evaluate(TinyFeatures().eval(), TinyClassifier(), loader, K, device="cpu",
                                  distributed=True, progress=False)
        ccd = analysis.class_center_analysis(TinyFeatures(), loader, K, device="cpu", backend="eager",
                                             progress=False)
        torch.save({"confusion": torch.from_numpy(res.confusion), "images": res.num_images, "ccd": ccd.per_class,
                    "counts": ccd.counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo_matches_single(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    items = make_items(n=5)
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=2)
    single = evaluation.evaluate(TinyFeatures().eval(), TinyClassifier(), loader, K, device="cpu", progress=False)
    ccd = analysis.class_center_analysis(TinyFeatures(), loader, K, device="cpu", backend="eager", progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        np.testing.assert_array_equal(got["confusion"], single.confusion)
        assert got["images"] == 5
        np.testing.assert_allclose(got["ccd"].numpy(), ccd.per_class.numpy(), rtol=1e-5, equal_nan=True)
        np.testing.assert_array_equal(got["counts"].numpy(), ccd.counts.numpy())


# ------------------------------------------------------------------------------ entry scripts
def _load_entry(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_entry_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_checkpoint(path, synthetic_dir, seed, num_classes=19):
    models = pytest.importorskip("fada_examples.models")
    config = pytest.importorskip("fada_examples.config")
    cfg = config.default_config()
    cfg["model"].update(backbone="small", num_classes=num_classes)
    cfg["input"]["size_test"] = [160, 96]
    cfg["datasets"]["synthetic_dir"] = str(synthetic_dir)
    cfg["datasets"]["synthetic"].update(num_source=2, num_target_train=1, num_target_val=3)
    torch.manual_seed(seed)
    fe, clf = models.build_segmentor("small", num_classes, None, cfg["model"]["freeze_bn"])
    torch.save({"feature_extractor": fe.state_dict(), "classifier": clf.state_dict(), "config": cfg}, path)
    return str(path)


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    pytest.importorskip("fada_examples.data.synthetic")
    root = tmp_path_factory.mktemp("entries")
    return root, [_small_checkpoint(root / f"model_{i}.pth", root / "synthetic_data", seed=i) for i in range(2)]


def test_evaluate_entry_end_to_end(small_checkpoints, capsys):
    root, ckpts = small_checkpoints
    out = root / "eval"
    entry = _load_entry("evaluate")
    res = entry.main(["--checkpoint", ckpts[0], "--output", str(out), "--flip", "--multi-scale",
                      "--save-images", "2", "--save-label-ids", "--num-workers", "0", "--device", "cpu",
                      "--amp", "bf16", "--official-check"])
    printed = capsys.readouterr().out
    assert "IoU (%)" in printed and "mIoU" in printed and "road" in printed and "s/image" in printed
    assert res.num_images == 3 and res.confusion.sum() > 0
    assert "cityscapesscripts mIoU" in printed
    assert res.extra["official"]["mIoU"] == pytest.approx(res.miou, abs=1e-6)
    rows = list(csv.reader(open(out / "results.csv")))
    assert rows[1][1] == "road" and len(rows) == 1 + 19 + 3
    assert float(rows[20][2]) == pytest.approx(res.miou, abs=1e-6)
    conf = np.loadtxt(out / "confusion.csv", delimiter=",", dtype=np.int64)
    np.testing.assert_array_equal(conf, res.confusion)
    _nontrivial_png(str(out / "per_class_iou.png"))
    assert len(os.listdir(out / "predictions")) == 2
    label_ids = [os.path.join(d, f) for d, _, fs in os.walk(out / "label_ids") for f in fs]
    assert len(label_ids) == 3
    ids = np.unique(np.concatenate([np.unique(np.array(Image.open(f))) for f in label_ids]))
    assert set(ids.tolist()) <= {lab.id for lab in cs_labels.labels if 0 <= lab.trainId < 19}
    import json

    summary = json.load(open(out / "summary.json"))
    assert summary["images"] == 3 and summary["scales"] == [0.7, 1.0, 1.3] and summary["flip"] is True


def test_ccd_entry_end_to_end(small_checkpoints, capsys):
    root, ckpts = small_checkpoints
    out = root / "ccd"
    entry = _load_entry("ccd_analysis")
    results = entry.main(["--checkpoint", *ckpts, "--labels", "source only", "FADA", "--output", str(out),
                          "--num-workers", "0", "--device", "cpu", "--backend", "eager"])
    printed = capsys.readouterr().out
    assert "mean CCD" in printed and "source only" in printed and "FADA" in printed
    assert list(results) == ["source only", "FADA"]
    assert results["source only"].mean != pytest.approx(results["FADA"].mean)  # different weights
    for name in ("ccd_source_only.csv", "ccd_FADA.csv", "ccd_matrix_FADA.csv", "ccd_per_class.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.reader(open(out / "ccd_per_class.csv")))
    assert rows[0] == ["class_id", "class", "source only", "FADA"] and rows[1][1] == "road"
    assert float(rows[-1][3]) == pytest.approx(results["FADA"].mean, rel=1e-5)
    rows = list(csv.reader(open(out / "ccd_FADA.csv")))
    assert sum(int(r[2]) for r in rows[1:-1]) == int(results["FADA"].counts.sum()) > 0
    _nontrivial_png(str(out / "ccd_per_class.png"))
    _nontrivial_png(str(out / "ccd_per_class_grid.png"))


def test_evaluate_entry_16_classes_reports_miou13(small_checkpoints, capsys):
    root, _ = small_checkpoints
    ckpt = _small_checkpoint(root / "model_16.pth", root / "synthetic_data", seed=3, num_classes=16)
    out = root / "eval16"
    res = _load_entry("evaluate").main(["--checkpoint", ckpt, "--output", str(out), "--num-workers", "0",
                                        "--device", "cpu", "--max-images", "2"])
    printed = capsys.readouterr().out
    assert "mIoU* (13 classes)" in printed and res.iou.shape == (16,) and res.num_images == 2
    import json

    summary = json.load(open(out / "summary.json"))
    assert "terrain" not in summary["iou"] and "mIoU13" in summary
    names = evaluation.class_names_for(16)
    thirteen = [n for n in names if n not in ("wall", "fence", "pole")]
    assert summary["mIoU13"] == pytest.approx(evaluation.subset_miou(res, names, thirteen))


def test_entries_on_a_trained_checkpoint(tmp_path, capsys):
    """The entries read checkpoints written by the training engine (2 source-only iterations on
    the synthetic data), with the data root recorded in the checkpoint's config."""
    trainer = pytest.importorskip("fada_examples.engine.trainer")
    config = pytest.importorskip("fada_examples.config")
    cfg_path = os.path.join(EXAMPLES, "configs", "synthetic_small_src.yaml")
    if not os.path.isfile(cfg_path):
        pytest.skip("synthetic_small_src.yaml not present")
    overrides = [f"output_dir={tmp_path / 'src'}", f"datasets.synthetic_dir={tmp_path / 'syn'}",
                 "datasets.synthetic.num_source=2", "datasets.synthetic.num_target_train=1",
                 "datasets.synthetic.num_target_val=2", "datasets.synthetic.size=[64,48]",
                 "input.source_size_train=[64,48]", "input.target_size_train=[64,48]",
                 "input.size_test=[64,48]", "solver.max_iter=4", "solver.stop_iter=2",
                 "solver.checkpoint_period=2", "solver.batch_size=2", "solver.num_workers=0", "backend=eager"]
    cfg = trainer.prepare_data(config.load_config(cfg_path, overrides, stage="src"))
    ckpt = trainer.train_stage("src", cfg, progress=False, tensorboard=False).checkpoint
    res = _load_entry("evaluate").main(["--checkpoint", ckpt, "--output", str(tmp_path / "eval"),
                                        "--num-workers", "0", "--device", "cpu", "--flip"])
    labelled = sum(int((label != 255).sum()) for _, label, _ in evaluation.build_test_dataset(cfg))
    assert res.num_images == 2 and res.confusion.sum() == labelled > 0
    ccd = _load_entry("ccd_analysis").main(["--checkpoint", ckpt, "--output", str(tmp_path / "ccd"),
                                            "--num-workers", "0", "--device", "cpu", "--backend", "eager"])
    (label, result), = ccd.items()
    assert np.isfinite(result.mean) and int(result.present.sum()) >= 3
    assert (tmp_path / "ccd" / "ccd_per_class.png").is_file()
    assert "mean CCD" in capsys.readouterr().out


def test_evaluate_entry_reads_official_checkpoints(small_checkpoints, capsys, tmp_path):
    """An official-layout checkpoint (module.backbone.* / module.conv2d_list.*, no config) with
    the config from the command line scores exactly as the same weights in this project's format."""
    root, ckpts = small_checkpoints
    ours = torch.load(ckpts[0], weights_only=False)
    official = {"iteration": 40000,
                "feature_extractor": {f"module.backbone.{k}": v for k, v in ours["feature_extractor"].items()},
                "classifier": {f"module.{k.replace('branches.', 'conv2d_list.')}": v
                               for k, v in ours["classifier"].items()}}
    path = tmp_path / "model_iter040000.pth"
    torch.save(official, path)
    entry = _load_entry("evaluate")
    common = ["--num-workers", "0", "--device", "cpu", "--flip"]
    with pytest.raises(ValueError, match="--config"):
        entry.main(["--checkpoint", str(path), "--output", str(tmp_path / "x"), *common])
    cfg = ours["config"]
    overrides = ["model.backbone=small", f"model.freeze_bn={str(cfg['model']['freeze_bn']).lower()}",
                 "input.size_test=[160,96]", f"datasets.synthetic_dir={cfg['datasets']['synthetic_dir']}",
                 "datasets.synthetic.num_source=2", "datasets.synthetic.num_target_train=1",
                 "datasets.synthetic.num_target_val=3"]
    res_official = entry.main(["--checkpoint", str(path), "--output", str(tmp_path / "a"), *common, *overrides])
    with pytest.warns(UserWarning, match="carries its own config"):  # never silently ignored
        res_ours = entry.main(["--checkpoint", ckpts[0], "--output", str(tmp_path / "b"), *common,
                               "model.num_classes=16"])
    capsys.readouterr()
    assert res_official.num_images == res_ours.num_images == 3
    np.testing.assert_array_equal(res_official.confusion, res_ours.confusion)
