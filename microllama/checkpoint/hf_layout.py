"""Hugging Face's Llama layout: config.json beside model.safetensors, or beside
model-0000x-of-0000y.safetensors and model.safetensors.index.json.

Names map one to one onto Meta's. The rows of wq and wk are reordered: Meta rotates consecutive pairs
(2i, 2i+1) of each head as complex numbers, while transformers' rotate_half pairs (i, i + head_dim/2),
so its converter (convert_llama_weights_to_hf.py, `permute`) moves row 2i+j of each head to
j * head_dim/2 + i. Reading undoes that; both directions are pure row permutations, bit for bit.
"""

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..args import ModelArgs, RopeScaling, ffn_hidden_dim, is_finite, is_int
from ..files import READS, StateDict, atomic_dir, converted, dtype_name, own_tensors, read_json
from ..quantize import is_quantized_key, quantize_weight, quantized_rows
from . import family
from .meta_layout import Rows, filled_in_place, rank_range, shard_dim, shard_shape
from .params import CheckpointError, args_from_params, check_dtype, check_finite, check_shapes, expected_shapes

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}  # fmt: skip
_LAYER = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
          "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
          "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
          "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight"}  # fmt: skip
_ROPE = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
         "original_max_position_embeddings": "original_context"}  # fmt: skip
INDEX = "model.safetensors.index.json"


def hf_name(key: str) -> str:
    """The Hugging Face name of Meta's tensor `key`."""
    if key in _TOP:
        return _TOP[key]
    _, layer, rest = key.split(".", 2)
    return f"model.layers.{layer}.{_LAYER[rest]}"


def permute_rotary(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Reorder the rows of wq or wk (n_heads * head_dim, dim) from Meta's RoPE pairing to Hugging
    Face's (to_hf) or back."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    shape = (n_heads, half, 2, cols) if to_hf else (n_heads, 2, half, cols)
    return w.reshape(shape).transpose(1, 2).reshape(rows, cols)


_REQUIRED = object()
_KINDS = {"int": "an integer", "number": "a finite number", "bool": "true or false", "object": "a JSON object",
          "str": "a string"}  # fmt: skip


def _get(config: dict[str, Any], key: str, source: Path, kind: str, default: Any = _REQUIRED) -> Any:
    """config[key], checked to be of `kind` (see _KINDS); `default` when absent (or missing-key error)."""
    if key not in config:
        if default is _REQUIRED:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return default
    value = config[key]
    ok = {
        "int": is_int(value) and value > 0,
        "number": is_finite(value),
        "bool": isinstance(value, bool),
        "object": isinstance(value, dict),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        expected = "a positive integer" if kind == "int" else _KINDS[kind]
        raise CheckpointError(f"{source}: {key} must be {expected}, got {json.dumps(value)}")
    return value


def params_from_config(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """Meta's params.json dict for a Llama config.json (transformers 4's rope_scaling or 5's rope_parameters)."""
    if _get(config, "model_type", source, "str", "llama") != "llama":
        raise CheckpointError(f"{source}: model_type {config['model_type']!r}, microllama reads 'llama'")
    if _get(config, "hidden_act", source, "str", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r}; Llama's SwiGLU uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if _get(config, key, source, "bool", False):
            raise CheckpointError(f"{source}: {key} is true; Llama 3 has no biases")
    n_heads = _get(config, "num_attention_heads", source, "int")
    params = {
        "dim": _get(config, "hidden_size", source, "int"),
        "n_layers": _get(config, "num_hidden_layers", source, "int"),
        "n_heads": n_heads,
        "n_kv_heads": _get(config, "num_key_value_heads", source, "int", n_heads),
        "vocab_size": _get(config, "vocab_size", source, "int"),
    }
    head_dim = _get(config, "head_dim", source, "int", params["dim"] // n_heads)
    if params["dim"] % n_heads or head_dim != params["dim"] // n_heads:
        raise CheckpointError(f"{source}: head_dim {head_dim} is not hidden_size / num_attention_heads")
    # params.json gives the SwiGLU size as a rounding rule, config.json as a number: take the rule of the
    # known model with these shapes, or one that rounds up to exactly that number.
    hidden = _get(config, "intermediate_size", source, "int")
    name = family.match(params["dim"], params["n_layers"], n_heads, params["n_kv_heads"], params["vocab_size"], hidden)
    if name is not None:
        known = family.REGISTRY[name].params
        params.update(multiple_of=known["multiple_of"], ffn_dim_multiplier=known["ffn_dim_multiplier"])
    else:
        params.update(multiple_of=hidden, ffn_dim_multiplier=hidden / int(8 * params["dim"] / 3))
    rope_key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    rope = config.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: {rope_key} must be a JSON object or null, got {json.dumps(rope)}")
    rope_type = _get(rope, "rope_type", source, "str", _get(rope, "type", source, "str", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{source}: RoPE type {rope_type!r}; microllama computes 'default' and 'llama3'")
    params.update(
        norm_eps=_get(config, "rms_norm_eps", source, "number"),
        rope_theta=_get(rope, "rope_theta", source, "number", _get(config, "rope_theta", source, "number", 10000.0)),
        use_scaled_rope=rope_type == "llama3",
    )
    if rope_type == "llama3":
        # Only what the checkpoint's shapes would not imply (a family member's published RoPE factor).
        inferred = args_from_params(params, source).rope_scaling
        for hf_key, field in _ROPE.items():
            value = _get(rope, hf_key, source, "int" if field == "original_context" else "number")
            if value != getattr(inferred, field):
                params[RopeScaling.PARAMS_KEYS[field]] = value
    if name is not None:  # in the order the registry lists them, so a round trip gives params.json's text back
        params = {**{k: params[k] for k in family.REGISTRY[name].params if k in params}, **params}
    return params


def config_from_params(params: dict[str, Any], tied: bool, dtype: torch.dtype) -> dict[str, Any]:
    """A transformers LlamaConfig dict (config.json) for a params.json dict."""
    args = args_from_params(params, "params.json")
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", **{k: getattr(args.rope_scaling, field) for k, field in _ROPE.items()}}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier),
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": family.CONTEXT if args.use_scaled_rope else args.rope_scaling.original_context,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": dtype_name(dtype),
    }


def read_config(ckpt_dir: Path) -> tuple[dict[str, Any], bool]:
    """Meta's params dict for ckpt_dir/config.json, and whether the output is tied to the embedding."""
    path = ckpt_dir / "config.json"
    config = read_json(path, CheckpointError)
    return params_from_config(config, path), _get(config, "tie_word_embeddings", path, "bool", False)


def safetensors_files(ckpt_dir: Path) -> list[Path]:
    """model.safetensors, or the files model.safetensors.index.json names."""
    if (ckpt_dir / INDEX).is_file():
        weight_map = read_json(ckpt_dir / INDEX, CheckpointError).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{ckpt_dir / INDEX}: no 'weight_map' of tensor names to file names")
        paths = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        for path in paths:
            if not path.is_file():
                raise CheckpointError(f"{ckpt_dir / INDEX} names {path.name}, which is not in {ckpt_dir}")
        return paths
    if not (ckpt_dir / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt_dir}: config.json but neither model.safetensors nor {INDEX}")
    return [ckpt_dir / "model.safetensors"]


def open_safetensors(path: Path) -> Any:
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(f"{path}: not a complete safetensors file (truncated?): {e}") from e


# safetensors' dtype names, as torch's.
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}  # fmt: skip


def hf_stored_bytes(paths: list[Path]) -> dict[str, int]:
    """Bytes of the tensors per dtype name, as stored (only the files' headers are read)."""
    totals: dict[str, int] = {}
    for path in paths:
        with open_safetensors(path) as f:
            for key in f.keys():
                s = f.get_slice(key)
                dtype = _ST_DTYPES[s.get_dtype()]
                nbytes = dtype.itemsize * int(torch.tensor(s.get_shape(), dtype=torch.int64).prod())
                totals[dtype_name(dtype)] = totals.get(dtype_name(dtype), 0) + nbytes
    return totals


def read_hf(
    paths: list[Path],
    args: ModelArgs,
    tied: bool,
    device: torch.device,
    dtype: Optional[torch.dtype],
    part: tuple[int, int] = (0, 1),
    quantize: Optional[str] = None,
    into: Optional[Rows] = None,
) -> StateDict:
    """Checked tensors in Meta's names from the safetensors files `paths`, in dtype (None: as stored) on
    device, memory-mapped as read: dense, or with part = (rank, n) only the slice of each split tensor that
    rank holds under tensor parallelism at n ranks (Meta's split, meta_layout.shard_dim), sliced as it is read,
    or with `into` only the rows of every tensor an FSDP2 rank holds, copied into its local tensors (which the
    result then holds; rows that split a head of wq or wk read that head whole, to undo its RoPE order).
    quantize: a format of microllama.quantize, in which the block linear layers' weights are quantized one by
    one as they are read; with `into` too, each read whole in its local tensor's dtype, quantized, and only this
    rank's rows of the result kept (quantize.quantized_rows; the result holds them, for the caller to place)."""
    expected = {hf_name(k): s for k, s in expected_shapes(args).items() if not (tied and k == "output.weight")}
    meta_names = {hf_name(k): k for k in expected_shapes(args)}
    fill = filled_in_place(into, quantize)
    state_dict: StateDict = {}
    for path in paths:
        with open_safetensors(path) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            check_shapes(shapes, {k: s for k, s in expected.items() if k in shapes}, path, "config.json")
            for key in shapes:
                meta, heads = meta_names[key], _rotary_heads(key, args)
                dim = shard_dim(meta)
                if meta in fill:
                    first, local = fill[meta]
                    tensor = _rows(f, key, first, first + local.shape[0], heads)  # counts what it reads
                elif part == (0, 1) or dim is None:
                    tensor = f.get_tensor(key)
                    READS.count(tensor)
                else:
                    start, stop = rank_range(shapes[key][dim], part)
                    # A block of columns comes back as a view of whole rows: made contiguous, as a weight read
                    # whole is (a strided weight would take another matmul kernel, and other bits).
                    tensor = f.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)].contiguous()
                    READS.count(tensor)
                check_dtype(tensor.dtype, key, path)
                if meta in fill:
                    state_dict[meta] = local.copy_(tensor)
                    check_finite(local, key, path)
                    continue
                # a quantized weight read whole under FSDP2: in its shard's dtype, the one it dequantizes to
                tensor = converted(tensor, device, dtype if into is None else into[meta][1].dtype)
                check_finite(tensor, key, path)
                if heads:  # a rank's slice holds whole heads
                    tensor = permute_rotary(tensor, heads // part[1], to_hf=False)
                if quantize is not None and is_quantized_key(meta):
                    tensor = quantize_weight(tensor, quantize, meta)
                    if into is not None:
                        tensor = quantized_rows(tensor, into[meta][0], into[meta][1].shape[0])
                state_dict[meta] = tensor
    source = paths[0].parent / (INDEX if len(paths) > 1 else "model.safetensors")
    local_shapes = {hf_name(k): shard_shape(k, s, part[1]) for k, s in expected_shapes(args).items()}
    if into is not None:
        local_shapes = {hf_name(k): tuple(into[k][1].shape) for k in expected_shapes(args)}
    check_shapes({hf_name(k): tuple(v.shape) for k, v in state_dict.items()},
                 {k: local_shapes[k] for k in expected}, source, "config.json")  # fmt: skip
    if tied and into is not None:  # the output's rows are the embedding's, of the same shape
        state_dict["output.weight"] = into["output.weight"][1].copy_(state_dict["tok_embeddings.weight"])
    elif tied:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    return state_dict


def _rotary_heads(key: str, args: ModelArgs) -> int:
    """The heads whose rows Hugging Face reorders in tensor `key` (wq: n_heads, wk: n_kv_heads), else 0."""
    return args.n_heads if key.endswith("q_proj.weight") else args.n_kv_heads if key.endswith("k_proj.weight") else 0


def _rows(f: Any, key: str, start: int, stop: int, heads: int) -> torch.Tensor:
    """Rows [start, stop) of tensor `key` of the open safetensors file f, in Meta's order; for wq and wk (heads
    > 0) read as the whole heads that hold them, their rows put back in Meta's RoPE order, then cut."""
    if not heads or stop == start:
        rows = f.get_slice(key)[start:stop]
        READS.count(rows)
        return rows
    head_dim = f.get_slice(key).get_shape()[0] // heads
    h0, h1 = start // head_dim, -(-stop // head_dim)
    block = f.get_slice(key)[h0 * head_dim : h1 * head_dim]
    READS.count(block)
    return permute_rotary(block, h1 - h0, to_hf=False)[start - h0 * head_dim : stop - h0 * head_dim]


def hf_state_dict(state_dict: StateDict, params: dict[str, Any], tied: bool) -> StateDict:
    """Meta-named tensors under Hugging Face's names, the rows of wq and wk in its RoPE order; without the
    output when tied (it is the embedding)."""
    args = args_from_params(params, "params.json")
    tensors = {}
    for key, t in state_dict.items():
        if key == "output.weight" and tied:
            continue
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = permute_rotary(t, args.n_heads if key.endswith("wq.weight") else args.n_kv_heads, to_hf=True)
        tensors[hf_name(key)] = t
    return tensors


def write_config(out_dir: Path, params: dict[str, Any], tied: bool, dtype: torch.dtype) -> None:
    (out_dir / "config.json").write_text(json.dumps(config_from_params(params, tied, dtype), indent=2) + "\n")


def save_hf(
    state_dict: StateDict, params: dict[str, Any], out_dir: Union[str, Path], max_shard_bytes: Optional[int] = None
) -> Path:
    """Write config.json and safetensors (several files and an index when max_shard_bytes is exceeded).
    An output equal to the embedding is written once, as tie_word_embeddings."""
    tied = torch.equal(state_dict["output.weight"], state_dict["tok_embeddings.weight"])
    tensors = own_tensors(hf_state_dict(state_dict, params, tied))
    groups: list[dict[str, torch.Tensor]] = [{}]
    for key, t in tensors.items():
        if max_shard_bytes and groups[-1] and sum(v.nbytes for v in groups[-1].values()) + t.nbytes > max_shard_bytes:
            groups.append({})
        groups[-1][key] = t
    dtype = state_dict["tok_embeddings.weight"].dtype
    with atomic_dir(out_dir) as tmp:
        write_config(tmp, params, tied, dtype)
        if len(groups) == 1:
            save_file(groups[0], tmp / "model.safetensors", metadata={"format": "pt"})
            return Path(out_dir)
        weight_map = {}
        for i, group in enumerate(groups):
            name = hf_file_name(i, len(groups))
            save_file(group, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, name))
        write_index(tmp, weight_map, sum(t.nbytes for t in tensors.values()))
    return Path(out_dir)


def hf_file_name(i: int, n: int) -> str:
    """The name of file i (from 0) of n safetensors files, as Hugging Face numbers them (from 1)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_hf_file(state_dict: StateDict, params: dict[str, Any], path: Path) -> None:
    """Meta-named tensors (some of a model's, whole, untied) into one safetensors file under Hugging Face's names."""
    save_file(own_tensors(hf_state_dict(state_dict, params, tied=False)), path, metadata={"format": "pt"})


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: which file holds each tensor (by its Hugging Face name), and their bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def file_owners(shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, int]:
    """Meta-named tensors -> which of min(n, their count) files holds each, whole: the largest first, each into the
    file holding the fewest elements so far (the first of those), so that n ranks writing one file each hold about
    1/n of the model."""
    files, owners = [0] * min(n, len(shapes)), {}
    for key in sorted(shapes, key=lambda k: -math.prod(shapes[k])):  # stable: Meta's order among equal sizes
        owners[key] = files.index(min(files))
        files[owners[key]] += math.prod(shapes[key])
    return owners
