"""SwiGLU sizing (ffn_hidden_dim) and RMSNorm: Meta's sizes for any config, and the norm's laws."""

import math
from fractions import Fraction
from typing import Optional

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st

from microllama.args import ffn_hidden_dim
from microllama.model import RMSNorm
from microllama.tolerances import FP32_UNIT_ROUNDOFF

pytestmark = pytest.mark.usefixtures("one_torch_thread")

dims = st.integers(1, 1024)
multiples = st.sampled_from([1, 2, 8, 32, 64, 256, 1024, 4096]) | st.integers(1, 5000)
multipliers = st.none() | st.floats(0.25, 4.0)
seeds = st.integers(0, 2**32 - 1)


@given(st.integers(1, 65536), multiples, multipliers)
def test_ffn_hidden_dim_is_the_least_multiple_at_or_above_two_thirds_of_4_dim(dim, multiple_of, multiplier):
    base = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        base = int(multiplier * base)
    hidden = ffn_hidden_dim(dim, multiple_of, multiplier)
    assert hidden % multiple_of == 0
    assert base <= hidden < base + multiple_of


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, published",
    [(4096, 1024, 1.3, 14336), (8192, 4096, 1.3, 28672), (16384, 4096, 1.2, 53248), (2048, 256, 1.5, 8192)],
    ids=["llama3.1-8B", "llama3.1-70B", "llama3.1-405B", "llama3.2-1B"],
)
def test_ffn_hidden_dim_matches_published_llama_sizes(dim, multiple_of, multiplier, published):
    assert ffn_hidden_dim(dim, multiple_of, multiplier) == published


def scaled_two_thirds_of_4_dim(dim: int, multiplier: Optional[float]) -> int:
    """int(multiplier * int(2 * (4 * dim) / 3)) in exact arithmetic, but for the one rounding Meta's float
    product makes: the exact product of the float multiplier and the integer, rounded to the nearest
    double (Fraction's float() rounds correctly, as IEEE multiplication does), then floored. That
    rounding matters: 0.7 is stored a hair below 7/10, and 0.7 * 90 gives 62.99999999999999, so Meta's
    formula sizes dim 34 at 62 where the decimal 0.7 would give 63."""
    base = 8 * dim // 3
    return base if multiplier is None else math.floor(float(Fraction(multiplier) * base))


def least_multiple_at_or_above(n: int, multiple_of: int) -> int:
    return -(-n // multiple_of) * multiple_of


# Every width up to the 8B's; multiple_of 1, small, odd, not powers of two, and up to the 405B's;
# multipliers as params.json writes them (1.2, 1.3, 1.5), the identity, halves and doubles, and
# fractions and decimals whose product with int(8 * dim / 3) often lands exactly on an integer.
GRID_DIMS = range(1, 4097)
GRID_MULTIPLES = [1, 2, 3, 5, 7, 8, 10, 24, 96, 100, 256, 1000, 1024, 4096]
GRID_MULTIPLIERS = [None, 1.0, 1.2, 1.3, 1.5, 0.5, 2.0, 2 / 3, 4 / 3, 0.7, 1.1, 0.25, 3.3]


def test_ffn_hidden_dim_is_the_least_multiple_at_or_above_the_scaled_two_thirds_on_the_whole_grid():
    wrong = []
    for dim in GRID_DIMS:
        for multiplier in GRID_MULTIPLIERS:
            hidden = scaled_two_thirds_of_4_dim(dim, multiplier)
            for multiple_of in GRID_MULTIPLES:
                got = ffn_hidden_dim(dim, multiple_of, multiplier)
                if got != least_multiple_at_or_above(hidden, multiple_of):
                    wrong.append((dim, multiple_of, multiplier, got, least_multiple_at_or_above(hidden, multiple_of)))
    assert not wrong, f"{len(wrong)} of the grid wrong, e.g. (dim, multiple_of, multiplier, got, law): {wrong[:5]}"


def test_ffn_hidden_dim_keeps_metas_float_product_where_the_decimal_product_is_an_integer():
    # A refactor to exact decimal arithmetic would change the shapes of Meta's checkpoints.
    assert Fraction("0.7") * (8 * 34 // 3) == 63
    assert ffn_hidden_dim(34, 1, 0.7) == 62
    assert ffn_hidden_dim(34, 2, 0.7) == 62


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@st.composite
def ffn_sizing_cases(draw: st.DrawFn, max_dim: int) -> tuple[int, int, Optional[float]]:
    """(dim, multiple_of, multiplier), often with the product landing on an integer n (multiplier the
    float n / base, which may fall either side of the exact quotient), and often with multiple_of
    dividing the unrounded size exactly, so that rounding up must leave it alone."""
    dim = draw(st.integers(1, max_dim))
    base = 8 * dim // 3
    lands = st.integers(max(1, base // 4), 4 * base).map(lambda n: n / base)
    multiplier = draw(multipliers | lands | st.integers(1, 400).map(lambda k: k / 100))
    hidden = scaled_two_thirds_of_4_dim(dim, multiplier)
    exact = st.sampled_from(divisors(hidden)) if hidden else st.just(1)
    multiple_of = draw(multiples | st.just(1) | exact)
    if multiplier is not None and abs(multiplier * base - round(multiplier * base)) < 1e-9:
        event("product lands on an integer, or a rounding away from one")
    event("unrounded size is a multiple of multiple_of" if hidden % multiple_of == 0 else "rounded up")
    return dim, multiple_of, multiplier


@pytest.mark.reference
@given(ffn_sizing_cases(max_dim=1024))
@example((64, 32, 1.3))  # the tiny checkpoint
@example((34, 1, 0.7))  # 0.7 * 90 rounds to 62.99999999999999: Meta's size is 62, not 63
@example((3, 1, None))  # int(8 * 3 / 3) = 8 exactly
@example((96, 256, 1.0))  # 256, already a multiple
def test_ffn_hidden_dim_equals_meta_feedforward_weight_shape(case):
    from reference_harness.meta import import_meta, init_model_parallel

    dim, multiple_of, multiplier = case
    init_model_parallel(1)
    meta_ffn = import_meta().model.FeedForward(dim, 4 * dim, multiple_of, multiplier)
    assert meta_ffn.w1.weight.shape == (ffn_hidden_dim(dim, multiple_of, multiplier), dim)


@pytest.mark.reference
def test_ffn_hidden_dim_equals_metas_unrounded_for_every_dim_to_4096():
    # multiple_of 1 shows the unrounded size itself, where products landing on integers decide (all four
    # multipliers land for some dims; 1.2 and 0.7 are stored below their decimals, 1.3 above).
    from reference_harness.meta import meta_ffn_hidden_dims

    configs = [(d, 1, m) for d in GRID_DIMS for m in (0.7, 1.2, 1.3, 2 / 3)]
    expected = meta_ffn_hidden_dims(configs)
    wrong = [(c, e) for c, e in zip(configs, expected, strict=True) if ffn_hidden_dim(*c) != e]
    assert not wrong, f"{len(wrong)} differ from Meta's, e.g. ((dim, multiple_of, multiplier), Meta's): {wrong[:5]}"


def random_rows(seed: int, dim: int, log10_scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, dim, generator=g) * 10**log10_scale


@given(st.integers(1, 512), st.floats(-4, 2), st.floats(-3, 3), st.sampled_from([1e-5, 1e-6]), seeds)
def test_rmsnorm_scaling_input_by_c_equals_dividing_eps_by_c_squared(dim, log10_x, log10_c, eps, seed):
    # c x / sqrt(c^2 ms + eps) = x / sqrt(ms + eps / c^2): eps is the only thing scaling can change.
    # Input RMS from 1e-4 to 1e2 puts ms below, near and far above eps.
    x, c = random_rows(seed, dim, log10_x), 10**log10_c
    scaled = RMSNorm(dim, eps=eps)(c * x)
    expected = RMSNorm(dim, eps=eps / c**2)(x)
    torch.testing.assert_close(scaled, expected, rtol=64 * FP32_UNIT_ROUNDOFF, atol=0)


@given(st.integers(1, 512), st.floats(-1, 2), st.floats(0, 3), st.sampled_from([1e-5, 1e-6]), seeds)
def test_rmsnorm_invariant_to_positive_scaling_up_to_eps(dim, log10_x, log10_c, eps, seed):
    # For ms >> eps the output is x / rms up to a relative eps / (2 ms); scaling up only shrinks that.
    x, c = random_rows(seed, dim, log10_x), 10**log10_c
    norm = RMSNorm(dim, eps=eps)
    ms = x.pow(2).mean(-1, keepdim=True)
    out, scaled = norm(x), norm(c * x)
    assert ((scaled - out).abs() <= out.abs() * (eps / (2 * ms) + 64 * FP32_UNIT_ROUNDOFF)).all()


@given(st.integers(1, 512), st.floats(-4, 2), st.sampled_from([1e-5, 1e-6]), seeds)
def test_rmsnorm_output_mean_square_is_ms_over_ms_plus_eps(dim, log10_x, eps, seed):
    x = random_rows(seed, dim, log10_x)
    ms = x.double().pow(2).mean(-1)
    out_ms = RMSNorm(dim, eps=eps)(x).double().pow(2).mean(-1)
    torch.testing.assert_close(out_ms, ms / (ms + eps), rtol=64 * FP32_UNIT_ROUNDOFF, atol=0)


@pytest.mark.reference
@given(
    st.integers(1, 512),
    st.floats(-4, 2),
    st.sampled_from([1e-5, 1e-6]),
    st.sampled_from([torch.float32, torch.bfloat16]),
    seeds,
)
def test_rmsnorm_equals_meta_rmsnorm(dim, log10_x, eps, dtype, seed):
    from reference_harness.meta import import_meta

    x = random_rows(seed, dim, log10_x).to(dtype)
    ours, meta = RMSNorm(dim, eps=eps).to(dtype), import_meta().model.RMSNorm(dim, eps=eps).to(dtype)
    weight = 1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ours.weight.copy_(weight)
        meta.weight.copy_(weight)
        assert torch.equal(ours(x), meta(x))
