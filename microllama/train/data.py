"""Training data from local files, nothing downloaded: read, tokenized once into a cache, split, packed.

- `.txt`: documents separated by a line holding only `<|endoftext|>` (how TinyStories ships its raw
  text); a file without such a line is one document.
- `.jsonl`: one object per line, with a `text` string (a document) or a `messages` list (a chat for
  supervised fine-tuning: only the assistant's turns are targets, see encode_dialog).

A document is `<|begin_of_text|>` text `<|end_of_text|>`; a chat is encoded by microllama.chat, as Meta's
ChatFormat encodes a dialog. The corpus is tokenized once into a cache keyed by the files' contents and the
tokenizer: token ids, document offsets and a target flag per token, memory-mapped; a second run reuses it.
`pack` puts documents into rows of seq_len tokens that `Batches` serves in a seeded order, epoch after epoch.
"""

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..chat import ChatFormat, DialogError, Message, as_dialog
from ..files import atomic_dir, file_sha256
from ..tokenizer import Tokenizer

IGNORE_INDEX = -100  # a position with this target asks nothing (cross_entropy's default ignore_index)
SEPARATOR = re.compile(r"^<\|endoftext\|>[ \t]*\r?$", re.MULTILINE)
SUFFIXES = (".txt", ".jsonl")
CACHE_FORMAT = 1  # bump when what the cache holds, or how documents are encoded, changes


class DataError(ValueError):
    """Training data that cannot be used as given; the message names the file (and line)."""


def encode_dialog(tokenizer: Tokenizer, dialog: list[Message]) -> tuple[list[int], list[int]]:
    """A chat's token ids as Meta's ChatFormat encodes a dialog (without the assistant header it appends to
    prompt a reply), and per token 1 where it is a target: what the assistant wrote and its <|eot_id|> (or
    <|eom_id|>). Headers, system, user and tool turns are context only."""
    chat_format = ChatFormat(tokenizer)
    tokens, targets = [tokenizer.bos_id], [0]
    for message in dialog:
        encoded = chat_format.encode_message(message)
        header = len(chat_format.encode_header(message.role))
        tokens += encoded
        targets += [0] * header + [int(message.role == "assistant")] * (len(encoded) - header)
    return tokens, targets


def data_files(path: Union[str, Path]) -> list[Path]:
    """The .txt and .jsonl files a --data path names: the file itself, or those under a directory, sorted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: a directory without .txt or .jsonl files")
        return files
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: expected a .txt or .jsonl file (or a directory of them)")
    return [path]


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(f"{path} is empty")
    return text


def _dialog(value: Any, where: str) -> list[Message]:
    """value checked to be a chat (microllama.chat's messages) with at least one assistant turn."""
    try:
        dialog = as_dialog(value)
    except DialogError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(message.role == "assistant" for message in dialog):
        raise DataError(f"{where}: a chat without an assistant turn has nothing to learn")
    return dialog


def read_documents(path: Path, tokenizer: Tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    """Each document of one file: (token ids, per token 1 where it is a target)."""
    text = _read_text(path)
    if path.suffix == ".txt":
        for doc in SEPARATOR.split(text):
            if doc.strip():
                tokens = tokenizer.encode(doc.strip(), bos=True, eos=True)
                yield tokens, [1] * len(tokens)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if isinstance(record, dict) and "messages" in record:
            yield encode_dialog(tokenizer, _dialog(record["messages"], where))
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            if record["text"].strip():
                tokens = tokenizer.encode(record["text"], bos=True, eos=True)
                yield tokens, [1] * len(tokens)
        else:
            raise DataError(f'{where}: expected an object with a "text" string or a "messages" list')


@dataclass(frozen=True)
class Corpus:
    """Tokenized documents, end to end: document i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # uint32 token ids (memory-mapped)
    is_target: np.ndarray  # uint8, 1 where the token may be predicted from the ones before it
    offsets: np.ndarray  # int64, n_documents + 1
    key: str  # sha256 of the format, the tokenizer and the files' contents: the cache's name
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.tokens[start:end], self.is_target[start:end]


def corpus_key(files: Sequence[Path], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(f"microllama corpus {CACHE_FORMAT}\n{file_sha256(tokenizer.model_path)}\n".encode())
    for path in files:
        h.update(f"{file_sha256(path)}\n".encode())
    return h.hexdigest()


def load_corpus(path: Union[str, Path], tokenizer: Tokenizer, cache_root: Union[str, Path]) -> Corpus:
    """The corpus of the files at path, tokenized into cache_root/<key> on first use (with a progress bar)."""
    files = data_files(path)
    key = corpus_key(files, tokenizer)
    cache = Path(cache_root) / key
    if not (cache / "meta.json").is_file():
        _tokenize_into(cache, files, tokenizer)
    meta = json.loads((cache / "meta.json").read_text())
    return Corpus(
        tokens=np.memmap(cache / "tokens.bin", dtype=np.uint32, mode="r"),
        is_target=np.memmap(cache / "is_target.bin", dtype=np.uint8, mode="r"),
        offsets=np.load(cache / "offsets.npy"),
        key=key,
        files=tuple(meta["files"]),
    )


def _tokenize_into(cache: Path, files: list[Path], tokenizer: Tokenizer) -> None:
    offsets, n_targets = [0], 0
    total = sum(p.stat().st_size for p in files)
    with atomic_dir(cache, replace=True) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        with open(tmp / "tokens.bin", "wb") as ids, open(tmp / "is_target.bin", "wb") as flags:
            for path in files:
                for tokens, targets in read_documents(path, tokenizer):
                    ids.write(np.asarray(tokens, dtype=np.uint32).tobytes())
                    flags.write(np.asarray(targets, dtype=np.uint8).tobytes())
                    offsets.append(offsets[-1] + len(tokens))
                    n_targets += sum(targets[1:])
                bar.update(path.stat().st_size)
        if n_targets == 0:
            where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
            raise DataError(f"{where}: no complete document (every document is empty)")
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta = {"format": CACHE_FORMAT, "files": [str(p) for p in files], "documents": len(offsets) - 1,
                "tokens": offsets[-1], "tokenizer": str(tokenizer.model_path)}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def split_documents(n_documents: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document indices for training and for held-out evaluation, a seeded eval_fraction of them (at least one
    when eval_fraction > 0), each in corpus order."""
    n_eval = 0 if eval_fraction == 0 else max(1, round(n_documents * eval_fraction))
    if n_eval >= n_documents:
        raise DataError(
            f"the corpus has {n_documents} document(s): too few to hold out {eval_fraction:.0%} for evaluation "
            "and train on the rest (--eval_fraction 0 trains on all of them)"
        )
    held_out = np.random.Generator(np.random.PCG64(seed)).permutation(n_documents)[:n_eval]
    is_eval = np.zeros(n_documents, dtype=bool)
    is_eval[held_out] = True
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


Segment = tuple[int, int, int]  # (document, start, end): tokens start..end-1 of a document, in one row


@dataclass(frozen=True)
class Packing:
    rows: list[list[Segment]]
    n_split: int  # documents longer than a row, cut into pieces (each piece is a document of its own)
    tokens: int  # document tokens in all rows (the rest is padding)


def pack(lengths: np.ndarray, order: Sequence[int], seq_len: int, open_rows: int = 8) -> Packing:
    """Documents (in `order`) into rows of seq_len tokens, never cut unless longer than a row: each goes to
    the first of the last `open_rows` rows with room for it, or starts a new row (first fit over a window,
    which keeps the order roughly and wastes little). A longer document is cut into pieces of seq_len tokens."""
    rows: list[list[Segment]] = []
    is_open: list[tuple[list[Segment], int]] = []  # a row being filled and its free tokens
    n_split = tokens = 0
    for doc in order:
        length = int(lengths[doc])
        n_split += length > seq_len
        tokens += length
        for start in range(0, length, seq_len):
            piece = (int(doc), start, min(start + seq_len, length))
            size = piece[2] - start
            fit = next((i for i, (_, free) in enumerate(is_open) if free >= size), None)
            if fit is None:
                if len(is_open) == open_rows:
                    rows.append(is_open.pop(0)[0])
                is_open.append(([], seq_len))
                fit = len(is_open) - 1
            row, free = is_open[fit]
            row.append(piece)
            if free == size:
                rows.append(is_open.pop(fit)[0])
            else:
                is_open[fit] = (row, free - size)
    rows += [row for row, _ in is_open]
    return Packing(rows, n_split, tokens)


@dataclass
class Batch:
    tokens: torch.Tensor  # (rows, seq_len) token ids; padding after the last document of a row
    targets: torch.Tensor  # (rows, seq_len) the next token of the same document, IGNORE_INDEX where none is asked
    documents: torch.Tensor  # (rows, seq_len) which document of its row each token is in (padding: one more)

    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.documents.to(device))


def make_batch(corpus: Corpus, rows: Sequence[Sequence[Segment]], seq_len: int, pad_id: int) -> Batch:
    """Rows of segments as tensors. Position i of a document targets its token i + 1 where that one is a
    target; a document's last token targets nothing, so no document is asked for the next one's first token."""
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    documents = np.empty((len(rows), seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        o = 0
        for d, (doc, start, end) in enumerate(row):
            ids, is_target = corpus.document(doc)
            n = end - start
            tokens[r, o : o + n] = ids[start:end]
            # int64 before -100 meets the stored uint32 ids (numpy 2.5 refuses to cast it to uint32)
            following = ids[start + 1 : end].astype(np.int64)
            targets[r, o : o + n - 1] = np.where(is_target[start + 1 : end] == 1, following, IGNORE_INDEX)
            documents[r, o : o + n] = d
            o += n
        documents[r, o:] = len(row)  # padding is a document of its own, with no targets
    return Batch(torch.from_numpy(tokens), torch.from_numpy(targets), torch.from_numpy(documents))


def held_out_batches(
    corpus: Corpus, eval_docs: Sequence[int], seq_len: int, batch_size: int, rows: Optional[int], pad_id: int
) -> list[Batch]:
    """The held-out documents packed into rows of seq_len, the first `rows` of them (None: all), in batches of
    batch_size rows: what the trainer evaluates."""
    packed = pack(corpus.lengths(), eval_docs, seq_len).rows[:rows]
    return [make_batch(corpus, packed[i : i + batch_size], seq_len, pad_id) for i in range(0, len(packed), batch_size)]


@dataclass
class DataPosition:
    epoch: int = 0  # passes over the training documents begun
    row: int = 0  # rows of this epoch's packing already served


class Batches:
    """Batches of rows from the training documents, packed anew each epoch in an order drawn from (seed,
    epoch); a batch that reaches an epoch's end continues into the next. `position` is all a resume needs."""

    def __init__(self, corpus: Corpus, documents: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 pad_id: int, position: Optional[DataPosition] = None):  # fmt: skip
        self.corpus, self.documents, self.seq_len, self.batch_size = corpus, documents, seq_len, batch_size
        self.seed, self.pad_id = seed, pad_id
        self.position = position or DataPosition()
        self._epoch: Optional[int] = None
        self._rows: list[list[Segment]] = []

    def packing(self, epoch: int) -> Packing:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))  # the same order on every machine
        order = self.documents[rng.permutation(len(self.documents))]
        return pack(self.corpus.lengths(), order, self.seq_len)

    def next_batch(self) -> Batch:
        rows = []
        while len(rows) < self.batch_size:
            if self._epoch != self.position.epoch:
                self._epoch, self._rows = self.position.epoch, self.packing(self.position.epoch).rows
            take = self._rows[self.position.row : self.position.row + self.batch_size - len(rows)]
            rows += take
            self.position.row += len(take)
            if self.position.row == len(self._rows):
                self.position = DataPosition(self.position.epoch + 1, 0)
        return make_batch(self.corpus, rows, self.seq_len, self.pad_id)
