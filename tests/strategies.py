"""Hypothesis strategies shared by the property tests (tests/test_prop_*.py), and the small random
models they run on."""

import dataclasses
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from microllama.model import ModelArgs, RopeScaling, Transformer
from microllama.tokenizer import SPECIAL_TOKENS

# Meta's apply_scaling hard-codes these (Llama 3.1); Llama 3.2's small models publish a factor of 32.
META_ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)
LLAMA32_ROPE_SCALING = RopeScaling(factor=32.0)

SMALL_VOCAB = 256


@st.composite
def rope_scaling_constants(draw: st.DrawFn) -> RopeScaling:
    """apply_scaling's constants: factor > 1, 0 < low < high, any original context."""
    low = draw(st.floats(0.25, 4.0))
    return RopeScaling(
        factor=draw(st.floats(1.5, 64.0)),
        low_freq_factor=low,
        high_freq_factor=low + draw(st.floats(0.5, 8.0)),
        original_context=draw(st.integers(256, 65536)),
    )


def rope_theta() -> st.SearchStrategy[float]:
    return st.sampled_from([10_000.0, 500_000.0]) | st.floats(100.0, 1e7)


def head_dims(max_value: int = 256) -> st.SearchStrategy[int]:
    return st.integers(1, max_value // 2).map(lambda n: 2 * n)


def rope_frequencies(theta: float, head_dim: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """RoPE's unscaled frequencies theta ** (-2i / head_dim), i < head_dim / 2."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))


@st.composite
def small_model_args(draw: st.DrawFn, flash: bool = False, gqa: bool = False) -> ModelArgs:
    """A few-layer model over a 256-token vocabulary and 64 positions; with gqa, n_kv_heads < n_heads."""
    n_kv_heads = draw(st.sampled_from([1, 2]))
    n_heads = n_kv_heads * draw(st.sampled_from([2, 4]) if gqa else st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    scaled = draw(st.booleans())
    # A small original context puts RoPE wavelengths of a 64-position model into all three regimes.
    scaling = draw(rope_scaling_constants())
    scaling = dataclasses.replace(scaling, original_context=scaling.original_context // 64)
    return ModelArgs(
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, 2)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=SMALL_VOCAB,
        multiple_of=draw(st.sampled_from([1, 8, 32])),
        ffn_dim_multiplier=draw(st.none() | st.floats(0.5, 2.0)),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_theta=draw(st.sampled_from([10_000.0, 500_000.0])),
        use_scaled_rope=scaled,
        rope_scaling=scaling,
        max_seq_len=64,
        max_batch_size=4,
        flash=flash,
    )


def random_transformer(args: ModelArgs, seed: int) -> Transformer:
    """args' model with torch's default initialisation drawn from `seed`, norms perturbed off 1 so
    that their weights matter; torch's global generator is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(args)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@dataclass
class SmallVocabTokenizer:
    """What Llama.generate needs of a tokenizer (pad and stop ids), for a SMALL_VOCAB model: stop ids
    inside the vocabulary, so that generation can stop."""

    pad_id: int = 0
    stop_tokens: list[int] = field(default_factory=lambda: [1, 2, 3])


def token_ids(min_size: int, max_size: int, vocab_size: int = SMALL_VOCAB) -> st.SearchStrategy[list[int]]:
    """Prompts over the vocabulary, never the stand-in pad id 0."""
    return st.lists(st.integers(1, vocab_size - 1), min_size=min_size, max_size=max_size)


@st.composite
def chunkings(draw: st.DrawFn, total: int) -> list[int]:
    """Sizes of a prefill of k >= 1 tokens then steps of random sizes, summing to total."""
    sizes = [draw(st.integers(1, total))]
    while sum(sizes) < total:
        sizes.append(draw(st.integers(1, min(4, total - sum(sizes)))))
    return sizes


# Text for the tokenizer: any unicode character except surrogates, which UTF-8 cannot encode.
unicode_chars = st.characters(exclude_categories=("Cs",))
unicode_text = st.text(unicode_chars)
whitespace_chars = st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2003\u3000")
special_token_text = st.sampled_from(SPECIAL_TOKENS)


@st.composite
def long_runs(draw: st.DrawFn, min_run: int = 25_001, max_run: int = 60_000) -> str:
    """Text holding runs of whitespace or non-whitespace longer than the tokenizer's 25k cut."""
    pieces = []
    for _ in range(draw(st.integers(1, 3))):
        char = draw(whitespace_chars | st.characters(exclude_categories=("Cs", "Z", "Cc")))
        pieces += [draw(st.text(unicode_chars, max_size=8)), char * draw(st.integers(min_run, max_run))]
    return "".join(pieces)


@st.composite
def special_token_case(draw: st.DrawFn) -> tuple[str, set[str]]:
    """Text spliced from plain pieces and a few special tokens (sometimes right against other text),
    and those tokens."""
    pool = draw(st.sets(special_token_text, min_size=1, max_size=4))
    parts = draw(st.lists(st.text(unicode_chars, max_size=10) | st.sampled_from(sorted(pool)), min_size=1, max_size=8))
    return "".join(parts), pool


def greedy_is_decisive(logits: torch.Tensor, atol: float, rtol: float) -> bool:
    """Whether in every row of logits (..., vocab) the best beats the runner-up by more than two
    tolerances: only then must two computations within that tolerance pick the same greedy token."""
    top = logits.topk(2, dim=-1).values
    return bool((top[..., 0] - top[..., 1] > 2 * (atol + rtol * top[..., 0].abs())).all())
