"""SwiGLU sizing (ffn_hidden_dim) and RMSNorm: Meta's sizes for any config, and the norm's laws."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from microllama.model import RMSNorm, ffn_hidden_dim
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


@pytest.mark.reference
@given(dims, multiples, multipliers)
@example(64, 32, 1.3)  # the tiny checkpoint
def test_ffn_hidden_dim_equals_meta_feedforward_weight_shape(dim, multiple_of, multiplier):
    from reference_harness.meta import import_meta, init_model_parallel

    init_model_parallel(1)
    meta_ffn = import_meta().model.FeedForward(dim, 4 * dim, multiple_of, multiplier)
    assert meta_ffn.w1.weight.shape == (ffn_hidden_dim(dim, multiple_of, multiplier), dim)


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
