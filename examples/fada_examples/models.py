"""DeepLab-v2 segmentors as in the official FADA code, split into feature extractor and classifier.

FADA aligns the *features* of the segmentation network, so the network is kept as two modules:

- ``feature_extractor(x) -> (B, C, h, w)``, output stride 8:
  ``resnet101``: torchvision's ResNet-101 with the strides of layer3/layer4 replaced by dilation
  (``replace_stride_with_dilation=[False, True, True]``), C = 2048; BatchNorm frozen
  (``torchvision.ops.FrozenBatchNorm2d``: statistics *and* affine parameters fixed) when
  ``freeze_bn`` as in the official configs for stages 1 and 2.
  ``vgg16``: torchvision's VGG-16 features without pool4/pool5, conv5 dilated by 2, then fc6/fc7
  as 3x3 convolutions with dilation 4 (512 -> 1024 -> 1024, ReLU after each), C = 1024.
  ``small``: a few convolutions with three stride-2 steps (stride 8), C = 128, for quick CPU runs.
- ``classifier(features, size=None) -> logits``: ASPP-v2, four 3x3 convolutions C -> K with
  dilation = padding = 6, 12, 18, 24, summed; weights N(0, 0.01). Low-resolution logits unless
  ``size`` is given (then bilinear, ``align_corners=True``). Training passes the low-resolution
  logits straight to fada_core's losses, which upsample on the fly.

ImageNet weights come only from a local file (``weights_path``); nothing is downloaded. The
official configs use torchvision's V1 ResNet-101 (``resnet101-5d3b4d8f.pth``) and, for VGG-16, Justin
Johnson's exact conversion of the Caffe model (``vgg16-00b39a1b.pth``: BGR input in 0-255 minus the
mean, no division by a std). A file that is recognisably the other one (torchvision's RGB VGG-16, the
V2 ResNet-101), or whose keys/shapes do not fit, is an error that names the file that fits.

Weights load strictly: every tensor of the module must come from the file and every tensor of the
file must be used (apart from the ImageNet classifier heads, which DeepLab drops, and VGG's fc6/fc7,
which DeepLab re-creates); otherwise the error lists the missing and unexpected keys. ``partial=True``
loads what fits and returns the lists instead.

Checkpoints of the official FADA release (``{"feature_extractor", "classifier"[, "model_D"]}`` with
keys ``backbone.*`` / ``conv2d_list.*`` / ``D.*``, ``cls1``/``cls2``, possibly ``module.``-prefixed, no
config inside) load through :func:`load_model_states` / :func:`load_checkpoint_models` too; their
config (backbone, classes, BN) comes from the caller. The official FrozenBatchNorm2d has no epsilon
(``weight * running_var.rsqrt()``), so neither has this one: frozen-BN models compute exactly what
the official ones do.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONES",
    "ASPPClassifier",
    "SmallBackbone",
    "WeightsError",
    "build_segmentor",
    "feature_channels",
    "from_official_state",
    "identify_weights",
    "is_official_checkpoint",
    "load_backbone_weights",
    "load_checkpoint_models",
    "load_model_states",
    "load_state_strict",
    "strip_module_prefix",
]

BACKBONES = ("resnet101", "vgg16", "small")
_CHANNELS = {"resnet101": 2048, "vgg16": 1024, "small": 128}
# The ImageNet files of the official configs (https://github.com/JDAI-CV/FADA/tree/master/configs).
OFFICIAL_WEIGHTS = {
    "resnet101": "resnet101-5d3b4d8f.pth",
    "vgg16": "vgg16-00b39a1b.pth",
}
_WEIGHT_HINTS = {
    "resnet101": "torchvision's V1 ImageNet ResNet-101, resnet101-5d3b4d8f.pth (the official configs' file; "
                 "resnet101-63fe2227.pth is the same V1 weights re-saved) from https://download.pytorch.org/models/",
    "vgg16": "the Caffe VGG-16 converted by Justin Johnson, vgg16-00b39a1b.pth "
             "(https://github.com/jcjohnson/pytorch-vgg; BGR 0-255 input, input.to_bgr255=true as in the VGG configs)",
    "small": "a state dict saved from this project's small backbone",
}
# torchvision names its files <arch>-<first 8 hex digits of the file's SHA-256>.pth; these known
# files are recognised by content, whatever they are called.
_KNOWN_FILES = {
    "5d3b4d8f": ("resnet101", "v1", "torchvision's V1 ResNet-101 (resnet101-5d3b4d8f.pth)"),
    "63fe2227": ("resnet101", "v1", "torchvision's V1 ResNet-101 (resnet101-63fe2227.pth)"),
    "cd907fc2": ("resnet101", "v2", "torchvision's V2 ResNet-101 (resnet101-cd907fc2.pth, IMAGENET1K_V2)"),
    "397923af": ("vgg16", "rgb", "torchvision's VGG-16 (vgg16-397923af.pth, RGB input normalised by the "
                                 "ImageNet mean/std)"),
    "00b39a1b": ("vgg16", "bgr255", "the Caffe VGG-16 conversion (vgg16-00b39a1b.pth, BGR 0-255 input)"),
}


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model it is loaded into."""


def feature_channels(backbone: str) -> int:
    """Channels of ``feature_extractor``'s output for ``backbone``."""
    if backbone not in _CHANNELS:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return _CHANNELS[backbone]


class ASPPClassifier(nn.Module):
    """DeepLab-v2 ASPP classifier: the sum of four dilated 3x3 convolutions C_in -> K."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, features: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        out = self.branches[0](features)
        for conv in self.branches[1:]:
            out = out + conv(features)
        if size is not None:
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=True)
        return out


class SmallBackbone(nn.Module):
    """A light stride-8 backbone (about 0.3 M parameters, 128 output channels) for CPU smoke runs and tests."""

    def __init__(self, freeze_bn: bool = False, width: int = 32) -> None:
        super().__init__()
        norm = _frozen_bn if freeze_bn else nn.BatchNorm2d

        def block(cin: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                norm(cout),
                nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(3, width, 2),
            block(width, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
            block(4 * width, 4 * width, 1, dilation=2),
        )
        self.out_channels = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _frozen_bn(num_features: int) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    # eps=0: the official FrozenBatchNorm2d computes weight * running_var.rsqrt() with no epsilon.
    return FrozenBatchNorm2d(num_features, eps=0.0)


class ResNetFeatures(nn.Module):
    """torchvision ResNet-101 up to layer4, output stride 8 (dilated layer3/layer4)."""

    def __init__(self, freeze_bn: bool = True) -> None:
        super().__init__()
        from torchvision.models import resnet101

        norm = _frozen_bn if freeze_bn else nn.BatchNorm2d
        net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True], norm_layer=norm)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class VGGFeatures(nn.Module):
    """DeepLab-v2 VGG-16: pool4/pool5 removed, conv5 dilation 2, fc6/fc7 3x3 dilation 4 -> 1024 ch."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        layers = list(vgg16(weights=None).features.children())
        # torchvision indices: 23 = pool4, 24/26/28 = conv5_1..3, 30 = pool5.
        kept = layers[:23] + layers[24:30]
        for conv in (kept[23], kept[25], kept[27]):
            conv.dilation, conv.padding = (2, 2), (2, 2)
        self.features = nn.Sequential(*kept)
        self.fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=4, dilation=4)
        self.fc7 = nn.Conv2d(1024, 1024, kernel_size=3, padding=4, dilation=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.relu(self.fc6(x), inplace=True)
        return F.relu(self.fc7(x), inplace=True)


def _sha256_prefix(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:8]


def identify_weights(path: str, state: Optional[dict] = None) -> Tuple[str, str]:
    """``(backbone, kind)`` of a known ImageNet file, else ``("", "")``.

    By content hash (torchvision's naming convention) first; then by key layout: Johnson's Caffe
    VGG-16 keeps the pre-2017 torchvision classifier names ``classifier.1`` / ``classifier.4``
    (jcjohnson/pytorch-vgg#3) where torchvision's own file has ``classifier.0`` / ``classifier.3``.
    """
    known = _KNOWN_FILES.get(_sha256_prefix(path))
    if known:
        return known[0], known[1]
    if state is not None and "classifier.1.weight" in state and "classifier.4.weight" in state \
            and "features.0.weight" in state:
        return "vgg16", "bgr255"
    return "", ""


def _check_known_file(path: str, backbone: str, kind: str, bgr255: bool) -> None:
    """Raise if the file is recognisably not the one this backbone/input format needs."""
    if not kind:
        return
    fits = _WEIGHT_HINTS[backbone]
    if backbone == "resnet101" and kind == "v2":
        raise WeightsError(f"{path!r} is torchvision's V2 ResNet-101 (IMAGENET1K_V2); the official FADA "
                           f"configs start from {fits}")
    if backbone == "vgg16" and kind == "rgb" and bgr255:
        raise WeightsError(f"{path!r} is torchvision's RGB VGG-16 (vgg16-397923af.pth) but the config feeds "
                           f"Caffe-style BGR 0-255 input (input.to_bgr255=true): use {fits}, or set "
                           f"input.to_bgr255=false with the ImageNet pixel_mean/pixel_std for this file")
    if backbone == "vgg16" and kind == "bgr255" and not bgr255:
        raise WeightsError(f"{path!r} is the Caffe VGG-16 (BGR 0-255 input) but the config feeds RGB input "
                           f"normalised by mean/std (input.to_bgr255=false): set input.to_bgr255=true, "
                           f"input.pixel_mean=[103.939,116.779,123.68], input.pixel_std=[1,1,1] as the "
                           f"official VGG configs, or use torchvision's vgg16-397923af.pth")


def _short(keys: Sequence[str], limit: int = 12) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(module: nn.Module, state: Dict[str, torch.Tensor], what: str, *,
                      partial: bool = False, ignore_missing: Iterable[str] = (),
                      ignore_unexpected: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """Load ``state`` into ``module``; every key must match in name and shape.

    Keys starting with a prefix in ``ignore_missing`` may be absent from ``state`` and those in
    ``ignore_unexpected`` may be left over (both stated by the caller, e.g. the ImageNet ``fc``).
    Otherwise a :class:`WeightsError` names ``what`` and lists the missing, unexpected and
    mis-shaped keys; with ``partial=True`` the tensors that fit are loaded and ``(missing,
    unexpected)`` returned instead. BN ``num_batches_tracked`` counters are neither required nor
    rejected (frozen BN has none; they do not change a prediction).
    """
    own = module.state_dict()
    ignore_missing, ignore_unexpected = tuple(ignore_missing), tuple(ignore_unexpected)
    shaped = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore_unexpected)
                  and not k.endswith("num_batches_tracked")]
    if (missing or unexpected or shaped) and not partial:
        parts = [f"missing keys ({len(missing)}): {_short(missing)}" if missing else "",
                 f"unexpected keys ({len(unexpected)}): {_short(unexpected)}" if unexpected else "",
                 f"shape mismatches ({len(shaped)}): {_short(shaped, 6)}" if shaped else ""]
        raise WeightsError(f"{what} does not fit the model; " + "; ".join(p for p in parts if p)
                           + " (pass partial=True to load only the tensors that fit)")
    if not fitting:
        raise WeightsError(f"{what}: no tensor fits the model (wrong file?)")
    module.load_state_dict(fitting, strict=False)
    return missing + [k.split(" ")[0] for k in shaped], unexpected


def _read_state(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return strip_module_prefix(state)


def load_backbone_weights(module: nn.Module, backbone: str, weights_path: str, *,
                          bgr255: Optional[bool] = None, partial: bool = False) -> Tuple[list, list]:
    """Load ImageNet weights from a local file into a feature extractor, strictly.

    ``bgr255``: whether the input is Caffe-style BGR 0-255 (``input.to_bgr255``); default the
    official choice for the backbone (VGG-16: yes, ResNet-101: no). A recognisably wrong file
    (see :func:`identify_weights`) raises :class:`WeightsError` naming the file that fits; so do
    missing or unexpected keys unless ``partial``. Returns ``(missing, unexpected)``. A missing
    file raises FileNotFoundError naming the path; no download is ever attempted.
    """
    path = os.path.expanduser(str(weights_path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights for backbone {backbone!r} not found at {path!r}: put "
            f"{_WEIGHT_HINTS.get(backbone, 'a state dict')} there (nothing is downloaded at run time), "
            f"or set model.weights='' to start from random initialisation"
        )
    state = _read_state(path)
    if backbone in OFFICIAL_WEIGHTS:
        found, kind = identify_weights(path, state)
        if found and found != backbone:
            raise WeightsError(f"{path!r} holds {found} weights; backbone {backbone!r} needs "
                               f"{_WEIGHT_HINTS[backbone]}")
        _check_known_file(path, backbone, kind, (backbone == "vgg16") if bgr255 is None else bool(bgr255))
    ignore_missing: Tuple[str, ...] = ()
    ignore_unexpected: Tuple[str, ...] = ()
    if backbone == "resnet101":
        ignore_unexpected = ("fc.",)                       # the ImageNet classifier
    elif backbone == "vgg16":
        # features.N of torchvision's VGG; pool4 (23) and pool5 (30) have no tensors, so conv5_x
        # (24, 26, 28) move down by one. fc6/fc7 are new 3x3 convs (not the ImageNet FC layers).
        remap = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit():
                index = int(parts[1])
                remap[f"features.{index - 1 if index > 23 else index}.{parts[2]}"] = value
            else:
                remap[key] = value
        state = remap
        ignore_missing, ignore_unexpected = ("fc6.", "fc7."), ("classifier.",)
    return load_state_strict(module, state, f"ImageNet weights {path!r} for backbone {backbone!r}",
                             partial=partial, ignore_missing=ignore_missing,
                             ignore_unexpected=ignore_unexpected)


def build_segmentor(
    backbone: str,
    num_classes: int,
    weights_path: Optional[str] = None,
    freeze_bn: bool = True,
    *,
    bgr255: Optional[bool] = None,
    partial: bool = False,
) -> Tuple[nn.Module, ASPPClassifier]:
    """``(feature_extractor, classifier)`` for ``backbone`` in {"resnet101", "vgg16", "small"}.

    ``weights_path``: local ImageNet weights for the backbone (None or "" = random init), loaded
    by :func:`load_backbone_weights` (``bgr255``, ``partial`` go there).
    ``freeze_bn``: FrozenBatchNorm2d instead of BatchNorm2d (ResNet and small; VGG has no BN).
    """
    channels = feature_channels(backbone)
    if backbone == "resnet101":
        features: nn.Module = ResNetFeatures(freeze_bn=freeze_bn)
    elif backbone == "vgg16":
        features = VGGFeatures()
    else:
        features = SmallBackbone(freeze_bn=freeze_bn)
    if weights_path:
        load_backbone_weights(features, backbone, weights_path, bgr255=bgr255, partial=partial)
    return features, ASPPClassifier(channels, num_classes)


def strip_module_prefix(state: dict, prefix: str = "module.") -> dict:
    """Remove a DDP ``module.`` prefix when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def is_official_checkpoint(ckpt: dict) -> bool:
    """Whether ``ckpt`` is in the official FADA layout (``backbone.*`` / ``conv2d_list.*`` keys)."""
    classifier = ckpt.get("classifier") if isinstance(ckpt, dict) else None
    if not isinstance(classifier, dict):
        return False
    return any(k.startswith(("conv2d_list.", "module.conv2d_list.")) for k in classifier)


def from_official_state(state: dict, part: str, backbone: str) -> dict:
    """One official state dict (``part`` = feature_extractor | classifier | model_D) with this
    project's key names; a ``module.`` prefix is removed.

    Official -> here: ResNet ``backbone.X`` -> ``X``; VGG ``backbone.N`` (N <= 28) ->
    ``features.N``, ``backbone.29`` -> ``fc6``, ``backbone.31`` -> ``fc7``; ASPP
    ``conv2d_list.i`` -> ``branches.i``; discriminator ``D.j`` -> ``body.j``, ``cls1`` ->
    ``source_head``, ``cls2`` -> ``target_head``.
    """
    state = strip_module_prefix(state)
    out = {}
    for key, value in state.items():
        new = key
        if part == "feature_extractor" and key.startswith("backbone."):
            new = key[len("backbone."):]
            if backbone == "vgg16":
                index, rest = new.split(".", 1)
                new = {"29": "fc6", "31": "fc7"}.get(index, f"features.{index}") + "." + rest
        elif part == "classifier" and key.startswith("conv2d_list."):
            new = "branches." + key[len("conv2d_list."):]
        elif part == "model_D":
            head = key.split(".", 1)
            new = {"D": "body", "cls1": "source_head", "cls2": "target_head"}.get(head[0], head[0]) \
                + ("." + head[1] if len(head) > 1 else "")
        out[new] = value
    return out


def load_model_states(ckpt: dict, features: nn.Module, classifier: nn.Module, *, backbone: str,
                      discriminator: Optional[nn.Module] = None, partial: bool = False,
                      source: str = "checkpoint") -> None:
    """Load the models of a checkpoint dict (this project's or the official layout) strictly.

    ``discriminator`` is loaded from ``discriminator`` (here) or ``model_D`` (official) when given.
    Missing or unexpected keys raise :class:`WeightsError` listing them, unless ``partial``.
    """
    official = is_official_checkpoint(ckpt)
    names = {"feature_extractor": features, "classifier": classifier}
    if discriminator is not None:
        names["model_D" if official else "discriminator"] = discriminator
    for part, module in names.items():
        if part not in ckpt:
            raise KeyError(f"{source} has no {part!r} entry (keys: {sorted(ckpt)})")
        state = from_official_state(ckpt[part], part, backbone) if official else strip_module_prefix(ckpt[part])
        load_state_strict(module, state, f"{part} of {source}", partial=partial)


def load_checkpoint_models(path: str, device="cpu", cfg: Optional[dict] = None, *, partial: bool = False):
    """Rebuild ``(feature_extractor, classifier, cfg)`` from a checkpoint, in eval mode on ``device``.

    A checkpoint of this project carries its config (``cfg`` is then ignored). An official FADA
    checkpoint has none: ``cfg`` (the config it was trained with: ``model.backbone``,
    ``model.num_classes``, ``model.freeze_bn``) must be given and is returned.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "feature_extractor" not in ckpt or "classifier" not in ckpt:
        raise KeyError(f"{path!r} is not a segmentation checkpoint (no 'feature_extractor'/'classifier' entries)")
    if "config" in ckpt:
        cfg = ckpt["config"]
    elif cfg is None:
        raise ValueError(f"{path!r} holds no config (an official FADA checkpoint?): give the config it was "
                         f"trained with, e.g. --config examples/configs/deeplabv2_r101_adv.yaml")
    model = cfg["model"]
    features, classifier = build_segmentor(model["backbone"], model["num_classes"], None, model["freeze_bn"])
    load_model_states(ckpt, features, classifier, backbone=model["backbone"], partial=partial, source=repr(path))
    features.to(device).eval()
    classifier.to(device).eval()
    return features, classifier, cfg
