"""Each kind of bad checkpoint gives one error naming the file and the key; nothing loads half-way."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from microllama.checkpoint.family import REGISTRY
from microllama.checkpoint.load import CheckpointError, convert, load_model
from microllama.checkpoint.tiny import tiny_state_dict
from microllama.cli import main
from microllama.generation import Llama

PARAMS = {**REGISTRY["tiny"].params, "n_layers": 1}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A one-layer tiny checkpoint in both layouts: {'meta': dir, 'hf': dir}."""
    root = tmp_path_factory.mktemp("good")
    (root / "meta").mkdir()
    (root / "meta" / "params.json").write_text(json.dumps(PARAMS))
    torch.save(tiny_state_dict(PARAMS, seed=7), root / "meta" / "consolidated.00.pth")
    return {"meta": root / "meta", "hf": convert(root / "meta", root / "hf", "hf")}


def edited(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint src whose single weights file went through edit(tensors) -> tensors (read from
    src: rewriting a file that is memory-mapped would pull pages from under the mapping)."""
    shutil.copytree(src, dst)
    if (src / "consolidated.00.pth").exists():
        torch.save(edit(torch.load(src / "consolidated.00.pth", weights_only=True)), dst / "consolidated.00.pth")
    else:
        save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
    return dst


def test_directory_without_params_or_config_json(tmp_path):
    shutil.copyfile(__file__, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"no params\.json .* and no config\.json"):
        load_model(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "absent")


KEYS = {"meta": "layers.0.attention.wk.weight", "hf": "model.layers.0.self_attn.k_proj.weight"}
FILES = {"meta": "consolidated.00.pth", "hf": "model.safetensors"}


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_missing_tensor_is_named(tmp_path, good, layout):
    key = KEYS[layout]
    ckpt = edited(good[layout], tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"{FILES[layout]}: missing tensor '{key}'"):
        load_model(ckpt)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_unexpected_tensor_is_named(tmp_path, good, layout):
    ckpt = edited(good[layout], tmp_path / "c", lambda t: {**t, "rope.freqs": torch.zeros(8)})
    with pytest.raises(CheckpointError, match=rf"{FILES[layout]}: unexpected tensor 'rope.freqs'"):
        load_model(ckpt)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_mis_shaped_tensor_is_named_with_both_shapes(tmp_path, good, layout):
    key = KEYS[layout]
    ckpt = edited(good[layout], tmp_path / "c", lambda t: {**t, key: t[key][:-16].clone()})
    config = "params.json" if layout == "meta" else "config.json"
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \(16, 64\), {config} implies \(32, 64\)"):
        load_model(ckpt)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_truncated_weights_file_is_refused(tmp_path, good, layout):
    ckpt = shutil.copytree(good[layout], tmp_path / "c")
    path = ckpt / FILES[layout]
    os.truncate(path, path.stat().st_size // 2)
    message = {
        "meta": "a truncated or damaged torch.save archive",
        "hf": r"not a complete safetensors file \(truncated",
    }
    with pytest.raises(CheckpointError, match=rf"{FILES[layout]}: {message[layout]}"):
        load_model(ckpt)


def test_pth_whose_header_is_overwritten_is_one_line_naming_it_damaged(tmp_path, good, capsys):
    ckpt = shutil.copytree(good["meta"], tmp_path / "c")
    with open(ckpt / "consolidated.00.pth", "r+b") as f:
        f.write(b"\x00" * 64)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_dir", str(ckpt)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        f"microllama: error: {ckpt / 'consolidated.00.pth'}: a damaged torch.save archive: its zip header is "
        f"overwritten (it begins {bytes(4)!r})\n"
    )


class RunsCode:
    """Unpickling this calls os.system: what a hostile .pth could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pth_whose_unpickling_would_run_code_is_refused(tmp_path, good):
    marker = tmp_path / "code-ran"
    ckpt = edited(good["meta"], tmp_path / "c", lambda t: {**t, "norm.weight": RunsCode(marker)})
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused to unpickle"):
        load_model(ckpt)
    assert not marker.exists()


def test_vocab_size_other_than_the_tokenizers_is_refused(tmp_path, tokenizer):
    params = {**PARAMS, "vocab_size": 1000}
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save(tiny_state_dict(params, seed=0), tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"params\.json: vocab_size 1000 differs from the tokenizer's 128256"):
        Llama.build(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"n_heads": 3}, r"params\.json: ModelArgs\.dim \(64\) must be divisible by n_heads \(3\)"),
        ({"dim": "64"}, r"params\.json: .*"),
    ],
)
def test_invalid_params_json_names_the_file(tmp_path, good, change, message):
    ckpt = shutil.copytree(good["meta"], tmp_path / "c")
    (ckpt / "params.json").write_text(json.dumps({**PARAMS, **change}))
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_config_json_without_a_required_key_names_it(tmp_path, good):
    ckpt = shutil.copytree(good["hf"], tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    del config["intermediate_size"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: missing key 'intermediate_size'"):
        load_model(ckpt)


def test_index_naming_an_absent_file_is_refused(tmp_path, good):
    ckpt = shutil.copytree(good["hf"], tmp_path / "c")
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json names model-00002-of-00002\.safetensors, which is not"):
        load_model(ckpt)


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(tmp_path)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("microllama: error: ") and "no params.json" in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": 64.0}, r"ModelArgs\.dim must be an integer, got 64\.0"),
        ({"n_layers": 2.5}, r"ModelArgs\.n_layers must be an integer, got 2\.5"),
        ({"n_heads": True}, r"ModelArgs\.n_heads must be an integer, got True"),
        ({"use_scaled_rope": "false"}, r"ModelArgs\.use_scaled_rope must be true or false, got 'false'"),
        ({"rope_theta": float("inf")}, r"ModelArgs\.rope_theta must be a finite number, got inf"),
        ({"norm_eps": float("nan")}, r"ModelArgs\.norm_eps must be a finite number, got nan"),
        ({"rope_scale_factor": "32"}, r"RopeScaling\.factor must be a finite number, got '32'"),
    ],
    ids=["float-dim", "fractional-layers", "bool-heads", "string-bool", "infinite-theta", "nan-eps", "string-factor"],
)
def test_params_json_of_the_wrong_type_is_one_error_naming_file_and_field(tmp_path, good, change, message):
    ckpt = shutil.copytree(good["meta"], tmp_path / "c")
    (ckpt / "params.json").write_text(json.dumps({**PARAMS, **change}))  # json writes inf and nan as Infinity, NaN
    with pytest.raises(CheckpointError, match=rf"params\.json: {message}"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_attention_heads": "4"}, 'num_attention_heads must be a positive integer, got "4"'),
        ({"hidden_size": 64.0}, "hidden_size must be a positive integer, got 64.0"),
        ({"rope_scaling": "llama3"}, 'rope_scaling must be a JSON object or null, got "llama3"'),
        ({"rms_norm_eps": "1e-5"}, 'rms_norm_eps must be a finite number, got "1e-5"'),
        ({"tie_word_embeddings": "false"}, 'tie_word_embeddings must be true or false, got "false"'),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite number, got Infinity"),
    ],
    ids=["zero-heads", "string-heads", "float-hidden", "string-rope-scaling", "string-eps", "string-tie", "inf-theta"],
)
def test_config_json_of_the_wrong_type_is_one_error_naming_file_and_key(tmp_path, good, change, message):
    ckpt = shutil.copytree(good["hf"], tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    if "rope_theta" in change:
        config["rope_scaling"]["rope_theta"] = change.pop("rope_theta")
    (ckpt / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        load_model(ckpt)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_integer_weights_are_refused_not_cast(tmp_path, good, layout):
    key = KEYS[layout]
    ckpt = edited(good[layout], tmp_path / "c", lambda t: {**t, key: t[key].to(torch.int8)})
    with pytest.raises(CheckpointError, match=rf"{FILES[layout]}: tensor '{key}' is torch\.int8"):
        load_model(ckpt)


@pytest.mark.parametrize("layout", ["meta", "hf"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_holding_nan_or_infinity_is_refused(tmp_path, good, layout, value):
    key = KEYS[layout]

    def poison(t):
        w = t[key].clone()
        w[3, 5] = value
        return {**t, key: w}

    ckpt = edited(good[layout], tmp_path / "c", poison)
    with pytest.raises(
        CheckpointError, match=rf"{FILES[layout]}: tensor '{key}' holds {value} at flat index {3 * 64 + 5}"
    ):
        load_model(ckpt, dtype=torch.bfloat16)


@pytest.fixture
def two_shards(tmp_path, good):
    return convert(good["meta"], tmp_path / "mp2", "meta", shards=2)


def test_shards_of_mixed_dtypes_are_refused(two_shards):
    shard = torch.load(two_shards / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"].float()
    torch.save(shard, two_shards / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: tensor 'norm.weight' is torch\.float32, but "):
        load_model(two_shards)


def test_shard_numbers_with_a_gap_are_refused(two_shards):
    (two_shards / "consolidated.01.pth").rename(two_shards / "consolidated.05.pth")
    with pytest.raises(CheckpointError, match=r"2 \*\.pth files \(consolidated\.00\.pth, consolidated\.05\.pth\).*"
                       r"consolidated\.00\.pth \.\.\. consolidated\.01\.pth"):  # fmt: skip
        load_model(two_shards)


def test_convert_to_hf_refuses_a_shard_count(tmp_path, good):
    with pytest.raises(ValueError, match="--shards splits Meta's layout"):
        convert(good["meta"], tmp_path / "hf2", "hf", shards=2)
    assert not (tmp_path / "hf2").exists()


def test_tokenizer_env_naming_a_missing_file_is_an_error(tmp_path, monkeypatch):
    from microllama.tokenizer import TOKENIZER_ENV, Tokenizer

    monkeypatch.setenv(TOKENIZER_ENV, str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match=r"\$MICROLLAMA_TOKENIZER names .*nope\.model, which is not a file"):
        Tokenizer()


def test_garbage_tokenizer_model_names_the_file(tmp_path):
    from microllama.tokenizer import Tokenizer

    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a tiktoken BPE file"):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_text("")
    with pytest.raises(ValueError, match=r"tokenizer\.model: holds no BPE ranks"):
        Tokenizer(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("below", ["", "sub"])
def test_cache_env_naming_a_file_is_one_error_naming_the_variable(tmp_path, monkeypatch, capsys, below):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / below if below else tmp_path / "file"
    monkeypatch.setenv("MICROLLAMA_CACHE", str(cache))
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "tiny-hd128"])
    under = f", under {tmp_path / 'file'}," if below else ""
    assert exit_info.value.code == 1
    assert (
        capsys.readouterr().err
        == f"microllama: error: $MICROLLAMA_CACHE names {cache}{under} which is not a directory\n"
    )
