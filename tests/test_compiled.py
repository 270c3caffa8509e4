"""The compiled decode path (microllama/compiled.py): its static cache computes what the growing one does, it
compiles once per batch bucket and never per token, and compiled with inductor it stays within the flash
tolerances of the default path step by step to position 9,000 and passes golden sets."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microllama.args import ModelArgs
from microllama.checkpoint.load import load_model
from microllama.compiled import CompiledDecoder, batch_buckets
from microllama.generation import Llama
from microllama.golden.capture import last_position_logits, long_context_ids
from microllama.golden.verify import verify
from microllama.tolerances import LOGITS_ATOL
from tests.strategies import SMALL_VOCAB, SmallVocabTokenizer, random_transformer, small_model_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = LOGITS_ATOL[torch.float32]
LONG = 8_300  # positions past Llama 3.1's original context of 8,192
GOLDENS = Path(__file__).resolve().parents[1] / "goldens"
# A small grouped-query model with Llama 3.1's scaled RoPE.
SMALL = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=SMALL_VOCAB, multiple_of=8,
                  use_scaled_rope=True, max_seq_len=64, max_batch_size=4, flash=True)  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """torch keeps at most 8 compiled variants of a function per process (recompile_limit); each test's
    decoders start from none, so a count in one test does not depend on the others."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_batch_buckets_are_powers_of_two_capped_at_max_batch_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(8) == [1, 2, 4, 8]


def test_compiled_decoder_needs_flash_attention():
    model = random_transformer(SMALL.replace(flash=False), 0)
    with pytest.raises(ValueError, match="flash=True"):
        CompiledDecoder(model, backend=None)


def test_decode_step_past_the_static_cache_is_refused():
    model = random_transformer(SMALL, 0)
    decoder = CompiledDecoder(model, backend=None)
    limit = model.params.max_seq_len
    refused = pytest.raises(ValueError, match=f"positions up to {limit + 1} exceed the KV cache's limit of {limit}")
    with torch.inference_mode(), decoder.kv_cache(1, limit), refused:
        decoder.forward(torch.tensor([[5]]), limit)


@settings(max_examples=10)
@given(
    args=small_model_args(flash=True, gqa=True),
    seed=st.integers(0, 2**32 - 1),
    bsz=st.integers(1, 4),
    prompt_len=st.integers(1, 12),
    start=st.integers(0, LONG - 20),
    n_steps=st.integers(1, 4),
)
def test_static_cache_decode_equals_dynamic_cache_decode(args, seed, bsz, prompt_len, start, n_steps):
    """At any position, also past 8,192: a prompt prefilled at `start` over earlier positions holding random
    keys and values, then decode steps; the static step (all LONG keys, later ones masked) against model.py's
    (the keys so far), on the same cache contents."""
    model = random_transformer(args.replace(max_seq_len=LONG), seed)
    decoder = CompiledDecoder(model, backend=None)  # the static-shape step itself, uncompiled
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, model.vocab_size, (bsz, prompt_len + n_steps), generator=generator)
    with torch.inference_mode(), decoder.kv_cache(bsz, LONG):
        for cache in decoder.caches:
            cache.cache_k.normal_(generator=generator)
            cache.cache_v.normal_(generator=generator)
        model.forward(tokens[:, :prompt_len], start)
        for i in range(prompt_len, prompt_len + n_steps):
            static = decoder.forward(tokens[:, i : i + 1], start + i)  # writes position start + i, then attends
            dynamic = model.forward(tokens[:, i : i + 1], start + i)  # writes the same keys there again
            torch.testing.assert_close(static, dynamic, atol=ATOL, rtol=0)


def test_compiled_decode_compiles_once_per_batch_bucket_never_per_token():
    """Counted by a backend that records each graph torch.compile hands it: prompts of many lengths, several
    max_gen_len and batch sizes 1 to 4 (buckets 1, 2, 4) compile three graphs for hundreds of steps."""
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    model = random_transformer(SMALL, 1)
    llama = Llama(model, SmallVocabTokenizer(stop_tokens=[SMALL_VOCAB]))  # a stop id it never makes: full lengths
    llama.decoder = CompiledDecoder(model, backend=counting_backend)
    steps = 0
    original_forward = llama.decoder.forward

    def counting_forward(tokens, start_pos, **kwargs):
        nonlocal steps
        steps += tokens.shape[1] == 1
        return original_forward(tokens, start_pos, **kwargs)

    llama.decoder.forward = counting_forward
    for bsz, prompt_len, max_gen_len in [(1, 3, 20), (1, 11, 30), (2, 5, 25), (3, 2, 40), (4, 7, 20), (1, 30, 33)]:
        prompts = [[5 + (i + j) % 200 for j in range(prompt_len + i)] for i in range(bsz)]
        llama.generate(prompts, max_gen_len=max_gen_len, temperature=0)
    assert steps > 100
    assert len(graphs) == 3


@pytest.fixture(scope="module")
def tiny_long(tiny_ckpt):
    """The tiny checkpoint with room for 9,001 positions: default attention, and flash for the compiled path."""
    return {flash: load_model(tiny_ckpt, max_seq_len=9_001, max_batch_size=1, flash=flash) for flash in (False, True)}


# Token by token over the first positions and over the last ones, past Llama 3.1's original context of 8,192 (where
# RoPE's scaled wavelengths act); the positions between are prefilled, each path into its own cache. The static
# cache's update at any position is the hypothesis law above; stepping through every one of the 9,001 positions
# cost about a minute more and checked nothing else.
STEPPED = [range(0, 512), range(8_100, 9_001)]


@pytest.mark.slow
def test_compiled_logits_within_flash_tolerance_step_by_step_to_position_9000(tiny_long):
    """Teacher-forced on fixed ids, the compiled step's logits against the default path's (the one equal to Meta's),
    each path with its own KV cache: every step of STEPPED, the prefills between them."""
    ids = torch.from_numpy(long_context_ids(9_001)).long()[None]
    default, decoder = tiny_long[False], CompiledDecoder(tiny_long[True])
    worst, steps, pos = 0.0, 0, 0
    with torch.inference_mode(), default.kv_cache(1, 9_001), decoder.kv_cache(1, 9_001):
        for stepped in STEPPED:
            with last_position_logits(default), last_position_logits(decoder.model):
                for start in range(pos, stepped.start, 512):  # the prefill: many positions, eager on both paths
                    end = min(start + 512, stepped.start)
                    default.forward(ids[:, start:end], start)
                    decoder.forward(ids[:, start:end], start)
            for pos in stepped:
                expected = default.forward(ids[:, pos : pos + 1], pos)
                got = decoder.forward(ids[:, pos : pos + 1], pos)
                worst = max(worst, float((got - expected).abs().max()))
                torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m, pos=pos: f"pos {pos}: {m}")
                steps += 1
            pos = stepped.stop
    assert steps == sum(map(len, STEPPED)) and pos == 9_001
    print(f"compiled vs default, {steps} steps to position 9,000: max abs diff {worst:.3g} (atol {ATOL:.3g})")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-fp32-cpu-ws1", "tiny-bf16-cpu-ws1"])
def test_verify_through_the_compiled_path_passes_the_golden_sets(name):
    """microllama verify --compile: capture points and logits within tolerance (the long-range step, at
    position 9,000, compiled). In float32 greedy and top-p completions and chat replies are identical to Meta's;
    in bfloat16 those that differ must part from Meta's where the tolerance allows (verify.tolerance_admits)."""
    comparison = verify(GOLDENS / name, compile=True)
    assert not comparison.exact
    if "fp32" in name:
        assert all(all(equal) for equal in comparison.completions_equal.values())
        assert not any(comparison.completions_parted.values()) and not any(comparison.chat.parted.values())
    assert comparison.passed, comparison.failure
