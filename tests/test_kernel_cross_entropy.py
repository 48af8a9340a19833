"""The compiled upsampled_cross_entropy kernels against the eager reference
(``CrossEntropyLoss(upsample(logits) / T, labels, ignore_index)``).

Every kernel call runs with ``FADA_CORE_DEBUG_POISON=1``: outputs and scratch
buffers start as NaN in the C++ code, so a value the kernel forgot to write
fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fada_core import _reference
from kernel_testing import assert_close_scaled, cross_entropy_inputs, forward_backward, with_layout

REDUCTIONS = ["none", "mean", "sum"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FADA_CORE_DEBUG_POISON", "1")


def _eager(logits, labels, temperature, ignore_index, reduction, grad_out=None, align_corners=True):
    def fn(x):
        # the reference and the kernels return the loss of half inputs in float32
        return _reference.upsampled_cross_entropy(
            x, labels, temperature, ignore_index, REDUCTIONS[reduction], align_corners
        )

    return forward_backward(fn, logits, grad_out)


def _kernel(ops, logits, labels, temperature, ignore_index, reduction, grad_out, align_corners=True):
    def fn(x):
        return ops.upsampled_cross_entropy(x, labels, temperature, ignore_index, reduction, align_corners)

    return forward_backward(fn, logits, grad_out)[:2]


def _assert_close(got, want, dtype):
    assert_close_scaled(got, want, dtype, equal_nan=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    k=st.integers(1, 6),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    out_size=st.one_of(st.none(), st.tuples(st.integers(1, 13), st.integers(1, 13))),
    temperature=st.sampled_from([1.0, 1.8, 0.5]),
    ignore_index=st.sampled_from([255, -100, 0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    reduction=st.sampled_from([0, 1, 2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    align_corners=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(isa_kernel_ops, batch, k, h, w, out_size, temperature, ignore_index, ignore_frac, reduction,
                           dtype, layout, align_corners, seed):
    out_h, out_w = out_size if out_size is not None else (h, w)  # None: H == h
    logits, labels = cross_entropy_inputs(batch, k, h, w, out_h, out_w, dtype, seed, ignore_frac, ignore_index)
    want, want_grad, grad_out = _eager(logits, labels, temperature, ignore_index, reduction, None, align_corners)
    got, got_grad = _kernel(isa_kernel_ops, with_layout(logits, layout), with_layout(labels, layout), temperature, ignore_index,
                            reduction, grad_out, align_corners)
    _assert_close(got, want, dtype)
    _assert_close(got_grad, want_grad, dtype)
    if (labels != ignore_index).any() and k > 1:
        assert want_grad.abs().max() > 0  # the comparison is not between zeros


@pytest.mark.parametrize("align_corners", [True, False])
def test_realistic_shapes_and_official_formula(isa_kernel_ops, align_corners):
    logits, labels = cross_entropy_inputs(2, 19, 9, 17, 65, 129, torch.float32, 0, 0.2)
    x = logits.clone().requires_grad_(True)
    up = F.interpolate(x, size=(65, 129), mode="bilinear", align_corners=align_corners)
    want = torch.nn.CrossEntropyLoss(ignore_index=255)(up / 1.8, labels)
    want.backward()
    got, got_grad = _kernel(isa_kernel_ops, logits, labels, 1.8, 255, 1, torch.tensor(1.0), align_corners)
    _assert_close(got, want.detach(), torch.float32)
    _assert_close(got_grad, x.grad, torch.float32)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cpu(isa_kernel_ops, dtype, align_corners):
    logits, labels = cross_entropy_inputs(2, 5, 6, 7, 23, 17, dtype, 1, 0.2, scale=2.0)
    for reduction in (0, 1, 2):
        want, want_grad, grad_out = _eager(logits, labels, 1.8, 255, reduction, None, align_corners)
        got, got_grad = _kernel(isa_kernel_ops, logits, labels, 1.8, 255, reduction, grad_out, align_corners)
        assert got.dtype == torch.float32 and got_grad.dtype == dtype
        _assert_close(got, want, dtype)
        _assert_close(got_grad, want_grad, dtype)
        # the half kernels read the half values exactly and compute as the float32 ones do
        full, full_grad = _kernel(isa_kernel_ops, logits.float(), labels, 1.8, 255, reduction, grad_out, align_corners)
        assert torch.equal(got, full) and torch.equal(got_grad, full_grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_half(kernel_ops, dtype, reduction):
    """Half logits: a float32 loss (the fake kernels say so too) and a gradient in the logits' dtype."""
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 9, dtype, 4, 0.2)
    torch.library.opcheck(kernel_ops.upsampled_cross_entropy.default,
                          (logits.requires_grad_(True), labels, 1.8, 255, reduction))
    grad = torch.randn(2, 7, 9) if reduction == 0 else torch.tensor(0.7)  # float32, as the loss
    torch.library.opcheck(
        kernel_ops.upsampled_cross_entropy_backward.default, (grad, logits.detach(), labels, 1.8, 255, reduction)
    )
    if reduction != 0:
        torch.library.opcheck(kernel_ops.upsampled_cross_entropy_with_grad.default, (logits, labels, 1.8, 255, reduction))
        loss, grad_logits = kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.8, 255, reduction)
        assert loss.dtype == torch.float32 and grad_logits.dtype == dtype


def test_same_bits_twice_and_across_thread_counts(isa_kernel_ops):
    logits, labels = cross_entropy_inputs(2, 19, 9, 17, 70, 130, torch.float32, 3, 0.1)
    g = torch.tensor(1.0)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads, max(threads, 3)):
            torch.set_num_threads(n)
            out = isa_kernel_ops.upsampled_cross_entropy(logits, labels, 1.8, 255, 1)
            grad = isa_kernel_ops.upsampled_cross_entropy_backward(g, logits, labels, 1.8, 255, 1)
            results.append((out, grad))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(kernel_ops, requires_grad, reduction):
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 9, torch.float32, 4, 0.2)
    logits.requires_grad_(requires_grad)
    torch.library.opcheck(kernel_ops.upsampled_cross_entropy.default, (logits, labels, 1.8, 255, reduction))
    torch.library.opcheck(kernel_ops.upsampled_cross_entropy.default, (logits, labels, 1.8, 255, reduction, False))
    grad = torch.randn(2, 7, 9) if reduction == 0 else torch.tensor(0.7)
    for align_corners in (True, False):
        torch.library.opcheck(
            kernel_ops.upsampled_cross_entropy_backward.default,
            (grad, logits.detach(), labels, 1.8, 255, reduction, align_corners),
        )


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_gradcheck(isa_kernel_ops, reduction, align_corners):
    logits, labels = cross_entropy_inputs(1, 3, 3, 4, 5, 7, torch.float64, 5, 0.2)
    logits.requires_grad_(True)
    fn = lambda x: isa_kernel_ops.upsampled_cross_entropy(x, labels, 1.8, 255, reduction, align_corners)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph(kernel_ops):
    logits, labels = cross_entropy_inputs(2, 4, 5, 6, 11, 13, torch.float32, 6, 0.2)

    def f(x, y):
        return kernel_ops.upsampled_cross_entropy(x * 2, y, 1.8, 255, 1) + 0.1 * kernel_ops.upsampled_cross_entropy(
            x, y, 1.0, 255, 2
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    want = f(x1, labels)
    got = compiled(x2, labels)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [1, 2])
def test_opcheck_with_grad(kernel_ops, requires_grad, reduction):
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 9, torch.float32, 4, 0.2)
    logits.requires_grad_(requires_grad)
    torch.library.opcheck(kernel_ops.upsampled_cross_entropy_with_grad.default, (logits, labels, 1.8, 255, reduction))
    torch.library.opcheck(
        kernel_ops.upsampled_cross_entropy_with_grad.default, (logits, labels, 1.8, 255, reduction, False)
    )


@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("sizes", [(2, 3, 4, 5, 7, 9), (1, 5, 6, 70, 13, 300)])  # the second: 2 column tiles a row
def test_with_grad_equals_forward_and_backward(isa_kernel_ops, reduction, sizes):
    """The fused op's loss is the forward op's; its gradient, the backward op's for 1; autograd scales it.
    (On the CPU the fused op is its own kernel, one pass: held to the same bits in every build.)"""
    logits, labels = cross_entropy_inputs(*sizes, torch.float32, 8, 0.3)
    args = (1.8, 255, reduction)
    loss, grad = isa_kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, *args)
    assert torch.equal(loss, isa_kernel_ops.upsampled_cross_entropy(logits, labels, *args))
    assert torch.equal(grad, isa_kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), logits, labels, *args))
    leaf = logits.clone().requires_grad_(True)
    (isa_kernel_ops.upsampled_cross_entropy_with_grad(leaf, labels, *args)[0] * 0.25).backward()
    torch.testing.assert_close(leaf.grad, 0.25 * grad)
    with pytest.raises(RuntimeError, match="reduction must be mean"):
        isa_kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.8, 255, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_with_grad_autograd_scales_half_gradients_in_float32(kernel_ops, dtype):
    """As the FADA loss's test of the same name: GradScaler's 2**16 upstream gradient is inf in float16."""
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 9, dtype, 8, 0.3)
    leaf = logits.clone().requires_grad_(True)
    (kernel_ops.upsampled_cross_entropy_with_grad(leaf, labels, 1.8, 255, 1)[0] * 2.0**16).backward()
    want = kernel_ops.upsampled_cross_entropy_backward(torch.tensor(2.0**16), logits, labels, 1.8, 255, 1)
    assert leaf.grad.dtype == dtype
    assert_close_scaled(leaf.grad, want, dtype, equal_nan=False)


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("reduction", [1, 2])
def test_gradcheck_with_grad(kernel_ops, reduction, align_corners):
    logits, labels = cross_entropy_inputs(1, 3, 3, 4, 5, 7, torch.float64, 5, 0.2)
    logits.requires_grad_(True)
    fn = lambda x: kernel_ops.upsampled_cross_entropy_with_grad(x, labels, 1.8, 255, reduction, align_corners)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_functional(kernel_ops):
    """functional.upsampled_cross_entropy under torch.compile: the fused op when a gradient is needed."""
    from fada_core.functional import upsampled_cross_entropy

    logits, labels = cross_entropy_inputs(2, 4, 5, 6, 11, 13, torch.float32, 6, 0.2)

    def f(x, y):
        return upsampled_cross_entropy(x, y, 1.8, backend="kernel") + upsampled_cross_entropy(
            x, y, reduction="sum", backend="kernel"
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    want = f(x1, labels)
    got = compiled(x2, labels)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-7)
    x3 = logits.clone().requires_grad_(True)
    eager = _reference.upsampled_cross_entropy(x3, labels, 1.8, 255, "mean") + _reference.upsampled_cross_entropy(
        x3, labels, 1.0, 255, "sum"
    )
    eager.backward()
    torch.testing.assert_close(x2.grad, x3.grad, rtol=1e-5, atol=1e-6)


def test_with_grad_all_ignored_and_empty_batch(kernel_ops):
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 8, torch.float32, 0, 1.0)
    loss, grad = kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.0, 255, 1)
    assert math.isnan(loss.item()) and torch.equal(grad, torch.zeros_like(grad))
    empty_logits, empty_labels = cross_entropy_inputs(0, 3, 4, 5, 7, 8, torch.float32, 0, 0.0)
    loss, grad = kernel_ops.upsampled_cross_entropy_with_grad(empty_logits, empty_labels, 1.0, 255, 2)
    assert loss.item() == 0.0 and grad.shape == empty_logits.shape


def test_all_ignored_and_empty_batch(kernel_ops):
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 8, torch.float32, 0, 1.0)
    assert math.isnan(kernel_ops.upsampled_cross_entropy(logits, labels, 1.0, 255, 1).item())
    assert kernel_ops.upsampled_cross_entropy(logits, labels, 1.0, 255, 2).item() == 0.0
    grad = kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), logits, labels, 1.0, 255, 1)
    assert torch.equal(grad, torch.zeros_like(grad))
    empty_logits, empty_labels = cross_entropy_inputs(0, 3, 4, 5, 7, 8, torch.float32, 0, 0.0)
    assert kernel_ops.upsampled_cross_entropy(empty_logits, empty_labels, 1.0, 255, 0).shape == (0, 7, 8)
    assert math.isnan(kernel_ops.upsampled_cross_entropy(empty_logits, empty_labels, 1.0, 255, 1).item())
    assert kernel_ops.upsampled_cross_entropy(empty_logits, empty_labels, 1.0, 255, 2).item() == 0.0
    grad = kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), empty_logits, empty_labels, 1.0, 255, 1)
    assert grad.shape == empty_logits.shape


def test_nan_propagates(isa_kernel_ops):
    logits, labels = cross_entropy_inputs(1, 3, 4, 5, 10, 13, torch.float32, 8, 0.0)
    bad = logits.clone()
    bad[0, 1, 2, 3] = float("nan")
    assert torch.isnan(isa_kernel_ops.upsampled_cross_entropy(bad, labels, 1.8, 255, 1))
    per_pixel = isa_kernel_ops.upsampled_cross_entropy(bad, labels, 1.8, 255, 0)
    assert torch.isnan(per_pixel[0, 6, 9]) and torch.isfinite(per_pixel[0, 0, 0])
    assert torch.isfinite(isa_kernel_ops.upsampled_cross_entropy(logits * 1e4, labels, 1.0, 255, 1))


def test_bad_inputs_raise(kernel_ops):
    logits, labels = cross_entropy_inputs(2, 3, 4, 5, 7, 8, torch.float32, 0, 0.2)
    op = kernel_ops.upsampled_cross_entropy
    out_of_range = labels.clone()
    out_of_range[0, 0, 0] = 3
    negative = labels.clone()
    negative[1, 2, 3] = -1
    cases = [
        lambda: op(logits, out_of_range, 1.0, 255, 1),
        lambda: op(logits, negative, 1.0, 255, 0),
        lambda: kernel_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), logits, out_of_range, 1.0, 255, 1),
        lambda: op(logits, labels.int(), 1.0, 255, 1),  # labels must be int64
        lambda: op(logits, labels.float(), 1.0, 255, 1),
        lambda: op(logits[0], labels, 1.0, 255, 1),  # 3-D logits
        lambda: op(logits, labels[0], 1.0, 255, 1),  # 2-D labels
        lambda: op(logits[:1], labels, 1.0, 255, 1),  # batch mismatch
        lambda: op(logits, labels, 0.0, 255, 1),  # temperature
        lambda: op(logits, labels, 1.0, 255, 5),  # reduction
        lambda: op(logits.long(), labels, 1.0, 255, 1),
        lambda: kernel_ops.upsampled_cross_entropy_backward(torch.ones(2, 7, 7), logits, labels, 1.0, 255, 0),
    ]
    for case in cases:
        with pytest.raises(RuntimeError):
            case()


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cuda_matches_reference(cuda_kernel_ops, dtype, reduction):
    shapes = [(2, 3, 4, 5, 9, 13), (1, 19, 9, 17, 65, 129), (3, 4, 1, 1, 5, 7), (2, 5, 7, 6, 7, 6), (2, 19, 64, 128, 512, 1024)]
    for i, (b, k, h, w, out_h, out_w) in enumerate(shapes):
        logits, labels = cross_entropy_inputs(b, k, h, w, out_h, out_w, dtype, i, 0.2, scale=2.0, device="cuda")
        want, want_grad, grad_out = _eager(logits, labels, 1.8, 255, reduction)
        got, got_grad = _kernel(cuda_kernel_ops, logits, labels, 1.8, 255, reduction, grad_out)
        _assert_close(got, want, dtype)
        _assert_close(got_grad, want_grad, dtype)
        got_cl = _kernel(cuda_kernel_ops, with_layout(logits, "channels_last"), labels, 1.8, 255, reduction, grad_out)[1]
        _assert_close(got_cl, want_grad, dtype)


@pytest.mark.cuda
def test_cuda_same_bits_and_all_ignored(cuda_kernel_ops):
    logits, labels = cross_entropy_inputs(4, 19, 64, 128, 512, 1024, torch.float32, 9, 0.1, device="cuda")
    g = torch.tensor(1.0, device="cuda")
    op, bwd = cuda_kernel_ops.upsampled_cross_entropy, cuda_kernel_ops.upsampled_cross_entropy_backward
    assert torch.equal(op(logits, labels, 1.8, 255, 1), op(logits, labels, 1.8, 255, 1))
    assert torch.equal(bwd(g, logits, labels, 1.8, 255, 1), bwd(g, logits, labels, 1.8, 255, 1))
    ignored = torch.full_like(labels, 255)
    assert torch.isnan(op(logits, ignored, 1.8, 255, 1)).item()
    assert torch.equal(bwd(g, logits, ignored, 1.8, 255, 1), torch.zeros_like(logits))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", [((64, 128), (512, 1024)), ((65, 129), (512, 1024)), ((1, 1), (5, 7)),
                                   ((6, 5), (3, 9)), ((2, 2), (3, 300))])
def test_cuda_fast_path_fused_matches_reference(cuda_kernel_ops, dtype, sizes):
    """The staged kernel: upsampled_cross_entropy_with_grad against eager, itself and the separate ops."""
    (h, w), (out_h, out_w) = sizes
    k = 19 if h >= 64 else 4
    logits, labels = cross_entropy_inputs(2, k, h, w, out_h, out_w, dtype, 23, 0.2, scale=2.0, device="cuda")
    one = torch.tensor(1.0, dtype=dtype, device="cuda")
    for reduction in (1, 2):
        want, want_grad, _ = _eager(logits, labels, 1.8, 255, reduction, one)
        got, got_grad = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.8, 255, reduction)
        _assert_close(got, want, dtype)
        _assert_close(got_grad, want_grad, dtype)
        again = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.8, 255, reduction)
        assert torch.equal(again[0], got) and torch.equal(again[1], got_grad)
        args = (logits, labels, 1.8, 255, reduction)
        assert torch.equal(cuda_kernel_ops.upsampled_cross_entropy(*args), got)
        assert torch.equal(cuda_kernel_ops.upsampled_cross_entropy_backward(one, *args), got_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [19, 600])  # the staged kernel; the general kernels (600 channels exceed its block)
def test_cuda_fused_agrees_with_cpu_and_reports_bad_labels(cuda_kernel_ops, k):
    from fada_core.functional import check_label_errors

    logits, labels = cross_entropy_inputs(2, k, 9, 17, 65, 129, torch.float32, 24, 0.2)
    cpu = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits, labels, 1.8, 255, 1)
    gpu = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits.cuda(), labels.cuda(), 1.8, 255, 1)
    _assert_close(gpu[0].cpu(), cpu[0], torch.float32)
    _assert_close(gpu[1].cpu(), cpu[1], torch.float32)
    ignored = torch.full_like(labels, 255).cuda()
    loss, grad = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits.cuda(), ignored, 1.8, 255, 1)
    assert loss.isnan().item() and torch.equal(grad, torch.zeros_like(grad))
    bad = labels.clone()
    bad[1, 3, 4] = k
    loss, grad = cuda_kernel_ops.upsampled_cross_entropy_with_grad(logits.cuda(), bad.cuda(), 1.8, 255, 2)
    assert loss.isnan().item() and grad.isnan().any().item()
    with pytest.raises(ValueError, match=f"found {k}"):
        check_label_errors()
