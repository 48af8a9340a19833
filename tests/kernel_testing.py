"""Helpers shared by the kernel parity tests: inputs, layouts, one forward+backward, the scaled comparison."""

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
from hypothesis import strategies as st

# per-dtype relative tolerances: tight enough that an indexing or weighting bug fails
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close_scaled(got, want, dtype, equal_nan=False, floor=0.0):
    """Same shape and dtype; values within RTOL[dtype], absolutely relative to the largest finite entry
    or ``floor``, whichever is larger (see :func:`loss_floor`).

    A float32 ``want`` (the loss of half inputs: computed and returned in float32, never rounded to
    half) is held to float32's tolerance whatever ``dtype`` is."""
    rtol = RTOL[torch.float32] if want.dtype == torch.float32 else RTOL[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    finite = want[torch.isfinite(want)]
    scale = finite.double().abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, floor, 1e-30), equal_nan=equal_nan)


def loss_floor(*logits: torch.Tensor) -> float:
    """The scale a cross-entropy-like loss of these logits is exact to: each term is a log-sum-exp
    minus a logit, which cancel, so its rounding error follows the logits' magnitude, not the
    loss's (a loss near 0 from confident logits is not known to its own relative precision)."""
    return 1.0 + max(float(x.detach().abs().max()) for x in logits)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (same values) as a contiguous, channels_last or strided (every other column of a wider tensor) tensor."""
    if layout == "channels_last":
        if x.dim() == 3:  # labels: column-major planes
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        out = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
        assert torch.equal(out, x)
        return out
    return x.contiguous()


def forward_backward(fn, x, grad_out=None):
    """``fn`` on a fresh leaf copy of ``x``, then backward of ``grad_out`` (random if None).

    Returns the detached output, the gradient w.r.t. ``x`` and ``grad_out``, so that a second
    implementation can be run with the same upstream gradient.
    """
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out.detach(), leaf.grad, grad_out


def fada_loss_inputs(batch, k, h, w, hs, ws, out_h, out_w, dtype, seed, weighted, scale=3.0, device="cpu"):
    """Random non-zero (disc (B, 2K, h, w), seg (B, K, hs, ws), weight (B, H, W) or None)."""
    g = torch.Generator().manual_seed(seed)
    disc = (torch.randn(batch, 2 * k, h, w, generator=g, dtype=torch.float64) * scale).to(dtype)
    seg = (torch.randn(batch, k, hs, ws, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = torch.rand(batch, out_h, out_w, generator=g, dtype=torch.float64).to(dtype) if weighted else None
    return disc.to(device), seg.to(device), None if weight is None else weight.to(device)


def cross_entropy_inputs(batch, k, h, w, out_h, out_w, dtype, seed, ignore_frac, ignore_index=255, scale=3.0,
                         device="cpu"):
    """Random logits (B, K, h, w) and labels (B, H, W), a fraction ``ignore_frac`` of them ignore_index."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, k, h, w, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, k, (batch, out_h, out_w), generator=g)
    labels[torch.rand(batch, out_h, out_w, generator=g) < ignore_frac] = ignore_index
    return logits.to(device), labels.to(device)


def class_stats_inputs(batch, channels, h, w, num_classes, dtype, offset, ignore_frac, seed, ignore_index=255):
    """Random features (B, C, h, w) around ``offset`` and labels (B, h, w), a fraction ignore_index."""
    g = torch.Generator().manual_seed(seed)
    features = (torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) + offset).to(dtype)
    labels = torch.randint(0, num_classes, (batch, h, w), generator=g)
    labels[torch.rand(batch, h, w, generator=g) < ignore_frac] = ignore_index
    return features, labels


def assert_class_stats_close(got, want, offset=0.0, rtol=1e-9):
    """(counts, means, m2) in float64: counts exact, means and m2 within ``rtol`` (means relative to the offset)."""
    counts, means, m2 = got
    r_counts, r_means, r_m2 = want
    assert counts.dtype == means.dtype == m2.dtype == torch.float64
    assert counts.shape == r_counts.shape and means.shape == r_means.shape and m2.shape == r_m2.shape
    torch.testing.assert_close(counts, r_counts, rtol=0, atol=0)
    torch.testing.assert_close(means, r_means, rtol=rtol, atol=rtol * (1.0 + abs(offset)))
    torch.testing.assert_close(m2, r_m2, rtol=rtol, atol=1e-9)


LAYOUTS = ("contiguous", "channels_last", "strided")


@dataclasses.dataclass
class FadaLossCase:
    """One drawn FADA loss problem: contiguous inputs (``layout`` says how to present them), the output
    size and the op's arguments."""

    disc: torch.Tensor
    seg: torch.Tensor
    weight: Optional[torch.Tensor]
    out_size: Tuple[int, int]
    domain: int
    reduction: int
    dtype: torch.dtype
    layout: str
    align_corners: bool


def fada_loss_cases(max_batch: int = 3, max_k: int = 5, max_side: int = 6, max_out: Tuple[int, int] = (13, 13),
                    reductions: Sequence[int] = (0, 1, 2),
                    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64)) -> st.SearchStrategy:
    """FADA loss problems for the kernel parity tests: sizes, seg logits at the disc's size or another
    one, output sizes (None: the input size), domain, reduction, weight or none, dtype, layout, corners."""

    @st.composite
    def case(draw) -> FadaLossCase:
        side = st.integers(1, max_side)
        batch, k, h, w = draw(st.integers(1, max_batch)), draw(st.integers(1, max_k)), draw(side), draw(side)
        hs, ws = draw(st.one_of(st.none(), st.tuples(side, side))) or (h, w)
        out_h, out_w = draw(st.one_of(st.none(), st.tuples(st.integers(1, max_out[0]), st.integers(1, max_out[1])))) \
            or (h, w)
        dtype = draw(st.sampled_from(list(dtypes)))
        disc, seg, weight = fada_loss_inputs(batch, k, h, w, hs, ws, out_h, out_w, dtype,
                                             draw(st.integers(0, 2**31 - 1)), draw(st.booleans()))
        return FadaLossCase(disc, seg, weight, (out_h, out_w), draw(st.sampled_from([0, 1])),
                            draw(st.sampled_from(list(reductions))), dtype, draw(st.sampled_from(LAYOUTS)),
                            draw(st.booleans()))

    return case()
