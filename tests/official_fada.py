"""An independent transcription of the official FADA formulas (github.com/JDAI-CV/FADA,
train_adv.py), used as an oracle. It deliberately imports nothing from fada_core and keeps
the official structure: upsample to full resolution, divide by T, softmax, cap by masked
assignment, cat with zeros, then soft_label_cross_entropy."""

import torch
import torch.nn.functional as F


def official_soft_label_cross_entropy(pred, soft_label, pixel_weights=None):
    loss = -soft_label.to(pred.dtype) * F.log_softmax(pred, dim=1)
    if pixel_weights is None:
        return torch.mean(torch.sum(loss, dim=1))
    return torch.mean(pixel_weights * torch.sum(loss, dim=1))


def official_soft_label(seg_logits, size, temperature=1.8, cap=0.9):
    pred = F.interpolate(seg_logits, size=size, mode="bilinear", align_corners=True)
    pred = pred.div(temperature)
    soft = F.softmax(pred, dim=1).detach()
    soft[soft > cap] = cap
    return soft


def official_encoding(seg_logits, size, domain, temperature=1.8, cap=0.9):
    soft = official_soft_label(seg_logits, size, temperature, cap)
    zeros = torch.zeros_like(soft)
    return torch.cat((soft, zeros) if domain == "source" else (zeros, soft), dim=1)


def official_fada_loss(disc_logits, seg_logits, size, domain, temperature=1.8, cap=0.9, pixel_weights=None):
    d_up = F.interpolate(disc_logits, size=size, mode="bilinear", align_corners=True)
    return official_soft_label_cross_entropy(
        d_up, official_encoding(seg_logits, size, domain, temperature, cap), pixel_weights
    )


def official_seg_loss(logits, labels, temperature=1.0, ignore_index=255):
    pred = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    return torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(pred.div(temperature), labels)
