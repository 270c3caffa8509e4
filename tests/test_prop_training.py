"""Laws of the training path, over whole input spaces: packed documents compute what each computes alone,
the document mask and positions, gradient accumulation and the chunked cross-entropy leave the gradient
as it was, a fresh LoRA adapter changes no bit and a merged one little, and each mode trains only its
weights. Small random models (tests/strategies.py) and the tiny checkpoint."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microllama.args import ModelArgs
from microllama.checkpoint.load import load_model
from microllama.model import causal_mask, document_positions
from microllama.tolerances import GRAD_RTOL, LOGITS_ATOL
from microllama.train.config import TrainConfig
from microllama.train.data import Batch
from microllama.train.loop import make_optimizer, select_trainable, step_loss
from microllama.train.lora import TARGETS, adapter_state_dict, apply_lora, load_adapters, merge_lora
from tests.strategies import SMALL_VOCAB, random_transformer, small_model_args, token_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@st.composite
def packed_rows(draw: st.DrawFn, max_len: int = 64) -> tuple[list[list[int]], int]:
    """Documents that fill one row of at most max_len tokens, and the row's length (padding after them)."""
    docs = draw(st.lists(token_ids(1, 24), min_size=1, max_size=5))
    while sum(map(len, docs)) > max_len:
        docs.pop()
    return docs, draw(st.integers(sum(map(len, docs)), max_len)) if docs else 1


def row_tensors(docs: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = [t for d in docs for t in d]
    ids = [i for i, d in enumerate(docs) for _ in d]
    pad = length - len(tokens)
    return torch.tensor([tokens + [0] * pad]), torch.tensor([ids + [len(docs)] * pad])


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@given(args=small_model_args(), seed=st.integers(0, 2**32 - 1), row=packed_rows())
def test_packed_row_logits_equal_each_document_alone(flash, args, seed, row):
    """Within the reshaped-sums tolerance, not bit for bit: in a longer row the attention sums over more
    (masked, zero) terms and the kernels group them otherwise (max measured: tolerances.py)."""
    docs, length = row
    if not docs:
        return
    model = random_transformer(args.replace(flash=flash), seed)
    tokens, documents = row_tensors(docs, length)
    with torch.no_grad():
        packed = model(tokens, documents=documents)[0]
        o = 0
        for doc in docs:
            alone = model(torch.tensor([doc]))[0]
            torch.testing.assert_close(packed[o : o + len(doc)], alone, atol=LOGITS_ATOL[torch.float32], rtol=0)
            o += len(doc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_row_on_tiny_checkpoint_equals_documents_alone(tiny_ckpt, dtype):
    model = load_model(tiny_ckpt, max_seq_len=128, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 128256, (n,), generator=g).tolist() for n in (37, 1, 50, 22)]
    tokens, documents = row_tensors(docs, 128)
    with torch.no_grad():
        packed, o = model(tokens, documents=documents)[0], 0
        for doc in docs:
            alone = model(torch.tensor([doc]))[0]
            torch.testing.assert_close(packed[o : o + len(doc)], alone, atol=LOGITS_ATOL[dtype], rtol=0)
            o += len(doc)


@given(documents=st.lists(st.integers(0, 3), min_size=1, max_size=20), flash=st.booleans())
def test_document_mask_lets_a_token_see_only_earlier_tokens_of_its_own_run(documents, flash):
    """A document is a run of equal ids: an id that comes back later is another document. Positions restart."""
    ids = torch.tensor([documents])
    mask, is_causal = causal_mask(len(documents), 0, flash, torch.zeros(1), ids)
    run = [sum(a != b for a, b in zip(documents, documents[1 : i + 1], strict=False)) for i in range(len(documents))]
    expected = [[0.0 if k <= q and run[k] == run[q] else float("-inf") for k in range(len(documents))]
                for q in range(len(documents))]  # fmt: skip
    assert not is_causal and mask.shape == (1, 1, len(documents), len(documents))
    assert mask[0, 0].tolist() == expected
    starts = [i for i in range(len(documents)) if i == 0 or run[i] != run[i - 1]]
    assert document_positions(ids)[0].tolist() == [i - max(s for s in starts if s <= i) for i in range(len(documents))]


@given(row=packed_rows(max_len=48))
def test_rope_positions_restart_at_zero_in_each_document(row):
    """RoPE is relative, so a shifted start barely moves the logits and the law above cannot see it: the
    rotations each block receives are checked directly, position 0 at each document's first token."""
    docs, length = row
    if not docs:
        return
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=SMALL_VOCAB, max_seq_len=48)
    model = random_transformer(args, 0)
    tokens, documents = row_tensors(docs, length)
    seen = []
    model.layers[0].attention.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[2]))
    with torch.no_grad():
        model(tokens, documents=documents)
    positions = [p for d in docs for p in range(len(d))] + list(range(length - sum(map(len, docs))))
    assert torch.equal(seen[0], model.freqs_cis(torch.device("cpu"))[torch.tensor([positions])])


def grads_of_step(model, micro_batches, chunk_size=0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainer's step: its loss (microllama.train.loop.step_loss summed) and gradients, accumulated."""
    model.zero_grad(set_to_none=True)
    batches = [Batch(*micro) for micro in micro_batches]
    n_targets = sum(b.n_targets() for b in batches)
    total = torch.zeros(())
    for batch in batches:
        loss = step_loss(model, batch, n_targets, chunk_size)
        loss.backward()
        total += loss.detach()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, expected: dict, dtype: torch.dtype) -> None:
    """Every gradient within GRAD_RTOL of the step's largest gradient element (tolerances.py says why)."""
    assert got.keys() == expected.keys()
    scale = max(g.abs().max() for g in expected.values())
    for name, g in expected.items():
        assert (got[name] - g).abs().max() <= GRAD_RTOL[dtype] * scale, name


@st.composite
def training_batch(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of packed documents with next-token targets, some ignored (prompt tokens, ends of documents)."""
    rows, seqlen = draw(st.integers(2, 5)), draw(st.integers(2, 32))
    tokens = torch.tensor(draw(st.lists(token_ids(seqlen, seqlen), min_size=rows, max_size=rows)))
    targets = torch.tensor(draw(st.lists(st.lists(st.integers(-1, SMALL_VOCAB - 1), min_size=seqlen,
                                                  max_size=seqlen), min_size=rows, max_size=rows)))  # fmt: skip
    targets[targets < 0] = -100
    targets[0, 0] = 1  # at least one target in the step
    documents = torch.tensor(draw(st.lists(st.lists(st.integers(0, 2), min_size=seqlen, max_size=seqlen),
                                           min_size=rows, max_size=rows))).sort(1).values  # fmt: skip
    return tokens, targets, documents


@given(args=small_model_args(), seed=st.integers(0, 2**32 - 1), batch=training_batch(), data=st.data())
def test_splitting_a_step_into_uneven_micro_batches_leaves_its_gradient_unchanged(args, seed, batch, data):
    model = random_transformer(args, seed).train()
    tokens, targets, documents = batch
    cuts = sorted(data.draw(st.sets(st.integers(1, len(tokens) - 1), min_size=1)))
    bounds = [0, *cuts, len(tokens)]
    micro = [(tokens[a:b], targets[a:b], documents[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    loss, expected = grads_of_step(model, [batch])
    loss_split, got = grads_of_step(model, micro)
    torch.testing.assert_close(loss_split, loss, atol=LOGITS_ATOL[torch.float32], rtol=0)
    assert_grads_close(got, expected, torch.float32)


@given(args=small_model_args(), seed=st.integers(0, 2**32 - 1), batch=training_batch(), chunk=st.integers(1, 70))
def test_chunked_cross_entropy_equals_the_plain_one_in_loss_and_gradients(args, seed, batch, chunk):
    model = random_transformer(args, seed).train()
    loss, expected = grads_of_step(model, [batch])
    loss_chunked, got = grads_of_step(model, [batch], chunk_size=chunk)
    torch.testing.assert_close(loss_chunked, loss, atol=LOGITS_ATOL[torch.float32], rtol=0)
    assert_grads_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunks_and_micro_batches_on_tiny_checkpoint(tiny_ckpt, dtype):
    model = load_model(tiny_ckpt, max_seq_len=64, dtype=dtype).train()
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 128256, (4, 64), generator=g), torch.randint(0, 128256, (4, 64), generator=g)
    targets[:, :7], targets[2, 30:] = -100, -100
    documents = torch.randint(0, 3, (4, 64), generator=g).sort(1).values
    loss, expected = grads_of_step(model, [(tokens, targets, documents)])
    for micro, chunk in [([(tokens[:1], targets[:1], documents[:1]), (tokens[1:], targets[1:], documents[1:])], 0),
                         ([(tokens, targets, documents)], 50)]:  # fmt: skip
        other_loss, got = grads_of_step(model, micro, chunk)
        torch.testing.assert_close(other_loss, loss, atol=LOGITS_ATOL[dtype], rtol=0)
        assert_grads_close(got, expected, dtype)


lora_settings = st.fixed_dictionaries({
    "rank": st.integers(1, 8),
    "alpha": st.floats(0.5, 64.0),
    "targets": st.lists(st.sampled_from(TARGETS), min_size=1, max_size=7, unique=True),
})  # fmt: skip


@given(args=small_model_args(), seed=st.integers(0, 2**32 - 1), tokens=token_ids(1, 40), lora=lora_settings)
def test_fresh_lora_gives_the_base_logits_bit_for_bit_and_merged_within_tolerance(args, seed, tokens, lora):
    model = random_transformer(args, seed)
    tokens = torch.tensor([tokens])
    with torch.no_grad():
        base = model(tokens)
        adapters = apply_lora(model, lora["rank"], lora["alpha"], 0.0, lora["targets"])
        assert torch.equal(model(tokens), base)  # B starts at zero: the update is exactly zero
        for b in adapters[1::2]:
            b.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed))
        unmerged = model(tokens)
        merge_lora(model)
        assert {n.rsplit(".", 1)[-1] for n in model.state_dict()} == {"weight"}  # Meta's keys again
        torch.testing.assert_close(model(tokens), unmerged, atol=LOGITS_ATOL[torch.float32], rtol=0)


def test_lora_adapters_save_and_load_alone():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=SMALL_VOCAB, max_seq_len=16)
    trained, fresh = random_transformer(args, 1), random_transformer(args, 1)
    for model in (trained, fresh):
        apply_lora(model, 4, 8.0, 0.0, ["wq", "wv", "w2"])
    with torch.no_grad():
        for p in adapter_state_dict(trained).values():
            p.normal_()
    saved = adapter_state_dict(trained)
    assert len(saved) == 2 * 3 * args.n_layers
    load_adapters(fresh, saved)
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(fresh(tokens), trained(tokens))
    with pytest.raises(ValueError, match=r"missing LoRA adapter layers\.0\.attention\.wq\.lora_a"):
        load_adapters(fresh, {k: v for k, v in saved.items() if "attention.wq" not in k})


@pytest.mark.parametrize("mode", ["norms", "lora", "full"])
@settings(max_examples=10)
@given(args=small_model_args(), seed=st.integers(0, 2**32 - 1), batch=training_batch())
def test_each_mode_changes_only_its_own_weights(mode, args, seed, batch):
    """After AdamW steps (with weight decay): norms changes only RMSNorm weights; lora only the adapters of
    its targets; full everything."""
    model = random_transformer(args, seed).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(data="-", mode=mode, weight_decay=0.1, lr=1e-2, lora_targets=["wq", "w2"])
    params = select_trainable(model, cfg)
    optimizer = make_optimizer(params, cfg, torch.device("cpu"))
    for _ in range(2):
        grads_of_step(model, [batch])
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    if mode == "norms":
        assert changed == {k for k in before if k.endswith("norm.weight")}
    elif mode == "lora":
        assert changed == {k for k in after if k.endswith((".wq.lora_a", ".wq.lora_b", ".w2.lora_a", ".w2.lora_b"))}
    else:
        assert changed == set(before)
