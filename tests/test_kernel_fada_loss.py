"""The compiled fada_loss / fada_loss_backward / fada_loss_with_grad kernels against the eager reference.

Every kernel call runs with ``FADA_CORE_DEBUG_POISON=1``: outputs and scratch
buffers start as NaN in the C++ code, so a value the kernel forgot to write
fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fada_core import _reference
from kernel_testing import assert_close_scaled, fada_loss_cases, fada_loss_inputs, forward_backward, with_layout

REDUCTIONS = ["none", "mean", "sum"]
DOMAINS = ["source", "target"]
T, CAP = 1.8, 0.9


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FADA_CORE_DEBUG_POISON", "1")


def _eager(disc, seg, domain, size, weight, reduction, grad_out=None, align_corners=True):
    def fn(d):
        # the reference and the kernels return the loss of half inputs in float32
        return _reference.fada_loss(
            d, seg, DOMAINS[domain], T, CAP, size, weight, REDUCTIONS[reduction], align_corners
        )

    return forward_backward(fn, disc, grad_out)


def _kernel(ops, disc, seg, domain, size, weight, reduction, grad_out, align_corners=True):
    def fn(d):
        return ops.fada_loss(d, seg, domain, T, CAP, size[0], size[1], weight, reduction, align_corners)

    return forward_backward(fn, disc, grad_out)[:2]


def _assert_close(got, want, dtype):
    assert_close_scaled(got, want, dtype, equal_nan=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=fada_loss_cases())
def test_matches_reference(isa_kernel_ops, case):
    c, dtype = case, case.dtype
    want, want_grad, grad_out = _eager(c.disc, c.seg, c.domain, c.out_size, c.weight, c.reduction, None,
                                       c.align_corners)
    got, got_grad = _kernel(isa_kernel_ops, with_layout(c.disc, c.layout), with_layout(c.seg, c.layout), c.domain,
                            c.out_size, c.weight, c.reduction, grad_out, c.align_corners)
    _assert_close(got, want, dtype)
    _assert_close(got_grad, want_grad, dtype)
    assert want_grad.abs().max() > 0  # the comparison is not between zeros


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("domain", [0, 1])
@pytest.mark.parametrize("sizes", [((9, 17), (65, 129)), ((8, 16), (64, 128)), ((7, 11), (40, 24))])
def test_realistic_shapes(isa_kernel_ops, domain, sizes, align_corners):
    (h, w), (out_h, out_w) = sizes
    disc, seg, _ = fada_loss_inputs(2, 19, h, w, h, w, out_h, out_w, torch.float32, 0, False)
    for reduction in (0, 1):
        want, want_grad, grad_out = _eager(disc, seg, domain, (out_h, out_w), None, reduction, None, align_corners)
        got, got_grad = _kernel(isa_kernel_ops, disc, seg, domain, (out_h, out_w), None, reduction, grad_out,
                                align_corners)
        _assert_close(got, want, torch.float32)
        _assert_close(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(isa_kernel_ops, dtype, align_corners):
    disc, seg, weight = fada_loss_inputs(2, 5, 6, 7, 6, 7, 23, 17, dtype, 1, True, scale=2.0)
    for reduction in (0, 1, 2):
        want, want_grad, grad_out = _eager(disc, seg, 1, (23, 17), weight, reduction, None, align_corners)
        got, got_grad = _kernel(isa_kernel_ops, disc, seg, 1, (23, 17), weight, reduction, grad_out, align_corners)
        assert got.dtype == torch.float32 and got_grad.dtype == dtype
        _assert_close(got, want, dtype)
        _assert_close(got_grad, want_grad, dtype)
        # the half kernels read the half values exactly and compute as the float32 ones do
        full, full_grad = _kernel(isa_kernel_ops, disc.float(), seg.float(), 1, (23, 17), weight.float(), reduction,
                                  grad_out, align_corners)
        assert torch.equal(got, full) and torch.equal(got_grad, full_grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_half(kernel_ops, dtype, reduction):
    """Half logits: a float32 loss (the fake kernels say so too) and a gradient in the logits' dtype."""
    disc, seg, weight = fada_loss_inputs(2, 3, 4, 5, 3, 4, 7, 9, dtype, 4, True)
    args = (1, T, CAP, 7, 9, weight, reduction)
    torch.library.opcheck(kernel_ops.fada_loss.default, (disc.requires_grad_(True), seg, *args))
    grad = torch.randn(2, 7, 9) if reduction == 0 else torch.tensor(0.7)  # float32, as the loss
    torch.library.opcheck(kernel_ops.fada_loss_backward.default, (grad, disc.detach(), seg, *args))
    if reduction != 0:
        torch.library.opcheck(kernel_ops.fada_loss_with_grad.default, (disc, seg, *args))
        loss, grad_disc = kernel_ops.fada_loss_with_grad(disc, seg, *args)
        assert loss.dtype == torch.float32 and grad_disc.dtype == dtype


def test_same_bits_twice_and_across_thread_counts(isa_kernel_ops):
    disc, seg, weight = fada_loss_inputs(2, 19, 9, 17, 9, 17, 70, 130, torch.float32, 3, True)
    g = torch.tensor(1.0)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads, max(threads, 3)):
            torch.set_num_threads(n)
            out = isa_kernel_ops.fada_loss(disc, seg, 0, T, CAP, 70, 130, weight, 1)
            grad = isa_kernel_ops.fada_loss_backward(g, disc, seg, 0, T, CAP, 70, 130, weight, 1)
            results.append((out, grad, *isa_kernel_ops.fada_loss_with_grad(disc, seg, 0, T, CAP, 70, 130, weight, 1)))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))
    assert torch.equal(results[0][2], results[0][0]) and torch.equal(results[0][3], results[0][1])


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(kernel_ops, requires_grad, reduction):
    disc, seg, weight = fada_loss_inputs(2, 3, 4, 5, 3, 4, 7, 9, torch.float32, 4, True)
    disc.requires_grad_(requires_grad)
    torch.library.opcheck(kernel_ops.fada_loss.default, (disc, seg, 1, T, CAP, 7, 9, weight, reduction))
    torch.library.opcheck(kernel_ops.fada_loss.default, (disc, seg, 0, T, CAP, 7, 9, None, reduction, False))
    grad = torch.randn(2, 7, 9) if reduction == 0 else torch.tensor(0.7)
    torch.library.opcheck(
        kernel_ops.fada_loss_backward.default, (grad, disc.detach(), seg, 1, T, CAP, 7, 9, weight, reduction)
    )
    torch.library.opcheck(
        kernel_ops.fada_loss_backward.default, (grad, disc.detach(), seg, 1, T, CAP, 7, 9, weight, reduction, False)
    )


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [1, 2])
def test_opcheck_with_grad(kernel_ops, requires_grad, reduction):
    disc, seg, weight = fada_loss_inputs(2, 3, 4, 5, 4, 5, 7, 9, torch.float32, 4, True)
    disc.requires_grad_(requires_grad)
    torch.library.opcheck(kernel_ops.fada_loss_with_grad.default, (disc, seg, 1, T, CAP, 7, 9, weight, reduction))
    torch.library.opcheck(kernel_ops.fada_loss_with_grad.default, (disc, seg, 0, T, CAP, 7, 9, None, reduction, False))


def _with_grad_and_separate_ops(ops, disc, seg, args):
    """fada_loss_with_grad, and fada_loss with fada_loss_backward for an upstream 1 (in the loss's dtype)."""
    loss, grad = ops.fada_loss_with_grad(disc, seg, *args)
    one = torch.ones((), dtype=loss.dtype)
    return (loss, grad), (ops.fada_loss(disc, seg, *args), ops.fada_loss_backward(one, disc, seg, *args))


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("sizes", [(2, 3, 4, 5, 4, 5, 7, 9), (2, 3, 4, 5, 3, 6, 7, 9),  # seg at another size
                                   (1, 4, 5, 70, 5, 70, 11, 600)])  # 3 column tiles a row
def test_with_grad_equals_forward_and_backward(isa_kernel_ops, reduction, sizes):
    """The fused op's loss is fada_loss's; its gradient, fada_loss_backward's for 1; autograd scales it.
    (On the CPU the fused op is its own kernel, one pass: held to the same bits in every build.)"""
    for domain, weighted in ((1, True), (0, False)):
        disc, seg, weight = fada_loss_inputs(*sizes, torch.float32, 8, weighted)
        args = (domain, T, CAP, sizes[-2], sizes[-1], weight, reduction)
        (loss, grad), (want, want_grad) = _with_grad_and_separate_ops(isa_kernel_ops, disc, seg, args)
        assert torch.equal(loss, want) and torch.equal(grad, want_grad)
        leaf = disc.clone().requires_grad_(True)
        (isa_kernel_ops.fada_loss_with_grad(leaf, seg, *args)[0] * 0.25).backward()
        torch.testing.assert_close(leaf.grad, 0.25 * grad)
    with pytest.raises(RuntimeError, match="reduction must be mean"):
        isa_kernel_ops.fada_loss_with_grad(disc, seg, *args[:-1], 0)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=fada_loss_cases(max_out=(13, 300), reductions=(1, 2),
                            dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)))
def test_with_grad_matches_reference(isa_kernel_ops, case):
    """The one-pass loss and gradient (for an upstream 1) against eager, and the bits of the separate ops."""
    c, dtype = case, case.dtype
    want, want_grad, _ = _eager(c.disc, c.seg, c.domain, c.out_size, c.weight, c.reduction, torch.tensor(1.0),
                                c.align_corners)
    args = (c.domain, T, CAP, *c.out_size, c.weight, c.reduction, c.align_corners)
    (loss, grad), separate = _with_grad_and_separate_ops(
        isa_kernel_ops, with_layout(c.disc, c.layout), with_layout(c.seg, c.layout), args
    )
    _assert_close(loss, want, dtype)
    _assert_close(grad, want_grad, dtype)
    assert torch.equal(loss, separate[0]) and torch.equal(grad, separate[1])
    assert want_grad.abs().max() > 0  # the comparison is not between zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_with_grad_autograd_scales_half_gradients_in_float32(kernel_ops, dtype):
    """The with_grad op's autograd multiplies the float32 upstream gradient into its half gradient in
    float32: GradScaler's default 2**16 is inf in float16. Same values as the backward op for that
    upstream gradient, up to the one extra rounding of the gradient for 1."""
    disc, seg, weight = fada_loss_inputs(2, 3, 4, 5, 4, 5, 7, 9, dtype, 8, True)
    args = (1, T, CAP, 7, 9, weight, 1)
    leaf = disc.clone().requires_grad_(True)
    (kernel_ops.fada_loss_with_grad(leaf, seg, *args)[0] * 2.0**16).backward()
    want = kernel_ops.fada_loss_backward(torch.tensor(2.0**16), disc, seg, *args)
    assert leaf.grad.dtype == dtype
    assert_close_scaled(leaf.grad, want, dtype, equal_nan=False)


def test_with_grad_empty_batch(kernel_ops):
    disc, seg, weight = fada_loss_inputs(0, 3, 4, 5, 4, 5, 7, 9, torch.float32, 0, True)
    loss, grad = kernel_ops.fada_loss_with_grad(disc, seg, 1, T, CAP, 7, 9, weight, 1)
    assert math.isnan(loss.item()) and grad.shape == disc.shape  # mean over no pixel, like torch
    loss, grad = kernel_ops.fada_loss_with_grad(disc, seg, 1, T, CAP, 7, 9, weight, 2)
    assert loss.item() == 0.0 and grad.shape == disc.shape


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("reduction", [1, 2])
def test_gradcheck_with_grad(isa_kernel_ops, reduction, align_corners):
    disc, seg, weight = fada_loss_inputs(1, 2, 3, 4, 3, 4, 5, 7, torch.float64, 5, True)
    disc.requires_grad_(True)
    fn = lambda d: isa_kernel_ops.fada_loss_with_grad(d, seg, 1, T, CAP, 5, 7, weight, reduction, align_corners)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (disc,), eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_functional(kernel_ops):
    """functional.fada_loss under torch.compile: the fused op when a gradient is needed."""
    from fada_core.functional import fada_loss

    disc, seg, weight = fada_loss_inputs(2, 4, 5, 6, 5, 6, 11, 13, torch.float32, 6, True)

    def f(d, s, wt):
        return fada_loss(d, s, "target", size=(11, 13), weight=wt, backend="kernel") + fada_loss(
            d, s, "source", size=(11, 13), reduction="sum", backend="kernel"
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    d1 = disc.clone().requires_grad_(True)
    d2 = disc.clone().requires_grad_(True)
    want = f(d1, seg, weight)
    got = compiled(d2, seg, weight)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d2.grad, d1.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_gradcheck(isa_kernel_ops, reduction, align_corners):
    disc, seg, weight = fada_loss_inputs(1, 2, 3, 4, 2, 3, 5, 7, torch.float64, 5, True)
    disc.requires_grad_(True)
    fn = lambda d: isa_kernel_ops.fada_loss(d, seg, 1, T, CAP, 5, 7, weight, reduction, align_corners)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (disc,), eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph(kernel_ops):
    disc, seg, weight = fada_loss_inputs(2, 4, 5, 6, 5, 6, 11, 13, torch.float32, 6, True)

    def f(d, s, wt):
        return 0.5 * kernel_ops.fada_loss(d, s, 0, T, CAP, 11, 13, wt, 1) + kernel_ops.fada_loss(
            d * 2, s, 1, T, CAP, 11, 13, None, 2
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    d1 = disc.clone().requires_grad_(True)
    d2 = disc.clone().requires_grad_(True)
    want = f(d1, seg, weight)
    got = compiled(d2, seg, weight)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d2.grad, d1.grad, rtol=1e-6, atol=1e-7)


def test_torch_compile_inductor(kernel_ops):
    disc, seg, _ = fada_loss_inputs(1, 3, 4, 5, 4, 5, 9, 10, torch.float32, 7, False)

    def f(d, s):
        return kernel_ops.fada_loss(d.float() * 1.5, s, 1, T, CAP, 9, 10, None, 1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(disc, seg), f(disc, seg), rtol=1e-6, atol=1e-6)


def test_empty_batch(kernel_ops):
    disc, seg, weight = fada_loss_inputs(0, 3, 4, 5, 4, 5, 7, 8, torch.float32, 0, True)
    none = kernel_ops.fada_loss(disc, seg, 0, T, CAP, 7, 8, weight, 0)
    assert none.shape == (0, 7, 8)
    assert math.isnan(kernel_ops.fada_loss(disc, seg, 0, T, CAP, 7, 8, weight, 1).item())
    assert kernel_ops.fada_loss(disc, seg, 0, T, CAP, 7, 8, weight, 2).item() == 0.0
    grad = kernel_ops.fada_loss_backward(torch.tensor(1.0), disc, seg, 0, T, CAP, 7, 8, weight, 1)
    assert grad.shape == disc.shape


def test_nan_propagates(isa_kernel_ops):
    disc, seg, _ = fada_loss_inputs(1, 3, 4, 5, 4, 5, 10, 13, torch.float32, 8, False)
    disc_nan = disc.clone()
    disc_nan[0, 1, 2, 3] = float("nan")
    assert torch.isnan(isa_kernel_ops.fada_loss(disc_nan, seg, 0, T, CAP, 10, 13, None, 1))
    assert torch.isnan(isa_kernel_ops.fada_loss(disc_nan, seg, 1, T, CAP, 10, 13, None, 2))
    per_pixel = isa_kernel_ops.fada_loss(disc_nan, seg, 0, T, CAP, 10, 13, None, 0)
    # the output pixel sitting exactly on source pixel (2, 3): scale 3 in both axes
    assert torch.isnan(per_pixel[0, 6, 9])
    assert torch.isfinite(per_pixel[0, 0, 0])
    grad = isa_kernel_ops.fada_loss_backward(torch.tensor(1.0), disc_nan, seg, 0, T, CAP, 10, 13, None, 1)
    assert torch.isnan(grad).any()
    seg_nan = seg.clone()
    seg_nan[0, 0, 1, 1] = float("nan")
    assert torch.isnan(isa_kernel_ops.fada_loss(disc, seg_nan, 1, T, CAP, 10, 13, None, 1))
    big = disc * 1e4  # large logits: finite, no overflow in the exp
    assert torch.isfinite(isa_kernel_ops.fada_loss(big, seg, 0, T, CAP, 10, 13, None, 1))


def test_bad_inputs_raise(kernel_ops):
    disc, seg, weight = fada_loss_inputs(2, 3, 4, 5, 4, 5, 7, 8, torch.float32, 0, True)
    op = kernel_ops.fada_loss
    cases = [
        lambda: op(disc[:, :5], seg, 0, T, CAP, 7, 8, None, 1),  # not 2K channels
        lambda: op(disc.double(), seg, 0, T, CAP, 7, 8, None, 1),  # dtype mismatch
        lambda: op(disc[0], seg, 0, T, CAP, 7, 8, None, 1),  # 3-D
        lambda: op(disc[:1], seg, 0, T, CAP, 7, 8, None, 1),  # batch mismatch
        lambda: op(disc, seg, 2, T, CAP, 7, 8, None, 1),  # domain
        lambda: op(disc, seg, 0, T, CAP, 7, 8, None, 3),  # reduction
        lambda: op(disc, seg, 0, 0.0, CAP, 7, 8, None, 1),  # temperature
        lambda: op(disc, seg, 0, T, CAP, 0, 8, None, 1),  # output size
        lambda: op(disc, seg, 0, T, CAP, 7, 8, weight[:, :3], 1),  # weight shape
        lambda: op(disc.long(), seg.long(), 0, T, CAP, 7, 8, None, 1),  # integer logits
        lambda: kernel_ops.fada_loss_backward(torch.ones(3), disc, seg, 0, T, CAP, 7, 8, None, 1),
        lambda: kernel_ops.fada_loss_backward(torch.ones(2, 7, 7), disc, seg, 0, T, CAP, 7, 8, None, 0),
    ]
    for case in cases:
        with pytest.raises(RuntimeError):
            case()


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("domain", [0, 1])
def test_cuda_matches_reference(cuda_kernel_ops, dtype, reduction, domain):
    shapes = [(2, 3, 4, 5, 4, 5, 9, 13), (1, 19, 9, 17, 9, 17, 65, 129), (3, 4, 1, 1, 2, 3, 5, 7), (2, 5, 7, 6, 3, 3, 7, 6)]
    for i, (b, k, h, w, hs, ws, out_h, out_w) in enumerate(shapes):
        disc, seg, weight = fada_loss_inputs(b, k, h, w, hs, ws, out_h, out_w, dtype, i, i % 2 == 0, scale=2.0,
                                             device="cuda")
        want, want_grad, grad_out = _eager(disc, seg, domain, (out_h, out_w), weight, reduction)
        got, got_grad = _kernel(cuda_kernel_ops, disc, seg, domain, (out_h, out_w), weight, reduction, grad_out)
        _assert_close(got, want, dtype)
        _assert_close(got_grad, want_grad, dtype)
        _assert_close(
            _kernel(cuda_kernel_ops, with_layout(disc, "channels_last"), seg, domain, (out_h, out_w), weight, reduction,
                    grad_out)[1],
            want_grad,
            dtype,
        )


@pytest.mark.cuda
def test_cuda_same_bits_and_matches_cpu(cuda_kernel_ops):
    disc, seg, weight = fada_loss_inputs(4, 19, 64, 128, 64, 128, 512, 1024, torch.float32, 9, True)
    g = torch.tensor(1.0)
    args = (0, T, CAP, 512, 1024)
    dc, sc, wc, gc = disc.cuda(), seg.cuda(), weight.cuda(), g.cuda()
    out1 = cuda_kernel_ops.fada_loss(dc, sc, *args, wc, 1)
    out2 = cuda_kernel_ops.fada_loss(dc, sc, *args, wc, 1)
    grad1 = cuda_kernel_ops.fada_loss_backward(gc, dc, sc, *args, wc, 1)
    grad2 = cuda_kernel_ops.fada_loss_backward(gc, dc, sc, *args, wc, 1)
    assert torch.equal(out1, out2) and torch.equal(grad1, grad2)
    cpu_out = cuda_kernel_ops.fada_loss(disc, seg, *args, weight, 1)
    cpu_grad = cuda_kernel_ops.fada_loss_backward(g, disc, seg, *args, weight, 1)
    _assert_close(out1.cpu(), cpu_out, torch.float32)
    _assert_close(grad1.cpu(), cpu_grad, torch.float32)


@pytest.mark.cuda
def test_cuda_torch_compile_and_opcheck(cuda_kernel_ops):
    disc, seg, weight = fada_loss_inputs(2, 3, 4, 5, 4, 5, 11, 13, torch.float32, 10, True, device="cuda")
    torch.library.opcheck(cuda_kernel_ops.fada_loss.default, (disc.requires_grad_(True), seg, 1, T, CAP, 11, 13, weight, 1))

    def f(d, s):
        return cuda_kernel_ops.fada_loss(d, s, 0, T, CAP, 11, 13, None, 1)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(disc, seg), f(disc, seg))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", [((64, 128), (512, 1024)), ((65, 129), (512, 1024)), ((1, 1), (5, 7)),
                                   ((6, 5), (3, 9)), ((2, 2), (3, 300))])
def test_cuda_fast_path_fused_matches_reference(cuda_kernel_ops, dtype, sizes):
    """Disc and seg at one size, cap 0.9: the staged kernel; fada_loss_with_grad against eager and the separate ops."""
    (h, w), (out_h, out_w) = sizes
    k, b = (19, 2) if h >= 64 else (3, 2)
    disc, seg, weight = fada_loss_inputs(b, k, h, w, h, w, out_h, out_w, dtype, 21, True, scale=2.0, device="cuda")
    for domain, reduction in ((0, 1), (1, 2)):
        want, want_grad, _ = _eager(disc, seg, domain, (out_h, out_w), weight, reduction,
                                    torch.tensor(1.0, dtype=dtype, device="cuda"))
        args = (domain, T, CAP, out_h, out_w, weight, reduction)
        got, got_grad = cuda_kernel_ops.fada_loss_with_grad(disc, seg, *args)
        _assert_close(got, want, dtype)
        _assert_close(got_grad, want_grad, dtype)
        again = cuda_kernel_ops.fada_loss_with_grad(disc, seg, *args)
        assert torch.equal(again[0], got) and torch.equal(again[1], got_grad)
        one = torch.tensor(1.0, dtype=dtype, device="cuda")
        _assert_close(cuda_kernel_ops.fada_loss_backward(one, disc, seg, *args), got_grad, dtype)
        _assert_close(cuda_kernel_ops.fada_loss(disc, seg, *args), got, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("cap", [0.5, 0.3])
def test_cuda_fast_path_and_fallback_agree_with_cpu(cuda_kernel_ops, cap):
    """cap 0.5 takes the staged kernel, 0.3 the general kernels; both match the CPU kernels."""
    disc, seg, weight = fada_loss_inputs(2, 19, 9, 17, 9, 17, 65, 129, torch.float32, 22, True)
    args = (1, T, cap, 65, 129, weight, 1)
    cpu = cuda_kernel_ops.fada_loss_with_grad(disc, seg, *args)
    gpu = cuda_kernel_ops.fada_loss_with_grad(disc.cuda(), seg.cuda(), 1, T, cap, 65, 129, weight.cuda(), 1)
    _assert_close(gpu[0].cpu(), cpu[0], torch.float32)
    _assert_close(gpu[1].cpu(), cpu[1], torch.float32)
