"""The model on its own: configuration, shapes, loading, the training path."""

import json
import math

import pytest
import torch

from microllama.args import ffn_hidden_dim
from microllama.checkpoint.family import REGISTRY, TINY
from microllama.checkpoint.load import CheckpointError, load_model
from microllama.checkpoint.tiny import SHA256, make_tiny
from microllama.model import (
    KVCache,
    ModelArgs,
    RopeScaling,
    Transformer,
    causal_mask,
    precompute_freqs_cis,
)

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(**{**SMALL, **overrides})).eval()


@pytest.mark.parametrize(
    ("field", "value"),
    [("dim", 0), ("n_layers", -1), ("n_heads", 0), ("vocab_size", 0), ("max_seq_len", 0), ("norm_eps", 0.0),
     ("dim", 30), ("n_kv_heads", 3), ("ffn_dim_multiplier", -1.0), ("rope_high_freq_factor", 0.5),
     ("dim", 32.0), ("n_layers", 2.5), ("n_heads", True), ("use_scaled_rope", "false"), ("flash", 1),
     ("rope_theta", float("inf")), ("norm_eps", float("nan")), ("rope_original_context", 8192.0),
     ("rope_scale_factor", "8"), ("ffn_dim_multiplier", float("nan"))],
)  # fmt: skip
def test_model_args_reject_impossible_values_and_wrong_types_naming_the_field(field, value):
    """Through params.json keys, as a checkpoint gives them: ints are ints, booleans booleans, numbers finite."""
    name = {key: attr for attr, key in RopeScaling.PARAMS_KEYS.items()}.get(field, field)  # RopeScaling's own
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        ModelArgs.from_params({**SMALL, field: value})


def test_model_args_read_meta_params_ignoring_unknown_keys():
    params = {**REGISTRY["tiny"].params, "some_future_key": 1, "vision_chunk_size": -1}
    args = ModelArgs.from_params(params, max_seq_len=128)
    assert (args.dim, args.n_kv_heads, args.max_seq_len, args.use_scaled_rope) == (64, 2, 128, True)


def test_n_kv_heads_defaults_to_n_heads():
    assert ModelArgs(dim=32, n_heads=4).n_kv_heads == 4


def test_parameter_names_are_meta_checkpoint_keys():
    keys = set(small_model(n_layers=1).state_dict())
    layer = {f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
    layer |= {f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    layer |= {"layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"}
    assert keys == layer | {"tok_embeddings.weight", "norm.weight", "output.weight"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_returns_float32_logits_of_shape_bsz_seqlen_vocab(dtype):
    model = small_model().to(dtype)
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32


def test_training_forward_allocates_no_cache_and_backpropagates():
    model = small_model().train()
    tokens = torch.randint(0, 97, (2, 16))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert all(layer.attention.cache is None for layer in model.layers)
    assert not any(name.startswith("layers.0.attention.cache") for name, _ in model.named_buffers())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_loss_is_mean_cross_entropy_skipping_ignore_index():
    model = small_model()
    tokens, targets = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    targets[0, :4] = -100
    logits = model(tokens)
    keep = targets != -100
    expected = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(model.loss(tokens, targets), expected)


def test_setup_cache_then_clear_cache_leaves_no_cache():
    model = small_model()
    model.setup_cache(2, 32)
    assert model.layers[1].attention.cache.cache_k.shape == (2, 32, 2, 8)
    assert "layers.0.attention.cache.cache_k" not in model.state_dict()  # never saved with the weights
    model.clear_cache()
    assert all(layer.attention.cache is None for layer in model.layers)


def test_kv_cache_reports_its_capacity():
    cache = KVCache(3, 40, n_kv_heads=2, head_dim=8)
    assert (cache.max_batch_size, cache.max_seq_len) == (3, 40)
    assert cache.cache_k.shape == cache.cache_v.shape == (3, 40, 2, 8)


def test_kv_cache_context_allocates_in_every_layer_and_frees_on_exit():
    model = small_model()
    with model.kv_cache(2, 32):
        assert all((layer.attention.cache.max_batch_size, layer.attention.cache.max_seq_len) == (2, 32)
                   for layer in model.layers)  # fmt: skip
        model(torch.zeros(2, 5, dtype=torch.long), 0)
        model(torch.zeros(2, 1, dtype=torch.long), 5)
    assert all(layer.attention.cache is None for layer in model.layers)


def test_kv_cache_context_frees_the_cache_when_the_block_raises():
    model = small_model()
    with pytest.raises(RuntimeError, match="inside the block"), model.kv_cache(2, 32):
        raise RuntimeError("inside the block")
    assert all(layer.attention.cache is None for layer in model.layers)


def test_forward_rejects_start_pos_without_cache_and_positions_past_max_seq_len():
    model = small_model()
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=3)
    with pytest.raises(ValueError, match="model's limit of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_forward_rejects_a_batch_or_positions_beyond_the_cache_capacity():
    model = small_model()
    with model.kv_cache(2, 16):
        with pytest.raises(ValueError, match="batch of 3 exceeds the KV cache's max_batch_size 2"):
            model(torch.zeros(3, 4, dtype=torch.long), 0)
        with pytest.raises(ValueError, match=r"positions up to 18 exceed the KV cache's limit of 16"):
            model(torch.zeros(2, 8, dtype=torch.long), 10)
        model(torch.zeros(2, 16, dtype=torch.long), 0)  # exactly the capacity is fine


def test_ffn_hidden_dim_follows_meta_sizing_for_llama31_8b():
    # Meta-Llama-3.1-8B: dim 4096, multiple_of 1024, ffn_dim_multiplier 1.3 -> w1 is 14336 x 4096.
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336
    assert ffn_hidden_dim(64, 32, 1.3) == 224


def test_tiny_rope_frequencies_fall_in_all_three_scaling_regimes():
    """Wavelengths below 2048 (kept), between 2048 and 8192 (interpolated), above 8192 (divided)."""
    args = ModelArgs.from_params(REGISTRY["tiny"].params)
    unscaled = precompute_freqs_cis(args.head_dim, 2, args.rope_theta)[1].angle()
    wavelen = 2 * math.pi / unscaled
    assert (wavelen < 2048).any() and ((wavelen > 2048) & (wavelen < 8192)).any() and (wavelen > 8192).any()


@pytest.mark.parametrize("name", TINY)
def test_tiny_checkpoint_bytes_equal_recorded_sha256(tmp_path, name):
    out = make_tiny(tmp_path / name, name)
    assert (out / "sha256.txt").read_text().strip() == SHA256[name]
    assert json.loads((out / "params.json").read_text()) == REGISTRY[name].params
    assert {v.dtype for v in torch.load(out / "consolidated.00.pth", weights_only=True).values()} == {torch.bfloat16}


def test_meta_layout_checkpoint_loads_strict(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype="bfloat16")
    state_dict = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    assert model.load_state_dict(state_dict, strict=True)  # no missing or unexpected keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())


@pytest.fixture
def broken_ckpt(tmp_path, tiny_ckpt):
    """A copy of the tiny checkpoint with one tensor changed by `change(state_dict)`."""

    def make(change):
        state_dict = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
        change(state_dict)
        (tmp_path / "params.json").write_text((tiny_ckpt / "params.json").read_text())
        torch.save(state_dict, tmp_path / "consolidated.00.pth")
        return tmp_path

    return make


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda sd: sd.pop("layers.1.ffn_norm.weight"), "missing tensor 'layers.1.ffn_norm.weight'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "unexpected tensor 'extra'"),
        (lambda sd: sd.update({"norm.weight": torch.zeros(65)}), r"'norm.weight' has shape \(65,\)"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_bad_checkpoint_error_names_file_and_key(broken_ckpt, change, message):
    ckpt = broken_ckpt(change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(ckpt)
    assert "consolidated.00.pth" in str(e.value)


def test_missing_params_json_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="params.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_mask_hides_later_positions_only(flash, dtype):
    """Queries at positions 3, 4, 5 over keys 0..5: -inf above the diagonal of the new block, in h's dtype."""
    mask, is_causal = causal_mask(3, 3, flash, torch.zeros(1, dtype=dtype))
    inf = float("-inf")
    expected = torch.tensor([[0, 0, 0, 0, inf, inf], [0, 0, 0, 0, 0, inf], [0, 0, 0, 0, 0, 0]], dtype=dtype)
    assert not is_causal and mask.dtype == dtype and torch.equal(mask, expected)


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
def test_causal_mask_is_left_to_sdpa_only_for_a_flash_prefill_from_position_0(flash):
    like = torch.zeros(1)
    assert causal_mask(1, 7, flash, like) == (None, False)  # one new token sees every key so far
    mask, is_causal = causal_mask(4, 0, flash, like)
    assert (mask is None, is_causal) == ((True, True) if flash else (False, False))


@pytest.mark.parametrize("flash", [False, True], ids=["default", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_causal_mask_at_a_tensor_position_spans_the_static_cache_and_hides_its_later_slots(flash, dtype):
    """compiled.py's step: one token at position 2 of a 5-slot static cache sees slots 0..2, in h's dtype."""
    mask, is_causal = causal_mask(1, torch.tensor([2]), flash, torch.zeros(1, dtype=dtype), capacity=5)
    expected = torch.tensor([[0, 0, 0, float("-inf"), float("-inf")]], dtype=dtype)
    assert not is_causal and mask.dtype == dtype and torch.equal(mask, expected)


def test_training_after_inference_mode_use_backpropagates():
    """The RoPE table made under inference_mode (generation) is not reused by a training forward."""
    model = small_model().train()
    tokens = torch.randint(0, 97, (2, 16))
    with torch.inference_mode():
        model(tokens)
    model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_kv_cache_larger_than_max_seq_len_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="max_seq_len 64"):
        model.setup_cache(1, 65)
    assert all(layer.attention.cache is None for layer in model.layers)
