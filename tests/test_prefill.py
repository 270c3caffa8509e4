"""A KV cache that cannot fit the device's memory is refused in one line before it is allocated; its size is said."""

import re

import pytest
import torch

from microllama import memory
from microllama.args import ModelArgs
from microllama.checkpoint.family import kv_cache_bytes_per_token
from microllama.cli import main
from microllama.generation import Llama
from tests.strategies import SMALL_VOCAB, SmallVocabTokenizer, random_transformer

SMALL = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=SMALL_VOCAB, multiple_of=8,
                  use_scaled_rope=True, max_seq_len=64, max_batch_size=4)  # fmt: skip


def test_a_kv_cache_that_cannot_fit_is_refused_in_one_line_and_nothing_allocated(monkeypatch):
    args = SMALL
    model = random_transformer(args, 0)
    nbytes = model.check_cache_fits(args.max_batch_size, args.max_seq_len)
    # Keys and values, per layer, per position and sequence: info's per-token figure.
    assert nbytes == kv_cache_bytes_per_token(args, torch.float32) * args.max_batch_size * args.max_seq_len
    monkeypatch.setattr(memory, "available_bytes", lambda device: nbytes - 1)
    with pytest.raises(ValueError) as refused:
        model.setup_cache(args.max_batch_size, args.max_seq_len)
    message = str(refused.value)
    assert message == (
        f"a KV cache of 4 x 64 positions in float32 takes 64.0 KiB ({nbytes:,} bytes), more than the "
        "64.0 KiB available on cpu: lower max_seq_len or max_batch_size"
    )
    assert all(layer.attention.cache is None for layer in model.layers)
    with pytest.raises(ValueError, match="a KV cache of 4 x 64 positions"):
        Llama(model, SmallVocabTokenizer())
    monkeypatch.setattr(memory, "available_bytes", lambda device: nbytes)  # exactly enough
    with model.kv_cache(args.max_batch_size, args.max_seq_len):
        assert model.layers[0].attention.cache.cache_k.shape == (4, 64, args.n_kv_heads, args.head_dim)


def test_available_memory_on_the_cpu_is_at_most_the_machine_s():
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < memory.available_bytes("cpu") <= total


@pytest.mark.gpu
def test_available_memory_on_cuda_is_at_most_the_card_s():
    free, total = torch.cuda.mem_get_info()
    assert free <= memory.available_bytes("cuda") <= total


def test_generate_refuses_a_max_seq_len_whose_kv_cache_exceeds_memory_in_one_line(capsys, tokenizer):
    """A real refusal (no machine has 186 TiB): had the cache been allocated first, this would be an
    out-of-memory error, not a line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompts", '["a", "b", "c", "d"]', "--max_seq_len", "100000000000"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out == "" and captured.err.count("\n") == 1
    assert re.fullmatch(r"microllama: error: a KV cache of 4 x 100,000,000,000 positions in float32 takes 186\.3 "
                        r"TiB \(204,800,000,000,000 bytes\), more than the [\d.]+ [KMG]iB available on cpu: lower "
                        r"max_seq_len or max_batch_size\n", captured.err), captured.err  # fmt: skip


def test_generate_says_the_kv_cache_size(capsys, tokenizer):
    main(["generate", "--prompt", "Hello", "--temperature", "0", "--max_gen_len", "4"])
    assert capsys.readouterr().err == "KV cache: 256.0 KiB for 1 x 512 positions in float32 (512 B per position)\n"
