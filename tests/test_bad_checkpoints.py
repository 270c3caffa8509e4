"""Each kind of bad checkpoint gives one error naming the file and the key; nothing loads half-way."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from microllama.checkpoint import CheckpointError, convert, load_model
from microllama.cli import main
from microllama.family import REGISTRY
from microllama.generation import Llama
from microllama.tiny import tiny_state_dict

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
