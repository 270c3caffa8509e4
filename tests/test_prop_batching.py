"""Batch and padding invariance: a prompt's greedy completion does not depend on the other prompts of
its batch, however long they are (right padding, prefill to the shortest prompt, then steps)."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from microllama.checkpoint.load import load_model
from microllama.generation import Llama
from microllama.tolerances import LOGITS_ATOL
from tests.strategies import SmallVocabTokenizer, greedy_is_decisive, random_transformer, small_model_args, token_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL, RTOL = LOGITS_ATOL[torch.float32], 0.0


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@given(
    args=small_model_args(),
    seed=st.integers(0, 2**32 - 1),
    prompts=st.lists(token_ids(1, 20), min_size=2, max_size=4),
    max_gen_len=st.integers(1, 12),
)
def test_greedy_completion_alone_equals_in_batch(flash, args, seed, prompts, max_gen_len):
    llama = Llama(random_transformer(args.replace(flash=flash), seed), SmallVocabTokenizer())
    in_batch, _ = llama.generate(prompts, max_gen_len, temperature=0)
    for prompt, completion in zip(prompts, in_batch, strict=True):
        (alone,), _ = llama.generate([prompt], max_gen_len, temperature=0)
        # In a batch a prompt is fed in other chunks than alone: its logits may move within the
        # reshaped-sums tolerance, which decides the greedy token only where no two logits tie within it.
        with torch.inference_mode():
            logits = llama.model(torch.tensor([prompt + alone]))[0, len(prompt) - 1 :]
        assume(greedy_is_decisive(logits, ATOL, RTOL))
        assert completion == alone


@pytest.fixture(scope="module")
def tiny_llama_bf16(tiny_ckpt, tokenizer):
    return Llama(load_model(tiny_ckpt, max_seq_len=64, max_batch_size=3, dtype=torch.bfloat16), tokenizer)


@pytest.mark.slow
@settings(max_examples=8)
@given(prompts=st.lists(st.text(max_size=24), min_size=2, max_size=3), max_gen_len=st.integers(1, 6))
def test_greedy_text_completion_alone_equals_in_batch_on_tiny_checkpoint(tiny_llama_bf16, prompts, max_gen_len):
    # bfloat16 on the default path: cached and uncached logits are bit-identical there (tolerances.py),
    # so the completions must be equal with no allowance for ties.
    llama = tiny_llama_bf16
    in_batch = llama.text_completion(prompts, temperature=0, max_gen_len=max_gen_len)
    for prompt, completion in zip(prompts, in_batch, strict=True):
        (alone,) = llama.text_completion([prompt], temperature=0, max_gen_len=max_gen_len)
        assert completion.tokens == alone.tokens
