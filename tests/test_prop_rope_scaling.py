"""Llama 3.1 RoPE frequency scaling (apply_scaling): the laws of its three bands for any constants,
and Meta's function for Meta's constants.

The laws are checked in float64, where they hold to rounding; Meta is matched in float32, bit for bit.
"""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from microllama.args import ModelArgs, RopeScaling
from microllama.model import Transformer, apply_scaling, precompute_freqs_cis
from tests.strategies import (
    LLAMA32_ROPE_SCALING,
    META_ROPE_SCALING,
    head_dims,
    rope_frequencies,
    rope_scaling_constants,
    rope_theta,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


any_constants = rope_scaling_constants()


def band_edges(c: RopeScaling) -> tuple[float, float]:
    """Wavelengths where the bands meet: below the first kept, above the second divided."""
    return c.original_context / c.high_freq_factor, c.original_context / c.low_freq_factor


def frequencies_across_bands(c: RopeScaling, theta: float, head_dim: int) -> torch.Tensor:
    """A model's frequencies plus a log grid of wavelengths from 1 to far beyond the long edge, and the
    edges themselves: every band is populated."""
    short, long = band_edges(c)
    grid = torch.logspace(0, math.log10(100 * long), 2000, dtype=torch.float64)
    wavelengths = torch.cat([grid, torch.tensor([short, long], dtype=torch.float64)])
    return torch.cat([rope_frequencies(theta, head_dim), 2 * math.pi / wavelengths])


def wavelengths_of(freqs: torch.Tensor) -> torch.Tensor:
    return 2 * math.pi / freqs


@given(any_constants, rope_theta(), head_dims())
@example(META_ROPE_SCALING, 500_000.0, 128)
@example(LLAMA32_ROPE_SCALING, 500_000.0, 64)
def test_rope_high_frequencies_unchanged(c, theta, head_dim):
    freqs = frequencies_across_bands(c, theta, head_dim)
    kept = wavelengths_of(freqs) < band_edges(c)[0]
    assert kept.any()
    assert torch.equal(apply_scaling(freqs, c)[kept], freqs[kept])


@given(any_constants, rope_theta(), head_dims())
@example(META_ROPE_SCALING, 500_000.0, 128)
@example(LLAMA32_ROPE_SCALING, 500_000.0, 64)
def test_rope_low_frequencies_divided_by_factor(c, theta, head_dim):
    freqs = frequencies_across_bands(c, theta, head_dim)
    divided = wavelengths_of(freqs) > band_edges(c)[1]
    assert divided.any()
    assert torch.equal(apply_scaling(freqs, c)[divided], freqs[divided] / c.factor)


@given(any_constants, rope_theta(), head_dims())
@example(META_ROPE_SCALING, 500_000.0, 128)
@example(LLAMA32_ROPE_SCALING, 500_000.0, 64)
def test_rope_interpolated_frequencies_lie_between_divided_and_original(c, theta, head_dim):
    freqs = frequencies_across_bands(c, theta, head_dim)
    wavelengths = wavelengths_of(freqs)
    short, long = band_edges(c)
    band = (wavelengths >= short) & (wavelengths <= long)
    assert band.any()
    scaled, f = apply_scaling(freqs, c)[band], freqs[band]
    slack = 1e-12 * f  # float64 rounding of the interpolation's three products
    assert (scaled >= f / c.factor - slack).all()
    assert (scaled <= f + slack).all()


@given(any_constants)
@example(META_ROPE_SCALING)
@example(LLAMA32_ROPE_SCALING)
def test_rope_scaling_continuous_at_band_edges(c):
    # Inside the band the slope d(scaled)/d(freq) is at most 1 + high / (high - low), outside it 1 or
    # 1 / factor: the values either side of an edge, 2 * delta apart, may differ by that much at most.
    delta = 1e-9
    slope = 1 + c.high_freq_factor / (c.high_freq_factor - c.low_freq_factor)
    for edge in band_edges(c):
        f = 2 * math.pi / edge
        below, above = apply_scaling(torch.tensor([f * (1 - delta), f * (1 + delta)], dtype=torch.float64), c)
        assert abs(float(above - below)) <= 2 * (2 * delta * f * slope) + 1e-14 * f, (edge, float(below), float(above))


@given(any_constants, rope_theta(), head_dims())
@example(META_ROPE_SCALING, 500_000.0, 128)
@example(LLAMA32_ROPE_SCALING, 500_000.0, 64)
def test_rope_scaling_monotone_in_wavelength(c, theta, head_dim):
    # Longer wavelength, lower scaled frequency, and a division by at least as much.
    freqs = frequencies_across_bands(c, theta, head_dim).sort(descending=True).values  # wavelengths ascending
    scaled = apply_scaling(freqs, c)
    ratio = scaled / freqs
    assert (scaled[1:] <= scaled[:-1]).all()
    assert (ratio[1:] <= ratio[:-1] + 1e-12).all()
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / c.factor)


@pytest.mark.reference
@given(rope_theta(), head_dims(), st.floats(-3, 8))
def test_rope_scaling_equals_meta_apply_scaling(theta, head_dim, log10_wavelength):
    from reference_harness.meta import import_meta

    meta = import_meta().model
    extra = torch.tensor([2 * math.pi / 10**log10_wavelength], dtype=torch.float32)
    for freqs in (rope_frequencies(theta, head_dim, torch.float32), extra):
        assert torch.equal(apply_scaling(freqs, META_ROPE_SCALING), meta.apply_scaling(freqs))
        assert torch.equal(apply_scaling(freqs), meta.apply_scaling(freqs))  # the defaults are Meta's


@given(any_constants, st.sampled_from([10_000.0, 500_000.0]), st.sampled_from([4, 16, 64]))
@example(LLAMA32_ROPE_SCALING, 500_000.0, 64)
def test_model_rope_table_uses_configured_scaling_constants(c, theta, head_dim):
    args = ModelArgs(
        dim=2 * head_dim, n_layers=1, n_heads=2, vocab_size=8, rope_theta=theta, use_scaled_rope=True,
        rope_scaling=c, max_seq_len=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = Transformer(args)
    expected = precompute_freqs_cis(head_dim, 16, theta, True, scaling=c)
    assert torch.equal(model.freqs_cis(torch.device("cpu")), expected)
