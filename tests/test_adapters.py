"""Adapters on real torchvision / segmentation_models_pytorch / Hugging Face models (random weights,
nothing downloaded): the logits are the model's own before its upsampling, and FADA trains through them."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fada_core import AdversarialStep, FineGrainedAdversary, FineGrainedDiscriminator
from fada_core.adapters import HookAdapter, SegformerAdapter, SMPAdapter, TorchvisionAdapter, adapt

K = 5


def _images(h=64, w=64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


def _trains(adapter, h=64, w=64):
    """Two AdversarialStep iterations through the adapter with a lazy discriminator: every part moves."""
    torch.manual_seed(0)
    D = FineGrainedDiscriminator(num_classes=K, ndf=16)
    adversary = FineGrainedAdversary(D, align_corners=adapter.align_corners)
    step = AdversarialStep(adapter, adversary, torch.optim.SGD(adapter.parameters(), lr=1e-2),
                           torch.optim.Adam(D.parameters(), lr=1e-3))
    before = [p.detach().clone() for p in adapter.parameters()]
    adapter.train()
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        losses = step(_images(h, w, seed=i), torch.randint(0, K, (2, h, w), generator=g), _images(h, w, seed=10 + i))
    assert all(torch.isfinite(v) for v in losses)
    assert D.in_channels is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.parameters()))
    return D


def test_importing_fada_core_imports_no_model_library():
    code = ("import sys, fada_core, fada_core.adapters, fada_core.plot\n"
            "print([m for m in ('torchvision', 'segmentation_models_pytorch', 'transformers', 'matplotlib') "
            "if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


# ------------------------------------------------------------------ torchvision


def test_torchvision_deeplabv3_logits_before_upsampling_and_training():
    seg = pytest.importorskip("torchvision.models.segmentation", reason="torchvision is not installed")
    model = seg.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=True).eval()
    net = adapt(model)
    assert isinstance(net, TorchvisionAdapter)
    x = _images()
    with torch.no_grad():
        features, logits = net(x)
        full = model(x)["out"]
    assert features.shape == (2, 2048, 8, 8) and logits.shape == (2, K, 8, 8)
    assert torch.equal(F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False), full)
    D = _trains(net)
    assert D.in_channels == 2048


def test_torchvision_lraspp_takes_the_high_level_map():
    seg = pytest.importorskip("torchvision.models.segmentation", reason="torchvision is not installed")
    model = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K).eval()
    x = _images()
    with torch.no_grad():
        features, logits = TorchvisionAdapter(model)(x)
        full = model(x)["out"]
    assert features.shape[1] == 960
    assert torch.equal(F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False), full)


# ------------------------------------------------------------------ segmentation_models_pytorch


@pytest.mark.parametrize("arch", ["DeepLabV3Plus", "Unet"])
def test_smp_logits_before_the_head_upsampling_and_training(arch):
    smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation-models-pytorch is not installed")
    model = getattr(smp, arch)("resnet18", encoder_weights=None, classes=K).eval()
    net = adapt(model)
    assert isinstance(net, SMPAdapter)
    x = _images()
    with torch.no_grad():
        features, logits = net(x)
        full = model(x)
        assert torch.equal(model.segmentation_head[1](logits), full)  # the head's own upsampling
        deepest = SMPAdapter(model, features="encoder")(x).features
    assert deepest.shape[:2] == (2, 512)
    if arch == "DeepLabV3Plus":  # output stride 16 (dilated), decoder and head at stride 4
        assert deepest.shape[-2:] == (4, 4)
        assert features.shape == (2, 256, 16, 16) and logits.shape == (2, K, 16, 16)
    _trains(SMPAdapter(model, features="encoder"))


def test_smp_rejects_a_head_with_an_activation():
    smp = pytest.importorskip("segmentation_models_pytorch", reason="segmentation-models-pytorch is not installed")
    model = smp.Unet("resnet18", encoder_weights=None, classes=K, activation="sigmoid")
    with pytest.raises(ValueError, match="activation=None"):
        SMPAdapter(model)


# ------------------------------------------------------------------ Hugging Face Segformer


def tiny_segformer(num_labels=K):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.SegformerConfig(num_labels=num_labels, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                          num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=64)
    return transformers.SegformerForSemanticSegmentation(config)


def test_segformer_decoder_and_encoder_features_and_training():
    model = tiny_segformer().eval()
    net = adapt(model)
    assert isinstance(net, SegformerAdapter) and net.features == "decoder"
    x = _images()
    with torch.no_grad():
        features, logits = net(x)
        assert torch.equal(logits, model(pixel_values=x).logits)
        assert torch.equal(model.decode_head.classifier(features), logits)  # what the 1x1 classifier sees
        encoder_features, encoder_logits = SegformerAdapter(model, features="encoder")(x)
    assert features.shape == (2, 64, 16, 16) and logits.shape == (2, K, 16, 16)
    assert encoder_features.shape == (2, 128, 2, 2) and torch.equal(encoder_logits, logits)
    assert _trains(net).in_channels == 64
    _trains(SegformerAdapter(model, features="encoder"))


# ------------------------------------------------------------------ generic


def test_hook_adapter_by_module_names():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, K, 1))
    x = _images()
    features, logits = HookAdapter(net, features="1")(x)
    assert torch.equal(features, torch.relu(net[0](x))) and torch.equal(logits, net(x))
    features, logits = HookAdapter(net, features="2", features_from="input", logits="2")(x)
    assert torch.equal(features, torch.relu(net[0](x))) and torch.equal(logits, net(x))
    _trains(HookAdapter(net, features="1"))
    with pytest.raises(ValueError, match="features='body' is not a submodule"):
        HookAdapter(net, features="body")


def test_hook_adapter_on_a_torchvision_model_with_select():
    seg = pytest.importorskip("torchvision.models.segmentation", reason="torchvision is not installed")
    model = seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=K).eval()
    x = _images()
    with torch.no_grad():
        features, logits = HookAdapter(model, features="backbone", logits="classifier",
                                       select=lambda stages: stages["out"])(x)
        want = TorchvisionAdapter(model)(x)
    assert torch.equal(features, want.features) and torch.equal(logits, want.logits)


def test_unknown_family_and_wrong_model():
    with pytest.raises(TypeError, match="use HookAdapter"):
        adapt(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="lacks encoder, decoder, segmentation_head"):
        SMPAdapter(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="features must be one of"):
        SegformerAdapter(tiny_segformer(), features="middle")
