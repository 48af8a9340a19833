"""``align_corners`` held to F.interpolate's own convention, and half precision / autocast:
inputs accepted, losses computed and returned in float32 (as torch's cross-entropy under autocast)."""

import pytest
import torch
import torch.nn.functional as F

import fada_core.functional as FF
from fada_core import DomainEncoding, FADALoss, FineGrainedDiscriminator, UpsampledCrossEntropy
from official_fada import official_encoding, official_fada_loss, official_seg_loss

SIZE = (19, 23)  # not a multiple of the inputs: the two corner conventions differ everywhere


def _inputs(dtype=torch.float64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    disc = torch.randn(2, 2 * k, 5, 7, generator=g, dtype=dtype) * 2
    seg = torch.randn(2, k, 4, 6, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, k, (2, *SIZE), generator=g)
    labels[0, :3] = 255
    return disc, seg, labels


# ------------------------------------------------------------------ align_corners


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("domain", ["source", "target"])
def test_fada_loss_eager_matches_official_for_both_corner_conventions(align_corners, domain):
    disc, seg, _ = _inputs()
    want = official_fada_loss(disc, seg, SIZE, domain, align_corners=align_corners)
    got = FF.fada_loss(disc, seg, domain, size=SIZE, backend="eager", align_corners=align_corners)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    module = FADALoss(3, backend="eager", align_corners=align_corners)(disc, seg, domain, SIZE)
    torch.testing.assert_close(module, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align_corners", [True, False])
def test_encoding_and_cross_entropy_match_official(align_corners):
    disc, seg, labels = _inputs()
    want = official_encoding(seg, SIZE, "target", align_corners=align_corners)
    assert torch.equal(FF.domain_encoding(seg, "target", size=SIZE, align_corners=align_corners), want)
    assert torch.equal(DomainEncoding(3, align_corners=align_corners)(seg, "target", SIZE), want)
    want_ce = official_seg_loss(seg, labels, 1.8, align_corners=align_corners)
    got_ce = UpsampledCrossEntropy(1.8, backend="eager", align_corners=align_corners)(seg, labels)
    torch.testing.assert_close(got_ce, want_ce, rtol=1e-12, atol=1e-12)


def test_discriminator_upsamples_with_its_convention():
    features = torch.randn(1, 4, 5, 6)
    for align_corners in (True, False):
        D = FineGrainedDiscriminator(4, 3, ndf=8, align_corners=align_corners)
        want = F.interpolate(D(features), size=SIZE, mode="bilinear", align_corners=align_corners)
        assert torch.equal(D(features, size=SIZE), want)


def test_the_conventions_differ():
    disc, seg, labels = _inputs()
    a = FF.fada_loss(disc, seg, "source", size=SIZE, backend="eager", align_corners=True)
    b = FF.fada_loss(disc, seg, "source", size=SIZE, backend="eager", align_corners=False)
    assert (a - b).abs() > 1e-6


@pytest.mark.parametrize("align_corners", [True, False])
def test_kernels_follow_the_convention(kernel_ops, align_corners):
    """backend="kernel" (the fused kernels, with and without a gradient) against eager, for the
    functions and the modules; the two conventions give different values, so a kernel that ignored
    the argument would fail one of the two."""
    disc, seg, labels = _inputs(torch.float32)
    for reduction in ("mean", "none"):
        d_kernel = disc.clone().requires_grad_(True)
        d_eager = disc.clone().requires_grad_(True)
        got = FF.fada_loss(d_kernel, seg, "target", size=SIZE, reduction=reduction, backend="kernel",
                           align_corners=align_corners)
        want = FF.fada_loss(d_eager, seg, "target", size=SIZE, reduction=reduction, backend="eager",
                            align_corners=align_corners)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(d_kernel.grad, d_eager.grad, rtol=2e-5, atol=2e-7)
    s_kernel = seg.clone().requires_grad_(True)
    s_eager = seg.clone().requires_grad_(True)
    got = UpsampledCrossEntropy(1.8, backend="kernel", align_corners=align_corners)(s_kernel, labels)
    want = UpsampledCrossEntropy(1.8, backend="eager", align_corners=align_corners)(s_eager, labels)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(s_kernel.grad, s_eager.grad, rtol=2e-5, atol=2e-7)
    module = FADALoss(3, backend="kernel", align_corners=align_corners)(disc, seg, "source", SIZE)
    want = FF.fada_loss(disc, seg, "source", size=SIZE, backend="eager", align_corners=align_corners)
    torch.testing.assert_close(module, want, rtol=2e-5, atol=2e-6)


def test_ops_default_to_align_corners_true(kernel_ops):
    """align_corners is the last argument of every loss op, default True: calls without it keep FADA's convention."""
    disc, seg, labels = _inputs(torch.float32)
    for op in ("fada_loss", "fada_loss_backward", "fada_loss_with_grad", "upsampled_cross_entropy",
               "upsampled_cross_entropy_backward", "upsampled_cross_entropy_with_grad"):
        last = getattr(kernel_ops, op).default._schema.arguments[-1]
        assert (last.name, str(last.type), last.default_value) == ("align_corners", "bool", True)
    args = (0, 1.8, 0.9, *SIZE, None, 1)
    default = kernel_ops.fada_loss(disc, seg, *args)
    assert torch.equal(default, kernel_ops.fada_loss(disc, seg, *args, True))
    assert not torch.equal(default, kernel_ops.fada_loss(disc, seg, *args, False))
    default = kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), seg, labels, 1.8, 255, 1)
    assert torch.equal(default, kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), seg, labels, 1.8, 255, 1,
                                                                            True))
    assert not torch.equal(default, kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), seg, labels, 1.8,
                                                                                255, 1, False))


def test_align_corners_must_be_a_bool():
    disc, seg, _ = _inputs()
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        FF.fada_loss(disc, seg, "source", size=SIZE, align_corners=1)
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        FADALoss(3, align_corners="no")


# ------------------------------------------------------------------ half precision and autocast


def _autocast_case(device, dtype, backend):
    """A conv discriminator and segmenter under autocast; the losses against the same
    low-precision values computed in float32 outside autocast."""
    torch.manual_seed(0)
    k = 3
    D = torch.nn.Conv2d(4, 2 * k, 3, padding=1).to(device)
    head = torch.nn.Conv2d(4, k, 1).to(device)
    features = torch.randn(2, 4, 5, 7, device=device)
    labels = torch.randint(0, k, (2, *SIZE), device=device)
    with torch.autocast(device, dtype=dtype):
        disc, seg = D(features), head(features)
        assert disc.dtype == seg.dtype == dtype  # the convs really ran in low precision
        loss = FADALoss(k, backend=backend)(disc, seg, "target", SIZE)
        ce = UpsampledCrossEntropy(1.8, backend=backend)(seg, labels)
    want = FF.fada_loss(disc.float(), seg.float(), "target", size=SIZE, backend="eager")
    want_ce = FF.upsampled_cross_entropy(seg.float(), labels, 1.8, backend="eager")
    return disc, (loss, want), (ce, want_ce), labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_cpu_autocast_losses_are_float32_and_match(dtype, backend):
    disc, (loss, want), (ce, want_ce), labels = _autocast_case("cpu", dtype, backend)
    assert loss.dtype == ce.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ce, want_ce, rtol=2e-6, atol=1e-6)
    # torch's own loss under autocast: float32 as well, same value
    with torch.autocast("cpu", dtype=dtype):
        torch_ce = official_seg_loss(disc[:, :3], labels, 1.8)
    assert torch_ce.dtype == torch.float32
    mine = FF.upsampled_cross_entropy(disc[:, :3], labels, 1.8, backend=backend)
    # float32 summation order only: a value rounded to bf16/fp16 would be off by ~1e-3
    torch.testing.assert_close(mine, torch_ce, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_losses_and_half_gradients(dtype):
    disc, seg, labels = _inputs(dtype)
    disc.requires_grad_(True)
    loss = FF.fada_loss(disc, seg, "source", size=SIZE, backend="eager")
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, disc)
    assert grad.dtype == dtype
    want = official_fada_loss(disc.detach().double(), seg.double(), SIZE, "source")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)  # no half rounding of the result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_kernel_backend_matches_eager(isa_kernel_ops, dtype):
    _, (loss, want), (ce, want_ce), _ = _autocast_case("cpu", dtype, "kernel")
    assert loss.dtype == ce.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ce, want_ce, rtol=2e-5, atol=1e-6)


def _autocast_step(dtype, backend, k=3):
    """One adversarial + segmentation step of two conv heads under CPU autocast: the losses, the
    half activations they saw, and the heads' weight gradients."""
    torch.manual_seed(0)
    D = torch.nn.Conv2d(4, 2 * k, 3, padding=1)
    head = torch.nn.Conv2d(4, k, 1)
    features = torch.randn(2, 4, 5, 7)
    labels = torch.randint(0, k, (2, *SIZE))
    with torch.autocast("cpu", dtype=dtype):
        disc, seg = D(features), head(features)
        loss = FADALoss(k, backend=backend)(disc, seg.detach(), "target", SIZE)
        ce = UpsampledCrossEntropy(1.8, backend=backend)(seg, labels)
    (loss + ce).backward()
    return (loss, ce), (disc.detach(), seg.detach(), labels), (D.weight.grad, head.weight.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_kernels_take_half_and_match_eager_gradients(isa_kernel_ops, dtype):
    """Under CPU autocast the half activations reach the CPU kernels as they are (no float32
    copy): float32 losses, equal to the ops on the half tensors, and the heads' gradients
    match the eager backend's."""
    (loss, ce), (disc, seg, labels), grads = _autocast_step(dtype, "kernel")
    assert disc.dtype == seg.dtype == dtype
    assert loss.dtype == ce.dtype == torch.float32
    assert torch.equal(loss.detach(), isa_kernel_ops.fada_loss(disc, seg, 1, 1.8, 0.9, *SIZE, None, 1))
    assert torch.equal(ce.detach(), isa_kernel_ops.upsampled_cross_entropy(seg, labels, 1.8, 255, 1))
    (want_loss, want_ce), _, want_grads = _autocast_step(dtype, "eager")
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ce, want_ce, rtol=2e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        # dL/d(logits) is rounded to the activations' dtype on both paths, in other orders
        tol = 2e-2 if dtype == torch.float16 else 5e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
        assert want.abs().max() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_cuda_autocast_losses_are_float32_and_match(dtype, backend):
    _, (loss, want), (ce, want_ce), _ = _autocast_case("cuda", dtype, backend)
    assert loss.dtype == ce.dtype == torch.float32
    # the CUDA kernels take half inputs natively (float accumulators and result;
    # the staged kernels' exp2/log2 are the approximate MUFU ones)
    tol = 2e-6 if backend == "eager" else 1e-4
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(ce, want_ce, rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("general", [False, True])  # the staged fast paths; the general kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_kernels_half_pixel_convention(cuda_kernel_ops, monkeypatch, general, dtype):
    """align_corners=False on the GPU, every loss op, against the float64 reference rounded to the dtype."""
    from fada_core import _reference
    from kernel_testing import assert_close_scaled, cross_entropy_inputs, fada_loss_inputs

    if general:
        monkeypatch.setenv("FADA_CORE_CUDA_GENERAL_KERNELS", "1")
    shapes = [((64, 128), (512, 1024)), ((9, 17), (65, 129)), ((1, 1), (5, 7)), ((6, 5), (3, 9)), ((2, 2), (3, 300))]
    for i, ((h, w), (out_h, out_w)) in enumerate(shapes):
        k = 19 if h >= 9 else 3
        disc, seg, weight = fada_loss_inputs(2, k, h, w, h, w, out_h, out_w, dtype, i, True, 2.0, "cuda")
        logits, labels = cross_entropy_inputs(2, k, h, w, out_h, out_w, dtype, i, 0.2, scale=2.0, device="cuda")
        d64 = disc.double().requires_grad_(True)
        want = _reference.fada_loss(d64, seg.double(), "target", 1.8, 0.9, (out_h, out_w), weight.double(), "mean",
                                    False)
        want.backward()
        got, got_grad = cuda_kernel_ops.fada_loss_with_grad(disc, seg, 1, 1.8, 0.9, out_h, out_w, weight, 1, False)
        assert_close_scaled(got, want.detach().to(dtype), dtype)
        assert_close_scaled(got_grad, d64.grad.to(dtype), dtype)
        per_pixel = cuda_kernel_ops.fada_loss(disc, seg, 1, 1.8, 0.9, out_h, out_w, weight, 0, False)
        want = _reference.fada_loss(disc.double(), seg.double(), "target", 1.8, 0.9, (out_h, out_w), weight.double(),
                                    "none", False)
        assert_close_scaled(per_pixel, want.to(dtype), dtype)
        x64 = logits.double().requires_grad_(True)
        want = _reference.upsampled_cross_entropy(x64, labels, 1.8, 255, "mean", False)
        want.backward()
        got, got_grad = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.8, 255, 1, False)
        assert_close_scaled(got, want.detach().to(dtype), dtype)
        assert_close_scaled(got_grad, x64.grad.to(dtype), dtype)
