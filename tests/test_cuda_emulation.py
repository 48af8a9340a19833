"""The CUDA kernels (FADA loss, cross-entropy, class statistics), run on the CPU under emulation.

``tests/cuda_emulation/emulated_ops.cpp`` compiles ``csrc/cuda/*.cu`` (host wrappers included) as
host code: every CUDA thread of a block is a host thread, ``__syncthreads`` a barrier, the warp
intrinsics exchanges between a warp's threads, shared memory a per-block buffer that starts as
0xFF bytes. These tests hold the CUDA code to the eager reference where no GPU is at hand: indexing,
the adjoint's ranges and partial slots, barriers, the fixed-order reductions and the host-side
launch configuration. They say nothing about speed, and the GPU suite (``-m cuda``) still has
to run on a GPU.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fada_core import _reference
from fada_core._reference import opmath_dtype
from fada_core.functional import _cuda_backward_fits
from kernel_testing import (
    assert_class_stats_close,
    assert_close_scaled,
    class_stats_inputs,
    cross_entropy_inputs,
    fada_loss_cases,
    fada_loss_inputs,
    forward_backward,
    loss_floor,
    with_layout,
)

T, CAP = 1.8, 0.9
REDUCTIONS = ["none", "mean", "sum"]
DOMAINS = ["source", "target"]
H100_SHARED_BYTES = 227 * 1024  # what the emulation reports as the opt-in shared memory

# each example launches thousands of host threads: fewer than the CPU kernels' 200
EXAMPLES = settings(max_examples=100)


@contextlib.contextmanager
def kernels(general):
    """general=True: FADA_CORE_CUDA_GENERAL_KERNELS=1, the staged fast paths off (csrc/cuda/staged_rows.cuh),
    so the shapes they would take reach the general kernels; False: the usual choice."""
    old = os.environ.pop("FADA_CORE_CUDA_GENERAL_KERNELS", None)
    if general:
        os.environ["FADA_CORE_CUDA_GENERAL_KERNELS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("FADA_CORE_CUDA_GENERAL_KERNELS", None)
        if old is not None:
            os.environ["FADA_CORE_CUDA_GENERAL_KERNELS"] = old


def _loss_pair(ops, disc, seg, domain, size, weight, reduction, align_corners=True):
    """(reference value, grad), (emulated value, grad). The reference runs in float64 on the same
    values; its loss is rounded to float32 for half inputs (the kernels' loss dtype), else to the
    inputs' dtype, its gradient to the inputs' dtype; both get the same upstream gradient."""
    dtype = disc.dtype
    w64 = None if weight is None else weight.double()
    want, want_grad, grad_out = forward_backward(
        lambda d: _reference.fada_loss(
            d, seg.double(), DOMAINS[domain], T, CAP, size, w64, REDUCTIONS[reduction], align_corners
        ),
        disc.double(),
    )
    grad_out = grad_out.to(opmath_dtype(dtype))
    args = (domain, T, CAP, size[0], size[1], weight, reduction, align_corners)
    got = ops.fada_loss(disc, seg, *args)
    got_grad = ops.fada_loss_backward(grad_out, disc, seg, *args)
    return (want.to(opmath_dtype(dtype)), want_grad.to(dtype)), (got, got_grad)


def _ce_pair(ops, logits, labels, ignore_index, reduction, align_corners=True):
    """As _loss_pair, for the upsampled cross-entropy."""
    dtype = logits.dtype
    want, want_grad, grad_out = forward_backward(
        lambda x: _reference.upsampled_cross_entropy(
            x, labels, T, ignore_index, REDUCTIONS[reduction], align_corners
        ),
        logits.double(),
    )
    grad_out = grad_out.to(opmath_dtype(dtype))
    got = ops.upsampled_cross_entropy(logits, labels, T, ignore_index, reduction, align_corners)
    got_grad = ops.upsampled_cross_entropy_backward(grad_out, logits, labels, T, ignore_index, reduction, align_corners)
    return (want.to(opmath_dtype(dtype)), want_grad.to(dtype)), (got, got_grad)


HALF_AND_FULL = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


@EXAMPLES
@given(case=fada_loss_cases(max_batch=2, max_k=4, max_side=5, max_out=(11, 11),
                            dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)),
       general=st.booleans())
def test_fada_loss_kernels_match_reference(emulated_cuda_ops, case, general):
    c, dtype, disc, seg = case, case.dtype, case.disc, case.seg
    with kernels(general):
        (want, want_grad), (got, got_grad) = _loss_pair(
            emulated_cuda_ops, with_layout(disc, c.layout), with_layout(seg, c.layout), c.domain, c.out_size,
            c.weight, c.reduction, c.align_corners,
        )
    assert_close_scaled(got, want, dtype, floor=loss_floor(disc, seg))
    assert_close_scaled(got_grad, want_grad, dtype)
    assert want_grad.abs().max() > 0  # the comparison is not between zeros


@EXAMPLES
@given(
    batch=st.integers(1, 2),
    k=st.integers(1, 5),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    out_size=st.one_of(st.none(), st.tuples(st.integers(1, 11), st.integers(1, 11))),
    ignore_index=st.sampled_from([255, -100, 0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    reduction=st.sampled_from([0, 1, 2]),
    dtype=HALF_AND_FULL,
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    align_corners=st.booleans(),
    general=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cross_entropy_kernels_match_reference(emulated_cuda_ops, batch, k, h, w, out_size, ignore_index, ignore_frac,
                                               reduction, dtype, layout, align_corners, general, seed):
    out_h, out_w = out_size if out_size is not None else (h, w)
    logits, labels = cross_entropy_inputs(batch, k, h, w, out_h, out_w, dtype, seed, ignore_frac, ignore_index)
    with kernels(general):
        (want, want_grad), (got, got_grad) = _ce_pair(
            emulated_cuda_ops, with_layout(logits, layout), with_layout(labels, layout), ignore_index, reduction,
            align_corners,
        )
    assert_close_scaled(got, want, dtype, equal_nan=True)  # mean over no pixel: NaN, as torch
    assert_close_scaled(got_grad, want_grad, dtype)
    if (labels != ignore_index).any() and k > 1:
        assert want_grad.abs().max() > 0


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sizes", [((9, 17), (65, 129)), ((8, 16), (64, 128))])
def test_realistic_shapes(emulated_cuda_ops, sizes, align_corners):
    """K = 19 at 8x upsampling: many output columns per source column, several chunks per block."""
    (h, w), (out_h, out_w) = sizes
    disc, seg, _ = fada_loss_inputs(1, 19, h, w, h, w, out_h, out_w, torch.float32, 0, False)
    for reduction in (0, 1):
        (want, want_grad), (got, got_grad) = _loss_pair(emulated_cuda_ops, disc, seg, 1, (out_h, out_w), None,
                                                        reduction, align_corners)
        assert_close_scaled(got, want, torch.float32)
        assert_close_scaled(got_grad, want_grad, torch.float32)
    logits, labels = cross_entropy_inputs(1, 19, h, w, out_h, out_w, torch.float32, 1, 0.2, 255)
    (want, want_grad), (got, got_grad) = _ce_pair(emulated_cuda_ops, logits, labels, 255, 1, align_corners)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


def test_same_bits_every_run(emulated_cuda_ops):
    """No float atomics: two runs (different thread interleavings) give identical bits."""
    disc, seg, weight = fada_loss_inputs(2, 5, 6, 7, 6, 7, 23, 29, torch.float32, 3, True)
    grad = torch.tensor(1.0)
    first = emulated_cuda_ops.fada_loss_backward(grad, disc, seg, 1, T, CAP, 23, 29, weight, 1)
    second = emulated_cuda_ops.fada_loss_backward(grad, disc, seg, 1, T, CAP, 23, 29, weight, 1)
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_limit_matches_python_guard(emulated_cuda_ops, kernel_ops, dtype):
    """functional._cuda_backward_fits mirrors adjoint_config: the largest channel count it allows
    runs (through the > 48 KB shared-memory path) and the next one is refused with the reason."""
    limit = max(c for c in range(1, 2000) if _cuda_backward_fits(c, dtype, H100_SHARED_BYTES))
    assert not _cuda_backward_fits(limit + 1, dtype, H100_SHARED_BYTES)
    labels = torch.zeros(1, 2, 3, dtype=torch.long)
    logits = torch.randn(1, limit, 2, 2, dtype=dtype)
    (want, want_grad), (got, got_grad) = _ce_pair(emulated_cuda_ops, logits, labels, 255, 1)
    assert_close_scaled(got_grad, want_grad, dtype)
    with pytest.raises(RuntimeError, match="need more shared memory than the device offers"):
        emulated_cuda_ops.upsampled_cross_entropy_backward(
            torch.tensor(1.0, dtype=dtype), torch.randn(1, limit + 1, 2, 2, dtype=dtype), labels, T, 255, 1
        )


@settings(max_examples=60)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 9),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    num_classes=st.integers(1, 6),
    dtype=HALF_AND_FULL,
    offset=st.sampled_from([0.0, 1e3]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_class_stats_kernels_match_reference(emulated_cuda_ops, batch, channels, h, w, num_classes, dtype, offset,
                                             ignore_frac, layout, seed):
    features, labels = class_stats_inputs(batch, channels, h, w, num_classes, dtype, offset, ignore_frac, seed)
    got = emulated_cuda_ops.class_center_stats(with_layout(features, layout), labels, num_classes, 255)
    assert_class_stats_close(got, _reference.class_center_stats(features.double(), labels, num_classes, 255), offset)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "channels, num_classes, h, w",
    [
        (40, 3, 40, 60),  # two channel groups (one partial), several splits of 1024 pixels
        (33, 100, 9, 130),  # accumulators too large for shared memory: the partials themselves
        (70, 19, 20, 30),  # K = 19: three warps per block (NCHW), warp_bytes apart
        (1, 1, 1, 1),
        (3, 2, 1, 37),  # h = 1, a 5-pixel last step
        (5, 4, 37, 1),  # w = 1
    ],
)
def test_class_stats_layouts_and_splits(emulated_cuda_ops, layout, channels, num_classes, h, w):
    """NCHW (shared-memory tile) and channels_last (direct) reads, several splits per image, partial
    channel groups and steps, both accumulator homes; the same bits on a second run."""
    features, labels = class_stats_inputs(2, channels, h, w, num_classes, torch.float32, 10.0, 0.1, 5)
    x = with_layout(features, layout)
    got = emulated_cuda_ops.class_center_stats(x, labels, num_classes, 255)
    assert_class_stats_close(got, _reference.class_center_stats(features.double(), labels, num_classes, 255), 10.0)
    again = emulated_cuda_ops.class_center_stats(x, labels, num_classes, 255)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h, w", [(5, 13), (4, 16)])
def test_class_stats_nchw_tile_loads_every_dtype(emulated_cuda_ops, dtype, h, w):
    """The NCHW tile's loads per dtype, whole tiles and partial ones: 5x13 takes the element loads
    (two channel rows per load), 4x16 the 16-byte loads; 36 channels: a whole channel group and
    one of 4; 5x13 also ends in a 1-pixel step."""
    features, labels = class_stats_inputs(2, 36, h, w, 3, dtype, 10.0, 0.1, 7)
    got = emulated_cuda_ops.class_center_stats(features, labels, 3, 255)
    assert_class_stats_close(got, _reference.class_center_stats(features.double(), labels, 3, 255), 10.0)


def test_class_stats_long_runs_and_changes(emulated_cuda_ops):
    """Whole 32-pixel steps of one class (the no-change path) next to steps that change class at
    every pixel, and runs that carry over from one step to the next."""
    features, _ = class_stats_inputs(1, 34, 16, 16, 4, torch.float64, 0.0, 0.0, 11)
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    flat = labels.view(-1)
    flat[:64] = 2  # two whole steps of class 2
    flat[64:96] = torch.arange(32) % 4  # a change at every pixel
    flat[96:150] = 1  # a run across a step boundary
    flat[150:160] = 255
    flat[160:] = 3
    for layout in ("contiguous", "channels_last"):
        got = emulated_cuda_ops.class_center_stats(with_layout(features, layout), labels, 4, 255)
        assert_class_stats_close(got, _reference.class_center_stats(features, labels, 4, 255))


def test_class_stats_bad_labels_reported_without_sync(emulated_cuda_ops):
    """A bad label makes that call's result NaN and is raised (ValueError naming it) by the next
    call or by check_label_errors(); the call after that runs normally."""
    features, labels = class_stats_inputs(1, 2, 3, 4, 3, torch.float32, 0.0, 0.0, 0)
    bad = labels.clone()
    bad[0, 1, 2] = 7
    counts, means, m2 = emulated_cuda_ops.class_center_stats(features, bad, 3, 255)
    assert counts.isnan().all() and means.isnan().all() and m2.isnan().all()
    with pytest.raises(ValueError, match=r"class_center_stats: labels .*\[0, 3\) or ignore_index=255; found 7"):
        emulated_cuda_ops.check_label_errors()
    emulated_cuda_ops.check_label_errors()  # reported once
    emulated_cuda_ops.class_center_stats(features, bad, 3, 255)
    with pytest.raises(ValueError, match="found 7"):
        emulated_cuda_ops.class_center_stats(features, labels, 3, 255)
    got = emulated_cuda_ops.class_center_stats(features, labels, 3, 255)
    assert_class_stats_close(got, _reference.class_center_stats(features.double(), labels, 3, 255))


def test_cross_entropy_bad_labels_reported_without_sync(emulated_cuda_ops):
    """As for the statistics: NaN loss and gradient from the faulty call, a ValueError from the next
    call (forward or backward) or check_label_errors(), then normal results again."""
    logits, labels = cross_entropy_inputs(1, 3, 3, 4, 5, 7, torch.float32, 2, 0.2)
    bad = labels.clone()
    bad[0, 2, 3] = 3
    assert torch.isnan(emulated_cuda_ops.upsampled_cross_entropy(logits, bad, T, 255, 1))
    with pytest.raises(ValueError, match=r"upsampled_cross_entropy: labels .*\[0, 3\) or ignore_index=255; found 3"):
        emulated_cuda_ops.check_label_errors()
    grad = emulated_cuda_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), logits, bad, T, 255, 1)
    assert grad.isnan().any()
    with pytest.raises(ValueError, match="found 3"):
        emulated_cuda_ops.upsampled_cross_entropy(logits, labels, T, 255, 0)
    per_pixel = emulated_cuda_ops.upsampled_cross_entropy(logits, bad, T, 255, 0)
    assert per_pixel[0, 2, 3].isnan() and per_pixel.isnan().sum() == 1  # only the bad pixel
    with pytest.raises(ValueError, match="found 3"):
        emulated_cuda_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), logits, labels, T, 255, 1)
    (want, want_grad), (got, got_grad) = _ce_pair(emulated_cuda_ops, logits, labels, 255, 1)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


# ----------------------------------------------------------------------------- FADA loss fast path
# Disc and seg logits at one size and cap >= 0.5 take the staged kernel (csrc/cuda/staged_rows.cuh);
# cap < 0.5 or seg logits at another size the general kernels.

FAST_SHAPES = [  # (h, w) -> (H, W)
    ((1, 1), (5, 7)),
    ((1, 6), (4, 13)),
    ((5, 1), (11, 3)),
    ((6, 5), (3, 9)),  # H < h: row groups without output rows
    ((4, 9), (7, 4)),  # W < w: source columns no output column reaches
    ((3, 40), (5, 300)),  # several tiles of source columns
    ((2, 2), (3, 300)),  # 299 output columns on one source column: chunks of 128 threads
]


def _fused_pair(ops, disc, seg, domain, size, weight, reduction, cap=CAP, align_corners=True):
    """Reference (value, grad for an upstream 1) and the emulated fada_loss_with_grad."""
    dtype = disc.dtype
    w64 = None if weight is None else weight.double()
    want, want_grad, _ = forward_backward(
        lambda d: _reference.fada_loss(
            d, seg.double(), DOMAINS[domain], T, cap, size, w64, REDUCTIONS[reduction], align_corners
        ),
        disc.double(),
        torch.tensor(1.0, dtype=torch.float64),
    )
    got, got_grad = ops.fada_loss_with_grad(disc, seg, domain, T, cap, size[0], size[1], weight, reduction,
                                            align_corners)
    return (want.to(opmath_dtype(dtype)), want_grad.to(dtype)), (got, got_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", FAST_SHAPES)
def test_fast_path_matches_reference(emulated_cuda_ops, shapes, dtype):
    (h, w), (out_h, out_w) = shapes
    disc, seg, weight = fada_loss_inputs(2, 3, h, w, h, w, out_h, out_w, dtype, h * 31 + w, True)
    for domain, reduction in ((0, 0), (1, 1), (0, 2)):
        (want, want_grad), (got, got_grad) = _loss_pair(
            emulated_cuda_ops, disc, seg, domain, (out_h, out_w), weight, reduction
        )
        assert_close_scaled(got, want, dtype)
        assert_close_scaled(got_grad, want_grad, dtype)
        if reduction != 0:
            (want, want_grad), (got, got_grad) = _fused_pair(
                emulated_cuda_ops, disc, seg, domain, (out_h, out_w), weight, reduction
            )
            assert_close_scaled(got, want, dtype)
            assert_close_scaled(got_grad, want_grad, dtype)
        assert want_grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cap, seg_size", [(0.9, (5, 6)), (0.3, (5, 6)), (0.9, (3, 4))])  # staged; general; general
def test_half_inputs_float32_losses(emulated_cuda_ops, dtype, cap, seg_size):
    """Half logits: the loss in float32 and the gradient in their dtype, each equal to what the kernels
    give for the same values in float32 (read exactly, computed alike), fused and separate ops."""
    disc, seg, weight = fada_loss_inputs(2, 3, 5, 6, *seg_size, 13, 17, dtype, 14, True)
    full = (disc.float(), seg.float(), weight.float())
    ops = emulated_cuda_ops
    for reduction in (0, 1, 2):
        args = (1, T, cap, 13, 17)
        loss = ops.fada_loss(disc, seg, *args, weight, reduction)
        assert loss.dtype == torch.float32
        assert torch.equal(loss, ops.fada_loss(full[0], full[1], *args, full[2], reduction))
        grad_out = torch.rand(2, 13, 17) if reduction == 0 else torch.tensor(0.6)
        grad = ops.fada_loss_backward(grad_out, disc, seg, *args, weight, reduction)
        assert grad.dtype == dtype
        assert torch.equal(grad, ops.fada_loss_backward(grad_out, full[0], full[1], *args, full[2], reduction).to(dtype))
        if reduction != 0:
            fused = ops.fada_loss_with_grad(disc, seg, *args, weight, reduction)
            fused_full = ops.fada_loss_with_grad(full[0], full[1], *args, full[2], reduction)
            assert fused[0].dtype == torch.float32 and fused[1].dtype == dtype
            assert torch.equal(fused[0], fused_full[0]) and torch.equal(fused[1], fused_full[1].to(dtype))
    logits, labels = cross_entropy_inputs(2, 3, 5, 6, 13, 17, dtype, 15, 0.2)
    for k_logits in (logits, torch.randn(1, 500, 2, 3).to(dtype)):  # staged; general (500 classes: see below)
        lab = labels if k_logits is logits else torch.randint(0, 500, (1, 5, 7))
        for reduction in (0, 1):
            loss = ops.upsampled_cross_entropy(k_logits, lab, T, 255, reduction)
            assert loss.dtype == torch.float32
            assert torch.equal(loss, ops.upsampled_cross_entropy(k_logits.float(), lab, T, 255, reduction))
        fused = ops.upsampled_cross_entropy_with_grad(k_logits, lab, T, 255, 1)
        fused_full = ops.upsampled_cross_entropy_with_grad(k_logits.float(), lab, T, 255, 1)
        assert fused[0].dtype == torch.float32 and fused[1].dtype == dtype
        assert torch.equal(fused[0], fused_full[0]) and torch.equal(fused[1], fused_full[1].to(dtype))


def test_staged_class_limits(kernel_ops):
    """The staged kernels' class limits come from C++ (kernel_limits.h): 500 classes, which the
    tests here use for the general kernels, exceed both on an H100 in float32 and float64."""
    for acc_bytes in (4, 8):
        fada = kernel_ops.cuda_staged_max_classes("fada_loss", acc_bytes, H100_SHARED_BYTES)
        ce = kernel_ops.cuda_staged_max_classes("upsampled_cross_entropy", acc_bytes, H100_SHARED_BYTES)
        assert 19 <= fada < ce < 500  # Cityscapes' 19 classes take the fast path
        # less shared memory, fewer classes
        assert kernel_ops.cuda_staged_max_classes("fada_loss", acc_bytes, H100_SHARED_BYTES - 4096) < fada
    assert kernel_ops.cuda_staged_max_classes("fada_loss", 4, 1024) == 0
    with pytest.raises(RuntimeError, match="op must be"):
        kernel_ops.cuda_staged_max_classes("nope", 4, H100_SHARED_BYTES)


@pytest.mark.parametrize("cap", [0.5, 0.3])  # 0.5: closed-form soft-label sum; 0.3: the general kernels
def test_cap_around_one_half(emulated_cuda_ops, cap):
    disc, seg, weight = fada_loss_inputs(1, 4, 5, 6, 5, 6, 13, 17, torch.float32, 11, False, scale=6.0)
    (want, want_grad), (got, got_grad) = _fused_pair(emulated_cuda_ops, disc, seg, 1, (13, 17), weight, 1, cap)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


def test_logits_near_80(emulated_cuda_ops):
    """+-80 logits: base-2 values near +-115, maxima subtracted before every exp2, nothing overflows."""
    g = torch.Generator().manual_seed(12)
    disc = (torch.randint(0, 2, (2, 6, 4, 5), generator=g) * 160.0 - 80.0 + torch.rand(2, 6, 4, 5, generator=g))
    seg = torch.randint(0, 2, (2, 3, 4, 5), generator=g) * 160.0 - 80.0
    for reduction in (1, 2):
        (want, want_grad), (got, got_grad) = _fused_pair(emulated_cuda_ops, disc, seg, 0, (9, 14), None, reduction)
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
        assert_close_scaled(got, want, torch.float32)
        assert_close_scaled(got_grad, want_grad, torch.float32)


def test_column_bounds_and_exact_passes_in_one_launch(emulated_cuda_ops):
    """Softmax shifts: the staged kernel shifts by a column's bound (max over channels of the top and
    bottom source rows) and re-runs a pass with exact row maxima when a row's sum falls below 2^-32.
    Logits that jump by 60 between source rows in some columns (disc) and by 50 (seg, before / T)
    put both kinds of pass in one launch; every value must still match the reference."""
    disc, seg, weight = fada_loss_inputs(2, 3, 5, 7, 5, 7, 17, 25, torch.float32, 21, True)
    disc[:, :, 1::2, 2] += 60.0
    disc[0, :, 2, 5] -= 60.0
    seg[:, :, ::2, 4] += 50.0
    for reduction in (1, 2):
        (want, want_grad), (got, got_grad) = _fused_pair(emulated_cuda_ops, disc, seg, 1, (17, 25), weight, reduction)
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
        assert_close_scaled(got, want, torch.float32)
        assert_close_scaled(got_grad, want_grad, torch.float32)
    (want, want_grad), (got, got_grad) = _loss_pair(emulated_cuda_ops, disc, seg, 0, (17, 25), weight, 0)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("sizes", [((64, 128), (512, 1024)), ((65, 129), (512, 1024))])
def test_fast_path_benchmark_shapes(emulated_cuda_ops, sizes):
    """K = 19 at the real sizes: 8x (and not quite 8x) upsampling, every tile and row group."""
    (h, w), (out_h, out_w) = sizes
    disc, seg, weight = fada_loss_inputs(1, 19, h, w, h, w, out_h, out_w, torch.float32, 13, True)
    (want, want_grad), (got, got_grad) = _fused_pair(emulated_cuda_ops, disc, seg, 1, (out_h, out_w), weight, 1)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 23, 29), (1, 3, 4, 9, 4, 9)])
def test_fused_equals_separate_ops_bitwise(emulated_cuda_ops, shape):
    """fada_loss_with_grad (one launch) gives the bits of fada_loss and of fada_loss_backward(1), every run."""
    b, k, h, w, out_h, out_w = shape
    disc, seg, weight = fada_loss_inputs(b, k, h, w, h, w, out_h, out_w, torch.float32, 14, True)
    for reduction in (1, 2):
        args = (1, T, CAP, out_h, out_w, weight, reduction)
        fused = emulated_cuda_ops.fada_loss_with_grad(disc, seg, *args)
        again = emulated_cuda_ops.fada_loss_with_grad(disc, seg, *args)
        loss = emulated_cuda_ops.fada_loss(disc, seg, *args)
        grad = emulated_cuda_ops.fada_loss_backward(torch.tensor(1.0), disc, seg, *args)
        assert torch.equal(fused[0], loss) and torch.equal(fused[1], grad)
        assert torch.equal(fused[0], again[0]) and torch.equal(fused[1], again[1])
    with pytest.raises(RuntimeError, match="reduction must be mean"):
        emulated_cuda_ops.fada_loss_with_grad(disc, seg, 1, T, CAP, out_h, out_w, weight, 0)


@settings(max_examples=40)
@given(
    batch=st.integers(1, 2),
    k=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    out_size=st.tuples(st.integers(1, 14), st.integers(1, 14)),
    domain=st.sampled_from([0, 1]),
    reduction=st.sampled_from([1, 2]),
    weighted=st.booleans(),
    dtype=HALF_AND_FULL,
    layout=st.sampled_from(["contiguous", "channels_last"]),
    align_corners=st.booleans(),
    general=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_matches_reference(emulated_cuda_ops, batch, k, h, w, out_size, domain, reduction, weighted, dtype,
                                 layout, align_corners, general, seed):
    disc, seg, weight = fada_loss_inputs(batch, k, h, w, h, w, *out_size, dtype, seed, weighted)
    with kernels(general):
        (want, want_grad), (got, got_grad) = _fused_pair(
            emulated_cuda_ops, with_layout(disc, layout), seg, domain, out_size, weight, reduction,
            align_corners=align_corners,
        )
    assert_close_scaled(got, want, dtype, floor=loss_floor(disc, seg))
    assert_close_scaled(got_grad, want_grad, dtype)


# ----------------------------------------------------------------------------- cross-entropy fast path
# Every shape whose K channels fit the staged block's shared memory takes the staged kernel
# (csrc/cuda/cross_entropy_kernel.cu, "fast path"); beyond that the general kernels.


def _ce_fused_pair(ops, logits, labels, ignore_index, reduction, align_corners=True):
    """Reference (value, grad for an upstream 1) and the emulated upsampled_cross_entropy_with_grad."""
    dtype = logits.dtype
    want, want_grad, _ = forward_backward(
        lambda x: _reference.upsampled_cross_entropy(
            x, labels, T, ignore_index, REDUCTIONS[reduction], align_corners
        ),
        logits.double(),
        torch.tensor(1.0, dtype=torch.float64),
    )
    got, got_grad = ops.upsampled_cross_entropy_with_grad(logits, labels, T, ignore_index, reduction, align_corners)
    return (want.to(opmath_dtype(dtype)), want_grad.to(dtype)), (got, got_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", FAST_SHAPES)
def test_ce_fast_path_matches_reference(emulated_cuda_ops, shapes, dtype):
    (h, w), (out_h, out_w) = shapes
    logits, labels = cross_entropy_inputs(2, 4, h, w, out_h, out_w, dtype, h * 31 + w, 0.3)
    for reduction in (0, 1, 2):
        (want, want_grad), (got, got_grad) = _ce_pair(emulated_cuda_ops, logits, labels, 255, reduction)
        assert_close_scaled(got, want, dtype)
        assert_close_scaled(got_grad, want_grad, dtype)
        assert want_grad.abs().max() > 0
        if reduction != 0:
            (want, want_grad), (got, got_grad) = _ce_fused_pair(emulated_cuda_ops, logits, labels, 255, reduction)
            assert_close_scaled(got, want, dtype)
            assert_close_scaled(got_grad, want_grad, dtype)


def test_ce_logits_near_80(emulated_cuda_ops):
    """+-80 logits / T: base-2 values near +-64, the maximum subtracted before every exp2."""
    g = torch.Generator().manual_seed(15)
    logits = torch.randint(0, 2, (2, 5, 4, 5), generator=g) * 160.0 - 80.0 + torch.rand(2, 5, 4, 5, generator=g)
    labels = torch.randint(0, 5, (2, 9, 14), generator=g)
    for reduction in (1, 2):
        (want, want_grad), (got, got_grad) = _ce_fused_pair(emulated_cuda_ops, logits, labels, 255, reduction)
        assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
        assert_close_scaled(got, want, torch.float32)
        assert_close_scaled(got_grad, want_grad, torch.float32)


def test_ce_all_ignored(emulated_cuda_ops):
    """Mean over no pixel: NaN, like torch; the gradient is 0 (fused and separate, staged and general)."""
    for k in (3, 500):  # the staged kernel; the general kernels (500 channels exceed the staged block)
        logits, labels = cross_entropy_inputs(2, k, 3, 4, 7, 9, torch.float32, 16, 1.0)
        loss, grad = emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, labels, T, 255, 1)
        assert loss.isnan() and torch.equal(grad, torch.zeros_like(grad))
        assert emulated_cuda_ops.upsampled_cross_entropy(logits, labels, T, 255, 1).isnan()
        loss, grad = emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, labels, T, 255, 2)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("k", [4, 500])  # staged; general kernels
@pytest.mark.parametrize("shape", [(2, 6, 7, 23, 29), (1, 4, 9, 4, 9)])
def test_ce_fused_equals_separate_ops_bitwise(emulated_cuda_ops, k, shape):
    """upsampled_cross_entropy_with_grad gives the bits of the forward op and of the backward op for 1, every run."""
    b, h, w, out_h, out_w = shape
    if k == 500:
        h, w, out_h, out_w = 2, 3, 5, 7  # keep the emulation short
    logits, labels = cross_entropy_inputs(b, k, h, w, out_h, out_w, torch.float32, 17, 0.3)
    for reduction in (1, 2):
        args = (T, 255, reduction)
        fused = emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, labels, *args)
        again = emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, labels, *args)
        loss = emulated_cuda_ops.upsampled_cross_entropy(logits, labels, *args)
        grad = emulated_cuda_ops.upsampled_cross_entropy_backward(torch.tensor(1.0), logits, labels, *args)
        assert torch.equal(fused[0], loss) and torch.equal(fused[1], grad)
        assert torch.equal(fused[0], again[0]) and torch.equal(fused[1], again[1])
        (want, want_grad), _ = _ce_fused_pair(emulated_cuda_ops, logits, labels, 255, reduction)
        assert_close_scaled(fused[0], want, torch.float32)
        assert_close_scaled(fused[1], want_grad, torch.float32)
    with pytest.raises(RuntimeError, match="reduction must be mean"):
        emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, labels, T, 255, 0)


def test_ce_fused_bad_labels_reported_without_sync(emulated_cuda_ops):
    """The fused op, as the separate ones: NaN loss and gradient, the ValueError from the next call."""
    logits, labels = cross_entropy_inputs(1, 3, 3, 4, 5, 7, torch.float32, 2, 0.2)
    bad = labels.clone()
    bad[0, 1, 2] = -7
    loss, grad = emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, bad, T, 255, 2)
    assert loss.isnan() and grad.isnan().any()
    with pytest.raises(ValueError, match=r"upsampled_cross_entropy: labels .*\[0, 3\) or ignore_index=255; found -7"):
        emulated_cuda_ops.upsampled_cross_entropy_with_grad(logits, labels, T, 255, 1)
    (want, want_grad), (got, got_grad) = _ce_fused_pair(emulated_cuda_ops, logits, labels, 255, 1)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


@pytest.mark.parametrize("sizes", [((64, 128), (512, 1024)), ((65, 129), (512, 1024))])
def test_ce_fast_path_benchmark_shapes(emulated_cuda_ops, sizes):
    """K = 19 at the real sizes: 8x (and not quite 8x) upsampling, every tile and row group."""
    (h, w), (out_h, out_w) = sizes
    logits, labels = cross_entropy_inputs(1, 19, h, w, out_h, out_w, torch.float32, 18, 0.1)
    (want, want_grad), (got, got_grad) = _ce_fused_pair(emulated_cuda_ops, logits, labels, 255, 1)
    assert_close_scaled(got, want, torch.float32)
    assert_close_scaled(got_grad, want_grad, torch.float32)


@settings(max_examples=40)
@given(
    batch=st.integers(1, 2),
    k=st.integers(1, 5),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    out_size=st.tuples(st.integers(1, 14), st.integers(1, 14)),
    ignore_index=st.sampled_from([255, -100, 0]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    reduction=st.sampled_from([1, 2]),
    dtype=HALF_AND_FULL,
    layout=st.sampled_from(["contiguous", "channels_last"]),
    align_corners=st.booleans(),
    general=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ce_fused_matches_reference(emulated_cuda_ops, batch, k, h, w, out_size, ignore_index, ignore_frac,
                                    reduction, dtype, layout, align_corners, general, seed):
    logits, labels = cross_entropy_inputs(batch, k, h, w, *out_size, dtype, seed, ignore_frac, ignore_index)
    with kernels(general):
        (want, want_grad), (got, got_grad) = _ce_fused_pair(
            emulated_cuda_ops, with_layout(logits, layout), labels, ignore_index, reduction, align_corners
        )
    assert_close_scaled(got, want, dtype, equal_nan=True)  # mean over no pixel: NaN, as torch
    assert_close_scaled(got_grad, want_grad, dtype)


# ----------------------------------------------------------------------------- align_corners=False, both paths


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("shapes", FAST_SHAPES)
def test_half_pixel_convention_on_both_paths(emulated_cuda_ops, shapes, general):
    """align_corners=False on the fixed shapes (h = 1, w = 1, H < h, W < w, several tiles, long runs):
    every op of the loss and the cross-entropy, on the fast paths and the general kernels."""
    (h, w), (out_h, out_w) = shapes
    disc, seg, weight = fada_loss_inputs(2, 3, h, w, h, w, out_h, out_w, torch.float32, h * 7 + w, True)
    logits, labels = cross_entropy_inputs(2, 4, h, w, out_h, out_w, torch.float32, h * 5 + w, 0.3)
    with kernels(general):
        for domain, reduction in ((0, 0), (1, 1), (0, 2)):
            pairs = [_loss_pair(emulated_cuda_ops, disc, seg, domain, (out_h, out_w), weight, reduction, False),
                     _ce_pair(emulated_cuda_ops, logits, labels, 255, reduction, False)]
            if reduction != 0:
                pairs += [_fused_pair(emulated_cuda_ops, disc, seg, domain, (out_h, out_w), weight, reduction,
                                      align_corners=False),
                          _ce_fused_pair(emulated_cuda_ops, logits, labels, 255, reduction, False)]
            for (want, want_grad), (got, got_grad) in pairs:
                assert_close_scaled(got, want, torch.float32)
                assert_close_scaled(got_grad, want_grad, torch.float32)
                assert want_grad.abs().max() > 0


def test_general_kernels_switch_takes_effect(emulated_cuda_ops):
    """FADA_CORE_CUDA_GENERAL_KERNELS=1 reaches other kernels: their float32 per-pixel losses (exp, not
    exp2 of pre-scaled values) differ from the fast path's in some last bits, and both match the reference."""
    disc, seg, _ = fada_loss_inputs(1, 3, 4, 5, 4, 5, 13, 17, torch.float32, 23, False)
    logits, labels = cross_entropy_inputs(1, 4, 4, 5, 13, 17, torch.float32, 24, 0.0)
    results = {}
    for general in (False, True):
        with kernels(general):
            results[general] = (
                emulated_cuda_ops.fada_loss(disc, seg, 1, T, CAP, 13, 17, None, 0, False),
                emulated_cuda_ops.upsampled_cross_entropy(logits, labels, T, 255, 0, False),
            )
    want = (
        _reference.fada_loss(disc.double(), seg.double(), "target", T, CAP, (13, 17), None, "none", False).float(),
        _reference.upsampled_cross_entropy(logits.double(), labels, T, 255, "none", False).float(),
    )
    for i in range(2):
        assert not torch.equal(results[False][i], results[True][i])
        assert_close_scaled(results[False][i], want[i], torch.float32)
        assert_close_scaled(results[True][i], want[i], torch.float32)
