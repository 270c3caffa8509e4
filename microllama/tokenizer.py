"""The Llama 3 tiktoken tokenizer: 128,000 BPE ranks and 256 special tokens, ids identical to Meta's."""

import base64
import importlib.util
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import AbstractSet, Literal, Optional, Union

import tiktoken

# tiktoken panics on inputs much beyond 400k characters, and on very long runs of whitespace or of
# non-whitespace (openai/tiktoken#195): Meta cuts its input at these lengths, and so must we to get its ids.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

NUM_RESERVED_SPECIAL_TOKENS = 256
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS += [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(SPECIAL_TOKENS))
]
TOKENIZER_ENV = "MICROLLAMA_TOKENIZER"


def tokenizer_candidates(ckpt_dir: Optional[Union[str, Path]] = None) -> list[Path]:
    """Where tokenizer.model is looked for, in order: $MICROLLAMA_TOKENIZER, the checkpoint directory,
    the installed llama-models package (found without importing it)."""
    candidates = []
    if os.environ.get(TOKENIZER_ENV):
        candidates.append(Path(os.environ[TOKENIZER_ENV]))
    if ckpt_dir is not None:
        candidates.append(Path(ckpt_dir) / "tokenizer.model")
    spec = importlib.util.find_spec("llama_models")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "llama3" / "tokenizer.model" for p in spec.submodule_search_locations]
    return candidates


def find_tokenizer_model(ckpt_dir: Optional[Union[str, Path]] = None) -> Path:
    """The first tokenizer.model of tokenizer_candidates that exists. A $MICROLLAMA_TOKENIZER naming no
    file is an error, not a reason to look elsewhere."""
    named = os.environ.get(TOKENIZER_ENV)
    if named and not Path(named).is_file():
        raise FileNotFoundError(f"${TOKENIZER_ENV} names {named}, which is not a file")
    candidates = tokenizer_candidates(ckpt_dir)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates) or "nowhere"
    raise FileNotFoundError(
        f"no Llama 3 tokenizer.model found; looked in: {looked}. Pass its path, set ${TOKENIZER_ENV}, "
        "or install llama-models==0.3.0 (pip install 'microllama[reference]'), which ships it"
    )


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """tokenizer.model is one 'base64-token rank' pair per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a tiktoken BPE file ('base64-token rank' lines of text): {e}") from e
    ranks = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}") from e
    if not ranks:
        raise ValueError(f"{path}: holds no BPE ranks")
    return ranks


class Tokenizer:
    """Encode and decode with Meta's Llama 3 tiktoken model; same signatures and ids as Meta's Tokenizer."""

    def __init__(self, model_path: Optional[Union[str, Path]] = None, ckpt_dir: Optional[Union[str, Path]] = None):
        path = Path(model_path) if model_path is not None else find_tokenizer_model(ckpt_dir)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        mergeable_ranks = load_bpe_ranks(path)
        num_base_tokens = len(mergeable_ranks)
        self.model_path = path
        self.special_tokens = {token: num_base_tokens + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.n_words = num_base_tokens + len(SPECIAL_TOKENS)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Optional[Union[Literal["all"], AbstractSet[str]]] = None,
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> list[int]:
        """Token ids of s. By default special-token text is encoded as plain text; allowed_special="all"
        makes it the special token, and text in disallowed_special raises ValueError."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        substrs = (
            substr
            for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS)
            for substr in split_whitespaces_or_nonwhitespaces(
                s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS
            )
        )
        allowed = set() if allowed_special is None else allowed_special
        t = [self.bos_id] if bos else []
        for substr in substrs:
            t += self.model.encode(substr, allowed_special=allowed, disallowed_special=disallowed_special)
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t))


def split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Cut s so that no piece holds more than max_consecutive_slice_len consecutive whitespace or
    consecutive non-whitespace characters (Meta's splitting, kept exactly: the pieces decide the ids)."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]
