"""The Llama 3.1 / 3.2 registry, its sizes, `microllama info`, and the RoPE factor of Llama 3.2."""

import json

import pytest
import torch

from microllama.args import ModelArgs, RopeScaling
from microllama.checkpoint import family
from microllama.checkpoint.load import read_checkpoint
from microllama.checkpoint.meta_layout import save_meta
from microllama.checkpoint.params import args_from_params
from microllama.checkpoint.tiny import tiny_state_dict
from microllama.cli import main
from microllama.model import Transformer, precompute_freqs_cis

# Parameter counts as published with the weights (the safetensors metadata of each Hugging Face repo).
PUBLISHED_PARAMETERS = {
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,  # output tied to the embedding
    "llama3.2-3b": 3_212_749_824,  # output tied to the embedding
}
META_DESCRIPTORS = {"llama3.1-8b": "Llama3.1-8B", "llama3.1-70b": "Llama3.1-70B", "llama3.1-405b": "Llama3.1-405B",
                    "llama3.2-1b": "Llama3.2-1B", "llama3.2-3b": "Llama3.2-3B"}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_parameter_count_matches_published_figure(name):
    assert (
        family.parameter_count(family.model_args(name), tied=family.REGISTRY[name].tied) == PUBLISHED_PARAMETERS[name]
    )


def meta_device_parameter_count(args: ModelArgs, tied: bool) -> int:
    """The parameters of microllama's Transformer built on the meta device (no memory), the output tied to the
    embedding if asked: then one tensor, which parameters() yields once."""
    with torch.device("meta"):
        model = Transformer(args)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "args",
    [pytest.param(family.model_args(name), id=name) for name in family.REGISTRY]
    + [pytest.param(ModelArgs(dim=96, n_layers=3, n_heads=6, vocab_size=101, multiple_of=16), id="mha-no-multiplier")],
)
def test_parameter_count_arithmetic_is_the_meta_device_models(args, tied):
    """Every registered configuration (grouped-query, tiny ones included) and one with as many key/value heads
    as query heads and no ffn_dim_multiplier, the output tied and not."""
    assert family.parameter_count(args, tied) == meta_device_parameter_count(args, tied)


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b", "tiny", "tiny-kv4"])
def test_weight_shapes_arithmetic_is_the_meta_device_models_state_dict(name):
    """family.weight_shapes (what info's weight bytes, quantized or not, are summed over): the names, their
    order and the shapes of the meta-device model's state_dict."""
    args = family.model_args(name)
    with torch.device("meta"):
        expected = [(k, tuple(v.shape)) for k, v in Transformer(args).state_dict().items()]
    assert list(family.weight_shapes(args).items()) == expected


@pytest.mark.reference
@pytest.mark.parametrize("name", META_DESCRIPTORS)
def test_registry_is_metas_params_json(name):
    from reference_harness.meta import meta_arch_args

    assert family.REGISTRY[name].params == meta_arch_args(META_DESCRIPTORS[name])


def test_kv_cache_bytes_per_token_of_8b_in_bf16_is_128_kib():
    # 2 (k and v) * 32 layers * 8 kv heads * 128 head_dim * 2 bytes
    assert family.kv_cache_bytes_per_token(family.model_args("llama3.1-8b")) == 128 * 1024
    assert {name: getattr(torch, name).itemsize for name in family.DTYPE_BYTES} == family.DTYPE_BYTES


def test_published_rope_factor_is_the_default_and_params_json_overrides_it():
    params = family.REGISTRY["llama3.2-1b"].params  # Meta's file
    assert args_from_params(params, "params.json").rope_scaling.factor == 32.0
    assert args_from_params({**params, "rope_scale_factor": 8.0}, "params.json").rope_scaling.factor == 8.0
    assert args_from_params(family.REGISTRY["llama3.1-8b"].params, "params.json").rope_scaling.factor == 8.0
    assert args_from_params(family.REGISTRY["tiny"].params, "params.json").rope_scaling.factor == 8.0


def test_rope_factors_8_and_32_agree_on_high_frequencies_and_differ_on_low_ones():
    head_dim, end = 64, 4096  # Llama 3.2 1B's head_dim
    f8, f32 = (precompute_freqs_cis(head_dim, end, 500000.0, True, scaling=RopeScaling(factor=s)) for s in (8.0, 32.0))
    wavelen = 2 * torch.pi * 500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    kept = wavelen < 8192 / 4  # shorter than original context / high_freq_factor: never scaled
    assert kept.any() and not kept.all()
    assert torch.equal(f8[:, kept], f32[:, kept])
    assert torch.equal(f8[0], f32[0])  # position 0 is not rotated at all
    assert not torch.isclose(f8[1:, ~kept], f32[1:, ~kept]).all(dim=0).any()


@pytest.mark.reference
def test_metas_reference_scales_by_8_where_llama_3_2_publishes_32():
    from reference_harness.meta import import_meta

    metas = import_meta().model.precompute_freqs_cis(64, 4096, 500000.0, True)
    assert torch.equal(metas, precompute_freqs_cis(64, 4096, 500000.0, True, scaling=RopeScaling(factor=8.0)))
    assert not torch.equal(metas, precompute_freqs_cis(64, 4096, 500000.0, True, scaling=RopeScaling(factor=32.0)))


def test_rope_factor_changes_logits_after_position_0_only():
    params = {**family.REGISTRY["tiny"].params, "n_layers": 1}
    state_dict = tiny_state_dict(params, seed=5)
    tokens = torch.randint(0, 128256, (1, 64), generator=torch.Generator().manual_seed(5))
    logits = []
    for factor in (8.0, 32.0):
        with torch.device("meta"):
            model = Transformer(args_from_params({**params, "rope_scale_factor": factor}, "test", max_seq_len=64))
        model.load_state_dict(state_dict, assign=True)
        with torch.inference_mode():
            logits.append(model.float()(tokens))
    assert torch.equal(logits[0][:, 0], logits[1][:, 0])
    assert not torch.equal(logits[0][:, -1], logits[1][:, -1])


def test_info_prints_config_parameters_and_kv_cache(capsys, tmp_path):
    main(["info", "llama3.2-1b"])
    out = capsys.readouterr().out
    assert "parameters  1,235,814,400 (output tied to the embedding)" in out
    assert "factor 32" in out and "KV cache 32.0 KiB per token, 4.0 GiB for the full 131,072-token context" in out
    params = {**family.REGISTRY["tiny"].params, "n_layers": 1}
    save_meta(tiny_state_dict(params, seed=0), params, tmp_path / "ckpt")
    main(["info", str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    n = sum(t.numel() for t in read_checkpoint(tmp_path / "ckpt")[1].values())
    assert f"parameters  {n:,}" in out and f"stored      bfloat16 {n * 2 / 2**20:.1f} MiB ({n * 2:,} bytes)" in out
    assert json.loads((tmp_path / "ckpt" / "params.json").read_text()) == params
