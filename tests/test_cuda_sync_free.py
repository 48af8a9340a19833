"""The CUDA training path never synchronises with the host: a FADA step runs under torch's sync
debug mode "error" and is capturable in a CUDA graph; bad labels are reported lazily (GPU only)."""

from __future__ import annotations

import pytest
import torch

from fada_core import FineGrainedAdversary, FineGrainedDiscriminator, UpsampledCrossEntropy
from fada_core.functional import check_label_errors, class_center_stats

K, C = 5, 8
pytestmark = pytest.mark.cuda


def _models(seed=0):
    torch.manual_seed(seed)
    backbone = torch.nn.Conv2d(3, C, 3, stride=4, padding=1).cuda()
    head = torch.nn.Conv2d(C, K, 1).cuda()
    disc = FineGrainedDiscriminator(C, K, ndf=16).cuda()
    return backbone, head, disc


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x_s = torch.randn(2, 3, 32, 48, generator=g).cuda()
    y_s = torch.randint(0, K, (2, 32, 48), generator=g)
    y_s[:, :4] = 255
    x_t = torch.randn(2, 3, 32, 48, generator=g).cuda()
    return x_s, y_s.cuda(), x_t


def _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t):
    """Generator loss (CE + adversarial) and discriminator loss, both backward; no optimizer step."""
    f_s, f_t = backbone(x_s), backbone(x_t)
    z_s, z_t = head(f_s), head(f_t)
    loss = seg_loss(z_s, y_s) + adversary.generator_loss(f_t, z_t, size=x_t.shape[-2:])
    loss.backward()
    d_loss = adversary.discriminator_loss(f_s.detach(), z_s.detach(), x_s.shape[-2:], f_t.detach(), z_t.detach(),
                                          x_t.shape[-2:])
    d_loss.backward()
    return loss.detach(), d_loss.detach()


def _params(*modules):
    return [p for m in modules for p in m.parameters()]


def test_training_step_does_not_sync(cuda_kernel_ops):
    backbone, head, disc = _models()
    adversary = FineGrainedAdversary(disc, K, backend="kernel")
    seg_loss = UpsampledCrossEntropy(temperature=1.8, backend="kernel")
    x_s, y_s, x_t = _inputs()
    _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t)  # builds, allocates the label-error records
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t)
        class_center_stats(backbone(x_t).detach(), y_s, K, backend="kernel")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_training_step_is_capturable_in_a_cuda_graph(cuda_kernel_ops):
    backbone, head, disc = _models()
    adversary = FineGrainedAdversary(disc, K, backend="kernel")
    seg_loss = UpsampledCrossEntropy(temperature=1.8, backend="kernel")
    params = _params(backbone, head, disc)
    x_s, y_s, x_t = _inputs()

    want = _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t)
    want_grads = [p.grad.clone() for p in params]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
        for _ in range(2):
            for p in params:
                p.grad = None
            _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        got = _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t)
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p, g in zip(params, want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)

    # new inputs copied into the captured ones: the replay follows them
    x_s2, y_s2, x_t2 = _inputs(seed=2)
    x_s.copy_(x_s2), y_s.copy_(y_s2), x_t.copy_(x_t2)
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    fresh = _step(backbone, head, adversary, seg_loss, x_s, y_s, x_t)
    torch.testing.assert_close(got[0], fresh[0], rtol=1e-4, atol=1e-6)
    for p, g in zip(params, replayed):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_bad_labels_reported_lazily_and_context_survives(cuda_kernel_ops):
    logits = torch.randn(1, 3, 4, 5, device="cuda", requires_grad=True)
    labels = torch.zeros(1, 7, 9, dtype=torch.long, device="cuda")
    labels[0, 2, 3] = 3
    seg_loss = UpsampledCrossEntropy(backend="kernel")
    loss = seg_loss(logits, labels)  # no host check: the kernel records the label
    loss.backward()
    assert torch.isnan(loss).item() and torch.isnan(logits.grad).any().item()
    with pytest.raises(ValueError, match=r"upsampled_cross_entropy: labels .*\[0, 3\).*found 3"):
        check_label_errors()
    check_label_errors()  # reported once
    labels[0, 2, 3] = 1
    assert torch.isfinite(seg_loss(logits, labels)).item()  # the CUDA context is usable
    bad = labels.clone()
    bad[0, 0, 0] = -7
    seg_loss(logits, bad)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="found -7"):
        seg_loss(logits, labels)  # the next call reports it
