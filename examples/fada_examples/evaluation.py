"""Semantic-segmentation evaluation as in the official FADA ``test.py``.

Inference: the classifier's low-resolution logits are upsampled to the *label* size (bilinear,
``align_corners=True``) and turned into probabilities with a softmax. Optional horizontal-flip
averaging and multi-scale testing (inputs resized bilinear, ``align_corners=True``, to
``int(H*s), int(W*s)`` for s in e.g. (0.7, 1.0, 1.3)) average the softmax maps.

Scores come from a K x K confusion matrix (rows = ground truth, columns = prediction, pixels with
the ignore label skipped), accumulated batch by batch and summed across ``torch.distributed``
ranks:

    IoU_c = TP_c / (TP_c + FP_c + FN_c)     Acc_c = TP_c / (TP_c + FN_c)
    mIoU = mean_c IoU_c    mAcc = mean_c Acc_c    allAcc = sum_c TP_c / #labelled pixels

A class that never occurs (neither in the ground truth nor in the predictions) has IoU NaN and is
left out of the mean, exactly as Cityscapes' official ``evalPixelLevelSemanticLabeling`` does; a
class absent from the ground truth has Acc NaN. On a data set in which every class occurs (e.g.
Cityscapes val) this equals the official FADA ``test.py`` figures (which count absent classes as
0 instead).
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from .data.datasets import safe_name
from .engine.distributed import rank as _rank, setup_device, world_size as _world_size
from .tables import format_number, resolve_class_names as _names

try:  # tqdm is in the examples extra; evaluation still works without it.
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

MULTI_SCALES = (0.7, 1.0, 1.3)

__all__ = [
    "MULTI_SCALES",
    "EvalResult",
    "confusion_matrix",
    "scores_from_confusion",
    "predict_probabilities",
    "evaluate",
    "format_table",
    "write_results_csv",
    "subset_miou",
    "miou13",
    "cityscapes_official_scores",
    "build_eval_loader",
    "build_test_dataset",
    "resolve_test_root",
    "class_names_for",
    "make_test_dataset",
    "add_test_data_arguments",
    "eval_data_from_args",
    "setup_device",
    "colorize_prediction",
    "default_palette",
    "invert_lut",
]


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Scores of one evaluation run. Fractions in [0, 1]; multiply by 100 for percent.

    Attributes:
        miou: mean IoU over the classes that occur (NaN-IoU classes left out).
        macc: mean per-class accuracy (recall) over the classes present in the ground truth.
        allacc: overall pixel accuracy, correct / labelled pixels.
        iou: (K,) per-class IoU, NaN where the class occurs nowhere.
        acc: (K,) per-class accuracy, NaN where the class is absent from the ground truth.
        confusion: (K, K) int64 pixel counts, rows = ground truth, columns = prediction.
    """

    miou: float
    macc: float
    allacc: float
    iou: np.ndarray
    acc: np.ndarray
    confusion: np.ndarray
    num_images: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self, class_names: Optional[Sequence[str]] = None) -> dict:
        names = _names(class_names, len(self.iou))
        out = {"mIoU": self.miou, "mAcc": self.macc, "allAcc": self.allacc, "images": self.num_images}
        thirteen = miou13(self, names)
        if thirteen is not None:
            out["mIoU13"] = thirteen
        for name, value in zip(names, self.iou):
            out[f"IoU/{name}"] = float(value)
        return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255, check: bool = True) -> torch.Tensor:
    """(K, K) int64 confusion matrix of integer predictions against labels (any equal shapes).

    Pixels whose label is ``ignore_index`` (or outside [0, K)) are skipped. Rows index the
    ground truth, columns the prediction. ``check=False`` skips the (synchronising) range check
    of the predictions, for argmax outputs that are in range by construction.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    pred = pred[valid]
    target = target[valid]
    if check and pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes}); got [{int(pred.min())}, {int(pred.max())}]")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(confusion, num_images: int = 0) -> EvalResult:
    """mIoU, mAcc, allAcc and per-class IoU/Acc from a (K, K) confusion matrix."""
    conf = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.int64)
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(axis=1).astype(np.float64)      # TP + FN
    predicted = conf.sum(axis=0).astype(np.float64)  # TP + FP
    union = gt + predicted - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = gt.sum()
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    macc = float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")
    allacc = float(tp.sum() / total) if total > 0 else float("nan")
    return EvalResult(miou, macc, allacc, iou, acc, conf, num_images)


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: Optional[str]):
    if amp in (None, "", "none"):
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be None, 'none', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[amp])


def predict_probabilities(feature_extractor, classifier, image: torch.Tensor, size,
                          *, flip: bool = False, scales: Iterable[float] = (1.0,),
                          amp: Optional[str] = None) -> torch.Tensor:
    """Softmax probabilities (B, K, *size) averaged over ``scales`` and, if ``flip``, mirroring.

    As the official ``inference`` / ``multi_scale_inference``: each scaled input is
    ``bilinear(image, (int(H*s), int(W*s)), align_corners=True)``; logits are upsampled to
    ``size`` (the label size) with ``align_corners=True`` before the softmax; a flipped input's
    probabilities are flipped back before averaging. The floating-point operations are the
    official ones, in the same order and batching, so on a deterministic backend the predictions
    are bit-identical to the official ones (tests/examples/test_models_official.py, on the CPU).
    ``amp`` ("bf16" / "fp16") runs the networks under autocast; upsampling and softmax stay in
    float32.
    """
    size = tuple(int(v) for v in size)
    scales = tuple(scales)
    single = len(scales) == 1
    height, width = image.shape[-2:]
    batch = image.shape[0]
    total = None
    count = 0
    for s in scales:
        s = float(s)
        if s == 1.0:
            x = image
        else:
            x = F.interpolate(image, size=(int(height * s), int(width * s)), mode="bilinear",
                              align_corners=True)
        # As the official code: one scale runs the mirrored copy in the same batch, several
        # scales run it separately (batching changes the float rounding of the convolutions).
        inputs = [x] if not flip else ([torch.cat([x, x.flip(3)], dim=0)] if single else [x, x.flip(3)])
        for i, xi in enumerate(inputs):
            with _autocast(image.device, amp):
                logits = classifier(feature_extractor(xi))
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)
            prob = F.softmax(logits, dim=1)
            if flip and single:
                prob = prob[:batch] + prob[batch:].flip(3)
            elif i == 1:
                prob = prob.flip(3)
            total = prob if total is None else total + prob
        count += 2 if flip else 1
    if total is None:
        raise ValueError("scales must not be empty")
    return total / count


# --------------------------------------------------------------------------------------------
# colour-coded predictions
# --------------------------------------------------------------------------------------------
def default_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: the Cityscapes trainId colours for the 19-, 16- and 13-class
    protocols (``fada_examples.data.labels``, read from cityscapesscripts), else a deterministic
    random palette."""
    if num_classes in (19, 16, 13):
        try:
            from fada_examples.data.labels import palette

            return np.asarray(palette(num_classes), dtype=np.uint8).reshape(num_classes, 3)
        except ImportError:
            pass
    if num_classes == 19:
        try:
            from cityscapesscripts.helpers.labels import labels as cs_labels

            colours = np.zeros((19, 3), dtype=np.uint8)
            for label in cs_labels:
                if label.id >= 0 and 0 <= label.trainId < 19:
                    colours[label.trainId] = label.color
            return colours
        except ImportError:  # pragma: no cover
            pass
    rng = np.random.RandomState(1234)
    return rng.randint(0, 256, size=(num_classes, 3)).astype(np.uint8)


def invert_lut(id_to_trainid: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) uint8 trainId -> label ID from a 256-entry label-ID -> trainId LUT (the smallest label
    ID of each trainId); used to write predictions as Cityscapes label-ID PNGs."""
    lut = np.asarray(id_to_trainid)
    out = np.zeros(num_classes, dtype=np.uint8)
    for t in range(num_classes):
        ids = np.nonzero(lut == t)[0]
        if len(ids) == 0:
            raise ValueError(f"trainId {t} has no label ID in the LUT")
        out[t] = ids[0]
    return out


def colorize_prediction(train_ids: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Palette ('P' mode) PNG image of a (H, W) trainId map; ids outside the palette are black."""
    ids = np.ascontiguousarray(np.asarray(train_ids).astype(np.uint8))
    if ids.ndim != 2:
        raise ValueError(f"expected a (H, W) id map, got shape {ids.shape}")
    image = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    image.putpalette(flat.reshape(-1).tolist())
    return image


# --------------------------------------------------------------------------------------------
# data loading helper
# --------------------------------------------------------------------------------------------
def _dist_info(distributed: bool):
    return (_rank(), _world_size()) if distributed else (0, 1)


def build_eval_loader(dataset, *, batch_size: int = 1, num_workers: int = 2, distributed: bool = False,
                      pin_memory: bool = False):
    """A sequential DataLoader; under ``distributed`` each rank gets the strided shard
    ``rank, rank + world, ...`` so every image is evaluated exactly once (no padding duplicates,
    unlike DistributedSampler)."""
    rank, world = _dist_info(distributed)
    if world > 1:
        dataset = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, pin_memory=pin_memory, drop_last=False)


def _get(cfg, dotted, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def resolve_test_root(cfg: dict, data_root: Optional[str] = None, synthetic_dir: Optional[str] = None) -> str:
    """The evaluation data root: ``data_root`` if given, else the config's ``datasets.test_root`` /
    ``datasets.target_root`` (a missing or empty folder is an error naming the option); when all
    are empty, the synthetic Cityscapes-layout target set, announced (generated once under
    ``synthetic_dir`` / ``datasets.synthetic_dir`` / ``<output_dir>/../synthetic_data``)."""
    from fada_examples.data.roots import announce_synthetic, check_root

    for key, root in (("--data-root", data_root), ("datasets.test_root", _get(cfg, "datasets.test_root")),
                      ("datasets.target_root", _get(cfg, "datasets.target_root"))):
        if root:
            return check_root(root, key)
    from fada_examples.data.synthetic import make_synthetic_data

    folder = synthetic_dir or _get(cfg, "datasets.synthetic_dir")
    if not folder:
        output_dir = _get(cfg, "output_dir", "results") or "results"
        folder = os.path.join(os.path.dirname(os.path.abspath(output_dir)), "synthetic_data")
    params = dict(_get(cfg, "datasets.synthetic", {}) or {})
    if "size" in params:
        params["size"] = tuple(params["size"])
    if _dist_info(True)[0] == 0:
        announce_synthetic(folder)
    return make_synthetic_data(folder, **params)["target"]


def build_test_dataset(cfg: dict, data_root: Optional[str] = None, *, split: Optional[str] = None,
                       size=None, synthetic_dir: Optional[str] = None, name: Optional[str] = None):
    """The test data set of a training config (``datasets.test``, ``datasets.test_split``,
    ``input.size_test``), as the official ``build_dataset(cfg, mode='test')``: the image is resized
    to ``size`` (W, H) (``input.size_test``; pass ``False`` for none), the label keeps its full
    resolution."""
    from fada_examples.data.datasets import build_dataset
    from fada_examples.data.transforms import build_transforms

    root = resolve_test_root(cfg, data_root, synthetic_dir)
    if size is None:
        size = _get(cfg, "input.size_test")
    transform = build_transforms(
        False, resize=tuple(size) if size else None,
        mean=tuple(_get(cfg, "input.pixel_mean", (0.485, 0.456, 0.406))),
        std=tuple(_get(cfg, "input.pixel_std", (0.229, 0.224, 0.225))),
        to_bgr255=bool(_get(cfg, "input.to_bgr255", False)))
    kwargs = dict(_get(cfg, "datasets.test_kwargs", {}) or {})
    num_classes = _get(cfg, "model.num_classes")
    dataset_name = name or _get(cfg, "datasets.test", "cityscapes")
    if num_classes is not None and dataset_name in ("cityscapes", "synthia", "gta5"):
        kwargs.setdefault("num_classes", int(num_classes))  # Cross-City is always 13 classes
    return build_dataset(dataset_name, root, split or _get(cfg, "datasets.test_split", "val"),
                         transform, **kwargs)


def make_test_dataset(cfg: dict, *, data_root: Optional[str] = None, name: Optional[str] = None,
                      split: Optional[str] = None, city: Optional[str] = None, size=None,
                      native_size: bool = False, max_images: int = 0, synthetic_dir: Optional[str] = None):
    """:func:`build_test_dataset` with the entry scripts' options: ``city`` (Cross-City),
    ``native_size`` (no resize), ``max_images`` (first N images only)."""
    cfg = dict(cfg)
    if city:
        datasets = dict(cfg.get("datasets", {}))
        datasets["test_kwargs"] = dict(datasets.get("test_kwargs", {}) or {}, city=city)
        cfg["datasets"] = datasets
    size = False if native_size else (tuple(size) if size else None)
    dataset = build_test_dataset(cfg, data_root, split=split, size=size, synthetic_dir=synthetic_dir, name=name)
    if max_images and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, list(range(max_images)))
    return dataset


def add_test_data_arguments(parser) -> None:
    """The options evaluate.py and ccd_analysis.py share: the test data, its loader, the device and
    the output folder (read by :func:`eval_data_from_args`)."""
    p = parser
    p.add_argument("--data-root", default=None, help="labelled test data root (default: from the checkpoint's config)")
    p.add_argument("--dataset", default=None, help="cityscapes | crosscity | synthia | gta5 (default: config)")
    p.add_argument("--split", default=None, help="split to use (default: config datasets.test_split)")
    p.add_argument("--city", default=None, help="Cross-City city (Rome, Rio, Tokyo, Taipei)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="resize the image to W H before inference (default: config input.size_test)")
    p.add_argument("--native-size", action="store_true", help="do not resize the images")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--synthetic-dir", default=None, help="where the synthetic data lives / is generated")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def eval_data_from_args(cfg: dict, args, device: torch.device, distributed: bool):
    """``(dataset, loader)`` as the options of :func:`add_test_data_arguments` ask."""
    dataset = make_test_dataset(cfg, data_root=args.data_root, name=args.dataset, split=args.split, city=args.city,
                                size=args.size, native_size=args.native_size, max_images=args.max_images,
                                synthetic_dir=args.synthetic_dir)
    return dataset, build_eval_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                      distributed=distributed, pin_memory=device.type == "cuda")


def class_names_for(num_classes: int) -> List[str]:
    """Cityscapes names for the 19/16/13-class protocols, else ``class_<i>``."""
    try:
        from fada_examples.data.labels import class_names

        return list(class_names(num_classes))
    except (ImportError, ValueError):
        return [f"class_{i}" for i in range(num_classes)]


# --------------------------------------------------------------------------------------------
# the evaluation loop
# --------------------------------------------------------------------------------------------
def _unpack(batch):
    if isinstance(batch, (list, tuple)):
        image, label = batch[0], batch[1]
        names = batch[2] if len(batch) > 2 else None
    elif isinstance(batch, dict):
        image, label, names = batch["image"], batch["label"], batch.get("name")
    else:
        raise TypeError(f"a batch must be (image, label[, name]); got {type(batch).__name__}")
    if names is not None and isinstance(names, str):
        names = [names]
    return image, label, names


@contextlib.contextmanager
def _eval_mode(*models):
    """The models in eval mode for the block, then back in the mode each had."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was_training):
            m.train(training)


class _PredictionWriter:
    """Writes predictions as PNGs: the first ``limit`` colour-coded under ``pred_dir`` (None: none),
    and, given a trainId -> label-ID LUT, every one as a Cityscapes label-ID PNG under ``label_id_dir``."""

    def __init__(self, pred_dir: Optional[str], limit: int, palette: np.ndarray,
                 label_id_dir: Optional[str], trainid_to_labelid: Optional[np.ndarray]):
        self.pred_dir, self.limit, self.palette, self.saved = pred_dir, limit, palette, 0
        if pred_dir is not None:
            os.makedirs(pred_dir, exist_ok=True)
        self.label_id_dir, self.lut = label_id_dir, None
        if label_id_dir is not None and trainid_to_labelid is not None:
            mapping = np.asarray(trainid_to_labelid)
            self.lut = np.full(256, 0, dtype=np.uint8)
            self.lut[: len(mapping)] = mapping

    def write(self, pred: torch.Tensor, names: Optional[Sequence[str]], rank: int, first_index: int) -> None:
        """The (B, H, W) trainId maps ``pred``, named ``names`` or else by rank and running index."""
        if self.pred_dir is None and self.lut is None:
            return
        pred_np = pred.to(torch.uint8).cpu().numpy()
        for i in range(pred_np.shape[0]):
            name = str(names[i]) if names is not None else f"{rank:02d}_{first_index + i:06d}"
            if self.pred_dir is not None and self.saved < self.limit:
                path = os.path.join(self.pred_dir, os.path.splitext(safe_name(name))[0] + ".png")
                colorize_prediction(pred_np[i], self.palette).save(path)
                self.saved += 1
            if self.lut is not None:
                path = os.path.join(self.label_id_dir, os.path.splitext(name)[0] + ".png")
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                Image.fromarray(self.lut[pred_np[i]]).save(path)


def _with_progress(loader, progress: bool, desc: str, rank: int):
    """``(iterable, set_postfix)``: a tqdm bar over ``loader`` on rank 0 (set_postfix None elsewhere)."""
    if not progress or tqdm is None:
        return loader, None
    bar = tqdm(loader, desc=desc, unit="batch", disable=rank != 0, dynamic_ncols=True)
    return bar, bar.set_postfix if rank == 0 else None


def _sum_over_ranks(confusion: torch.Tensor, images_seen: int) -> int:
    """Sums ``confusion`` (in place) and the image counts over the process group; the total count."""
    dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
    seen = torch.tensor([images_seen], dtype=torch.int64, device=confusion.device)
    dist.all_reduce(seen, op=dist.ReduceOp.SUM)
    return int(seen.item())


@torch.no_grad()
def evaluate(feature_extractor, classifier, loader, num_classes: int, *, device,
             flip: bool = False, scales: Sequence[float] = (1.0,), output_dir: Optional[str] = None,
             num_images_to_save: int = 0, distributed: bool = False, ignore_index: int = 255,
             palette: Optional[np.ndarray] = None,
             label_id_dir: Optional[str] = None, trainid_to_labelid: Optional[np.ndarray] = None,
             progress: bool = True, desc: str = "eval", amp: Optional[str] = None) -> EvalResult:
    """Evaluate a segmentor over ``loader`` and return an :class:`EvalResult`.

    Args:
        feature_extractor, classifier: ``classifier(feature_extractor(x))`` gives (B, K, h, w) logits.
        loader: yields ``(image (B,3,H,W), label (B,H',W') int, names)``; the label may have another
            resolution than the image (the official test keeps full-resolution labels).
        flip: average with the horizontally mirrored input.
        scales: input scales, e.g. :data:`MULTI_SCALES` for multi-scale testing.
        output_dir: where ``num_images_to_save`` colour-coded prediction PNGs go
            (``<output_dir>/predictions/<name>.png``; rank 0 only under DDP).
        label_id_dir, trainid_to_labelid: if both given, every prediction is also written as a
            label-ID PNG ``<label_id_dir>/<name without extension>.png`` (Cityscapes' submission
            format, readable by cityscapesscripts' evaluation); all ranks write their shard.
        distributed: sum the confusion matrix over the initialised process group.
        amp: "bf16" / "fp16" to run the networks under autocast (CUDA; bf16 also on the CPU).
    Models are put in eval mode for the run and restored to their previous mode after it.
    """
    device = torch.device(device)
    rank, world = _dist_info(distributed)
    with _eval_mode(feature_extractor, classifier):
        save = output_dir is not None and num_images_to_save > 0 and rank == 0
        writer = _PredictionWriter(os.path.join(output_dir, "predictions") if save else None, num_images_to_save,
                                   default_palette(num_classes) if palette is None else palette,
                                   label_id_dir, trainid_to_labelid)
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        images_seen = 0
        batches, set_postfix = _with_progress(loader, progress, desc, rank)
        for step, batch in enumerate(batches):
            image, label, names = _unpack(batch)
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True).long()
            pred = predict_probabilities(feature_extractor, classifier, image, label.shape[-2:],
                                         flip=flip, scales=scales, amp=amp).argmax(dim=1)
            confusion += confusion_matrix(pred, label, num_classes, ignore_index, check=False)
            if set_postfix is not None and step % 10 == 0:
                pixel_acc = 100.0 * float(confusion.diag().sum()) / max(float(confusion.sum()), 1.0)
                set_postfix(pixel_acc=f"{pixel_acc:.1f}%")
            writer.write(pred, names, rank, first_index=images_seen)
            images_seen += image.shape[0]
    if world > 1:
        images_seen = _sum_over_ranks(confusion, images_seen)
    result = scores_from_confusion(confusion, num_images=images_seen)
    if writer.pred_dir is not None:
        result.extra["predictions_dir"] = writer.pred_dir
    return result


def cityscapes_official_scores(label_id_dir: str, gt_files: Sequence[str]) -> dict:
    """Score label-ID prediction PNGs with cityscapesscripts' own pixel-level evaluation.

    Each ground-truth ``*_gtFine_labelIds.png`` in ``gt_files`` is matched to its prediction
    under ``label_id_dir`` by the official rule (``<city>_<seq>_<frame>*.png``), and the official
    ``evaluateImgLists`` computes the class IoUs (instance-level scores and the JSON export are
    switched off; nothing is downloaded). Returns ``{"classes": {name: IoU or NaN}, "mIoU": float}``.
    """
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = official.args
    keys = ("evalInstLevelScore", "JSONOutput", "quiet", "predictionPath", "predictionWalk")
    saved = {k: getattr(args, k) for k in keys}
    try:
        args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
        args.predictionPath, args.predictionWalk = os.path.abspath(label_id_dir), None
        predictions = [official.getPrediction(args, f) for f in gt_files]
        scores = official.evaluateImgLists(predictions, list(gt_files), args)
    except SystemExit as exc:  # cityscapesscripts' printError exits
        raise RuntimeError(f"cityscapesscripts evaluation failed (see its message above): {exc}") from None
    finally:
        for k, v in saved.items():
            setattr(args, k, v)
    return {"classes": dict(scores["classScores"]), "mIoU": float(scores["averageScoreClasses"])}


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return "   n/a" if not np.isfinite(value) else f"{100.0 * value:6.2f}"


def subset_miou(result: EvalResult, class_names: Sequence[str], subset: Sequence[str]) -> float:
    """Mean IoU over the named classes only, e.g. the 13-class mIoU* of the SYNTHIA->Cityscapes
    protocol from a 16-class evaluation."""
    names = list(class_names)
    missing = [n for n in subset if n not in names]
    if missing:
        raise ValueError(f"classes {missing} are not among {names}")
    values = np.array([result.iou[names.index(n)] for n in subset], dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def miou13(result: EvalResult, class_names: Sequence[str]) -> Optional[float]:
    """SYNTHIA -> Cityscapes: the paper's mIoU* over 13 classes, read from the *16-class* model's
    evaluation (the protocol: one 16-class model, reported as mIoU16 and mIoU13); None for
    other class sets."""
    from fada_examples.data.labels import CLASS_NAMES_13, CLASS_NAMES_16

    if list(class_names) != list(CLASS_NAMES_16):
        return None
    return subset_miou(result, class_names, CLASS_NAMES_13)


def format_table(result: EvalResult, class_names: Optional[Sequence[str]] = None) -> str:
    """Per-class IoU / accuracy table in percent, followed by mIoU, mAcc and allAcc."""
    names = _names(class_names, len(result.iou))
    width = max(12, max(len(n) for n in names))
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU (%)':>8}  {'Acc (%)':>8}"]
    lines.append("-" * len(lines[0]))
    for i, name in enumerate(names):
        lines.append(f"{i:>3}  {name:<{width}}  {_pct(result.iou[i]):>8}  {_pct(result.acc[i]):>8}")
    lines.append("-" * len(lines[0]))
    lines.append(f"mIoU {_pct(result.miou).strip()} %   mAcc {_pct(result.macc).strip()} %   "
                 f"allAcc {_pct(result.allacc).strip()} %   ({result.num_images} images)")
    thirteen = miou13(result, names)
    if thirteen is not None:
        lines.append(f"mIoU16 {_pct(result.miou).strip()} %   mIoU* (13 classes) {_pct(thirteen).strip()} %")
    return "\n".join(lines)


def write_results_csv(result: EvalResult, class_names: Optional[Sequence[str]], path: str) -> str:
    """CSV with one row per class (IoU, Acc as fractions, GT / predicted pixel counts) and the
    summary rows mIoU, mAcc, allAcc."""
    names = _names(class_names, len(result.iou))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conf = result.confusion
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "class", "iou", "acc", "gt_pixels", "pred_pixels"])
        for i, name in enumerate(names):
            writer.writerow([i, name, _fmt(result.iou[i]), _fmt(result.acc[i]),
                             int(conf[i].sum()), int(conf[:, i].sum())])
        writer.writerow(["", "mIoU", _fmt(result.miou), "", "", ""])
        thirteen = miou13(result, names)
        if thirteen is not None:
            writer.writerow(["", "mIoU13", _fmt(thirteen), "", "", ""])
        writer.writerow(["", "mAcc", "", _fmt(result.macc), "", ""])
        writer.writerow(["", "allAcc", "", _fmt(result.allacc), "", ""])
    return path


def _fmt(value) -> str:
    return format_number(value, ".6f")
