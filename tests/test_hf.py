"""Hugging Face layout: import and export are lossless, RoPE pairing is converted correctly, and (when
transformers is installed) LlamaForCausalLM computes what microllama computes on the same weights."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from microllama.checkpoint import family
from microllama.checkpoint.hf_layout import (
    INDEX,
    config_from_params,
    params_from_config,
    permute_rotary,
    read_config,
    save_hf,
)
from microllama.checkpoint.load import convert, load_model, read_checkpoint
from microllama.checkpoint.meta_layout import load_pth, save_meta
from microllama.checkpoint.params import args_from_params
from microllama.checkpoint.tiny import tiny_state_dict
from microllama.generation import Llama
from microllama.model import apply_rotary_emb, precompute_freqs_cis
from microllama.tolerances import LOGITS_ATOL


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory, tiny_ckpt):
    return convert(tiny_ckpt, tmp_path_factory.mktemp("hf") / "tiny-hf", "hf")


def test_meta_to_hf_to_meta_is_bit_identical(tmp_path, tiny_ckpt, hf_tiny):
    back = convert(hf_tiny, tmp_path / "back", "meta")
    assert (back / "params.json").read_text() == (tiny_ckpt / "params.json").read_text()
    original, again = load_pth(tiny_ckpt / "consolidated.00.pth"), load_pth(back / "consolidated.00.pth")
    assert again.keys() == original.keys()
    for key in original:
        assert again[key].dtype == original[key].dtype and torch.equal(again[key], original[key]), key


def test_hf_layout_loads_the_same_model(tiny_ckpt, hf_tiny):
    tokens = torch.randint(0, 128256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(load_model(hf_tiny, max_seq_len=16)(tokens), load_model(tiny_ckpt, max_seq_len=16)(tokens))


def test_llama_build_takes_either_layout_by_path_alone(tiny_ckpt, hf_tiny, tokenizer):
    prompts = ["Clearly, the meaning of life is"]
    outs = [Llama.build(d, max_seq_len=32, max_batch_size=1).text_completion(prompts, 0.0, max_gen_len=8)
            for d in (tiny_ckpt, hf_tiny)]  # fmt: skip
    assert outs[0][0].tokens == outs[1][0].tokens and len(outs[0][0].tokens) == 8


def test_sharded_safetensors_with_index_load_the_same_tensors(tmp_path, tiny_ckpt):
    params = json.loads((tiny_ckpt / "params.json").read_text())
    _, original = read_checkpoint(tiny_ckpt)
    out = save_hf(original, params, tmp_path / "sharded", max_shard_bytes=8 << 20)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    assert len(files) > 1 and sorted(set(weight_map.values())) == files
    _, loaded = read_checkpoint(out)
    assert all(torch.equal(loaded[k], original[k]) for k in original)


@given(n_heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_hf_rotate_half_on_permuted_rows_is_metas_complex_rotation(n_heads, half, cols, seed):
    head_dim = 2 * half
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_heads * head_dim, cols, generator=g)
    x = torch.randn(1, 5, cols, generator=g)
    freqs_cis = precompute_freqs_cis(head_dim, 5, theta=10.0)
    q_meta = (x @ w.T).view(1, 5, n_heads, head_dim)
    meta, _ = apply_rotary_emb(q_meta, q_meta, freqs_cis)
    # transformers' rotation: x * cos + rotate_half(x) * sin, frequencies repeated over both halves
    q_hf = (x @ permute_rotary(w, n_heads, to_hf=True).T).view(1, 5, n_heads, head_dim)
    angles = torch.cat([freqs_cis.angle(), freqs_cis.angle()], dim=-1)[None, :, None, :]
    rotate_half = torch.cat([-q_hf[..., half:], q_hf[..., :half]], dim=-1)
    hf = q_hf * angles.cos() + rotate_half * angles.sin()
    back = permute_rotary(hf.reshape(5, -1).T, n_heads, to_hf=False).T.reshape(1, 5, n_heads, head_dim)
    torch.testing.assert_close(back, meta, atol=1e-5, rtol=1e-5)
    assert torch.equal(permute_rotary(permute_rotary(w, n_heads, to_hf=True), n_heads, to_hf=False), w)


def test_tied_output_is_written_once_and_read_as_the_embedding(tmp_path):
    params = {**family.REGISTRY["tiny"].params, "n_layers": 1}
    state_dict = tiny_state_dict(params, seed=3)
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"].clone()
    save_meta(state_dict, params, tmp_path / "meta")
    out = convert(tmp_path / "meta", tmp_path / "hf", "hf")
    assert read_config(out)[1] is True  # tie_word_embeddings
    model = load_model(out)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    back = convert(out, tmp_path / "back", "meta")
    assert torch.equal(load_pth(back / "consolidated.00.pth")["output.weight"], state_dict["output.weight"])


def test_rope_scaling_is_read_from_config_json(tmp_path, hf_tiny):
    for factor in (8.0, 32.0, 16.0):
        config = json.loads((hf_tiny / "config.json").read_text())
        config["rope_scaling"]["factor"] = factor
        config["rope_scaling"]["original_max_position_embeddings"] = 4096
        (tmp_path / f"f{factor}").mkdir()
        (tmp_path / f"f{factor}" / "config.json").write_text(json.dumps(config))
        (tmp_path / f"f{factor}" / "model.safetensors").symlink_to(hf_tiny / "model.safetensors")
        args, _ = read_checkpoint(tmp_path / f"f{factor}")
        assert args.use_scaled_rope and args.rope_scaling.factor == factor
        assert args.rope_scaling.original_context == 4096


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="needs transformers (the 'test' extra)")


def test_transformers_logits_equal_microllamas_within_fp32_tolerance(transformers, hf_tiny):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_tiny, dtype=torch.float32).eval()
    model = load_model(hf_tiny, max_seq_len=256)
    tokens = torch.randint(0, 128256, (2, 200), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        theirs, ours = hf_model(tokens).logits.float(), model(tokens)
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL[torch.float32], rtol=0)
    assert not torch.equal(ours, theirs)  # different RoPE arithmetic: if this fails, tighten the claim


def test_what_transformers_saves_microllama_reads_back(transformers, tmp_path, hf_tiny):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_tiny)
    written = load_file(hf_tiny / "model.safetensors")
    assert hf_model.state_dict().keys() == written.keys()
    assert all(torch.equal(t, written[k]) for k, t in hf_model.state_dict().items())  # loaded as written
    hf_model.save_pretrained(tmp_path / "saved")
    _, ours = read_checkpoint(hf_tiny)
    _, again = read_checkpoint(tmp_path / "saved")
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


# The fields of the published config.json of each model that decide its shapes and RoPE.
PUBLISHED_CONFIG_JSON = {
    "llama3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "rope_factor": 8.0, "tie": False},
    "llama3.1-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                     "num_attention_heads": 64, "num_key_value_heads": 8, "rope_factor": 8.0, "tie": False},
    "llama3.1-405b": {"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                      "num_attention_heads": 128, "num_key_value_heads": 8, "rope_factor": 8.0, "tie": False},
    "llama3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "rope_factor": 32.0, "tie": True},
    "llama3.2-3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                    "num_attention_heads": 24, "num_key_value_heads": 8, "rope_factor": 32.0, "tie": True},
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED_CONFIG_JSON)
def test_published_config_json_gives_metas_params_json_and_rope_factor(name):
    published = dict(PUBLISHED_CONFIG_JSON[name])
    factor, tie = published.pop("rope_factor"), published.pop("tie")
    rope_scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}  # fmt: skip
    config = {**published, "model_type": "llama", "hidden_act": "silu", "vocab_size": 128256, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "rope_scaling": rope_scaling, "tie_word_embeddings": tie}  # fmt: skip
    params = params_from_config(config, Path("config.json"))
    assert params == family.REGISTRY[name].params
    assert args_from_params(params, "params.json").rope_scaling.factor == factor
    assert config_from_params(params, tie, torch.bfloat16)["intermediate_size"] == published["intermediate_size"]
    assert family.REGISTRY[name].tied == tie
