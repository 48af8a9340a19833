"""The discriminator's lazy ``in_channels``, the class count checked between the discriminator
and the adversary at construction, and non-float features rejected by name."""

import io

import pytest
import torch

from fada_core import FineGrainedAdversary, FineGrainedDiscriminator


def test_in_channels_inferred_at_the_first_call_with_an_optimizer_built_before():
    torch.manual_seed(0)
    D = FineGrainedDiscriminator(num_classes=3, ndf=8)
    assert D.in_channels is None and "in_channels=None" in repr(D)
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    features = torch.randn(2, 12, 5, 6)
    out = D(features)
    assert out.shape == (2, 6, 5, 6) and D.in_channels == 12
    before = D.body[0].weight.detach().clone()
    out.square().mean().backward()
    opt.step()
    assert not torch.equal(D.body[0].weight, before)  # the optimizer holds the materialised weight
    with pytest.raises(ValueError, match="in_channels=12"):
        D(torch.randn(1, 7, 5, 6))


def test_state_dict_round_trip_into_a_lazy_discriminator():
    torch.manual_seed(0)
    trained = FineGrainedDiscriminator(num_classes=3, ndf=8)
    features = torch.randn(1, 5, 4, 4)
    want = trained(features)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = FineGrainedDiscriminator(num_classes=3, ndf=8)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.in_channels == 5
    assert torch.equal(fresh(features), want)
    # and into one built with explicit in_channels: the same parameter names
    explicit = FineGrainedDiscriminator(5, 3, ndf=8)
    explicit.load_state_dict(trained.state_dict())
    assert torch.equal(explicit(features), want)


def test_num_classes_required():
    with pytest.raises(TypeError, match="num_classes is required"):
        FineGrainedDiscriminator(16)


def test_adversary_checks_the_class_count_at_construction():
    D = FineGrainedDiscriminator(num_classes=5, ndf=8)
    with pytest.raises(ValueError, match="num_classes=4 does not match the discriminator's num_classes=5"):
        FineGrainedAdversary(D, 4)
    assert FineGrainedAdversary(D).num_classes == 5  # taken from the discriminator
    plain = torch.nn.Conv2d(4, 10, 1)
    with pytest.raises(ValueError, match="num_classes is required"):
        FineGrainedAdversary(plain)
    assert FineGrainedAdversary(plain, 5).num_classes == 5


def test_integer_features_rejected_by_name():
    D = FineGrainedDiscriminator(num_classes=3, ndf=8)
    adv = FineGrainedAdversary(D, backend="eager")
    features = torch.randint(0, 255, (1, 4, 4, 4), dtype=torch.uint8)
    seg = torch.randn(1, 3, 4, 4)
    with pytest.raises(TypeError, match=r"features must be a floating-point tensor .* torch\.uint8"):
        D(features)
    with pytest.raises(TypeError, match="target_features must be a floating-point"):
        adv.generator_loss(features, seg, (8, 8))
    with pytest.raises(TypeError, match="source_features must be a floating-point"):
        adv.discriminator_loss(features, seg, (8, 8), features.float(), seg, (8, 8))
    assert D.in_channels is None  # nothing was materialised by the rejected calls
