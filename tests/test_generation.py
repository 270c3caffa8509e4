"""Generation: request checks, stop tokens, max_gen_len, echo, logprobs, seeds."""

import pytest
import torch
import torch.nn.functional as F

from microllama import Llama
from microllama.tolerances import LOGITS_ATOL

PROMPTS = ["Clearly, the meaning of life is", "Hi", "The repo llm.c on GitHub is"]


@pytest.fixture(scope="module")
def llama(tiny_ckpt, tokenizer):
    return Llama.build(tiny_ckpt, max_seq_len=64, max_batch_size=4)


def force_token(llama, row, token, from_call):
    """Put all of `row`'s mass on `token` from the model's `from_call`-th forward on (0-based)."""
    calls = []

    def hook(module, args, output):
        if len(calls) >= from_call:
            output[row, -1, token] = 1e4
        calls.append(1)
        return output

    return llama.model.output.register_forward_hook(hook)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[]), "batch is empty"),
        (dict(prompts=["a"] * 5), "5 prompts exceed max_batch_size 4"),
        (dict(prompts=["word " * 70]), "at or beyond max_seq_len 64"),
        (dict(prompts=["a"], temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(prompts=["a"], temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(prompts=["a"], temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
        (dict(prompts=["a"], top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(prompts=["a"], top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(prompts=["a"], top_p=float("nan")), r"top_p must be a number in \(0, 1\], got nan"),
        (dict(prompts=["a"], max_gen_len=0), "max_gen_len must be an integer >= 1"),
        (dict(prompts=["a"], max_gen_len=1.5), "max_gen_len must be an integer >= 1, got 1.5"),
        (dict(prompts=["a"], seed=-1), r"seed must be an integer from 0 to 2\*\*64 - 1, got -1"),
        (dict(prompts=["a"], seed=2**70), r"seed must be an integer from 0 to 2\*\*64 - 1"),
        (dict(prompts=["a"], seed=1.5), r"seed must be an integer"),
    ],
    ids=["empty-batch", "too-many-prompts", "prompt-too-long", "negative-temperature", "nan-temperature",
         "inf-temperature", "top-p-zero", "top-p-above-one", "nan-top-p", "max-gen-len-zero", "fractional-max-gen-len",
         "negative-seed", "seed-past-64-bits", "fractional-seed"],
)  # fmt: skip
def test_bad_request_fails_with_clear_message_before_model_work(llama, monkeypatch, kwargs, message):
    monkeypatch.setattr(llama.model, "forward", lambda *a, **k: pytest.fail("model ran on a bad request"))
    with pytest.raises(ValueError, match=message):
        llama.text_completion(**kwargs)


def test_prompts_must_be_a_list_not_a_string(llama):
    with pytest.raises(TypeError, match="list of strings"):
        llama.text_completion("Clearly")


@pytest.mark.parametrize("stop", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
def test_generation_stops_at_each_stop_token_for_that_row_only(llama, stop):
    free = llama.text_completion(PROMPTS, temperature=0, max_gen_len=8)
    lengths = [len(llama.tokenizer.encode(p, bos=True, eos=False)) for p in PROMPTS]
    # Forward call k predicts position min(lengths) + k; row 0 keeps 3 tokens, then meets the stop token.
    from_call = lengths[0] + 3 - min(lengths)
    handle = force_token(llama, row=0, token=llama.tokenizer.special_tokens[stop], from_call=from_call)
    try:
        stopped = llama.text_completion(PROMPTS, temperature=0, max_gen_len=8)
    finally:
        handle.remove()
    assert stopped[0].tokens == free[0].tokens[:3]
    assert [c.tokens for c in stopped[1:]] == [c.tokens for c in free[1:]]


def test_max_gen_len_bounds_each_completion(llama):
    for c in llama.text_completion(PROMPTS, temperature=0, max_gen_len=5):
        assert len(c.tokens) == 5  # the tiny model's random weights do not stop early here


def test_echo_prepends_the_prompt_tokens(llama):
    plain = llama.text_completion(PROMPTS, temperature=0, max_gen_len=4)
    echoed = llama.text_completion(PROMPTS, temperature=0, max_gen_len=4, echo=True)
    for p, a, b in zip(PROMPTS, plain, echoed, strict=True):
        assert b.tokens == llama.tokenizer.encode(p, bos=True, eos=False) + a.tokens


def test_logprobs_score_each_generated_token_under_the_full_forward(llama):
    (c,) = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=6, logprobs=True)
    ids = torch.tensor([llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False) + c.tokens])
    n = len(c.tokens)
    with torch.inference_mode():
        logits = llama.model(ids)[:, -n - 1 : -1]  # the positions that predicted the generated tokens
    # Meta's formula, on the same (bsz, vocab, seqlen) layout, so the logsumexp over 128k terms is
    # summed in the same order; what differs is the logits, cached against full forward.
    expected = -F.cross_entropy(logits.transpose(1, 2), ids[:, -n:], reduction="none")[0]
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=LOGITS_ATOL[torch.float32], rtol=0)
    assert torch.equal(logits[0].argmax(-1), ids[0, -n:])  # greedy: each token is its position's argmax


def test_same_seed_same_sample_other_seed_other_sample(llama):
    a = llama.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=8, seed=5)
    b = llama.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=8, seed=5)
    c = llama.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=8, seed=6)
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]


def test_on_token_streams_exactly_the_completion(llama):
    seen = {}
    out = llama.text_completion(
        PROMPTS, temperature=0, max_gen_len=5, on_token=lambda r, t: seen.setdefault(r, []).append(t)
    )
    assert [seen[i] for i in range(len(PROMPTS))] == [c.tokens for c in out]


def test_generation_leaves_no_cache_behind(llama):
    llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=2)
    assert all(layer.attention.cache is None for layer in llama.model.layers)
