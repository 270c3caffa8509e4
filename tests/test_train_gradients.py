"""One forward and backward of microllama against Meta's reference Transformer (its forward run without the
torch.inference_mode it is wrapped in) and against transformers' LlamaForCausalLM with labels, on the tiny
checkpoint: the loss and every parameter's gradient."""

import pytest
import torch
import torch.nn.functional as F

from microllama.checkpoint.hf_layout import hf_name, permute_rotary
from microllama.checkpoint.load import convert, load_model
from microllama.tolerances import GRAD_RTOL, LOGITS_ATOL
from reference_harness.meta import meta_loss, meta_transformer

DTYPES = [torch.float32, torch.bfloat16]


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and next-token targets with some positions ignored (as packing and SFT masking leave them)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128256, (2, 48), generator=g)
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], 1)
    targets[0, :9] = -100
    targets[1, 30:34] = -100
    return tokens, targets


@pytest.mark.reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_and_every_gradient_bit_identical_to_meta(tiny_ckpt, dtype):
    meta = meta_transformer(tiny_ckpt, dtype, max_seq_len=64, max_batch_size=2)
    ours = load_model(tiny_ckpt, max_seq_len=64, dtype=dtype).train()
    tokens, targets = batch()
    expected = meta_loss(meta, tokens, targets)
    expected.backward()
    loss = ours.loss(tokens, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
    meta_grads = {name: p.grad for name, p in meta.named_parameters()}
    assert meta_grads.keys() == {name for name, _ in ours.named_parameters()}
    differing = [name for name, p in ours.named_parameters() if not torch.equal(p.grad, meta_grads[name])]
    assert differing == []
    assert all(p.grad.abs().max() > 0 for p in ours.parameters())  # every weight is reached


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory, tiny_ckpt):
    return convert(tiny_ckpt, tmp_path_factory.mktemp("hf") / "tiny-hf", "hf")


def test_loss_and_gradients_equal_transformers_within_fp32_tolerance(hf_tiny, tiny_ckpt):
    """transformers computes RoPE another way (tolerances.py): equal within the float32 tolerances, not bits.
    Its labels are the tokens themselves (it shifts them); -100 marks the ignored ones as ours does."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (the 'test' extra)")
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_tiny, dtype=torch.float32).train()
    ours = load_model(tiny_ckpt, max_seq_len=64).train()
    tokens, targets = batch(1)
    labels = torch.cat([torch.full((2, 1), -100), targets[:, :-1]], 1)  # labels[i + 1] = targets[i]
    expected = theirs(input_ids=tokens, labels=labels).loss
    expected.backward()
    loss = ours.loss(tokens, targets)
    loss.backward()
    torch.testing.assert_close(loss, expected, atol=LOGITS_ATOL[torch.float32], rtol=0)
    hf_params = dict(theirs.named_parameters())
    heads = {"wq": ours.params.n_heads, "wk": ours.params.n_kv_heads}
    scale = max(p.grad.abs().max() for p in ours.parameters())
    for name, p in ours.named_parameters():
        grad = hf_params[hf_name(name)].grad
        kind = name.split(".")[-2]
        if kind in heads:  # transformers' rows of wq and wk are in its RoPE pairing: put back in Meta's
            grad = permute_rotary(grad, heads[kind], to_hf=False)
        assert (p.grad - grad).abs().max() <= GRAD_RTOL[torch.float32] * scale, name
    assert not torch.equal(loss, expected) or not all(
        torch.equal(p.grad, hf_params[hf_name(n)].grad) for n, p in ours.named_parameters()
    )  # different RoPE arithmetic: if this fails, tighten the claim


def test_cross_entropy_sum_over_targets_is_the_mean_times_their_count(tiny_ckpt):
    """reduction="sum" (what a training step divides by the step's own count) is F.cross_entropy's sum."""
    model = load_model(tiny_ckpt, max_seq_len=64)
    tokens, targets = batch(2)
    with torch.no_grad():
        logits = model(tokens).flatten(0, 1)
        assert torch.equal(model.loss(tokens, targets, reduction="sum"),
                           F.cross_entropy(logits, targets.flatten(), reduction="sum"))  # fmt: skip
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        model.loss(tokens, targets, reduction="none")
