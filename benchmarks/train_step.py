"""End-to-end adversarial training step (train_adv.py's iteration) with each loss implementation.

One step = source forward + segmentation loss + backward; target forward + 0.001 x adversarial
loss + backward; step the segmentor; discriminator on detached source and target features,
0.5/0.5 loss, backward; step the discriminator. Variants:

``official``     the official structure: the classifier and the discriminator upsample to full
                 resolution inside forward, the losses are the official formulas.
``fada_eager``   low-resolution logits into ``UpsampledCrossEntropy`` and
``fada_kernel``  ``FineGrainedAdversary`` with ``backend="eager"`` / ``"kernel"``.

The network is ``build_segmentor`` from ``examples/fada_examples/models.py`` (DeepLab-v2
ResNet-101 on the GPU; its light ``small`` stride-8 backbone for reduced CPU runs) with
``fada_core.FineGrainedDiscriminator(C, K, ndf=256)``; random initialisation, nothing downloaded.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.variants import (
    CAP,
    IGNORE_INDEX,
    TEMPERATURE,
    Case,
    Unavailable,
    Variant,
    kernel_unavailable_reason,
    official_soft_label_cross_entropy,
)

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
_MODELS: Dict[tuple, tuple] = {}


def _build_models(case: Case, device: str):
    """(features, classifier, discriminator) with a fixed seed, built once per case and copied."""
    key = (case.key, device)
    if key not in _MODELS:
        if _EXAMPLES not in sys.path:
            sys.path.insert(0, _EXAMPLES)
        try:
            from fada_examples.models import build_segmentor, feature_channels
            import fada_core
        except Exception as exc:
            raise Unavailable(f"models not importable: {exc!r}") from exc
        torch.manual_seed(0)
        feat, cls = build_segmentor(case.backbone, case.classes, weights_path=None, freeze_bn=True)
        disc = fada_core.FineGrainedDiscriminator(feature_channels(case.backbone), case.classes, ndf=256)
        _MODELS.clear()  # keep one case's models alive at a time
        _MODELS[key] = tuple(m.to(device).train() for m in (feat, cls, disc))
    return tuple(copy.deepcopy(m) for m in _MODELS[key])


def _optimizers(feat, cls, disc):
    lr = 2.5e-4
    opt_f = torch.optim.SGD(feat.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    opt_c = torch.optim.SGD(cls.parameters(), lr=lr * 10, momentum=0.9, weight_decay=5e-4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.9, 0.99))
    return opt_f, opt_c, opt_d


def make_train_inputs(case: Case, device: str, seed: int) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = case.batch
    src = torch.randn(b, 3, case.src_h, case.src_w, generator=g)
    tgt = torch.randn(b, 3, case.H, case.W, generator=g)
    labels = torch.randint(0, case.classes, (b, case.src_h, case.src_w), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE_INDEX
    return {"src": src.to(device), "src_labels": labels.to(device), "tgt": tgt.to(device)}


def _official_step(case: Case, device: str):
    feat, cls, disc = _build_models(case, device)
    opt_f, opt_c, opt_d = _optimizers(feat, cls, disc)
    src_size, tgt_size = (case.src_h, case.src_w), (case.H, case.W)

    def soft(pred: Tensor) -> Tensor:
        s = F.softmax(pred, dim=1).detach()
        s[s > CAP] = CAP
        return s

    def step(x: Dict[str, Tensor]) -> Tensor:
        for opt in (opt_f, opt_c, opt_d):
            opt.zero_grad()
        src_fea = feat(x["src"])
        src_pred = cls(src_fea, src_size).div(TEMPERATURE)
        loss_seg = F.cross_entropy(src_pred, x["src_labels"], ignore_index=IGNORE_INDEX)
        loss_seg.backward()
        src_soft = soft(src_pred)
        tgt_fea = feat(x["tgt"])
        tgt_soft = soft(cls(tgt_fea, tgt_size).div(TEMPERATURE))
        loss_adv = 0.001 * official_soft_label_cross_entropy(
            disc(tgt_fea, tgt_size), torch.cat((tgt_soft, torch.zeros_like(tgt_soft)), dim=1)
        )
        loss_adv.backward()
        opt_f.step()
        opt_c.step()
        opt_d.zero_grad()
        loss_d_src = 0.5 * official_soft_label_cross_entropy(
            disc(src_fea.detach(), src_size), torch.cat((src_soft, torch.zeros_like(src_soft)), dim=1)
        )
        loss_d_src.backward()
        loss_d_tgt = 0.5 * official_soft_label_cross_entropy(
            disc(tgt_fea.detach(), tgt_size), torch.cat((torch.zeros_like(tgt_soft), tgt_soft), dim=1)
        )
        loss_d_tgt.backward()
        opt_d.step()
        return (loss_seg + loss_adv + loss_d_src + loss_d_tgt).detach()

    return step


def _fada_step(backend: str):
    def build(case: Case, device: str):
        if backend == "kernel":
            reason = kernel_unavailable_reason(device, None)
            if reason:
                raise Unavailable(reason)
        import fada_core

        feat, cls, disc = _build_models(case, device)
        opt_f, opt_c, opt_d = _optimizers(feat, cls, disc)
        src_size, tgt_size = (case.src_h, case.src_w), (case.H, case.W)
        seg_loss = fada_core.UpsampledCrossEntropy(TEMPERATURE, IGNORE_INDEX, backend=backend)
        adv = fada_core.FineGrainedAdversary(disc, case.classes, TEMPERATURE, CAP, 0.001, backend=backend)

        def step(x: Dict[str, Tensor]) -> Tensor:
            for opt in (opt_f, opt_c, opt_d):
                opt.zero_grad()
            src_fea = feat(x["src"])
            src_pred = cls(src_fea)
            loss_seg = seg_loss(src_pred, x["src_labels"])
            loss_seg.backward()
            tgt_fea = feat(x["tgt"])
            tgt_pred = cls(tgt_fea)
            loss_adv = adv.generator_loss(tgt_fea, tgt_pred, tgt_size)
            loss_adv.backward()
            opt_f.step()
            opt_c.step()
            opt_d.zero_grad()
            loss_d = adv.discriminator_loss(src_fea, src_pred, src_size, tgt_fea, tgt_pred, tgt_size)
            loss_d.backward()
            opt_d.step()
            return (loss_seg + loss_adv + loss_d).detach()

        return step

    return build


def train_variants():
    return [
        Variant("official", "official (upsample in forward, cat/zeros)", _official_step, baseline=True),
        Variant("fada_eager", "fada_core eager", _fada_step("eager")),
        Variant("fada_kernel", "fada_core kernel", _fada_step("kernel")),
    ]
