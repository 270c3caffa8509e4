"""The Llama 3 tokenizer: ids identical to Meta's, and where tokenizer.model is found."""

import importlib.util

import pytest

from microllama import tokenizer as tokenizer_module
from microllama.tokenizer import Tokenizer, find_tokenizer_model

CORPUS = [
    "",
    "Clearly, the meaning of life is",
    "<|begin_of_text|>Hello<|eot_id|> and <|reserved_special_token_42|> as plain text",
    "Emoji 🦙🔥👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "日本語のテキストと中文文本，还有한국어",
    "النص العربي مع أرقام ١٢٣ and mixed",
    "tabs\tand\nnewlines\r\n\n   trailing   ",
    " " * 30_000 + "x",  # a whitespace run longer than Meta's 25k cut
    "a" * 60_000,  # a non-whitespace run longer than 25k, twice
    "The quick brown fox jumps over the lazy dog. " * 10_000,  # 450k characters: more than one 400k call
    "x\u200by\u00a0z\u3000w",  # zero-width space, no-break space, ideographic space
]


@pytest.mark.reference
@pytest.mark.parametrize("text", CORPUS, ids=lambda s: f"{s[:12]!r}...{len(s)}")
@pytest.mark.parametrize(("bos", "eos"), [(True, False), (False, True)])
def test_ids_identical_to_meta(tokenizer, meta_tokenizer, text, bos, eos):
    assert tokenizer.encode(text, bos=bos, eos=eos) == meta_tokenizer.encode(text, bos=bos, eos=eos)


@pytest.mark.reference
@pytest.mark.parametrize("text", CORPUS[1:7], ids=lambda s: f"{s[:12]!r}")
def test_special_tokens_allowed_identical_to_meta_and_round_trip(tokenizer, meta_tokenizer, text):
    ids = tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert ids == meta_tokenizer.encode(text, bos=False, eos=False, allowed_special="all")
    assert tokenizer.decode(ids) == text


def test_special_token_text_is_plain_text_unless_allowed(tokenizer):
    text = "<|eot_id|>"
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special="all") == [tokenizer.eot_id]
    assert tokenizer.eot_id not in tokenizer.encode(text, bos=False, eos=False)
    with pytest.raises(ValueError):
        tokenizer.encode(text, bos=False, eos=False, disallowed_special="all")


def test_vocabulary_and_stop_tokens(tokenizer):
    assert tokenizer.n_words == 128_256
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (128000, 128001, 128004)
    assert tokenizer.stop_tokens == [128001, 128008, 128009]  # end_of_text, eom, eot


def test_prompt_is_encoded_as_given_without_trailing_space(tokenizer):
    ids = tokenizer.encode("Clearly, the meaning of life is", bos=True, eos=False)
    assert ids == [128000, 75471, 11, 279, 7438, 315, 2324, 374]
    assert tokenizer.decode(ids[1:]) == "Clearly, the meaning of life is"


def test_missing_tokenizer_model_error_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(tokenizer_module.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="looked in: .*tokenizer.model") as e:
        find_tokenizer_model(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_tokenizer_model_found_in_checkpoint_dir_first(tmp_path, tokenizer, monkeypatch):
    monkeypatch.delenv(tokenizer_module.TOKENIZER_ENV, raising=False)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.model_path.read_bytes())
    assert find_tokenizer_model(tmp_path) == tmp_path / "tokenizer.model"


def test_malformed_tokenizer_model_names_file_and_line(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-a-pair\n")
    with pytest.raises(ValueError, match="tokenizer.model:2"):
        Tokenizer(bad)
