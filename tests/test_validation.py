"""Every public entry point rejects bad input with an error naming the argument."""

import pytest
import torch

import fada_core.functional as FF
from fada_core import (
    ClassCenterDistance,
    DomainEncoding,
    FADALoss,
    FineGrainedAdversary,
    FineGrainedDiscriminator,
    UpsampledCrossEntropy,
)

D4 = torch.randn(2, 6, 4, 4)
S4 = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(disc_logits=torch.randn(6, 4, 4)), ValueError, ["disc_logits", "4-D"]),
        (dict(seg_logits=torch.randn(2, 3, 4)), ValueError, ["seg_logits", "4-D"]),
        (dict(disc_logits=torch.randn(2, 5, 4, 4)), ValueError, ["disc_logits", "2K = 6"]),
        (dict(seg_logits=torch.randn(2, 4, 4, 4)), ValueError, ["num_classes=3"]),
        (dict(disc_logits=torch.randn(3, 6, 4, 4)), ValueError, ["batch"]),
        (dict(domain="both"), ValueError, ["domain", "'source'"]),
        (dict(size=(0, 8)), ValueError, ["size", "positive"]),
        (dict(size=(8,)), TypeError, ["size"]),
        (dict(seg_logits=torch.randn(2, 3, 5, 5)), ValueError, ["spatial", "size=(H, W)"]),
        (dict(disc_logits=torch.randint(0, 3, (2, 6, 4, 4))), TypeError, ["disc_logits", "floating"]),
        (dict(seg_logits=torch.randint(0, 3, (2, 3, 4, 4))), TypeError, ["seg_logits", "floating"]),
        (dict(weight=torch.rand(2, 5, 5)), ValueError, ["weight", "(B, H, W)"]),
        (dict(disc_logits=[1, 2]), TypeError, ["disc_logits", "torch.Tensor"]),
        (dict(disc_logits=D4.to("meta")), ValueError, ["device", "disc_logits on meta"]),
    ],
)
def test_fada_loss_rejects(kwargs, exc, words):
    args = dict(disc_logits=D4, seg_logits=S4, domain="source", size=None, weight=None)
    args.update(kwargs)
    with pytest.raises(exc) as err:
        FADALoss(3)(**args)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=0), ["temperature", "> 0"]),
        (dict(temperature=-1.0), ["temperature"]),
        (dict(cap=0.0), ["cap", "(0, 1]"]),
        (dict(cap=1.5), ["cap"]),
        (dict(num_classes=0), ["num_classes", ">= 1"]),
        (dict(backend="cuda"), ["backend", "'kernel'"]),
        (dict(reduction="avg"), ["reduction"]),
    ],
)
def test_fada_loss_constructor_rejects(kwargs, words):
    args = dict(num_classes=3)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        FADALoss(**args)
    for word in words:
        assert word in str(err.value)


def test_num_classes_type_is_checked():
    with pytest.raises(TypeError, match="num_classes"):
        FADALoss(3.0)
    with pytest.raises(TypeError, match="temperature"):
        DomainEncoding(3, temperature="hot")


def test_domain_encoding_rejects():
    with pytest.raises(ValueError, match="domain"):
        DomainEncoding(3)(S4, "other")
    with pytest.raises(ValueError, match="num_classes=4"):
        DomainEncoding(4)(S4, "source")
    with pytest.raises(TypeError, match="seg_logits"):
        DomainEncoding(3)(S4.long(), "source")


def test_upsampled_cross_entropy_rejects():
    ce = UpsampledCrossEntropy()
    y = torch.randint(0, 3, (2, 8, 8))
    with pytest.raises(TypeError, match="labels.*integer"):
        ce(S4, y.float())
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\).*found \[3\]"):
        ce(S4, torch.full((2, 8, 8), 3))
    with pytest.raises(ValueError, match=r"labels.*found \[-1\]"):
        ce(S4, torch.full((2, 8, 8), -1))
    with pytest.raises(ValueError, match="batch"):
        ce(S4, y[:1])
    with pytest.raises(ValueError, match="labels.*3-D"):
        ce(S4, y[0])
    with pytest.raises(ValueError, match="device"):
        ce(S4, y.to("meta"))


def test_class_center_distance_rejects():
    m = ClassCenterDistance(3)
    f = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        m.update(f, torch.full((2, 4, 4), 7))
    with pytest.raises(TypeError, match="labels.*integer"):
        m.update(f, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="features and labels must share the batch"):
        m.update(f, torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="features.*floating"):
        m.update(f.long(), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="features.*4-D"):
        m.update(f[0], torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="device"):
        m.update(f, torch.zeros(2, 4, 4, dtype=torch.long, device="meta"))
    m.update(f, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="channel count"):
        m.update(torch.randn(2, 5, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        ClassCenterDistance(0)
    # ignore_index itself is fine, and nothing was added by the failed calls
    m.update(f, torch.full((2, 4, 4), 255))
    assert m.counts.sum().item() == 2 * 4 * 4


def test_discriminator_rejects():
    with pytest.raises(ValueError, match="in_channels"):
        FineGrainedDiscriminator(0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        FineGrainedDiscriminator(4, 0)
    D = FineGrainedDiscriminator(4, 3, ndf=8)
    with pytest.raises(ValueError, match="in_channels=4"):
        D(torch.randn(1, 5, 3, 3))
    with pytest.raises(ValueError, match="size"):
        D(torch.randn(1, 4, 3, 3), size=(-1, 3))


def test_adversary_rejects_non_module():
    with pytest.raises(TypeError, match="discriminator"):
        FineGrainedAdversary(lambda x: x, 3)


def test_kernel_backend_unavailable_message(monkeypatch):
    from fada_core import _build

    monkeypatch.setattr(_build, "kernels_available", lambda device, op=None: False)
    monkeypatch.setattr(_build, "failure_reason", lambda: "no compiler (test)")
    with pytest.raises(RuntimeError, match="backend='kernel'.*no compiler \\(test\\)"):
        FF.fada_loss(D4, S4, "source", backend="kernel")
    # auto falls back to eager and still computes
    assert torch.isfinite(FF.fada_loss(D4, S4, "source", backend="auto"))


def test_module_reprs_list_the_checked_options():
    # the options are checked (ints become floats) and listed in the order the constructor takes them
    assert repr(FADALoss(3, temperature=2)) == (
        "FADALoss(num_classes=3, temperature=2.0, cap=0.9, reduction='mean', backend='auto', align_corners=True)"
    )
    assert repr(UpsampledCrossEntropy(reduction="sum", align_corners=False)) == (
        "UpsampledCrossEntropy(temperature=1.0, ignore_index=255, reduction='sum', backend='auto', "
        "align_corners=False)"
    )
    assert repr(DomainEncoding(4, cap=1)) == "DomainEncoding(num_classes=4, temperature=1.8, cap=1.0, align_corners=True)"
    assert repr(ClassCenterDistance(2, backend="eager")) == (
        "ClassCenterDistance(num_classes=2, ignore_index=255, backend='eager')"
    )
