"""An independent transcription of the official FADA networks and test-time inference
(github.com/JDAI-CV/FADA: core/models/{feature_extractor,classifier,discriminator,layers}.py and
test.py), used as an oracle for checkpoint interoperability. It imports nothing from fada_core or
fada_examples and keeps the official module structure, so its ``state_dict()`` has the official
key layout (``backbone.*``, ``conv2d_list.*``, ``D.*``, ``cls1``/``cls2``)."""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet101, vgg16
from torchvision.models._utils import IntermediateLayerGetter


class OfficialFrozenBN(nn.Module):
    """Official layers.FrozenBatchNorm2d: fixed affine and statistics, no epsilon."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight * self.running_var.rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class OfficialResNetFeatures(nn.Module):
    def __init__(self, freeze_bn=True):
        super().__init__()
        net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True],
                        norm_layer=OfficialFrozenBN if freeze_bn else nn.BatchNorm2d)
        self.backbone = IntermediateLayerGetter(net, return_layers={"layer4": "out"})

    def forward(self, x):
        return self.backbone(x)["out"]


class OfficialVGGFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        layers = list(vgg16(weights=None).features.children())
        kept = [layers[i] for i in list(range(23)) + list(range(24, 30))]
        for i in (23, 25, 27):
            kept[i].dilation, kept[i].padding = (2, 2), (2, 2)
        fc6 = nn.Conv2d(512, 1024, kernel_size=3, padding=4, dilation=4)
        fc7 = nn.Conv2d(1024, 1024, kernel_size=3, padding=4, dilation=4)
        body = nn.Sequential(*kept, fc6, nn.ReLU(inplace=True), fc7, nn.ReLU(inplace=True))
        self.backbone = IntermediateLayerGetter(body, return_layers={"4": "low_fea", "32": "out"})

    def forward(self, x):
        return self.backbone(x)["out"]


class OfficialASPP(nn.Module):
    def __init__(self, in_channels, num_classes, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, stride=1, padding=d, dilation=d, bias=True) for d in dilations)
        for m in self.conv2d_list:
            m.weight.data.normal_(0, 0.01)

    def forward(self, x, size=None):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        if size is not None:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        return out


class OfficialPixelDiscriminator(nn.Module):
    def __init__(self, input_nc, ndf=256, num_classes=19):
        super().__init__()
        self.D = nn.Sequential(nn.Conv2d(input_nc, ndf, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
                               nn.Conv2d(ndf, ndf // 2, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True))
        self.cls1 = nn.Conv2d(ndf // 2, num_classes, 3, 1, 1)
        self.cls2 = nn.Conv2d(ndf // 2, num_classes, 3, 1, 1)

    def forward(self, x, size=None):
        h = self.D(x)
        out = torch.cat((self.cls1(h), self.cls2(h)), dim=1)
        if size is not None:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        return out


def official_inference(fe, clf, image, label, flip=True):
    """test.py ``inference``: softmax of the logits upsampled to the label size; flip averages
    the batch-of-two [image, mirrored image] (batch size 1 only, as the official code)."""
    size = label.shape[-2:]
    if flip:
        image = torch.cat([image, torch.flip(image, [3])], 0)
    with torch.no_grad():
        out = clf(fe(image))
    out = F.softmax(F.interpolate(out, size=size, mode="bilinear", align_corners=True), dim=1)
    out = (out[0] + out[1].flip(2)) / 2 if flip else out[0]
    return out.unsqueeze(0)


def official_multi_scale_inference(fe, clf, image, label, scales=(0.7, 1.0, 1.3), flip=True):
    """test.py ``multi_scale_inference``: every scale (bilinear, align_corners) and, with flip,
    its mirror run separately; the softmax maps are averaged."""
    total = None
    h, w = image.shape[-2:]
    for s in scales:
        x = F.interpolate(image, size=(int(h * s), int(w * s)), mode="bilinear", align_corners=True)
        pred = official_inference(fe, clf, x, label, flip=False)
        total = pred if total is None else total + pred
        if flip:
            total = total + official_inference(fe, clf, torch.flip(x, [3]), label, flip=False).flip(3)
    return total / len(scales) / (2 if flip else 1)
