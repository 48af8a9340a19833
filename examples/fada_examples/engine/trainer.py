"""The three FADA training stages, as in the official ``train_src.py`` / ``train_adv.py`` /
``train_self_distill.py``, on fada_core's losses.

Stage ``src`` (source only): CE(upsample(C(F(x_s))), y_s), ignore 255, no temperature.
Stage ``adv`` (fine-grained adversarial), per iteration, batch = half source + half target:
  1. loss_seg = CE(upsample(C(F(x_s))) / T, y_s)                 backward
  2. loss_adv = 0.001 * soft_ce(D(F(x_t)), [a_t, 0])              backward; step F and C
     (a_t = min(softmax(upsample(C(F(x_t))) / T), 0.9), detached)
  3. loss_D = 0.5 soft_ce(D(F(x_s)^), [a_s, 0]) + 0.5 soft_ce(D(F(x_t)^), [0, a_t])   (^ detached)
     backward; step D.
  Steps 2-3 use :class:`fada_core.FineGrainedAdversary`, step 1
  :class:`fada_core.UpsampledCrossEntropy`; both get the *low-resolution* logits and upsample
  on the fly, so no full-resolution logit tensor is built.
Stage ``sd`` (self-distillation): pseudo labels = argmax of the stage-2 model on the target
  training images (logits upsampled to the label size); a fresh ImageNet-initialised model
  (BN not frozen in the official ResNet config) is trained on them with CE, no temperature.

Optimisers (official): SGD(momentum 0.9, weight decay 5e-4) for F at lr and for C at 10 x lr;
D: Adam(betas 0.9, 0.99) at base_lr_d; every lr follows poly(0.9) over ``solver.max_iter`` and
training stops at ``solver.stop_iter``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

import fada_core

from .. import models as M
from . import distributed as D
from .checkpoint import (capture_rng, checkpoint_path, latest_checkpoint, load_checkpoint, restore_rng,
                         save_checkpoint)
from .logger import CSVLogger, ProgressBar, TensorBoardLogger, peak_memory_mib
from .sampling import IterationBatchSampler, SeededSampleDataset

__all__ = ["StageResult", "resolve_device", "prepare_data", "poly_lr", "train_stage", "generate_pseudo_labels",
           "build_test_dataset", "evaluate_models", "set_determinism"]

LOSS_COLUMNS = {"src": ["loss_seg"], "adv": ["loss_seg", "loss_adv", "loss_D"], "sd": ["loss_seg"]}


@dataclass
class StageResult:
    stage: str
    stage_dir: str
    checkpoint: str
    iteration: int
    history: List[Dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# setup helpers
# ------------------------------------------------------------------------------------------------
def resolve_device(cfg: Dict[str, Any]) -> torch.device:
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' requested but no CUDA device is visible")
        if D.is_distributed():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(want)


def set_determinism(cfg: Dict[str, Any]) -> None:
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """Official ``adjust_learning_rate('poly', ...)``: base * (1 - it / max_iter) ** power."""
    return base_lr * (1.0 - float(iteration) / max_iter) ** power


def prepare_data(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check the data roots; with none given at all, the synthetic data (generated once, by rank 0)."""
    from ..data.roots import announce_synthetic, uses_synthetic_data

    ds = cfg["datasets"]
    if not uses_synthetic_data(ds):  # raises naming the key of a missing/empty root
        return cfg
    from ..data import make_synthetic_data

    syn_dir = ds["synthetic_dir"] or os.path.join(os.path.dirname(os.path.abspath(cfg["output_dir"])),
                                                  "synthetic_data")
    syn = ds["synthetic"]
    kwargs = dict(num_source=syn["num_source"], num_target_train=syn["num_target_train"],
                  num_target_val=syn["num_target_val"], size=tuple(syn["size"]), seed=syn["seed"])
    if D.is_main():
        announce_synthetic(syn_dir)
        paths = make_synthetic_data(syn_dir, **kwargs)
    D.barrier()
    if not D.is_main():
        paths = make_synthetic_data(syn_dir, **kwargs)
    cfg = json.loads(json.dumps(cfg))
    ds = cfg["datasets"]
    if not ds["source_root"]:
        ds["source_root"] = paths["source"] if ds["source"] == "gta5" else paths["target"]
        if ds["source"] == "gta5" and not ds["class_balanced_lists"] and os.path.isfile(paths.get("class_lists", "")):
            ds["class_balanced_lists"] = paths["class_lists"]
    if not ds["target_root"]:
        ds["target_root"] = paths["target"]
    ds["synthetic_dir"] = syn_dir
    return cfg


def _train_transform(cfg: Dict[str, Any], stream: str):
    from ..data import build_transforms

    inp = cfg["input"]
    size = tuple(inp["source_size_train"] if stream == "source" else inp["target_size_train"])
    scales = tuple(inp["scales_train"])
    jitter = (inp["brightness"], inp["contrast"], inp["saturation"], inp["hue"]) if stream == "source" else (0, 0, 0, 0)
    kwargs = dict(flip=inp["flip_prob_train"], jitter=jitter, mean=inp["pixel_mean"], std=inp["pixel_std"],
                  to_bgr255=inp["to_bgr255"])
    if scales == (1.0, 1.0):
        return build_transforms(True, resize=size, **kwargs)
    return build_transforms(True, scale=scales, crop=size, **kwargs)


def _test_transform(cfg: Dict[str, Any]):
    from ..data import build_transforms

    inp = cfg["input"]
    return build_transforms(False, resize=tuple(inp["size_test"]), mean=inp["pixel_mean"], std=inp["pixel_std"],
                            to_bgr255=inp["to_bgr255"])


def _with_classes(name: str, kwargs: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    kwargs = dict(kwargs)
    if name.lower() in ("gta5", "cityscapes", "synthia") and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return kwargs


def build_test_dataset(cfg: Dict[str, Any], split: Optional[str] = None, labelled: bool = True):
    """Target images at ``input.size_test``, labels at full resolution (official test.py)."""
    from ..data import build_dataset

    ds = cfg["datasets"]
    root = ds["test_root"] or ds["target_root"]
    split = split or ds["test_split"]
    kwargs = _with_classes(ds["test"], ds["test_kwargs"], cfg["model"]["num_classes"])
    return build_dataset(ds["test"], root, split, _test_transform(cfg), **kwargs)


def _source_dataset(cfg: Dict[str, Any], stage: str, pseudo_dir: Optional[str]):
    from ..data import build_dataset

    ds = cfg["datasets"]
    transform = _train_transform(cfg, "source")
    if stage == "sd":
        from ..data import PseudoLabelDataset

        return PseudoLabelDataset(_unlabelled_target(cfg, transform), pseudo_dir, transform)
    kwargs = _with_classes(ds["source"], ds["source_kwargs"], cfg["model"]["num_classes"])
    return build_dataset(ds["source"], ds["source_root"], ds["source_split"], transform, **kwargs)


def _unlabelled_target(cfg: Dict[str, Any], transform):
    """The target training images; their labels are never used (all 255 for Cityscapes)."""
    from ..data import build_dataset

    ds = cfg["datasets"]
    kwargs = _with_classes(ds["target"], ds["target_kwargs"], cfg["model"]["num_classes"])
    if ds["target"].lower() == "cityscapes":
        kwargs.setdefault("load_labels", False)
    return build_dataset(ds["target"], ds["target_root"], ds["target_split"], transform, **kwargs)


def _target_dataset(cfg: Dict[str, Any]):
    return _unlabelled_target(cfg, _train_transform(cfg, "target"))


def _class_lists(cfg: Dict[str, Any], dataset) -> Optional[List[int]]:
    """The official class-balanced source list (GTA5/SYNTHIA), or None (see data.sampling)."""
    from ..data.sampling import source_draw_list

    ds, solver = cfg["datasets"], cfg["solver"]
    return source_draw_list(ds["class_balanced_lists"], dataset, solver["max_iter"] * solver["batch_size"],
                            cfg["seed"], progress=D.is_main(), num_workers=solver["num_workers"],
                            cache_dirs=[ds["source_root"], os.path.dirname(os.path.abspath(cfg["output_dir"]))])


def _loader(dataset, batch: int, cfg: Dict[str, Any], stream: int, start: int, stop: int,
            draws=None) -> DataLoader:
    sampler = IterationBatchSampler(len(dataset), batch, seed=cfg["seed"], stream=stream, start_iter=start,
                                    stop_iter=stop, rank=D.rank(), world_size=D.world_size(),
                                    draws=draws)
    workers = cfg["solver"]["num_workers"]
    return DataLoader(SeededSampleDataset(dataset, cfg["seed"], stream), batch_sampler=sampler,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=2 if workers > 0 else None)


def _build_models(cfg: Dict[str, Any], device: torch.device, with_weights: bool = True):
    m = cfg["model"]
    torch.manual_seed(cfg["seed"])
    features, classifier = M.build_segmentor(m["backbone"], m["num_classes"],
                                             m["weights"] if with_weights else None, m["freeze_bn"],
                                             bgr255=cfg["input"]["to_bgr255"])
    return features.to(device), classifier.to(device)


def _wrap_ddp(module: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    if not D.is_distributed():
        return module
    if sync_bn:
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        elif any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in module.modules()):
            warnings.warn("SyncBatchNorm needs CUDA; on the CPU each rank keeps its own BN statistics")
    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)


def _amp(cfg: Dict[str, Any], device: torch.device):
    if cfg["amp"] == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg["amp"] == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _scaler(cfg: Dict[str, Any], device: torch.device):
    return torch.amp.GradScaler(device.type, enabled=cfg["amp"] == "fp16")


class _Float32Output(nn.Module):
    """Calls a module and returns its output as float32 (used for D's logits under autocast)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs).float()


def _state_of(module: nn.Module) -> Dict[str, torch.Tensor]:
    return M.strip_module_prefix(D.unwrap(module).state_dict())


def _config_diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ------------------------------------------------------------------------------------------------
# pseudo labels (stage 3)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_pseudo_labels(features: nn.Module, classifier: nn.Module, cfg: Dict[str, Any], out_dir: str,
                           device: torch.device, progress: bool = True, teacher: str = "") -> int:
    """Argmax pseudo labels of the target training images, written as train-ID PNGs.

    As the official ``test.py --saveres``: image resized to ``input.size_test``, logits upsampled to
    the label's full resolution (bilinear, align_corners=True). Each rank labels its shard; returns
    the number of images this rank wrote. A ``.done`` marker records the teacher checkpoint.
    """
    import numpy as np
    from PIL import Image

    from ..data import pseudo_label_path
    from ..evaluation import build_eval_loader, predict_probabilities

    dataset = _unlabelled_target(cfg, _test_transform(cfg))
    loader = build_eval_loader(dataset, batch_size=1, num_workers=cfg["solver"]["num_workers"],
                               distributed=D.is_distributed())
    os.makedirs(out_dir, exist_ok=True)
    features.eval()
    classifier.eval()
    written = 0
    bar = ProgressBar(len(loader), 0, "pseudo labels", progress and D.is_main())
    for image, label, names in loader:
        prob = predict_probabilities(features, classifier, image.to(device), label.shape[-2:])
        pred = prob.argmax(1).to(torch.uint8).cpu().numpy()
        for i, name in enumerate(names):
            Image.fromarray(pred[i].astype(np.uint8), mode="L").save(pseudo_label_path(out_dir, name))
            written += 1
        bar.update({})
    bar.close()
    D.barrier()
    if D.is_main():
        with open(os.path.join(out_dir, ".done"), "w", encoding="utf-8") as fh:
            json.dump({"teacher": teacher, "images": len(dataset)}, fh)
    D.barrier()
    return written


def _pseudo_labels_ready(out_dir: str, teacher: str) -> bool:
    marker = os.path.join(out_dir, ".done")
    if not os.path.isfile(marker):
        return False
    with open(marker, "r", encoding="utf-8") as fh:
        info = json.load(fh)
    return not teacher or info.get("teacher") == os.path.abspath(teacher)


def _ensure_pseudo_labels(cfg: Dict[str, Any], stage_dir: str, device: torch.device, progress: bool) -> str:
    out_dir = cfg["datasets"]["pseudo_label_dir"] or os.path.join(stage_dir, "pseudo_labels")
    teacher = cfg["teacher"]
    if _pseudo_labels_ready(out_dir, teacher):
        return out_dir
    if not teacher:
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            return out_dir  # labels made elsewhere (e.g. by the official test.py --saveres)
        raise FileNotFoundError(
            f"stage 'sd' needs pseudo labels in {out_dir!r}: pass teacher=<stage-2 checkpoint> "
            f"(or --teacher) to generate them, or set datasets.pseudo_label_dir to a folder of train-ID PNGs")
    features, classifier, _ = M.load_checkpoint_models(teacher, device, cfg)  # cfg: for official ones
    generate_pseudo_labels(features, classifier, cfg, out_dir, device, progress, os.path.abspath(teacher))
    del features, classifier
    return out_dir


# ------------------------------------------------------------------------------------------------
# evaluation hook (E3's evaluate + CCD)
# ------------------------------------------------------------------------------------------------
def evaluate_models(features: nn.Module, classifier: nn.Module, cfg: Dict[str, Any], device: torch.device,
                    output_dir: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Target-val mIoU (E3's evaluate) and mean class-center distance (E3's analysis)."""
    from ..analysis import class_center_analysis
    from ..evaluation import build_eval_loader, evaluate

    features, classifier = D.unwrap(features), D.unwrap(classifier)
    dataset = build_test_dataset(cfg)
    loader = build_eval_loader(dataset, batch_size=cfg["test"]["batch_size"], num_workers=cfg["solver"]["num_workers"],
                               distributed=D.is_distributed())
    k = cfg["model"]["num_classes"]
    result = evaluate(features, classifier, loader, k, device=device, flip=cfg["test"]["flip"],
                      scales=tuple(cfg["test"]["scales"]), output_dir=output_dir,
                      num_images_to_save=cfg["test"]["num_images_to_save"],
                      class_names=getattr(dataset, "class_names", None), distributed=D.is_distributed(),
                      progress=progress)
    ccd = class_center_analysis(features, loader, k, device=device, backend=cfg["backend"], progress=progress)
    return {"eval": result, "ccd": ccd, "miou": float(result.miou), "ccd_mean": float(ccd.mean),
            "class_names": getattr(dataset, "class_names", None)}


# ------------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------------
def train_stage(stage: str, cfg: Dict[str, Any], *, resume: Optional[str] = None, progress: bool = True,
                tensorboard: bool = True) -> StageResult:
    """Run one stage (``src`` | ``adv`` | ``sd``) in ``cfg['output_dir']``; returns the final checkpoint.

    ``resume``: a checkpoint of this stage (or ``"auto"`` = ``<output_dir>/last.pth`` if present) to
    continue exactly from; the models, discriminator, optimisers, scalers, RNG states and the
    iteration are restored and the data order continues where it stopped.
    """
    if stage not in LOSS_COLUMNS:
        raise ValueError(f"stage must be one of {tuple(LOSS_COLUMNS)}, got {stage!r}")
    device = resolve_device(cfg)
    set_determinism(cfg)
    stage_dir = cfg["output_dir"]
    main = D.is_main()
    if main:
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "config.yaml"), "w", encoding="utf-8") as fh:
            from ..config import to_yaml

            fh.write(to_yaml(cfg))
    solver, k = cfg["solver"], cfg["model"]["num_classes"]
    world = D.world_size()
    if solver["batch_size"] % world:
        raise ValueError(f"solver.batch_size={solver['batch_size']} must be divisible by the {world} processes")
    per_rank = solver["batch_size"] // world
    if stage == "adv":
        if per_rank < 2 or per_rank % 2:
            raise ValueError(f"stage 'adv' splits each process's batch ({per_rank}) half source, half target: "
                             "it must be even")
        per_rank //= 2

    if resume == "auto":
        resume = latest_checkpoint(stage_dir)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None and ckpt.get("stage") != stage:
        raise ValueError(f"{resume!r} is a checkpoint of stage {ckpt.get('stage')!r}, not {stage!r}")

    # --- data -----------------------------------------------------------------------------------
    pseudo_dir = _ensure_pseudo_labels(cfg, stage_dir, device, progress) if stage == "sd" else None

    # --- models ---------------------------------------------------------------------------------
    fresh_init = ckpt is None and not (stage == "adv" and cfg["init_from"])
    features, classifier = _build_models(cfg, device, with_weights=fresh_init)
    if ckpt is None and stage == "adv":
        if cfg["init_from"]:
            init = load_checkpoint(cfg["init_from"])  # this project's or an official FADA checkpoint
            M.load_model_states(init, features, classifier, backbone=cfg["model"]["backbone"],
                                source=repr(cfg["init_from"]))
        elif main:
            warnings.warn("stage 'adv' without init_from (a stage-1 checkpoint): starting from model.weights "
                          "(ImageNet, or random when empty)")
    discriminator = None
    if stage == "adv":
        torch.manual_seed(cfg["seed"] + 1)
        discriminator = fada_core.FineGrainedDiscriminator(M.feature_channels(cfg["model"]["backbone"]), k,
                                                           ndf=cfg["model"]["ndf"]).to(device)
    if ckpt is not None:
        features.load_state_dict(M.strip_module_prefix(ckpt["feature_extractor"]))
        classifier.load_state_dict(M.strip_module_prefix(ckpt["classifier"]))
        if discriminator is not None:
            discriminator.load_state_dict(M.strip_module_prefix(ckpt["discriminator"]))
    features = _wrap_ddp(features, device, sync_bn=not cfg["model"]["freeze_bn"])
    classifier = _wrap_ddp(classifier, device, sync_bn=False)
    if discriminator is not None:
        D.broadcast_module(discriminator)  # D is reduced by hand (two forwards before one backward)

    # --- optimisers -----------------------------------------------------------------------------
    mult = solver["classifier_lr_mult"]
    sgd = dict(momentum=solver["momentum"], weight_decay=solver["weight_decay"])
    fea_params = [p for p in features.parameters() if p.requires_grad]
    opt_fea = torch.optim.SGD(fea_params, lr=solver["base_lr"], **sgd)
    opt_cls = torch.optim.SGD(classifier.parameters(), lr=solver["base_lr"] * mult, **sgd)
    opt_d = (torch.optim.Adam(discriminator.parameters(), lr=solver["base_lr_d"], betas=(0.9, 0.99))
             if discriminator is not None else None)
    scaler, scaler_d = _scaler(cfg, device), _scaler(cfg, device)
    start_iter = 0
    if ckpt is not None:
        opt_fea.load_state_dict(ckpt["optimizer_fea"])
        opt_cls.load_state_dict(ckpt["optimizer_cls"])
        if opt_d is not None:
            opt_d.load_state_dict(ckpt["optimizer_D"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("scaler_D"):
            scaler_d.load_state_dict(ckpt["scaler_D"])
        start_iter = int(ckpt["iteration"])
        restore_rng(ckpt["rng"])
        diff = [d for d in _config_diff(ckpt["config"], cfg)
                if not d.startswith(("solver.stop_iter", "output_dir", "solver.num_workers", "solver.checkpoint_period"))]
        if diff and main:
            warnings.warn("resuming with a config that differs from the checkpoint's: " + "; ".join(diff))

    # --- losses (fada_core) ---------------------------------------------------------------------
    backend = cfg["backend"]
    ignore = cfg["input"]["ignore_label"]
    adv_cfg = cfg["adv"]
    if stage == "adv":
        seg_loss = fada_core.UpsampledCrossEntropy(temperature=adv_cfg["temperature"], ignore_index=ignore,
                                                   backend=backend)
        # Under autocast the discriminator's logits come out in bf16/fp16; the soft-label loss is
        # taken on them in fp32 (the kernels accumulate in fp32 anyway; this keeps the eager path exact).
        disc_for_loss = discriminator if cfg["amp"] == "none" else _Float32Output(discriminator)
        adversary = fada_core.FineGrainedAdversary(
            disc_for_loss, k, temperature=adv_cfg["temperature"], cap=adv_cfg["cap"],
            adversarial_weight=adv_cfg["adversarial_weight"],
            discriminator_weights=tuple(adv_cfg["discriminator_weights"]), backend=backend)
    else:
        seg_loss = fada_core.UpsampledCrossEntropy(temperature=1.0, ignore_index=ignore, backend=backend)

    stop = solver["stop_iter"]
    source_ds = _source_dataset(cfg, stage, pseudo_dir)
    src_lists = _class_lists(cfg, source_ds) if stage != "sd" else None
    src_loader = _loader(source_ds, per_rank, cfg, 0, start_iter, stop, src_lists)
    tgt_loader = _loader(_target_dataset(cfg), per_rank, cfg, 1, start_iter, stop) if stage == "adv" else None

    # --- logging --------------------------------------------------------------------------------
    loss_cols = LOSS_COLUMNS[stage]
    columns = ["iteration", "lr", "lr_D"] * 1 + loss_cols + ["time_s", "data_time_s", "peak_mem_mib"]
    if stage != "adv":
        columns.remove("lr_D")
    csv_log = CSVLogger(os.path.join(stage_dir, "log.csv"), columns, start_iter if ckpt is not None else None) if main else None
    tb = TensorBoardLogger(os.path.join(stage_dir, "tb"), tensorboard and main)
    bar = ProgressBar(stop, start_iter, f"stage {stage}", progress and main)
    amp = _amp(cfg, device)
    history: List[Dict[str, float]] = []

    def save(iteration: int) -> str:
        path = checkpoint_path(stage_dir, iteration)
        if main:
            state = {
                "stage": stage, "iteration": iteration,
                "feature_extractor": _state_of(features), "classifier": _state_of(classifier),
                "optimizer_fea": opt_fea.state_dict(), "optimizer_cls": opt_cls.state_dict(),
                "scheduler": {"method": solver["lr_method"], "base_lr": solver["base_lr"],
                              "base_lr_d": solver["base_lr_d"], "max_iter": solver["max_iter"],
                              "power": solver["lr_power"], "classifier_lr_mult": mult, "iteration": iteration},
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": capture_rng(),
                "sampler": {"seed": cfg["seed"], "next_iteration": iteration,
                            "per_rank_batch": per_rank, "world_size": world},
                "config": cfg,
            }
            if discriminator is not None:
                state["discriminator"] = _state_of(discriminator)
                state["optimizer_D"] = opt_d.state_dict()
                state["scaler_D"] = scaler_d.state_dict() if scaler_d.is_enabled() else None
            save_checkpoint(path, state)
        D.barrier()
        return path

    features.train()
    classifier.train()
    if discriminator is not None:
        discriminator.train()
    iteration = start_iter
    last_ckpt = resume or ""
    data_iters = [iter(src_loader)] + ([iter(tgt_loader)] if tgt_loader is not None else [])
    end = time.perf_counter()
    try:
        while iteration < stop:
            batches = [next(it) for it in data_iters]
            data_time = time.perf_counter() - end
            lr = poly_lr(solver["base_lr"], iteration, solver["max_iter"], solver["lr_power"])
            for g in opt_fea.param_groups:
                g["lr"] = lr
            for g in opt_cls.param_groups:
                g["lr"] = lr * mult
            row: Dict[str, float] = {"lr": lr}
            if opt_d is not None:
                lr_d = poly_lr(solver["base_lr_d"], iteration, solver["max_iter"], solver["lr_power"])
                for g in opt_d.param_groups:
                    g["lr"] = lr_d
                row["lr_D"] = lr_d
            opt_fea.zero_grad(set_to_none=True)
            opt_cls.zero_grad(set_to_none=True)

            x_s = batches[0][0].to(device, non_blocking=True)
            y_s = batches[0][1].to(device, non_blocking=True).long()
            with amp():
                f_s = features(x_s)
                z_s = classifier(f_s)                   # low-resolution logits
            loss_seg = seg_loss(z_s.float(), y_s)       # upsampled inside, never materialised
            scaler.scale(loss_seg).backward()
            losses = {"loss_seg": loss_seg.detach()}

            if stage == "adv":
                x_t = batches[1][0].to(device, non_blocking=True)
                size_s, size_t = tuple(x_s.shape[-2:]), tuple(x_t.shape[-2:])
                with amp():
                    f_t = features(x_t)
                    with torch.no_grad():               # only the (detached) soft labels need it
                        z_t = D.unwrap(classifier)(f_t)
                    loss_adv = adversary.generator_loss(f_t, z_t.float(), size_t)
                scaler.scale(loss_adv).backward()
                scaler.step(opt_fea)
                scaler.step(opt_cls)
                scaler.update()

                opt_d.zero_grad(set_to_none=True)       # drop the generator step's D gradients
                with amp():
                    loss_d = adversary.discriminator_loss(f_s.detach(), z_s.detach().float(), size_s,
                                                          f_t.detach(), z_t.float(), size_t)
                scaler_d.scale(loss_d).backward()
                D.average_gradients(discriminator.parameters())
                scaler_d.step(opt_d)
                scaler_d.update()
                losses["loss_adv"] = loss_adv.detach()
                losses["loss_D"] = loss_d.detach()
            else:
                scaler.step(opt_fea)
                scaler.step(opt_cls)
                scaler.update()

            iteration += 1
            values = D.reduce_mean({n: float(v) for n, v in losses.items()}, device)
            for name, value in values.items():
                if not math.isfinite(value) and not scaler.is_enabled():
                    raise FloatingPointError(f"{name} became {value} at iteration {iteration}")
            step_time = time.perf_counter() - end
            mem = peak_memory_mib(device)
            row.update(values)
            row.update({"iteration": iteration, "time_s": step_time, "data_time_s": data_time, "peak_mem_mib": mem})
            history.append(dict(row))
            if main:
                csv_log.log(row)
                tb.log({**values, "lr": lr}, iteration)
                bar.update({**{n: f"{v:.4f}" for n, v in values.items()}, "lr": f"{lr:.2e}", "mem": f"{mem:.0f}MiB"})
                if iteration % cfg["log_period"] == 0 or iteration == stop:
                    recent = history[-20:]
                    eta = (stop - iteration) * sum(r["time_s"] for r in recent) / len(recent)
                    bar.write(f"[{stage}] iter {iteration}/{stop}  " +
                              "  ".join(f"{n} {v:.4f}" for n, v in values.items()) +
                              f"  lr {lr:.3e}  {step_time:.2f} s/it  eta {eta / 60:.1f} min  peak mem {mem:.0f} MiB")
            if iteration % solver["checkpoint_period"] == 0 or iteration == stop:
                last_ckpt = save(iteration)
            end = time.perf_counter()
    finally:
        bar.close()
        tb.close()
        if csv_log is not None:
            csv_log.close()
    if not last_ckpt:
        last_ckpt = save(iteration)
    return StageResult(stage, stage_dir, last_ckpt, iteration, history)
