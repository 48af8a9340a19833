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

ImageNet weights come only from a local file (``weights_path``); nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONES",
    "ASPPClassifier",
    "SmallBackbone",
    "build_segmentor",
    "feature_channels",
    "load_backbone_weights",
    "load_checkpoint_models",
    "strip_module_prefix",
]

BACKBONES = ("resnet101", "vgg16", "small")
_CHANNELS = {"resnet101": 2048, "vgg16": 1024, "small": 128}
_WEIGHT_HINTS = {
    "resnet101": "torchvision's ImageNet ResNet-101 state dict, e.g. resnet101-5d3b4d8f.pth or "
                 "resnet101-63fe2227.pth from https://download.pytorch.org/models/",
    "vgg16": "an ImageNet VGG-16 state dict with torchvision key names (features.N.weight), e.g. "
             "vgg16-397923af.pth from https://download.pytorch.org/models/",
    "small": "a state dict saved from this project's small backbone",
}


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

    return FrozenBatchNorm2d(num_features)


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


def load_backbone_weights(module: nn.Module, backbone: str, weights_path: str) -> Tuple[list, list]:
    """Load ImageNet weights from a local file into a feature extractor (non-strict for heads).

    Returns ``(missing, unexpected)`` key lists. A missing file raises FileNotFoundError naming the
    path and what to put there; no download is ever attempted.
    """
    path = os.path.expanduser(str(weights_path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet weights for backbone {backbone!r} not found at {path!r}: put "
            f"{_WEIGHT_HINTS.get(backbone, 'a state dict')} there (nothing is downloaded at run time), "
            f"or set model.weights='' to start from random initialisation"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = strip_module_prefix(state)
    if backbone == "vgg16":
        # torchvision VGG keys are features.N.*; keep the convs whose new index is known.
        remap = {}
        for old, new in [(i, i) for i in range(23)] + [(i, i - 1) for i in range(24, 30)]:
            for suffix in ("weight", "bias"):
                key = f"features.{old}.{suffix}"
                if key in state:
                    remap[f"features.{new}.{suffix}"] = state[key]
        state = remap
    own = module.state_dict()
    filtered = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not filtered:
        raise ValueError(f"{path!r} holds no tensor matching the {backbone} feature extractor's keys")
    missing, unexpected = module.load_state_dict(filtered, strict=False)
    unexpected = [k for k in state if k not in own]
    return list(missing), unexpected


def build_segmentor(
    backbone: str,
    num_classes: int,
    weights_path: Optional[str] = None,
    freeze_bn: bool = True,
) -> Tuple[nn.Module, ASPPClassifier]:
    """``(feature_extractor, classifier)`` for ``backbone`` in {"resnet101", "vgg16", "small"}.

    ``weights_path``: local ImageNet weights for the backbone (None or "" = random init).
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
        load_backbone_weights(features, backbone, weights_path)
    return features, ASPPClassifier(channels, num_classes)


def strip_module_prefix(state: dict, prefix: str = "module.") -> dict:
    """Remove a DDP ``module.`` prefix when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_checkpoint_models(path: str, device="cpu"):
    """Rebuild ``(feature_extractor, classifier, cfg)`` from a training checkpoint of this project.

    The models are on ``device`` in eval mode; ``cfg`` is the checkpoint's config (a dict).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("feature_extractor", "classifier", "config"):
        if key not in ckpt:
            raise KeyError(f"{path!r} is not a fada_examples checkpoint (no {key!r} entry)")
    cfg = ckpt["config"]
    model = cfg["model"]
    features, classifier = build_segmentor(model["backbone"], model["num_classes"], None, model["freeze_bn"])
    features.load_state_dict(strip_module_prefix(ckpt["feature_extractor"]))
    classifier.load_state_dict(strip_module_prefix(ckpt["classifier"]))
    features.to(device).eval()
    classifier.to(device).eval()
    return features, classifier, cfg
