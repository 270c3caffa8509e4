"""The Llama 3 tokenizer on arbitrary text: Meta's ids, a lossless round trip, and special-token text
handled exactly as allowed_special / disallowed_special say."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microllama.tokenizer import TIKTOKEN_MAX_ENCODE_CHARS
from tests.strategies import long_runs, special_token_case, unicode_chars, unicode_text

NUM_BASE_TOKENS = 128_000  # ids at or above this are special tokens


def special_ids(ids: list[int]) -> list[int]:
    return [i for i in ids if i >= NUM_BASE_TOKENS]


def occurrences(s: str, tokens: set[str]) -> list[str]:
    """The special-token texts of `tokens` found in s, left to right (none is a prefix of another)."""
    if not tokens:
        return []
    return re.findall("|".join(map(re.escape, sorted(tokens))), s)


def allowed_or_disallowed(pool: set[str]) -> st.SearchStrategy:
    return st.just("all") | st.sets(st.sampled_from(sorted(pool)))


@pytest.mark.reference
@given(unicode_text, st.booleans(), st.booleans())
def test_encode_equals_meta_for_any_text(tokenizer, meta_tokenizer, s, bos, eos):
    assert tokenizer.encode(s, bos=bos, eos=eos) == meta_tokenizer.encode(s, bos=bos, eos=eos)


@given(unicode_text)
def test_decode_inverts_encode(tokenizer, s):
    assert tokenizer.decode(tokenizer.encode(s, bos=False, eos=False)) == s


@pytest.mark.reference
@pytest.mark.slow
@settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(long_runs())
def test_runs_beyond_25k_characters_encode_as_meta_and_round_trip(tokenizer, meta_tokenizer, s):
    ids = tokenizer.encode(s, bos=False, eos=False)
    assert ids == meta_tokenizer.encode(s, bos=False, eos=False)
    assert tokenizer.decode(ids) == s


@pytest.mark.reference
@pytest.mark.slow
@settings(max_examples=3, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(unicode_chars, min_size=1, max_size=40), st.integers(1, 60_000))
def test_text_beyond_400k_characters_encodes_as_meta_and_round_trips(tokenizer, meta_tokenizer, unit, extra):
    # A repeated unit, cut at a random length past tiktoken's 400k-character limit.
    s = (unit * (TIKTOKEN_MAX_ENCODE_CHARS // len(unit) + extra))[: TIKTOKEN_MAX_ENCODE_CHARS + extra]
    ids = tokenizer.encode(s, bos=True, eos=True)
    assert ids == meta_tokenizer.encode(s, bos=True, eos=True)
    assert tokenizer.decode(ids[1:-1]) == s


@given(special_token_case())
def test_special_token_text_encoded_as_plain_text_by_default(tokenizer, case):
    s, _ = case
    ids = tokenizer.encode(s, bos=False, eos=False)
    assert special_ids(ids) == []
    assert tokenizer.decode(ids) == s


@given(st.data())
def test_allowed_special_text_becomes_exactly_its_special_ids(tokenizer, data):
    s, pool = data.draw(special_token_case())
    allowed = data.draw(allowed_or_disallowed(pool), label="allowed_special")
    ids = tokenizer.encode(s, bos=False, eos=False, allowed_special=allowed)
    expected = occurrences(s, set(tokenizer.special_tokens) if allowed == "all" else allowed)
    assert special_ids(ids) == [tokenizer.special_tokens[t] for t in expected]
    assert tokenizer.decode(ids) == s


@given(st.data())
def test_disallowed_special_text_raises_and_nothing_else_does(tokenizer, data):
    s, pool = data.draw(special_token_case())
    allowed = data.draw(st.none() | allowed_or_disallowed(pool), label="allowed_special")
    disallowed = data.draw(allowed_or_disallowed(pool), label="disallowed_special")
    # tiktoken's rule: "all" means every special token not allowed; an explicit set is taken as it is.
    everything = set(tokenizer.special_tokens)
    forbidden = (
        everything - (everything if allowed == "all" else allowed or set()) if disallowed == "all" else disallowed
    )
    kwargs = {"allowed_special": allowed, "disallowed_special": disallowed}
    if occurrences(s, forbidden):
        with pytest.raises(ValueError, match="disallowed special token"):
            tokenizer.encode(s, bos=False, eos=False, **kwargs)
    else:
        without_check = tokenizer.encode(s, bos=False, eos=False, allowed_special=allowed)
        assert tokenizer.encode(s, bos=False, eos=False, **kwargs) == without_check


@pytest.mark.reference
@given(st.data())
def test_special_token_arguments_give_meta_result(tokenizer, meta_tokenizer, data):
    s, pool = data.draw(special_token_case())
    kwargs = {
        "allowed_special": data.draw(st.none() | allowed_or_disallowed(pool), label="allowed_special"),
        "disallowed_special": data.draw(st.just(()) | allowed_or_disallowed(pool), label="disallowed_special"),
    }
    results = []
    for tok in (tokenizer, meta_tokenizer):
        try:
            results.append(tok.encode(s, bos=True, eos=False, **kwargs))
        except ValueError as e:
            results.append(f"ValueError: {e}")
    assert results[0] == results[1]
