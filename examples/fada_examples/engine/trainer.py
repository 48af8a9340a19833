"""The three FADA training stages, as in the official ``train_src.py`` / ``train_adv.py`` /
``train_self_distill.py``, on fada_core's losses.

Stage ``src`` (source only): CE(upsample(C(F(x_s))), y_s), ignore 255, no temperature.
Stage ``adv`` (fine-grained adversarial), per iteration, batch = half source + half target:
  1. loss_seg = CE(upsample(C(F(x_s))) / T, y_s)                 backward
  2. loss_adv = 0.001 * soft_ce(D(F(x_t)), [a_t, 0])              backward; step F and C
     (a_t = min(softmax(upsample(C(F(x_t))) / T), 0.9), detached)
  3. loss_D = 0.5 soft_ce(D(F(x_s)^), [a_s, 0]) + 0.5 soft_ce(D(F(x_t)^), [0, a_t])   (^ detached)
     backward; step D.
  The iteration is :class:`fada_core.AdversarialStep` (the official order), with
  :class:`fada_core.UpsampledCrossEntropy` for step 1 and :class:`fada_core.FineGrainedAdversary`
  for steps 2-3; both get the *low-resolution* logits and upsample on the fly, so no
  full-resolution logit tensor is built.
Stage ``sd`` (self-distillation): pseudo labels = argmax of the stage-2 model on the target
  training images, made at the teacher's own test size (logits upsampled to the label size); a
  fresh ImageNet-initialised model (BN not frozen in the official ResNet config) is trained on
  them with stage 1's step (CE, no temperature).

Optimisers (official): SGD(momentum 0.9, weight decay 5e-4) for F at lr and for C at 10 x lr;
D: Adam(betas 0.9, 0.99) at base_lr_d; every lr follows poly(0.9) over ``solver.max_iter``
(:class:`.schedule.PolyLR`) and training stops at ``solver.stop_iter``.

Layout (as torchvision's ``references/segmentation/train.py``): ``build_*`` functions for the
data, models, optimisers/schedulers and losses, one step function per stage (:data:`STEPS`), and
:func:`train_stage`, a short loop that logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

import fada_core

from .. import models as M
from . import distributed as D
from .checkpoint import (capture_rng, checkpoint_path, latest_checkpoint, load_checkpoint, restore_rng,
                         save_checkpoint)
from .logger import ProgressBar, TrainingLog, peak_memory_mib
from .sampling import IterationBatchSampler, SeededSampleDataset
from .schedule import PolyLR, poly_lr

__all__ = ["StageResult", "Training", "STEPS", "prepare_data", "poly_lr", "train_stage", "build_loaders",
           "build_training", "supervised_step", "adversarial_step", "generate_pseudo_labels",
           "pseudo_label_dir", "score_pseudo_labels", "target_is_synthetic",
           "evaluate_models", "set_determinism"]

LOSS_COLUMNS = {"src": ["loss_seg"], "adv": ["loss_seg", "loss_adv", "loss_D"], "sd": ["loss_seg"]}


@dataclass
class StageResult:
    stage: str
    stage_dir: str
    checkpoint: str
    iteration: int
    history: List[Dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------
def set_determinism(cfg: Dict[str, Any]) -> None:
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


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


def _per_rank_batch(stage: str, cfg: Dict[str, Any]) -> int:
    """Images per process and stream (stage 'adv' draws half source, half target)."""
    batch, world = cfg["solver"]["batch_size"], D.world_size()
    if batch % world:
        raise ValueError(f"solver.batch_size={batch} must be divisible by the {world} processes")
    per_rank = batch // world
    if stage == "adv":
        if per_rank < 2 or per_rank % 2:
            raise ValueError(f"stage 'adv' splits each process's batch ({per_rank}) half source, half target: "
                             "it must be even")
        per_rank //= 2
    return per_rank


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
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


def _test_transform(input_cfg: Dict[str, Any], size):
    """The official test-time transform: resize to ``size`` (W, H) and normalise as ``input_cfg``."""
    from ..data import build_transforms

    return build_transforms(False, resize=tuple(size), mean=input_cfg["pixel_mean"], std=input_cfg["pixel_std"],
                            to_bgr255=input_cfg["to_bgr255"])


def _with_classes(name: str, kwargs: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    kwargs = dict(kwargs)
    if name.lower() in ("gta5", "cityscapes", "synthia") and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return kwargs


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


def build_loaders(cfg: Dict[str, Any], stage: str, start: int, pseudo_dir: Optional[str] = None) -> List[DataLoader]:
    """The loaders of iterations ``[start, solver.stop_iter)``: the (pseudo-)labelled stream, and
    for stage 'adv' the target stream."""
    per_rank, stop = _per_rank_batch(stage, cfg), cfg["solver"]["stop_iter"]
    source = _source_dataset(cfg, stage, pseudo_dir)
    lists = _class_lists(cfg, source) if stage != "sd" else None
    loaders = [_loader(source, per_rank, cfg, 0, start, stop, lists)]
    if stage == "adv":
        loaders.append(_loader(_target_dataset(cfg), per_rank, cfg, 1, start, stop))
    return loaders


# ------------------------------------------------------------------------------------------------
# models, optimisers, schedules, losses
# ------------------------------------------------------------------------------------------------
def _build_segmentor(cfg: Dict[str, Any], device: torch.device, with_weights: bool):
    m = cfg["model"]
    torch.manual_seed(cfg["seed"])
    features, classifier = M.build_segmentor(m["backbone"], m["num_classes"],
                                             m["weights"] if with_weights else None, m["freeze_bn"],
                                             bgr255=cfg["input"]["to_bgr255"], partial=m["partial_weights"])
    return features.to(device), classifier.to(device)


def build_models(cfg: Dict[str, Any], stage: str, device: torch.device, ckpt: Optional[Dict[str, Any]] = None):
    """``(features, classifier, discriminator or None)``, unwrapped: from ``ckpt`` when resuming, else
    stage 'adv' from ``init_from`` (the stage-1 checkpoint) and the others from ``model.weights``."""
    init = None
    if ckpt is None and stage == "adv":
        if cfg["init_from"]:
            init = load_checkpoint(cfg["init_from"])
        elif D.is_main():
            warnings.warn("stage 'adv' without init_from (a stage-1 checkpoint): starting from model.weights "
                          "(ImageNet, or random when empty)")
    features, classifier = _build_segmentor(cfg, device, with_weights=ckpt is None and init is None)
    discriminator = None
    if stage == "adv":
        torch.manual_seed(cfg["seed"] + 1)
        discriminator = fada_core.FineGrainedDiscriminator(M.feature_channels(cfg["model"]["backbone"]),
                                                           cfg["model"]["num_classes"],
                                                           ndf=cfg["model"]["ndf"]).to(device)
    if ckpt is not None:
        features.load_state_dict(M.strip_module_prefix(ckpt["feature_extractor"]))
        classifier.load_state_dict(M.strip_module_prefix(ckpt["classifier"]))
    elif init is not None:  # this project's or an official FADA checkpoint, loaded strictly
        M.load_model_states(init, features, classifier, backbone=cfg["model"]["backbone"],
                            discriminator=_discriminator_to_init(cfg, init, discriminator),
                            source=repr(cfg["init_from"]))
    if ckpt is not None and discriminator is not None:
        discriminator.load_state_dict(M.strip_module_prefix(ckpt["discriminator"]))
    return features, classifier, discriminator


def _discriminator_to_init(cfg: Dict[str, Any], init: Dict[str, Any], discriminator: Optional[nn.Module]):
    """``discriminator`` when it is to be loaded from the ``init_from`` checkpoint too (its
    ``discriminator``, or an official checkpoint's ``model_D``), as ``init_discriminator`` says."""
    mode, key = cfg["init_discriminator"], "model_D" if M.is_official_checkpoint(init) else "discriminator"
    if discriminator is None:
        return None
    if mode == "require" and key not in init:
        raise ValueError(f"init_discriminator=require, but init_from={cfg['init_from']!r} has no {key!r} entry "
                         f"(keys: {sorted(init)}); a stage-1 checkpoint has none: use init_discriminator=auto")
    load = mode != "skip" and key in init
    if D.is_main():  # say which discriminator training starts from: loaded or freshly initialised
        why = f"its {key!r} entry" if load else ("init_discriminator=skip" if mode == "skip" else f"no {key!r} entry")
        print(f"discriminator: {'loaded from' if load else 'new (random init);'} init_from={cfg['init_from']!r} "
              f"({why})", flush=True)
    return discriminator if load else None


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


def build_optimizers(cfg: Dict[str, Any], features: nn.Module, classifier: nn.Module,
                     discriminator: Optional[nn.Module]) -> Dict[str, torch.optim.Optimizer]:
    """The official optimisers, one per network as in its checkpoints (``optimizer_fea`` / ``_cls`` / ``_D``)."""
    solver = cfg["solver"]
    sgd = dict(momentum=solver["momentum"], weight_decay=solver["weight_decay"])
    opts = {"fea": torch.optim.SGD([p for p in features.parameters() if p.requires_grad], lr=solver["base_lr"], **sgd),
            "cls": torch.optim.SGD(classifier.parameters(), lr=solver["base_lr"] * solver["classifier_lr_mult"],
                                   **sgd)}
    if discriminator is not None:
        opts["D"] = torch.optim.Adam(discriminator.parameters(), lr=solver["base_lr_d"], betas=(0.9, 0.99))
    return opts


def build_schedulers(cfg: Dict[str, Any], optimizers: Dict[str, torch.optim.Optimizer]) -> Dict[str, PolyLR]:
    """Poly(``solver.lr_power``) over ``solver.max_iter`` for each optimiser; the classifier's is
    ``solver.classifier_lr_mult`` (10) times the features'."""
    solver = cfg["solver"]
    base = {"fea": solver["base_lr"], "cls": solver["base_lr"], "D": solver["base_lr_d"]}
    mult = {"cls": solver["classifier_lr_mult"]}
    return {name: PolyLR(opt, base[name], solver["max_iter"], solver["lr_power"], mult.get(name, 1.0))
            for name, opt in optimizers.items()}


def build_losses(cfg: Dict[str, Any], stage: str, discriminator: Optional[nn.Module]):
    """``(segmentation loss, FineGrainedAdversary or None)`` from fada_core."""
    backend, ignore, adv = cfg["backend"], cfg["input"]["ignore_label"], cfg["adv"]
    if stage != "adv":
        return fada_core.UpsampledCrossEntropy(temperature=1.0, ignore_index=ignore, backend=backend), None
    seg_loss = fada_core.UpsampledCrossEntropy(temperature=adv["temperature"], ignore_index=ignore, backend=backend)
    # Under autocast the discriminator's logits come out in bf16/fp16; the soft-label loss is
    # taken on them in fp32 (the kernels accumulate in fp32 anyway; this keeps the eager path exact).
    disc_for_loss = discriminator if cfg["amp"] == "none" else _Float32Output(discriminator)
    adversary = fada_core.FineGrainedAdversary(
        disc_for_loss, cfg["model"]["num_classes"], temperature=adv["temperature"], cap=adv["cap"],
        adversarial_weight=adv["adversarial_weight"], discriminator_weights=tuple(adv["discriminator_weights"]),
        backend=backend)
    return seg_loss, adversary


_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _amp(cfg: Dict[str, Any], device: torch.device):
    dtype = _AMP_DTYPES[cfg["amp"]]
    if dtype is None:
        return contextlib.nullcontext
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
# the training state and its checkpoint
# ------------------------------------------------------------------------------------------------
@dataclass
class Training:
    """Everything one stage's steps update, and what a checkpoint saves and restores."""

    stage: str
    device: torch.device
    features: nn.Module
    classifier: nn.Module
    discriminator: Optional[nn.Module]
    optimizers: Dict[str, torch.optim.Optimizer]
    schedulers: Dict[str, PolyLR]
    scalers: Dict[str, torch.amp.GradScaler]  # "G" (features + classifier), "D"
    seg_loss: nn.Module
    adversary: Optional[nn.Module]
    autocast: Callable[[], Any]
    adversarial: Optional[fada_core.AdversarialStep] = None  # stage 'adv''s iteration
    iteration: int = 0

    def learning_rates(self) -> Dict[str, float]:
        """The learning rates this iteration's step will use (logged as ``lr`` / ``lr_D``)."""
        lrs = {"lr": self.optimizers["fea"].param_groups[0]["lr"]}
        if "D" in self.optimizers:
            lrs["lr_D"] = self.optimizers["D"].param_groups[0]["lr"]
        return lrs

    def train(self) -> None:
        for module in (self.features, self.classifier, self.discriminator):
            if module is not None:
                module.train()


_OPTIMIZER_KEYS = {"fea": "optimizer_fea", "cls": "optimizer_cls", "D": "optimizer_D"}
_SCALER_KEYS = {"G": "scaler", "D": "scaler_D"}


def build_training(cfg: Dict[str, Any], stage: str, device: torch.device,
                   ckpt: Optional[Dict[str, Any]] = None) -> Training:
    """Models (DDP-wrapped under torchrun), optimisers, schedulers, scalers and losses of ``stage``;
    with ``ckpt`` every state (and the RNGs) restored from it, ready to continue exactly."""
    features, classifier, discriminator = build_models(cfg, stage, device, ckpt)
    features = _wrap_ddp(features, device, sync_bn=not cfg["model"]["freeze_bn"])
    classifier = _wrap_ddp(classifier, device, sync_bn=False)
    if discriminator is not None:
        D.broadcast_module(discriminator)  # D is reduced by hand (two forwards before one backward)
    optimizers = build_optimizers(cfg, features, classifier, discriminator)
    schedulers = build_schedulers(cfg, optimizers)  # before loading optimiser states: it sets their lr
    scalers = {"G": _scaler(cfg, device)}
    if discriminator is not None:
        scalers["D"] = _scaler(cfg, device)
    seg_loss, adversary = build_losses(cfg, stage, discriminator)
    t = Training(stage, device, features, classifier, discriminator, optimizers, schedulers, scalers, seg_loss,
                 adversary, _amp(cfg, device))
    if stage == "adv":
        t.adversarial = _adversarial_iteration(t, _AMP_DTYPES[cfg["amp"]])
    if ckpt is not None:
        _load_training_state(t, ckpt)
    return t


def _load_training_state(t: Training, ckpt: Dict[str, Any]) -> None:
    if not isinstance(ckpt.get("scheduler"), dict) or "fea" not in ckpt["scheduler"]:
        raise ValueError("the checkpoint holds no learning-rate scheduler state (written before the schedule "
                         "moved to torch.optim.lr_scheduler): continue from it with init_from / teacher instead")
    for name, opt in t.optimizers.items():
        opt.load_state_dict(ckpt[_OPTIMIZER_KEYS[name]])
        t.schedulers[name].load_state_dict(ckpt["scheduler"][name])
    for name, scaler in t.scalers.items():
        if ckpt.get(_SCALER_KEYS[name]):
            scaler.load_state_dict(ckpt[_SCALER_KEYS[name]])
    t.iteration = int(ckpt["iteration"])
    restore_rng(ckpt["rng"])


def training_state(t: Training, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint of ``t`` (the keys the official scripts write, plus what an exact resume needs)."""
    state = {"stage": t.stage, "iteration": t.iteration,
             "feature_extractor": _state_of(t.features), "classifier": _state_of(t.classifier),
             "scheduler": {name: s.state_dict() for name, s in t.schedulers.items()},
             "rng": capture_rng(),
             "sampler": {"seed": cfg["seed"], "next_iteration": t.iteration,
                         "per_rank_batch": _per_rank_batch(t.stage, cfg), "world_size": D.world_size()},
             "config": cfg}
    if t.discriminator is not None:
        state["discriminator"] = _state_of(t.discriminator)
    for name, opt in t.optimizers.items():
        state[_OPTIMIZER_KEYS[name]] = opt.state_dict()
    for name, scaler in t.scalers.items():
        state[_SCALER_KEYS[name]] = scaler.state_dict() if scaler.is_enabled() else None
    return state


# ------------------------------------------------------------------------------------------------
# one step per stage
# ------------------------------------------------------------------------------------------------
def _to_device(t: Training, batch):
    return (batch[0].to(t.device, non_blocking=True), batch[1].to(t.device, non_blocking=True).long())


def supervised_step(t: Training, batches) -> Dict[str, torch.Tensor]:
    """Stages 'src' and 'sd' (official ``train_src.py`` / ``train_self_distill.py``: the same step,
    on source labels or on pseudo labels): CE on the labelled batch, one SGD step of F and C."""
    for name in ("fea", "cls"):
        t.optimizers[name].zero_grad(set_to_none=True)
    x, y = _to_device(t, batches[0])
    with t.autocast():
        logits = t.classifier(t.features(x))        # low-resolution logits
    loss_seg = t.seg_loss(logits.float(), y)        # upsampled inside, never materialised
    scaler = t.scalers["G"]
    scaler.scale(loss_seg).backward()
    scaler.step(t.optimizers["fea"])
    scaler.step(t.optimizers["cls"])
    scaler.update()
    return {"loss_seg": loss_seg.detach()}


def _adversarial_iteration(t: Training, autocast_dtype: Optional[torch.dtype]) -> fada_core.AdversarialStep:
    """Stage 'adv''s iteration, in the official ``train_adv.py`` order (see the module docstring).

    The (features, classifier) pair lets the helper compute the target logits without autograd (only
    the detached soft labels need them), so the DDP classifier gets gradients from the source alone;
    logits reach the losses in float32 under autocast; D's gradients are averaged over the ranks by
    hand (it runs two forwards before one backward, so it is not DDP-wrapped).
    """
    return fada_core.AdversarialStep(
        (t.features, _Float32Output(t.classifier)), t.adversary, [t.optimizers["fea"], t.optimizers["cls"]],
        t.optimizers["D"], seg_loss=t.seg_loss, scaler=t.scalers["G"], discriminator_scaler=t.scalers["D"],
        autocast_dtype=autocast_dtype,
        on_discriminator_gradients=lambda: D.average_gradients(t.discriminator.parameters()))


def adversarial_step(t: Training, batches) -> Dict[str, torch.Tensor]:
    """Stage 'adv' (official ``train_adv.py``): the source CE and the fine-grained adversarial loss
    on the target batch step F and C; then the discriminator's loss on detached features steps D."""
    x_s, y_s = _to_device(t, batches[0])
    losses = t.adversarial(x_s, y_s, batches[1][0].to(t.device, non_blocking=True))
    return {"loss_seg": losses.segmentation, "loss_adv": losses.adversarial, "loss_D": losses.discriminator}


STEPS = {"src": supervised_step, "adv": adversarial_step, "sd": supervised_step}


# ------------------------------------------------------------------------------------------------
# pseudo labels (stage 3)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_pseudo_labels(features: nn.Module, classifier: nn.Module, cfg: Dict[str, Any], out_dir: str,
                           device: torch.device, *, size, input_cfg: Optional[Dict[str, Any]] = None,
                           progress: bool = True, teacher: str = "") -> int:
    """Argmax pseudo labels of the target training images, written as train-ID PNGs.

    As the official ``test.py --saveres`` run with the teacher's config: image resized to ``size``
    (W, H) and normalised as ``input_cfg`` (default ``cfg['input']``), logits upsampled to the label's
    full resolution (bilinear, align_corners=True). Each rank labels its shard; returns the number of
    images this rank wrote. A ``.done`` marker records the teacher checkpoint and the size.
    """
    import numpy as np
    from PIL import Image

    from ..data import pseudo_label_path
    from ..data.io import write_marker
    from ..evaluation import build_eval_loader, predict_probabilities

    dataset = _unlabelled_target(cfg, _test_transform(input_cfg or cfg["input"], size))
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
        write_marker(os.path.join(out_dir, ".done"), {"teacher": teacher, "size": list(size), "images": len(dataset)})
    D.barrier()
    return written


def pseudo_label_size(cfg: Dict[str, Any], teacher_cfg: Optional[Dict[str, Any]]) -> List[int]:
    """(W, H) the teacher labels at: ``datasets.pseudo_label_size`` when set, else the teacher's own
    ``input.size_test`` from its checkpoint's config (1024x512 for the official adversarial config,
    as the official ``train_with_sd.sh`` runs ``test.py`` with that config)."""
    override = cfg["datasets"]["pseudo_label_size"]
    if override:
        return list(override)
    size = ((teacher_cfg or {}).get("input") or {}).get("size_test")
    if not size:
        raise ValueError(f"the teacher {cfg['teacher']!r} carries no config with input.size_test: set "
                         "datasets.pseudo_label_size=[W,H] (the official adversarial config tests at [1024,512])")
    return list(size)


def _pseudo_labels_ready(out_dir: str, teacher: str, size: Optional[List[int]] = None) -> bool:
    from ..data.io import read_marker

    info = read_marker(os.path.join(out_dir, ".done"))
    if info is None:
        return False
    if not teacher:
        return True
    return info.get("teacher") == os.path.abspath(teacher) and (size is None or info.get("size") == list(size))


def pseudo_label_dir(cfg: Dict[str, Any]) -> str:
    """Where stage 3 reads (and makes) its pseudo labels: ``datasets.pseudo_label_dir`` or
    ``<output_dir>/pseudo_labels``."""
    return cfg["datasets"]["pseudo_label_dir"] or os.path.join(cfg["output_dir"], "pseudo_labels")


def target_is_synthetic(cfg: Dict[str, Any]) -> bool:
    """Whether the target data is the generated synthetic set (whose training labels exist)."""
    syn, target = cfg["datasets"]["synthetic_dir"], cfg["datasets"]["target_root"]
    return bool(syn and target) and os.path.abspath(target).startswith(os.path.abspath(syn) + os.sep)


def _ensure_pseudo_labels(cfg: Dict[str, Any], device: torch.device, progress: bool) -> str:
    out_dir = pseudo_label_dir(cfg)
    teacher = cfg["teacher"]
    if not teacher:
        # A folder filled elsewhere (no marker) is used as it is: PseudoLabelDataset (see _source_dataset)
        # finds each target image's label in it, under the file name the data layer expects.
        if _pseudo_labels_ready(out_dir, teacher) or (os.path.isdir(out_dir) and os.listdir(out_dir)):
            return out_dir
        raise FileNotFoundError(
            f"stage 'sd' needs pseudo labels in {out_dir!r}: pass teacher=<stage-2 checkpoint> "
            f"(or --teacher) to generate them, or set datasets.pseudo_label_dir to a folder of train-ID PNGs")
    features, classifier, teacher_cfg = M.load_checkpoint_models(teacher, device, cfg)  # cfg: for official ones
    if teacher_cfg is cfg:  # an official checkpoint carries no config: its test size is not known
        teacher_cfg = None
    size = pseudo_label_size(cfg, teacher_cfg)
    if not _pseudo_labels_ready(out_dir, teacher, size):
        input_cfg = (teacher_cfg or {}).get("input") or cfg["input"]
        generate_pseudo_labels(features, classifier, cfg, out_dir, device, size=size, input_cfg=input_cfg,
                               progress=progress, teacher=os.path.abspath(teacher))
    del features, classifier
    return out_dir


def score_pseudo_labels(cfg: Dict[str, Any], label_dir: str):
    """Pseudo labels scored against the target training set's own labels (``evaluation.EvalResult``).

    A diagnostic for data whose target training labels exist (the synthetic demo): it says how
    right the labels a stage-3 student learns from are. Training never reads these labels.
    """
    import numpy as np
    from PIL import Image

    from ..data import build_dataset, pseudo_label_path
    from ..evaluation import confusion_matrix, scores_from_confusion

    ds, k = cfg["datasets"], cfg["model"]["num_classes"]
    dataset = build_dataset(ds["target"], ds["target_root"], ds["target_split"], None,
                            **_with_classes(ds["target"], ds["target_kwargs"], k))
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for i in range(len(dataset)):
        _, label, name = dataset.load(i)
        pseudo = np.array(Image.open(pseudo_label_path(label_dir, name)))
        confusion += confusion_matrix(torch.from_numpy(pseudo), torch.from_numpy(np.array(label)), k)
    return scores_from_confusion(confusion, len(dataset))


# ------------------------------------------------------------------------------------------------
# evaluation hook (evaluation.evaluate + analysis.class_center_analysis)
# ------------------------------------------------------------------------------------------------
def evaluate_models(features: nn.Module, classifier: nn.Module, cfg: Dict[str, Any], device: torch.device,
                    output_dir: Optional[str] = None, progress: bool = True,
                    ccd_size: Optional[List[int]] = None) -> Dict[str, Any]:
    """Target-val mIoU at ``input.size_test`` and the mean class-center distance at ``ccd_size``
    (W, H; default ``input.size_test``): a fixed ``ccd_size`` makes CCDs of several stages comparable."""
    from ..analysis import class_center_analysis
    from ..evaluation import build_eval_loader, build_test_dataset, evaluate

    features, classifier = D.unwrap(features), D.unwrap(classifier)
    test_size = list(cfg["input"]["size_test"])
    ccd_size = list(ccd_size or test_size)

    def loader_of(dataset):
        return build_eval_loader(dataset, batch_size=cfg["test"]["batch_size"],
                                 num_workers=cfg["solver"]["num_workers"], distributed=D.is_distributed())

    dataset = build_test_dataset(cfg, size=test_size)
    names = getattr(dataset, "class_names", None)
    loader = loader_of(dataset)
    k = cfg["model"]["num_classes"]
    result = evaluate(features, classifier, loader, k, device=device, flip=cfg["test"]["flip"],
                      scales=tuple(cfg["test"]["scales"]), output_dir=output_dir,
                      num_images_to_save=cfg["test"]["num_images_to_save"], distributed=D.is_distributed(),
                      progress=progress)
    ccd_loader = loader if ccd_size == test_size else loader_of(build_test_dataset(cfg, size=ccd_size))
    ccd = class_center_analysis(features, ccd_loader, k, device=device, backend=cfg["backend"], progress=progress)
    return {"eval": result, "ccd": ccd, "miou": float(result.miou), "ccd_mean": float(ccd.mean),
            "class_names": names, "test_size": test_size, "ccd_size": ccd_size}


# ------------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------------
def _write_config(cfg: Dict[str, Any]) -> None:
    from ..config import to_yaml

    os.makedirs(cfg["output_dir"], exist_ok=True)
    with open(os.path.join(cfg["output_dir"], "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(to_yaml(cfg))


def _load_resume(stage: str, cfg: Dict[str, Any], resume: Optional[str]):
    """``(path, checkpoint)`` to resume from (``"auto"`` = ``<output_dir>/last.pth`` if present)."""
    if resume == "auto":
        resume = latest_checkpoint(cfg["output_dir"])
    if not resume:
        return "", None
    ckpt = load_checkpoint(resume)
    if ckpt.get("stage") != stage:
        raise ValueError(f"{resume!r} is a checkpoint of stage {ckpt.get('stage')!r}, not {stage!r}")
    ignored = ("solver.stop_iter", "output_dir", "solver.num_workers", "solver.checkpoint_period")
    diff = [d for d in _config_diff(ckpt["config"], cfg) if not d.startswith(ignored)]
    if diff and D.is_main():
        warnings.warn("resuming with a config that differs from the checkpoint's: " + "; ".join(diff))
    return resume, ckpt


def _save(t: Training, cfg: Dict[str, Any]) -> str:
    path = checkpoint_path(cfg["output_dir"], t.iteration)
    if D.is_main():
        save_checkpoint(path, training_state(t, cfg))
    D.barrier()
    return path


def _check_finite(losses: Dict[str, float], iteration: int, scaled: bool) -> None:
    if scaled:  # fp16: the scaler skips non-finite steps itself
        return
    for name, value in losses.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} became {value} at iteration {iteration}")


def train_stage(stage: str, cfg: Dict[str, Any], *, resume: Optional[str] = None, progress: bool = True,
                tensorboard: bool = True) -> StageResult:
    """Run one stage (``src`` | ``adv`` | ``sd``) in ``cfg['output_dir']``; returns the final checkpoint.

    ``resume``: a checkpoint of this stage (or ``"auto"`` = ``<output_dir>/last.pth`` if present) to
    continue exactly from; the models, discriminator, optimisers, schedulers, scalers, RNG states and
    the iteration are restored and the data order continues where it stopped.
    """
    if stage not in STEPS:
        raise ValueError(f"stage must be one of {tuple(STEPS)}, got {stage!r}")
    device = D.resolve_device(cfg["device"])
    set_determinism(cfg)
    if D.is_main():
        _write_config(cfg)
    last_ckpt, ckpt = _load_resume(stage, cfg, resume)
    pseudo_dir = _ensure_pseudo_labels(cfg, device, progress) if stage == "sd" else None
    t = build_training(cfg, stage, device, ckpt)
    data = [iter(loader) for loader in build_loaders(cfg, stage, t.iteration, pseudo_dir)]
    columns = ["iteration", "lr"] + (["lr_D"] if stage == "adv" else []) + LOSS_COLUMNS[stage] + \
        ["time_s", "data_time_s", "peak_mem_mib"]
    stop = cfg["solver"]["stop_iter"]
    log = TrainingLog(cfg["output_dir"], stage, columns, t.iteration, stop, resumed=ckpt is not None,
                      log_period=cfg["log_period"], main=D.is_main(), progress=progress, tensorboard=tensorboard)
    step = STEPS[stage]
    t.train()
    end = time.perf_counter()
    try:
        while t.iteration < stop:
            batches = [next(it) for it in data]
            data_time = time.perf_counter() - end
            lrs = t.learning_rates()
            losses = step(t, batches)
            for scheduler in t.schedulers.values():
                scheduler.step()
            t.iteration += 1
            values = D.reduce_mean({n: float(v) for n, v in losses.items()}, device)
            _check_finite(values, t.iteration, t.scalers["G"].is_enabled())
            log.log({"iteration": t.iteration, **lrs, "time_s": time.perf_counter() - end, "data_time_s": data_time,
                     "peak_mem_mib": peak_memory_mib(device)}, values)
            if t.iteration % cfg["solver"]["checkpoint_period"] == 0 or t.iteration == stop:
                last_ckpt = _save(t, cfg)
            end = time.perf_counter()
    finally:
        log.close()
    if not last_ckpt:
        last_ckpt = _save(t, cfg)
    return StageResult(stage, cfg["output_dir"], last_ckpt, t.iteration, log.history)
