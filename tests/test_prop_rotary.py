"""Rotary embedding (apply_rotary_emb with precompute_freqs_cis): a rotation of each consecutive pair
of q and k by position times frequency, so attention scores see relative positions only."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from microllama.model import apply_rotary_emb, precompute_freqs_cis, rotate_pairs
from microllama.tolerances import FP32_UNIT_ROUNDOFF
from tests.strategies import head_dims, rope_theta

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_POSITION = 4096


def random_qk(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(2))


def rotate_to(x: torch.Tensor, table: torch.Tensor, position: int) -> torch.Tensor:
    """x (head_dim,) rotated to one position."""
    out, _ = apply_rotary_emb(x.view(1, 1, 1, -1), x.view(1, 1, 1, -1), table[position : position + 1])
    return out.flatten()


@given(
    rope_theta(),
    head_dims(),
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_rotary_position_zero_is_identity(theta, head_dim, scaled, seed, dtype):
    xq, xk = random_qk(seed, (2, 1, 3, head_dim), dtype)
    table = precompute_freqs_cis(head_dim, 1, theta, scaled)
    assert torch.equal(table, torch.ones_like(table))
    rq, rk = apply_rotary_emb(xq, xk, table)
    assert torch.equal(rq, xq) and torch.equal(rk, xk)


@given(rope_theta(), head_dims(), st.integers(1, 32), st.integers(0, MAX_POSITION - 32), st.integers(0, 2**32 - 1))
def test_rotary_preserves_each_pair_norm(theta, head_dim, seqlen, start, seed):
    xq, xk = random_qk(seed, (2, seqlen, 3, head_dim))
    table = precompute_freqs_cis(head_dim, MAX_POSITION, theta, use_scaled=True)[start : start + seqlen]
    for x, rotated in zip((xq, xk), apply_rotary_emb(xq, xk, table), strict=True):
        before, after = (t.reshape(*t.shape[:-1], -1, 2).norm(dim=-1) for t in (x, rotated))
        torch.testing.assert_close(after, before, rtol=16 * FP32_UNIT_ROUNDOFF, atol=0)


@given(
    rope_theta(), head_dims(), st.booleans(), st.integers(0, 2**32 - 1),
    st.integers(0, MAX_POSITION // 2), st.integers(0, MAX_POSITION // 2), st.integers(0, MAX_POSITION // 2 - 1),
)  # fmt: skip
def test_rotary_dot_product_depends_only_on_offset(theta, head_dim, scaled, seed, m, n, shift):
    q, k = (t.flatten() for t in random_qk(seed, (head_dim,)))
    table = precompute_freqs_cis(head_dim, MAX_POSITION, theta, scaled)
    dot = torch.dot(rotate_to(q, table, m), rotate_to(k, table, n))
    shifted = torch.dot(rotate_to(q, table, m + shift), rotate_to(k, table, n + shift))
    # Each rotation to position t is off by about t units of roundoff in angle (see tolerances.py),
    # and the dot products add head_dim roundings.
    bound = q.norm() * k.norm() * FP32_UNIT_ROUNDOFF * (2 * (m + n + 2 * shift) + 16 + 2 * head_dim)
    assert abs(float(dot - shifted)) <= float(bound)


@given(
    rope_theta(), head_dims(), st.booleans(), st.integers(1, 3), st.integers(1, 16),
    st.integers(0, MAX_POSITION - 16), st.integers(0, 2**32 - 1), st.sampled_from([torch.float32, torch.bfloat16]),
)  # fmt: skip
def test_rotation_in_real_pairs_equals_the_complex_product(theta, head_dim, scaled, bsz, seqlen, start, seed, dtype):
    """rotate_pairs (the compiled path's RoPE, the complex product written out) against apply_rotary_emb's complex
    product: each feature within 2 roundings of its pair's size in float32 (a product and the difference rounded,
    or fused into one multiply-add), plus one unit in the last place of bfloat16 after the cast. Eager on x86 CPUs
    the two measured equal."""
    xq, xk = random_qk(seed, (bsz, seqlen, 3, head_dim), dtype)
    table = precompute_freqs_cis(head_dim, MAX_POSITION, theta, scaled)[start : start + seqlen]
    for x, product in zip((xq, xk), apply_rotary_emb(xq, xk, table), strict=True):
        pairs = rotate_pairs(x, torch.view_as_real(table))
        assert pairs.dtype == x.dtype and pairs.shape == x.shape
        size = x.float().unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
        bound = 2 * FP32_UNIT_ROUNDOFF * size + (2**-8 * product.float().abs() if dtype == torch.bfloat16 else 0)
        assert ((pairs.float() - product.float()).abs() <= bound).all()


@pytest.mark.reference
@given(
    rope_theta(), head_dims(), st.booleans(), st.integers(1, 3), st.integers(1, 16), st.integers(1, 4),
    st.integers(0, 512), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_rotary_equals_meta_apply_rotary_emb(theta, head_dim, scaled, bsz, seqlen, heads, start, dtype, seed):
    from reference_harness.meta import import_meta

    meta = import_meta().model
    xq, xk = random_qk(seed, (bsz, seqlen, heads, head_dim), dtype)
    table = meta.precompute_freqs_cis(head_dim, 2 * 512 + 32, theta, scaled)[start : start + seqlen]
    for ours, theirs in zip(apply_rotary_emb(xq, xk, table), meta.apply_rotary_emb(xq, xk, table), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.reference
@given(rope_theta(), head_dims(), st.integers(1, 4096), st.booleans())
def test_precompute_freqs_cis_equals_meta(theta, head_dim, end, scaled):
    from reference_harness.meta import import_meta

    meta = import_meta().model
    assert torch.equal(
        precompute_freqs_cis(head_dim, end, theta, scaled), meta.precompute_freqs_cis(head_dim, end, theta, scaled)
    )
