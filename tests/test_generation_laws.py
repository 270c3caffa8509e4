"""Generation's laws over whole input spaces: any batch of prompts (stop ids inside them, one token long,
one short of max_seq_len), any max_gen_len, greedy or seeded top-p, logprobs, echo.

Two kinds of model. A scripted one, whose next token is a fixed function of the prefix, so that the
expected output is a few lines of Python; and small random transformers, compared with Meta's own
`Llama3.generate` on the same weights, where ids and float32 log-probabilities must be equal exactly.
Small vocabularies make stop tokens common."""

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st
from torch import nn

from microllama.args import ModelArgs, RopeScaling
from microllama.generation import Llama, sample_top_p
from tests.strategies import SmallVocabTokenizer, random_transformer, small_model_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAD_ID = 0  # SmallVocabTokenizer's; prompts never hold it (a prompt's pad id would read as padding)
seeds = st.integers(0, 2**32 - 1)
# The scripted model's log_softmax and generate's cross_entropy over (bsz, vocab, seqlen) reduce in
# different orders: a few float32 ulps apart. A position off by one is off by 0.01 or more.
LOGPROB_TOL = dict(atol=1e-6, rtol=1e-6)


class ScriptedLM(nn.Module):
    """A causal language model whose next token is a fixed function of the whole prefix (`favoured`),
    its logit 4, 5 or 6 (by position) above the others' 0: a log-probability read at the wrong
    position shows. Keeps the prefix it has seen, as a KV cache would, inside `with kv_cache(...)`."""

    def __init__(self, successors: Sequence[int], max_seq_len: int, max_batch_size: int):
        super().__init__()
        self.successors = list(successors)
        vocab_size = len(self.successors)
        self.params = ModelArgs(
            dim=2, n_layers=1, n_heads=1, vocab_size=vocab_size, max_seq_len=max_seq_len, max_batch_size=max_batch_size
        )
        self.output = nn.Linear(1, vocab_size, bias=False)  # generate reads the device off output.weight
        self.history: Optional[torch.Tensor] = None

    def favoured(self, prefix: Sequence[int]) -> int:
        return self.successors[sum(prefix) % len(self.successors)]

    def next_logits(self, prefix: Sequence[int]) -> torch.Tensor:
        logits = torch.zeros(len(self.successors))
        logits[self.favoured(prefix)] = 4.0 + len(prefix) % 3
        return logits

    def logprob(self, prefix: Sequence[int], token: int) -> float:
        return torch.log_softmax(self.next_logits(prefix), dim=-1)[token].item()

    def check_cache_fits(self, max_batch_size: int, max_seq_len: int) -> int:
        return max_batch_size * max_seq_len * 8  # its cache: one int64 id per position

    @contextlib.contextmanager
    def kv_cache(self, max_batch_size: int, max_seq_len: int) -> Iterator[None]:
        self.history = torch.zeros(max_batch_size, max_seq_len, dtype=torch.long)
        try:
            yield
        finally:
            self.history = None

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        if start_pos + seqlen > self.params.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len {self.params.max_seq_len}")
        if self.history is None:
            assert start_pos == 0, "start_pos > 0 needs a kv_cache"
            rows = tokens.tolist()
        else:
            self.history[:bsz, start_pos : start_pos + seqlen] = tokens
            rows = self.history[:bsz, : start_pos + seqlen].tolist()
        positions = range(seqlen - 1, seqlen) if last_only else range(seqlen)
        return torch.stack(
            [torch.stack([self.next_logits(row[: start_pos + j + 1]) for j in positions]) for row in rows]
        )

    def continuation(self, prompt: Sequence[int], stop_tokens: Sequence[int], max_gen_len: Optional[int]) -> list[int]:
        """What generation must return for prompt: the favoured tokens up to the first stop token
        (excluded), at most max_gen_len of them, and never past max_seq_len."""
        room = self.params.max_seq_len - len(prompt)
        limit = room if max_gen_len is None else min(max_gen_len, room)
        seq = list(prompt)
        while len(seq) - len(prompt) < limit and self.favoured(seq) not in stop_tokens:
            seq.append(self.favoured(seq))
        return seq[len(prompt) :]


@dataclass
class Request:
    prompts: list[list[int]]
    max_gen_len: Optional[int]
    temperature: float
    top_p: float
    seed: int


@st.composite
def requests(
    draw: st.DrawFn,
    vocab_size: int,
    stop_tokens: Sequence[int],
    max_seq_len: int,
    max_batch_size: int,
    sampled: st.SearchStrategy[tuple[float, float]],
) -> Request:
    """A batch of prompts over 1 .. vocab_size - 1, stop ids frequent among them, of lengths from 1 to
    max_seq_len - 1 (both ends often); max_gen_len None, 1, small, or at and beyond max_seq_len;
    greedy or `sampled` (temperature, top_p)."""
    temperature, top_p = (0.0, 1.0) if draw(st.booleans()) else draw(sampled)
    max_gen_len = draw(st.none() | st.just(1) | st.integers(1, 8) | st.integers(max_seq_len - 1, max_seq_len + 4))
    token = st.sampled_from(list(stop_tokens)) | st.integers(1, vocab_size - 1)
    length = st.sampled_from([1, max_seq_len - 1]) | st.integers(1, max_seq_len - 1)
    prompt = length.flatmap(lambda n: st.lists(token, min_size=n, max_size=n))
    # Fuller batches first (and when shrinking): they hold rows of different lengths.
    prompts = [draw(prompt) for _ in range(draw(st.sampled_from(range(max_batch_size, 0, -1))))]
    return Request(prompts, max_gen_len, temperature, top_p, draw(seeds))


@dataclass
class ScriptedCase:
    model: ScriptedLM
    tokenizer: SmallVocabTokenizer
    request: Request


# With logits 4 above 31 others at most (vocabulary 32), the favoured token has probability above
# 0.63 at any temperature up to 1: a nucleus of top_p <= 0.6 is that token alone, so sampling is
# deterministic and the scripted continuation is the expected output on the sampling path too.
deterministic_nucleus = st.tuples(st.floats(0.05, 1.0), st.floats(0.01, 0.6))


@st.composite
def scripted_cases(draw: st.DrawFn) -> ScriptedCase:
    vocab_size = draw(st.sampled_from([4, 8, 16, 32]))
    stop_tokens = draw(st.lists(st.integers(1, vocab_size - 1), min_size=1, max_size=3, unique=True))
    # Half the models never favour a stop token: their rows run to max_gen_len or max_seq_len.
    tokens = [t for t in range(1, vocab_size) if t not in stop_tokens or draw(st.booleans())] or [stop_tokens[0]]
    successors = draw(st.lists(st.sampled_from(tokens), min_size=vocab_size, max_size=vocab_size))
    max_seq_len, max_batch_size = draw(st.integers(2, 24)), draw(st.sampled_from([4, 3, 2, 1]))
    request = draw(requests(vocab_size, stop_tokens, max_seq_len, max_batch_size, deterministic_nucleus))
    return ScriptedCase(
        ScriptedLM(successors, max_seq_len, max_batch_size), SmallVocabTokenizer(PAD_ID, stop_tokens), request
    )


def generate(case: ScriptedCase, echo: bool = False, prompts: Optional[list[list[int]]] = None):
    """Run case's request through Llama.generate; returns (tokens, logprobs, what on_token saw per row)."""
    r = case.request
    prompts = r.prompts if prompts is None else prompts
    streamed: list[list[int]] = [[] for _ in prompts]
    llama = Llama(case.model, case.tokenizer)
    tokens, logprobs = llama.generate(
        prompts,
        r.max_gen_len,
        r.temperature,
        r.top_p,
        logprobs=True,
        echo=echo,
        seed=r.seed,
        on_token=lambda row, t: streamed[row].append(t),
    )
    return tokens, logprobs, streamed


def record_events(case: ScriptedCase) -> None:
    """Which cut ends each row, and whether a stop id sits in a prompt where the loop reads it."""
    r, model, stops = case.request, case.model, case.tokenizer.stop_tokens
    shortest = min(len(p) for p in r.prompts)
    for p in r.prompts:
        n = len(model.continuation(p, stops, r.max_gen_len))
        room = model.params.max_seq_len - len(p)
        if n < min(room, r.max_gen_len or room):
            event("row cut at a stop token")
        elif r.max_gen_len is not None and r.max_gen_len < room:
            event("row cut at max_gen_len")
        else:
            event("row cut at max_seq_len")
        if any(t in stops for t in p[shortest:]):
            event("stop id in a prompt, past the shortest prompt")
    if len({len(p) for p in r.prompts}) > 1:
        event("prompts of different lengths")
    event("greedy" if r.temperature == 0 else "sampled")


@given(scripted_cases())
def test_each_row_is_its_continuation_cut_at_the_first_generated_stop_token_or_max_gen_len(case):
    # Every max_gen_len for the drawn batch: None, 1, ..., one past max_seq_len.
    stops = case.tokenizer.stop_tokens
    for max_gen_len in [None, *range(1, case.model.params.max_seq_len + 2)]:
        case.request.max_gen_len = max_gen_len
        record_events(case)
        tokens, _, _ = generate(case)
        assert tokens == [case.model.continuation(p, stops, max_gen_len) for p in case.request.prompts], max_gen_len


@given(scripted_cases())
def test_echo_returns_the_prompt_ids_followed_by_the_completion(case):
    plain, plain_logprobs, _ = generate(case)
    echoed, echoed_logprobs, _ = generate(case, echo=True)
    for prompt, a, b, lp_a, lp_b in zip(
        case.request.prompts, plain, echoed, plain_logprobs, echoed_logprobs, strict=True
    ):
        assert b == prompt + a
        # No position predicts the first prompt token: its log-probability reads 0, as in Meta's loop.
        expected_prompt = [0.0] + [case.model.logprob(prompt[:i], prompt[i]) for i in range(1, len(prompt))]
        torch.testing.assert_close(lp_b[: len(prompt)], expected_prompt, **LOGPROB_TOL)
        assert lp_b[len(prompt) :] == lp_a


@given(scripted_cases())
def test_logprobs_are_each_generated_tokens_log_probability_at_its_own_position(case):
    tokens, logprobs, _ = generate(case)
    for prompt, toks, lps in zip(case.request.prompts, tokens, logprobs, strict=True):
        seq = prompt + toks
        expected = [case.model.logprob(seq[:i], seq[i]) for i in range(len(prompt), len(seq))]
        torch.testing.assert_close(lps, expected, **LOGPROB_TOL)


@given(scripted_cases(), st.booleans())
def test_on_token_streams_exactly_the_new_tokens_of_every_row(case, echo):
    for max_gen_len in [None, *range(1, case.model.params.max_seq_len + 2)]:
        case.request.max_gen_len = max_gen_len
        record_events(case)
        tokens, _, streamed = generate(case, echo=echo)
        for prompt, toks, seen in zip(case.request.prompts, tokens, streamed, strict=True):
            assert seen == (toks[len(prompt) :] if echo else toks), max_gen_len


@given(scripted_cases())
def test_a_rows_completion_does_not_depend_on_the_other_rows_prompts(case):
    record_events(case)
    in_batch, in_batch_logprobs, _ = generate(case)
    for prompt, toks, lps in zip(case.request.prompts, in_batch, in_batch_logprobs, strict=True):
        (alone,), (alone_logprobs,), _ = generate(case, prompts=[prompt])
        assert toks == alone
        assert lps == alone_logprobs


@given(scripted_cases(), st.integers(0, 3), st.data())
def test_prompt_of_max_seq_len_tokens_or_more_is_refused_before_model_work(case, beyond, data):
    max_seq_len = case.model.params.max_seq_len
    prompts = list(case.request.prompts)
    prompts[data.draw(st.integers(0, len(prompts) - 1))] = [1] * (max_seq_len + beyond)
    case.model.forward = lambda *a, **k: pytest.fail("the model ran on a prompt with no room to generate")
    with pytest.raises(ValueError, match=f"at or beyond max_seq_len {max_seq_len}"):
        generate(case, prompts=prompts)


def small_random_llama(args: ModelArgs, seed: int, stop_tokens: Sequence[int]) -> Llama:
    return Llama(random_transformer(args, seed), SmallVocabTokenizer(PAD_ID, list(stop_tokens)))


@st.composite
def random_model_cases(draw: st.DrawFn) -> tuple[ModelArgs, list[int], Request]:
    """A small random transformer with Meta's RoPE scaling (Meta hard-codes it), a small vocabulary
    and context, its stop ids, and a request, greedy or top-p sampled (top_p 1.0 often)."""
    vocab_size = draw(st.sampled_from([8, 16, 32, 256]))
    args = draw(small_model_args()).replace(
        rope_scaling=RopeScaling(),
        vocab_size=vocab_size,
        max_seq_len=draw(st.integers(2, 32)),
        max_batch_size=draw(st.integers(1, 4)),
    )
    stop_tokens = draw(st.lists(st.integers(1, vocab_size - 1), min_size=1, max_size=3, unique=True))
    sampled = st.tuples(st.floats(0.1, 2.0), st.just(1.0) | st.floats(0.05, 1.0))
    return args, stop_tokens, draw(requests(vocab_size, stop_tokens, args.max_seq_len, args.max_batch_size, sampled))


@given(random_model_cases(), seeds, st.integers(1, 4) | st.integers(1, 33), st.booleans())
def test_completion_capped_at_k_tokens_is_the_first_k_of_the_uncapped_one(case, weight_seed, k, echo):
    # Capping changes when the loop ends, not what any step computes or draws: greedy and seeded.
    args, stop_tokens, r = case
    llama = small_random_llama(args, weight_seed, stop_tokens)
    full, full_logprobs = llama.generate(r.prompts, None, r.temperature, r.top_p, True, echo, r.seed)
    streamed: list[list[int]] = [[] for _ in r.prompts]
    capped, capped_logprobs = llama.generate(
        r.prompts, k, r.temperature, r.top_p, True, echo, r.seed, on_token=lambda row, t: streamed[row].append(t)
    )
    for prompt, a, b, lp_a, lp_b, seen in zip(
        r.prompts, full, capped, full_logprobs, capped_logprobs, streamed, strict=True
    ):
        n = len(prompt) if echo else 0
        assert b == a[: n + k]
        assert lp_b == lp_a[: n + k]
        assert seen == b[n:]
        assert not set(b[n:]) & set(stop_tokens)
        event("capped by k" if len(a) > n + k else "not capped by k")


@given(random_model_cases(), seeds, seeds)
def test_seeded_sampling_depends_on_the_seed_alone_and_leaves_torchs_global_generator(case, weight_seed, other):
    args, stop_tokens, r = case
    llama = small_random_llama(args, weight_seed, stop_tokens)
    settings = dict(max_gen_len=r.max_gen_len, temperature=max(r.temperature, 0.5), top_p=r.top_p, seed=r.seed)
    with torch.random.fork_rng():
        torch.manual_seed(other)
        state = torch.get_rng_state()
        first = llama.generate(r.prompts, logprobs=True, **settings)
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(other + 1)
        second = llama.generate(r.prompts, logprobs=True, **settings)
    assert first == second


class ScaledLogits(nn.Module):
    """model with its logits divided by `scale`; the KV cache and sizes are model's."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = model, scale
        self.params, self.output = model.params, model.output
        self.kv_cache, self.check_cache_fits = model.kv_cache, model.check_cache_fits

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        return self.inner(tokens, start_pos, last_only=last_only) / self.scale


@given(random_model_cases(), seeds, st.floats(0.1, 2.0))
def test_sampling_at_temperature_t_is_sampling_at_1_from_logits_divided_by_t(case, weight_seed, temperature):
    args, stop_tokens, r = case
    llama = small_random_llama(args, weight_seed, stop_tokens)
    scaled = Llama(ScaledLogits(llama.model, temperature), llama.tokenizer)
    at_t, _ = llama.generate(r.prompts, r.max_gen_len, temperature, r.top_p, seed=r.seed)
    at_1, _ = scaled.generate(r.prompts, r.max_gen_len, 1.0, r.top_p, seed=r.seed)
    assert at_t == at_1


@st.composite
def dyadic_distributions(draw: st.DrawFn) -> tuple[torch.Tensor, float]:
    """Distinct probabilities c / 2**m (exact in float32, so are their running sums), shuffled among
    zeros, and a top_p that is often exactly one of the running sums (the nucleus's boundary)."""
    counts = draw(st.sets(st.integers(1, 32), min_size=1, max_size=6))
    total = 2 ** math.ceil(math.log2(sum(counts)))
    if total - sum(counts) in counts:
        total *= 2  # the remainder then exceeds every count: the probabilities stay distinct
    if total > sum(counts):
        counts.add(total - sum(counts))
    probs = sorted(counts, reverse=True) + [0] * draw(st.integers(0, 4))
    probs = torch.tensor(draw(st.permutations(probs)), dtype=torch.float32) / total
    running = sorted({sum(sorted(counts, reverse=True)[:i]) / total for i in range(1, len(counts) + 1)})
    top_p = draw(st.sampled_from(running) | st.integers(1, total).map(lambda j: j / total) | st.floats(0.01, 1.0))
    return probs, top_p


def nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Meta's nucleus: the most likely tokens while the mass before each is at most top_p, i.e. until
    their mass exceeds it (a boundary token whose preceding mass equals top_p is in); zeros never drawn."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    kept, mass = set(), 0.0
    for i in order:
        if mass > top_p or probs[i] == 0:
            break
        kept.add(i)
        mass += probs[i].item()
    return kept


@given(dyadic_distributions(), seeds)
@example((torch.tensor([0.125, 0.5, 0.375]), 0.5), 0)  # the mass before 0.375 is exactly top_p: it is kept
def test_sample_top_p_draws_from_exactly_the_nucleus(dist, seed):
    probs, top_p = dist
    # 20k draws: a kept token (renormalised probability >= 1/512) is drawn with certainty in practice.
    draws = sample_top_p(probs.expand(20_000, -1).clone(), top_p, torch.Generator().manual_seed(seed))
    assert set(draws.flatten().tolist()) == nucleus(probs, top_p)


# ---- Meta's own code: the same function on the same inputs gives the same bits --------------------


# The params.json fields of ModelArgs: what Meta's ModelArgs reads.
META_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope")  # fmt: skip


def record_request_events(r: Request, got: list[list[int]], echo: bool, max_seq_len: int, stops: Sequence[int]) -> None:
    event("greedy" if r.temperature == 0 else "top_p 1.0" if r.top_p == 1.0 else "top_p < 1")
    if r.max_gen_len is None:
        event("max_gen_len None")
    else:
        event("max_gen_len >= max_seq_len" if r.max_gen_len >= max_seq_len else "max_gen_len < max_seq_len")
    for p, toks in zip(r.prompts, got, strict=True):
        n, room = len(toks) - (len(p) if echo else 0), max_seq_len - len(p)
        event("a row stopped at a stop token" if n < min(r.max_gen_len or room, room) else "a row ran to its limit")
        if set(p[min(len(q) for q in r.prompts) :]) & set(stops):
            event("a stop id in a prompt, past the shortest prompt")
        if len(p) == max_seq_len - 1:
            event("a prompt one short of max_seq_len")


@pytest.mark.reference
@given(random_model_cases(), seeds, st.booleans(), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_generation_equals_metas_for_any_batch_and_settings(case, weight_seed, logprobs, echo, dtype):
    from reference_harness.meta import meta_generate, meta_generator, meta_model_from_state_dict

    args, stop_tokens, r = case
    ours = small_random_llama(args, weight_seed, stop_tokens)
    ours.model.to(dtype)
    params = {k: getattr(args, k) for k in META_PARAMS}
    meta_model = meta_model_from_state_dict(
        params, ours.model.state_dict(), dtype, args.max_seq_len, args.max_batch_size
    )
    meta = meta_generator(meta_model, PAD_ID, stop_tokens)
    expected, expected_logprobs = meta_generate(meta, r.prompts, r.max_gen_len, r.temperature, r.top_p, echo, r.seed)
    got, got_logprobs = ours.generate(r.prompts, r.max_gen_len, r.temperature, r.top_p, logprobs, echo, r.seed)
    record_request_events(r, got, echo, args.max_seq_len, stop_tokens)
    assert got == expected
    if logprobs:
        generated = [lps[len(p) :] if echo else lps for p, lps in zip(r.prompts, got_logprobs, strict=True)]
        assert generated == expected_logprobs  # float32 values, bit for bit
    else:
        assert got_logprobs is None


@st.composite
def softmax_distributions(draw: st.DrawFn) -> tuple[torch.Tensor, float]:
    logits = draw(st.lists(st.floats(-8, 8), min_size=2, max_size=64))
    return torch.softmax(torch.tensor(logits), -1), draw(st.just(1.0) | st.floats(0.01, 1.0))


@pytest.mark.reference
@given(dyadic_distributions() | softmax_distributions(), st.integers(1, 64), seeds)
def test_sample_top_p_equals_metas_for_any_distribution(dist, rows, seed):
    from reference_harness.meta import import_meta

    probs, top_p = dist
    batch = probs.expand(rows, -1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # Meta draws from torch's global generator
        expected = import_meta().generation.sample_top_p(batch.clone(), top_p)
    assert torch.equal(sample_top_p(batch.clone(), top_p, torch.Generator().manual_seed(seed)), expected)
