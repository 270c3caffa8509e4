"""KV cache: decoding a sequence in chunks (a prefill of k tokens, then steps of any sizes) through the
cache gives the logits of one full-sequence forward, and the same greedy continuation."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from microllama.checkpoint.load import load_model
from microllama.generation import Llama
from microllama.model import Transformer
from microllama.tolerances import LOGITS_ATOL
from tests.strategies import (
    SmallVocabTokenizer,
    chunkings,
    greedy_is_decisive,
    random_transformer,
    small_model_args,
    token_ids,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ATOL, RTOL = LOGITS_ATOL[torch.float32], 0.0
seeds = st.integers(0, 2**32 - 1)


@torch.inference_mode()
def cached_logits(model: Transformer, tokens: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Logits of tokens (bsz, seqlen) fed through a fresh KV cache in chunks of the given sizes."""
    out, pos = [], 0
    with model.kv_cache(tokens.shape[0], model.params.max_seq_len):
        for size in sizes:
            out.append(model(tokens[:, pos : pos + size], pos))
            pos += size
    return torch.cat(out, dim=1)


@torch.inference_mode()
def full_greedy(model: Transformer, prompt: list[int], n_new: int, stop_tokens: list[int]) -> tuple[list[int], bool]:
    """Greedy continuation recomputing the whole sequence every step (no cache), and whether every
    step's choice was decisive within the cache's tolerance."""
    tokens, decisive = list(prompt), True
    for _ in range(n_new):
        logits = model(torch.tensor([tokens]))[0, -1]
        decisive &= greedy_is_decisive(logits, ATOL, RTOL)
        tokens.append(int(logits.argmax()))
        if tokens[-1] in stop_tokens:
            return tokens[len(prompt) : -1], decisive
    return tokens[len(prompt) :], decisive


def draw_batch(data: st.DataObject, vocab_size: int, max_len: int, max_bsz: int = 3) -> tuple[torch.Tensor, list[int]]:
    bsz = data.draw(st.integers(1, max_bsz), label="bsz")
    seqlen = data.draw(st.integers(1, max_len), label="seqlen")
    rows = [data.draw(token_ids(seqlen, seqlen, vocab_size), label="row") for _ in range(bsz)]
    return torch.tensor(rows), data.draw(chunkings(seqlen), label="chunk sizes")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@given(data=st.data(), seed=seeds)
def test_cached_decode_equals_full_forward(device, flash, data, seed):
    model = random_transformer(data.draw(small_model_args(flash=flash), label="args"), seed).to(device)
    tokens, sizes = draw_batch(data, model.vocab_size, model.params.max_seq_len)
    tokens = tokens.to(device)
    with torch.inference_mode():
        full = model(tokens)
    torch.testing.assert_close(cached_logits(model, tokens, sizes), full, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@given(args=small_model_args(), seed=seeds, prompt=token_ids(1, 24), n_new=st.integers(1, 16))
def test_cached_greedy_continuation_equals_full_forward_greedy(flash, args, seed, prompt, n_new):
    model = random_transformer(args.replace(flash=flash), seed)
    stand_in = SmallVocabTokenizer()
    expected, decisive = full_greedy(model, prompt, n_new, stand_in.stop_tokens)
    assume(decisive)  # greedy decoding is only defined up to logits that tie within the cache's tolerance
    tokens, _ = Llama(model, stand_in).generate([prompt], max_gen_len=n_new, temperature=0)
    assert tokens[0] == expected


@pytest.fixture(scope="module")
def tiny_models(tiny_ckpt):
    """The tiny checkpoint per (dtype, flash), loaded once. Its real 128,256-token vocabulary makes each
    forward cost 10 to 200 ms on 2 CPU cores, hence few, short examples."""
    return {
        (dtype, flash): load_model(tiny_ckpt, max_seq_len=64, max_batch_size=2, dtype=dtype, flash=flash)
        for dtype in (torch.float32, torch.bfloat16)
        for flash in (False, True)
    }


@pytest.mark.slow
@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@settings(max_examples=10)
@given(data=st.data())
def test_cached_decode_equals_full_forward_on_tiny_checkpoint(tiny_models, flash, data):
    model = tiny_models[torch.float32, flash]
    tokens, sizes = draw_batch(data, model.vocab_size, 48, max_bsz=2)
    with torch.inference_mode():
        full = model(tokens)
    torch.testing.assert_close(cached_logits(model, tokens, sizes), full, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@settings(max_examples=10)
@given(data=st.data())
def test_cached_decode_bit_identical_in_bf16_on_tiny_checkpoint(tiny_models, data):
    model = tiny_models[torch.bfloat16, False]
    tokens, sizes = draw_batch(data, model.vocab_size, 48, max_bsz=2)
    with torch.inference_mode():
        full = model(tokens)
    assert torch.equal(cached_logits(model, tokens, sizes), full)
