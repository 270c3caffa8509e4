"""The Llama 3.1 and 3.2 text models by name, with their published configurations, and the sizes a
user asks about before loading one: parameters, weight bytes, KV-cache bytes."""

from typing import Any, Optional

import torch

from .model import ModelArgs, Transformer, ffn_hidden_dim

# Meta's params.json for each model, as llama-models 0.3.0 lists them in sku_list.py (arch_args),
# plus what the Hugging Face config.json publishes and params.json leaves out: Llama 3.2's small models
# use a RoPE scaling factor of 32 (Meta's reference hard-codes 8) and tie the output to the embedding.
_LLAMA3 = {"vocab_size": 128256, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
FAMILY: dict[str, dict[str, Any]] = {
    "llama3.1-8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3,
                    "multiple_of": 1024, **_LLAMA3},
    "llama3.1-70b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3,
                     "multiple_of": 4096, **_LLAMA3},
    "llama3.1-405b": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "ffn_dim_multiplier": 1.2,
                      "multiple_of": 4096, **_LLAMA3},
    "llama3.2-1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.5,
                    "multiple_of": 256, **_LLAMA3, "rope_scale_factor": 32.0},
    "llama3.2-3b": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_dim_multiplier": 1.0,
                    "multiple_of": 256, **_LLAMA3, "rope_scale_factor": 32.0},
}  # fmt: skip
TIED = {"llama3.2-1b", "llama3.2-3b"}  # output.weight is tok_embeddings.weight
CONTEXT = 131072  # every model of both families is published with a 128K context
# The fields that fix the shapes of the weights; two configurations agreeing on them are one model.
_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")


def model_args(name: str, **overrides: Any) -> ModelArgs:
    """ModelArgs of a named model, e.g. model_args("llama3.1-8b", max_seq_len=8192)."""
    if name not in FAMILY:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(FAMILY)}")
    return ModelArgs.from_params(FAMILY[name], **overrides)


def match(params: dict[str, Any], hidden_dim: int, known: Optional[dict[str, dict[str, Any]]] = None) -> Optional[str]:
    """The name in `known` (default: FAMILY) of the configuration with the weight shapes of params
    (a params.json dict, n_kv_heads given) and SwiGLU size hidden_dim."""
    for name, config in (FAMILY if known is None else known).items():
        config = {"n_kv_heads": config["n_heads"], **config}
        hidden = ffn_hidden_dim(config["dim"], config.get("multiple_of", 256), config.get("ffn_dim_multiplier"))
        if all(params.get(k) == config[k] for k in _SHAPE_KEYS) and hidden == hidden_dim:
            return name
    return None


def parameter_count(args: ModelArgs, tied: bool = False) -> int:
    """Number of parameters, counted on the meta device (no memory); a tied output is counted once."""
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(args).parameters())
    return n - args.vocab_size * args.dim if tied else n


def kv_cache_bytes_per_token(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys and values of one position in every layer."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize
