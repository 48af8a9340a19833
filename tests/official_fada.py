"""An independent transcription of the official FADA formulas (github.com/JDAI-CV/FADA,
train_adv.py), used as an oracle. It deliberately imports nothing from fada_core and keeps
the official structure: upsample to full resolution, divide by T, softmax, cap by masked
assignment, cat with zeros, then soft_label_cross_entropy. ``align_corners`` (official: True)
is a parameter so the library's option can be held to F.interpolate's own convention."""

import torch
import torch.nn.functional as F


def official_soft_label_cross_entropy(pred, soft_label, pixel_weights=None):
    loss = -soft_label.to(pred.dtype) * F.log_softmax(pred, dim=1)
    if pixel_weights is None:
        return torch.mean(torch.sum(loss, dim=1))
    return torch.mean(pixel_weights * torch.sum(loss, dim=1))


def official_soft_label(seg_logits, size, temperature=1.8, cap=0.9, align_corners=True):
    pred = F.interpolate(seg_logits, size=size, mode="bilinear", align_corners=align_corners)
    pred = pred.div(temperature)
    soft = F.softmax(pred, dim=1).detach()
    soft[soft > cap] = cap
    return soft


def official_encoding(seg_logits, size, domain, temperature=1.8, cap=0.9, align_corners=True):
    soft = official_soft_label(seg_logits, size, temperature, cap, align_corners)
    zeros = torch.zeros_like(soft)
    return torch.cat((soft, zeros) if domain == "source" else (zeros, soft), dim=1)


def official_fada_loss(
    disc_logits, seg_logits, size, domain, temperature=1.8, cap=0.9, pixel_weights=None, align_corners=True
):
    d_up = F.interpolate(disc_logits, size=size, mode="bilinear", align_corners=align_corners)
    return official_soft_label_cross_entropy(
        d_up, official_encoding(seg_logits, size, domain, temperature, cap, align_corners), pixel_weights
    )


def official_seg_loss(logits, labels, temperature=1.0, ignore_index=255, align_corners=True):
    pred = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    return torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(pred.div(temperature), labels)
