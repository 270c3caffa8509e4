"""Hypothesis strategies shared by the property tests (tests/test_prop_*.py), and the small random
models they run on."""

import dataclasses
import json
import string
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from microllama.args import ModelArgs, RopeScaling
from microllama.model import Transformer
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


# Dialogs and assistant replies (tests/test_chat_format.py). Tool-call arguments are what Meta's ToolCall
# accepts: a dict of primitives, lists of primitives and dicts of primitives.
BUILTIN_TOOL_NAMES = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
primitives = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(unicode_chars, max_size=6)
argument_values = (
    primitives | st.lists(primitives, max_size=3) | st.dictionaries(st.text(max_size=4), primitives, max_size=3)
)
tool_arguments = st.dictionaries(st.text(unicode_chars, max_size=6), argument_values, max_size=3)
identifiers = st.tuples(
    st.sampled_from(string.ascii_letters + "_"), st.text(string.ascii_letters + string.digits + "_", max_size=8)
).map("".join)


def chat_text(max_pieces: int = 5) -> st.SearchStrategy[str]:
    """Message text: unicode, whitespace runs, and special-token text (which must stay text)."""
    piece = (
        st.text(unicode_chars, max_size=12)
        | st.text(whitespace_chars, min_size=1, max_size=3)
        | special_token_text
        | st.just(ASSISTANT_HEADER)
    )
    return st.lists(piece, max_size=max_pieces).map("".join)


@st.composite
def tool_calls(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["builtin", "code", "custom"]))
    if kind == "builtin":
        return {"tool_name": draw(st.sampled_from(BUILTIN_TOOL_NAMES[:3])), "arguments": {"query": draw(chat_text(3))}}
    if kind == "code":
        return {"tool_name": "code_interpreter", "arguments": {"code": draw(chat_text(3))}}
    return {
        "tool_name": draw(identifiers | st.text(unicode_chars, min_size=1, max_size=8)),
        "arguments": draw(tool_arguments),
    }


@st.composite
def chat_messages(draw: st.DrawFn) -> dict:
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    message = {"role": role, "content": draw(chat_text())}
    if role == "user" and draw(st.booleans()):
        message["context"] = draw(chat_text(3))
    if role == "assistant":
        stop = draw(st.sampled_from([None, "end_of_turn", "end_of_message", "out_of_tokens"]))
        if stop is not None:
            message["stop_reason"] = stop
        calls = draw(st.lists(tool_calls(), max_size=2))
        if calls:
            message["tool_calls"] = calls
    return message


def dialogs(max_size: int = 6) -> st.SearchStrategy[list[dict]]:
    return st.lists(chat_messages(), max_size=max_size)


# Replies in every form Meta's parser looks for, well- and ill-formed: plain text, builtin calls, <function=...>
# tags, JSON objects with or without "name"/"parameters"/"type", Python lists of calls with literal and
# non-literal arguments; with or without <|python_tag|>, the assistant header, a stop token's text and spaces.
tool_names = st.sampled_from(BUILTIN_TOOL_NAMES) | identifiers
python_literals = st.recursive(
    primitives | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=2)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=5,
)


@st.composite
def python_call_lists(draw: st.DrawFn) -> str:
    calls = []
    for _ in range(draw(st.integers(1, 2))):
        kwargs = draw(
            st.dictionaries(identifiers, python_literals.map(repr) | st.sampled_from(["x", "1j", "f()"]), max_size=3)
        )
        calls.append(f"{draw(tool_names)}({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
    return f"[{', '.join(calls)}]"


@st.composite
def json_calls(draw: st.DrawFn) -> str:
    obj = draw(st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["function", "other"]),
        "name": tool_names | st.none() | st.integers(),
        "parameters": tool_arguments | st.text(max_size=5) | st.lists(primitives, max_size=2) | st.none()
        | st.dictionaries(st.text(max_size=3), st.lists(st.lists(primitives, max_size=2), max_size=2), max_size=2),
    }))  # fmt: skip
    return json.dumps(obj, indent=draw(st.sampled_from([None, 4])), ensure_ascii=draw(st.booleans()))


@st.composite
def function_tags(draw: st.DrawFn) -> str:
    args = json.dumps(draw(tool_arguments | st.just({})))
    if draw(st.booleans()):
        args = args.replace('"', "'")  # Meta reads single quotes as double quotes
    return f"<function={draw(tool_names)}>{args}</function>"


@st.composite
def builtin_call_texts(draw: st.DrawFn) -> str:
    query = draw(st.text(unicode_chars, max_size=10).map(lambda s: s.replace('"', "")))
    return f'{draw(tool_names)}.call(query="{query}")'


@st.composite
def assistant_replies(draw: st.DrawFn) -> str:
    body = draw(chat_text() | builtin_call_texts() | function_tags() | json_calls() | python_call_lists())
    if draw(st.booleans()):  # text around the call
        body = draw(chat_text(2)) + body + draw(chat_text(2))
    prefix = draw(st.sampled_from(["", "<|python_tag|>", ASSISTANT_HEADER, ASSISTANT_HEADER + "<|python_tag|>"]))
    suffix = draw(st.sampled_from(["", "<|eot_id|>", "<|eom_id|>"]))
    spaces = st.sampled_from(["", " ", "  "])
    return draw(spaces) + prefix + body + suffix + draw(spaces)
