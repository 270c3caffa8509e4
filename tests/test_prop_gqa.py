"""Grouped-query attention: n_kv_heads key/value heads, each shared by n_heads / n_kv_heads query
heads, compute what multi-head attention computes when each K/V head's weights are repeated per group."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from microllama.model import Transformer, repeat_kv
from microllama.tolerances import LOGITS_ATOL
from tests.strategies import random_transformer, small_model_args, token_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


seeds = st.integers(0, 2**32 - 1)


def multi_head_twin(gqa: Transformer) -> Transformer:
    """gqa's model with n_kv_heads = n_heads: wk and wv rows repeated per group, every other weight shared."""
    args = gqa.params
    n_rep = args.n_heads // args.n_kv_heads
    with torch.device("meta"):
        mha = Transformer(args.replace(n_kv_heads=args.n_heads))
    state_dict = gqa.state_dict()
    for key, weight in state_dict.items():
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            per_head = weight.view(args.n_kv_heads, args.head_dim, args.dim)
            state_dict[key] = per_head.repeat_interleave(n_rep, dim=0).reshape(args.n_heads * args.head_dim, args.dim)
    mha.load_state_dict(state_dict, strict=True, assign=True)
    return mha.eval()


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@given(args=small_model_args(gqa=True), seed=seeds, rows=st.lists(token_ids(12, 12), min_size=1, max_size=2))
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights(flash, args, seed, rows):
    gqa = random_transformer(args.replace(flash=flash), seed)
    mha = multi_head_twin(gqa)
    tokens = torch.tensor(rows)
    atol, rtol = LOGITS_ATOL[torch.float32], 0.0  # wk, wv of other shapes sum in another order
    with torch.inference_mode():
        torch.testing.assert_close(gqa(tokens), mha(tokens), atol=atol, rtol=rtol)
        for model in (gqa, mha):  # and through the KV cache: a prefill, then one step
            model.setup_cache(len(rows), args.max_seq_len)
            model(tokens[:, :-1], 0)
        step = tokens[:, -1:], tokens.shape[1] - 1
        torch.testing.assert_close(gqa(*step), mha(*step), atol=atol, rtol=rtol)


@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 4), st.integers(1, 4), st.sampled_from([2, 4, 8]), seeds)
def test_repeat_kv_is_repeat_interleave_over_heads(bsz, seqlen, n_kv_heads, n_rep, head_dim, seed):
    x = torch.randn(bsz, seqlen, n_kv_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(repeat_kv(x, n_rep), torch.repeat_interleave(x, n_rep, dim=2))
