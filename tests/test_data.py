"""Training data: files read as documents, the token cache, the held-out split, packing into rows (every
token once, nothing crossing a document), chats encoded as Meta's ChatFormat with assistant-only targets."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from microllama.chat import as_dialog
from microllama.model import document_positions
from microllama.train.data import (
    IGNORE_INDEX,
    Batches,
    Corpus,
    DataError,
    encode_dialog,
    load_corpus,
    make_batch,
    pack,
    read_documents,
    split_documents,
)

ROOT = Path(__file__).resolve().parents[1]
DIALOG = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_documents_are_split_on_endoftext_lines_only(tmp_path, tokenizer):
    path = write(tmp_path / "a.txt", "One story.\n<|endoftext|>\nTwo: <|endoftext|> in a line stays text.\n"
                                     "<|endoftext|>\n\n<|endoftext|>\nThree.\n")  # fmt: skip
    docs = [tokenizer.decode(t) for t, _ in read_documents(path, tokenizer)]
    assert docs == ["<|begin_of_text|>One story.<|end_of_text|>",
                    "<|begin_of_text|>Two: <|endoftext|> in a line stays text.<|end_of_text|>",
                    "<|begin_of_text|>Three.<|end_of_text|>"]  # fmt: skip


def test_a_txt_file_without_separators_is_one_document(tmp_path, tokenizer):
    (doc,) = read_documents(write(tmp_path / "a.txt", "line one\nline two\n"), tokenizer)
    assert doc[0] == tokenizer.encode("line one\nline two", bos=True, eos=True) and doc[1] == [1] * len(doc[0])


def test_jsonl_text_and_messages(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"messages": DIALOG}))
    (text, text_targets), (chat, chat_targets) = read_documents(path, tokenizer)
    assert text == tokenizer.encode("hello", bos=True, eos=True)
    assert (chat, chat_targets) == encode_dialog(tokenizer, as_dialog(DIALOG))


def test_sft_targets_are_the_assistant_turns_and_their_end_of_turn_only(tokenizer):
    tokens, targets = encode_dialog(tokenizer, as_dialog(DIALOG))
    learned = [t for t, keep in zip(tokens, targets, strict=True) if keep]
    assert tokenizer.decode(learned) == "Blue.<|eot_id|>Green.<|eot_id|>"
    assert len(tokens) == len(targets) and tokens[0] == tokenizer.bos_id


@pytest.mark.reference
def test_dialog_tokens_equal_metas_chat_format(meta_tokenizer):
    """Token for token Meta's ChatFormat.encode_dialog_prompt, without the assistant header it appends."""
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    from microllama.tokenizer import Tokenizer

    chat_format = ChatFormat(meta_tokenizer)
    dialog = DIALOG + [
        {"role": "assistant", "content": "Let me look.", "stop_reason": "end_of_message"},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": " ok "},
    ]
    stops = {None: StopReason.end_of_turn, "end_of_message": StopReason.end_of_message}
    messages = [RawMessage(role=m["role"], content=m["content"], stop_reason=stops[m.get("stop_reason")])
                for m in dialog]  # fmt: skip
    expected = chat_format.encode_dialog_prompt(messages).tokens
    header = chat_format._encode_header("assistant")
    ours, targets = encode_dialog(Tokenizer(), as_dialog(dialog))
    assert ours + header == expected
    assert Tokenizer().decode([t for t, keep in zip(ours, targets, strict=True) if keep]) == (
        "Blue.<|eot_id|>Green.<|eot_id|>Let me look.<|eom_id|> ok <|eot_id|>"
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", r"empty\.txt is empty"),
        ("blank.txt", "\n  \n", r"blank\.txt is empty"),
        ("only-separators.txt", "<|endoftext|>\n<|endoftext|>\n", r"only-separators\.txt: no complete document"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": 3}\n', r"bad\.jsonl:2: expected an object with a \"text\" string"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', r"broken\.jsonl:2: not valid JSON"),
        ("role.jsonl", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
         r"role\.jsonl:1: message 0: unknown role 'robot'; roles: system, user, assistant, tool"),
        ("turn.jsonl", json.dumps({"messages": [{"role": "user"}]}), r"turn\.jsonl:1: message 0: 'user' message has no "
                                                                     r"content"),
        ("silent.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
         r"silent\.jsonl:1: a chat without an assistant turn"),
        ("list.jsonl", json.dumps({"messages": "hi"}), r"list\.jsonl:1: a dialog is a list of messages, got str"),
        ("notes.md", "# notes", r"notes\.md: expected a \.txt or \.jsonl file"),
    ],
)  # fmt: skip
def test_bad_data_is_one_clear_error_naming_file_and_line(tmp_path, tokenizer, name, content, message):
    with pytest.raises(DataError, match=message):
        load_corpus(write(tmp_path / name, content), tokenizer, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_missing_data_and_empty_directory(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data not found: .*nope\.txt"):
        load_corpus(tmp_path / "nope.txt", tokenizer, tmp_path / "cache")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"a directory without \.txt or \.jsonl files"):
        load_corpus(tmp_path / "d", tokenizer, tmp_path / "cache")


def test_corpus_is_tokenized_once_and_keyed_by_content(tmp_path, tokenizer):
    data = tmp_path / "d"
    data.mkdir()
    write(data / "a.txt", "first\n<|endoftext|>\nsecond\n")
    write(data / "b.jsonl", json.dumps({"text": "third"}) + "\n")
    corpus = load_corpus(data, tokenizer, tmp_path / "cache")
    assert len(corpus) == 3 and len(corpus.tokens) == corpus.offsets[-1]
    assert [tokenizer.decode(corpus.document(i)[0]) for i in range(3)][2] == "<|begin_of_text|>third<|end_of_text|>"
    stamp = (tmp_path / "cache" / corpus.key / "tokens.bin").stat().st_mtime_ns
    assert load_corpus(data, tokenizer, tmp_path / "cache").key == corpus.key  # reused: not written again
    assert (tmp_path / "cache" / corpus.key / "tokens.bin").stat().st_mtime_ns == stamp
    write(data / "a.txt", "first\n<|endoftext|>\nsecond, changed\n")
    assert load_corpus(data, tokenizer, tmp_path / "cache").key != corpus.key


def test_held_out_split_is_seeded_disjoint_and_complete():
    train, held = split_documents(100, 0.1, seed=3)
    assert len(held) == 10 and sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    assert np.array_equal(split_documents(100, 0.1, seed=3)[1], held)
    assert len(split_documents(5, 0.01, 0)[1]) == 1 and len(split_documents(5, 0.0, 0)[1]) == 0
    with pytest.raises(DataError, match="too few to hold out"):
        split_documents(1, 0.05, 0)


@given(st.lists(st.integers(1, 100), min_size=1, max_size=60), st.integers(4, 48), st.integers(1, 8))
def test_packing_puts_every_token_in_one_row_once_and_cuts_only_long_documents(lengths, seq_len, open_rows):
    lengths = np.array(lengths)
    packing = pack(lengths, range(len(lengths)), seq_len, open_rows)
    pieces: dict[int, list[tuple[int, int]]] = {}
    for row in packing.rows:
        assert 0 < sum(end - start for _, start, end in row) <= seq_len
        for doc, start, end in row:
            pieces.setdefault(doc, []).append((start, end))
    for doc, length in enumerate(lengths):
        spans = sorted(pieces[doc])
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous, no overlap
        assert len(spans) == -(-length // seq_len)  # cut only when longer than a row, into row-sized pieces
    assert packing.n_split == int((lengths > seq_len).sum()) and packing.tokens == lengths.sum()


@given(st.lists(st.integers(2, 30), min_size=1, max_size=12), st.integers(8, 40))
def test_rows_never_ask_a_document_for_another_ones_tokens(lengths, seq_len):
    """Every target is the next token of the same document; the last token of each document (and padding)
    has none; positions restart at 0 in each document."""
    tokens = np.arange(1, sum(lengths) + 1, dtype=np.uint32)  # distinct ids: a target names its source
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    corpus = Corpus(tokens, np.ones_like(tokens, dtype=np.uint8), offsets, "k", ())
    packing = pack(corpus.lengths(), range(len(lengths)), seq_len)
    batch = make_batch(corpus, packing.rows, seq_len, pad_id=0)
    positions = document_positions(batch.documents)
    for r, row in enumerate(packing.rows):
        o = 0
        for doc, start, end in row:
            n = end - start
            assert batch.tokens[r, o : o + n].tolist() == tokens[offsets[doc] + start : offsets[doc] + end].tolist()
            assert batch.targets[r, o : o + n - 1].tolist() == batch.tokens[r, o + 1 : o + n].tolist()
            assert batch.targets[r, o + n - 1] == IGNORE_INDEX
            assert positions[r, o : o + n].tolist() == list(range(n))
            o += n
        assert (batch.targets[r, o:] == IGNORE_INDEX).all()
    assert batch.n_targets() == sum(end - start - 1 for row in packing.rows for _, start, end in row)


def test_batches_continue_across_epochs_and_resume_from_a_position(tmp_path, tokenizer):
    corpus = load_corpus(ROOT / "corpus" / "tinytales.txt", tokenizer, tmp_path / "cache")
    docs = np.arange(40)
    one = Batches(corpus, docs, 64, 8, seed=1, pad_id=tokenizer.pad_id)
    n_rows = len(one.packing(0).rows)
    stream = [one.next_batch() for _ in range(2 * n_rows // 8 + 2)]  # past two epochs' ends
    assert one.position.epoch == 2
    assert one.packing(0).rows != one.packing(1).rows  # a new order each epoch
    again = Batches(corpus, docs, 64, 8, seed=1, pad_id=tokenizer.pad_id)
    for _ in range(5):
        again.next_batch()
    resumed = Batches(corpus, docs, 64, 8, seed=1, pad_id=tokenizer.pad_id, position=again.position)
    assert all(resumed.next_batch().tokens.equal(b.tokens) for b in stream[5:])


def test_shipped_corpus_is_what_its_script_writes(tmp_path):
    """corpus/tinytales.txt is tools/make_corpus.py's output, byte for byte (and small enough to ship)."""
    from tools.make_corpus import make_corpus

    make_corpus(str(tmp_path / "tales.txt"))
    shipped = (ROOT / "corpus" / "tinytales.txt").read_bytes()
    assert (tmp_path / "tales.txt").read_bytes() == shipped and len(shipped) < 300_000
