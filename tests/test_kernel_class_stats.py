"""The compiled class_center_stats kernel against the eager reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fada_core import _reference
from kernel_testing import assert_class_stats_close, class_stats_inputs

IGNORE = 255


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # every other column of a twice-as-wide tensor: no contiguous plane
        wide = torch.repeat_interleave(x, 2, dim=3)
        out = wide[..., ::2]
        assert x.numel() <= 1 or x.shape[3] == 1 or not out.is_contiguous()
        return out
    return x.contiguous()


def _sample(batch, channels, h, w, num_classes, dtype, offset, ignore_frac, seed, layout="contiguous"):
    features, labels = class_stats_inputs(batch, channels, h, w, num_classes, dtype, offset, ignore_frac, seed, IGNORE)
    return _layout(features, layout), labels


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(0, 3),
    channels=st.sampled_from([1, 2, 5, 15, 16, 17, 33]),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    num_classes=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    offset=st.sampled_from([0.0, 1e3, -1e3]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(isa_kernel_ops, batch, channels, h, w, num_classes, dtype, offset, ignore_frac, layout, seed):
    features, labels = _sample(batch, channels, h, w, num_classes, dtype, offset, ignore_frac, seed, layout)
    got = isa_kernel_ops.class_center_stats(features, labels, num_classes, IGNORE)
    want = _reference.class_center_stats(features, labels, num_classes, IGNORE)
    assert_class_stats_close(got, want, offset)


def test_absent_classes_are_zero(kernel_ops):
    features = torch.randn(2, 5, 4, 3) + 7.0
    labels = torch.full((2, 4, 3), 1)
    labels[0, 0, 0] = 3
    labels[1] = IGNORE
    counts, means, m2 = kernel_ops.class_center_stats(features, labels, 6, IGNORE)
    assert counts.tolist() == [0.0, 11.0, 0.0, 1.0, 0.0, 0.0]
    for k in (0, 2, 4, 5):
        assert means[k].abs().sum().item() == 0.0 and m2[k].item() == 0.0
    # a single pixel: mean is that pixel, spread is exactly zero
    torch.testing.assert_close(means[3], features[0, :, 0, 0].double(), rtol=0, atol=0)
    assert m2[3].item() == 0.0
    x = features[0].permute(1, 2, 0).reshape(-1, 5)[1:].double()
    torch.testing.assert_close(means[1], x.mean(0))
    torch.testing.assert_close(m2[1], ((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_offset_stays_exact(isa_kernel_ops, offset):
    # A naive Σx² − (Σx)²/n in float64 loses ~all digits of a spread of 1e-3 at
    # an offset of 1e4; the shifted accumulation must not.
    g = torch.Generator().manual_seed(0)
    features = offset + 1e-3 * torch.randn(2, 24, 9, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 9, 10), generator=g)
    got = isa_kernel_ops.class_center_stats(features, labels, 4, IGNORE)
    want = _reference.class_center_stats(features, labels, 4, IGNORE)
    torch.testing.assert_close(got[2], want[2], rtol=1e-8, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-14, atol=0)


def test_float32_features_with_offset_match_float64(kernel_ops):
    features, labels = _sample(2, 40, 17, 13, 5, torch.float32, 1e4, 0.2, seed=3)
    got = kernel_ops.class_center_stats(features, labels, 5, IGNORE)
    want = kernel_ops.class_center_stats(features.double(), labels, 5, IGNORE)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(isa_kernel_ops, dtype):
    features, labels = _sample(2, 19, 6, 5, 4, dtype, 0.0, 0.2, seed=5)
    got = isa_kernel_ops.class_center_stats(features, labels, 4, IGNORE)
    # the kernel reads the half values exactly and accumulates in float64
    want = _reference.class_center_stats(features.double(), labels, 4, IGNORE)
    assert_class_stats_close(got, want)


def test_int32_labels(kernel_ops):
    features, labels = _sample(2, 8, 5, 6, 3, torch.float32, 0.0, 0.2, seed=6)
    got = kernel_ops.class_center_stats(features, labels.int(), 3, IGNORE)
    want = kernel_ops.class_center_stats(features, labels, 3, IGNORE)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_negative_ignore_index(kernel_ops):
    features, labels = _sample(1, 3, 4, 4, 3, torch.float64, 0.0, 0.0, seed=7)
    labels[0, 0] = -1
    got = kernel_ops.class_center_stats(features, labels, 3, -1)
    want = _reference.class_center_stats(features, labels, 3, -1)
    assert_class_stats_close(got, want)


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("batch, channels, h, w", [(3, 35, 37, 41), (1, 16, 40, 13), (2, 48, 23, 23), (2, 32, 32, 64)])
def test_many_chunks_match_reference(isa_kernel_ops, batch, channels, h, w, offset):
    # The hypothesis shapes fit in one chunk of the CPU kernel's plan (512
    # pixels); these span several per image, with a partial last chunk, and
    # both the 16-channel SIMD blocks and a scalar tail block.
    features, labels = _sample(batch, channels, h, w, 19, torch.float32, offset, 0.1, seed=12)
    got = isa_kernel_ops.class_center_stats(features, labels, 19, IGNORE)
    want = _reference.class_center_stats(features, labels, 19, IGNORE)
    assert_class_stats_close(got, want, offset)


def _big_case():
    return _sample(2, 70, 33, 65, 19, torch.float32, 100.0, 0.1, seed=11)


def test_deterministic_bits_repeated(isa_kernel_ops):
    features, labels = _big_case()
    first = isa_kernel_ops.class_center_stats(features, labels, 19, IGNORE)
    for _ in range(3):
        again = isa_kernel_ops.class_center_stats(features, labels, 19, IGNORE)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_deterministic_across_thread_counts(isa_kernel_ops):
    features, labels = _big_case()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = isa_kernel_ops.class_center_stats(features, labels, 19, IGNORE)
        torch.set_num_threads(2)
        two = isa_kernel_ops.class_center_stats(features, labels, 19, IGNORE)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [7, -2, 256])
def test_bad_labels_raise(kernel_ops, bad):
    features, labels = _sample(1, 3, 4, 4, 7, torch.float32, 0.0, 0.0, seed=8)
    labels[0, 2, 1] = bad
    with pytest.raises(RuntimeError, match=rf"labels must be in \[0, num_classes=7\).*found {bad}"):
        kernel_ops.class_center_stats(features, labels, 7, IGNORE)


def test_shape_errors(kernel_ops):
    with pytest.raises(RuntimeError, match="do not match"):
        kernel_ops.class_center_stats(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long), 2, IGNORE)
    with pytest.raises(RuntimeError, match="integer"):
        kernel_ops.class_center_stats(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4), 2, IGNORE)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)])
def test_empty_inputs(kernel_ops, shape):
    features = torch.randn(shape)
    labels = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.long)
    counts, means, m2 = kernel_ops.class_center_stats(features, labels, 3, IGNORE)
    assert means.shape == (3, shape[1])
    assert m2.abs().sum().item() == 0.0 and means.abs().sum().item() == 0.0
    assert counts.tolist() == [float(labels.numel()), 0.0, 0.0]


def test_opcheck(kernel_ops):
    features, labels = _sample(2, 5, 4, 3, 3, torch.float32, 0.0, 0.2, seed=9)
    torch.library.opcheck(kernel_ops.class_center_stats.default, (features, labels, 3, IGNORE))
    torch.library.opcheck(
        kernel_ops.class_center_stats.default, (_layout(features.double(), "channels_last"), labels, 3, IGNORE)
    )


def test_torch_compile_fullgraph(kernel_ops):
    def centers(features, labels):
        counts, means, m2 = torch.ops.fada_core.class_center_stats(features, labels, 4, IGNORE)
        return means * counts[:, None], m2 / counts.clamp(min=1)

    features, labels = _sample(2, 6, 5, 7, 4, torch.float32, 3.0, 0.2, seed=10)
    compiled = torch.compile(centers, fullgraph=True, backend="inductor")
    for a, b in zip(compiled(features, labels), centers(features, labels)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cuda_matches_reference(cuda_kernel_ops, dtype, layout):
    for seed, (batch, channels, h, w, k) in enumerate([(2, 70, 33, 65, 19), (1, 3, 1, 1, 2), (3, 17, 90, 160, 5)]):
        features, labels = _sample(batch, channels, h, w, k, dtype, 1e3 if dtype == torch.float64 else 0.0, 0.2, seed)
        features, labels = features.cuda(), labels.cuda()
        got = cuda_kernel_ops.class_center_stats(features, labels, k, IGNORE)
        want = _reference.class_center_stats(features.double(), labels, k, IGNORE)
        assert_class_stats_close(got, want, 1e3 if dtype == torch.float64 else 0.0)
        again = cuda_kernel_ops.class_center_stats(features, labels, k, IGNORE)
        for a, b in zip(got, again):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_bad_labels_and_empty(cuda_kernel_ops):
    features = torch.randn(1, 3, 4, 4, device="cuda")
    labels = torch.zeros(1, 4, 4, dtype=torch.long, device="cuda")
    labels[0, 1, 1] = 9
    counts, _, _ = cuda_kernel_ops.class_center_stats(features, labels, 3, IGNORE)  # no sync: NaN, recorded
    assert counts.isnan().all()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="class_center_stats: labels .*found 9"):
        cuda_kernel_ops.check_label_errors()
    labels[0, 1, 1] = 0
    assert cuda_kernel_ops.class_center_stats(features, labels, 3, IGNORE)[0].sum().item() == 16  # context usable
    counts, means, m2 = cuda_kernel_ops.class_center_stats(
        torch.randn(0, 3, 4, 4, device="cuda"), torch.zeros(0, 4, 4, dtype=torch.long, device="cuda"), 3, IGNORE
    )
    assert counts.is_cuda and counts.abs().sum().item() == 0 and means.shape == (3, 3)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile(cuda_kernel_ops):
    features, labels = _sample(2, 5, 4, 3, 3, torch.float32, 0.0, 0.2, seed=9)
    features, labels = features.cuda(), labels.cuda()
    torch.library.opcheck(cuda_kernel_ops.class_center_stats.default, (features, labels, 3, IGNORE))
    fn = torch.compile(lambda f, l: torch.ops.fada_core.class_center_stats(f, l, 3, IGNORE)[1] * 2, fullgraph=True)
    want = cuda_kernel_ops.class_center_stats(features, labels, 3, IGNORE)[1] * 2
    torch.testing.assert_close(fn(features, labels), want)
