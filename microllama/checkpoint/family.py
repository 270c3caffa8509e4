"""The named configurations: the Llama 3.1 and 3.2 text models as published, and microllama's tiny
test checkpoints. The sizes a user asks about before loading one (parameters, weight bytes, KV-cache
bytes) and `microllama info`'s description are computed here from a configuration alone, by arithmetic on
ModelArgs: without torch, so that `microllama info llama3.1-8b` answers as quickly as --help."""

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..args import ModelArgs, RopeScaling, ffn_hidden_dim
from ..memory import format_bytes as _size
from ..memory import kv_cache_bytes
from ..quantize import FORMATS, is_quantized_key, quantized_weight_bytes

CONTEXT = 131072  # every model of both families is published with a 128K context
# Bytes per number of the dtypes whose sizes `microllama info` prints (torch.bfloat16.itemsize, ...).
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class NamedConfig:
    params: dict[str, Any]  # Meta's params.json
    tied: bool = False  # output.weight is tok_embeddings.weight (published so; params.json cannot say it)
    # The RoPE scaling factor the model is published with, where it is not the 8 Meta's code hard-codes.
    rope_factor: Optional[float] = None
    tiny: bool = False  # an embedded test checkpoint, built from a seed by microllama.checkpoint.tiny

    def args(self, **runtime: Any) -> ModelArgs:
        args = ModelArgs.from_params(self.params, **runtime)
        if self.rope_factor is not None:
            args = args.replace(rope_scaling=RopeScaling(factor=self.rope_factor))
        return args


# Meta's params.json for each model, as llama-models 0.3.0 lists them in sku_list.py (arch_args), plus
# what the Hugging Face config.json publishes and params.json leaves out: Llama 3.2's small models use
# a RoPE scaling factor of 32 and tie the output to the embedding.
_LLAMA3 = {"vocab_size": 128256, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
# The tiny checkpoints keep the real 128,256-token vocabulary, grouped-query attention,
# ffn_dim_multiplier and scaled RoPE; their weights are random (microllama.checkpoint.tiny).
_TINY = {"ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


def _tiny(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, multiple_of: int) -> dict[str, Any]:
    """A tiny checkpoint's params.json, its keys in the order of the one the committed goldens were recorded from."""
    return {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "vocab_size": 128256,
            "multiple_of": multiple_of, **_TINY}  # fmt: skip


REGISTRY: dict[str, NamedConfig] = {
    "llama3.1-8b": NamedConfig({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                                "ffn_dim_multiplier": 1.3, "multiple_of": 1024, **_LLAMA3}),
    "llama3.1-70b": NamedConfig({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8,
                                 "ffn_dim_multiplier": 1.3, "multiple_of": 4096, **_LLAMA3}),
    "llama3.1-405b": NamedConfig({"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8,
                                  "ffn_dim_multiplier": 1.2, "multiple_of": 4096, **_LLAMA3}),
    "llama3.2-1b": NamedConfig({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8,
                                "ffn_dim_multiplier": 1.5, "multiple_of": 256, **_LLAMA3}, tied=True, rope_factor=32.0),
    "llama3.2-3b": NamedConfig({"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8,
                                "ffn_dim_multiplier": 1.0, "multiple_of": 256, **_LLAMA3}, tied=True, rope_factor=32.0),
    # The default. With rope_theta 500,000, head_dim 16 puts RoPE wavelengths in all three regimes of
    # the 3.1 scaling: 6 to 862 positions (kept), 4,447 (interpolated), 22,950 and beyond (divided by 8).
    "tiny": NamedConfig(_tiny(64, 2, 4, 2, multiple_of=32), tiny=True),
    # head_dim 128 like the real 8B model: RoPE pairs at all 64 of its frequencies.
    "tiny-hd128": NamedConfig(_tiny(256, 2, 2, 1, multiple_of=64), tiny=True),
    # Four key/value heads: splits over 4 tensor-parallel ranks, as "tiny" (2 of them) cannot.
    "tiny-kv4": NamedConfig(_tiny(128, 2, 8, 4, multiple_of=32), tiny=True),
}  # fmt: skip
FAMILY = [name for name, c in REGISTRY.items() if not c.tiny]
TINY = [name for name, c in REGISTRY.items() if c.tiny]


def lookup(name: str) -> NamedConfig:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def model_args(name: str, **runtime: Any) -> ModelArgs:
    """ModelArgs of a named model, e.g. model_args("llama3.1-8b", max_seq_len=8192)."""
    return lookup(name).args(**runtime)


def shapes_key(args: ModelArgs) -> tuple[int, ...]:
    """What fixes the shapes of the weights: two configurations that agree on it are one model."""
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    return args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, hidden


def match(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int, hidden_dim: int) -> Optional[str]:
    """The name of the registered configuration with these weight shapes (SwiGLU size hidden_dim), if any."""
    key = (dim, n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim)
    return next((name for name, c in REGISTRY.items() if shapes_key(c.args()) == key), None)


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of microllama's Transformer for args (a checkpoint's names), in its state_dict's
    order, by arithmetic: no torch."""
    dim, hidden = args.dim, shapes_key(args)[-1]
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim  # grouped-query: kv is narrower
    block = {"attention.wq.weight": (q_width, dim), "attention.wk.weight": (kv_width, dim),
             "attention.wv.weight": (kv_width, dim), "attention.wo.weight": (dim, q_width),
             "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
             "feed_forward.w3.weight": (hidden, dim),
             "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}  # fmt: skip
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in block.items()})
    return shapes | {"norm.weight": (dim,), "output.weight": (args.vocab_size, dim)}


def parameter_count(args: ModelArgs, tied: bool = False) -> int:
    """Number of parameters of microllama's Transformer for args; a tied output is counted once."""
    return sum(math.prod(shape) for key, shape in weight_shapes(args).items() if not (tied and key == "output.weight"))


def weight_bytes(args: ModelArgs, tied: bool = False, itemsize: int = 2, quantize: Optional[str] = None) -> int:
    """Bytes of the weights in a dtype of itemsize bytes (bfloat16: 2), or with quantize (int8, nf4, int4) the blocks'
    linear layers in that format (microllama.quantize) and the rest in the dtype; a tied output is counted once."""
    return sum(
        quantized_weight_bytes(shape, quantize, itemsize) if quantize and is_quantized_key(key)
        else math.prod(shape) * itemsize
        for key, shape in weight_shapes(args).items()
        if not (tied and key == "output.weight")
    )  # fmt: skip


def kv_cache_bytes_per_token(args: ModelArgs, dtype: str = "bfloat16") -> int:
    """Keys and values of one position in every layer, in dtype (a key of DTYPE_BYTES)."""
    return kv_cache_bytes(args, 1, 1, DTYPE_BYTES[dtype])


def describe(
    label: str, args: ModelArgs, tied: bool, source: str, stored: Optional[dict[str, int]] = None
) -> list[str]:
    """The lines of `microllama info`: configuration, RoPE, parameters, stored bytes per dtype, and the
    weight and KV-cache bytes in bfloat16 and float32."""
    name = match(*shapes_key(args))
    hidden = shapes_key(args)[-1]
    n_params = parameter_count(args, tied)
    s = args.rope_scaling
    context = CONTEXT if args.use_scaled_rope else s.original_context
    rope = f"rope_theta={args.rope_theta:g}"
    if args.use_scaled_rope:
        rope += (f" scaled (factor {s.factor:g}, low {s.low_freq_factor:g}, high {s.high_freq_factor:g}, "
                 f"original context {s.original_context})")  # fmt: skip
    lines = [
        f"model       {label}" + (f" (matches {name})" if name and name != label else ""),
        f"config      {source}: dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} "
        f"n_kv_heads={args.n_kv_heads} head_dim={args.head_dim} vocab_size={args.vocab_size} ffn_hidden={hidden} "
        f"norm_eps={args.norm_eps:g}",
        f"rope        {rope}",
        f"parameters  {n_params:,}" + (" (output tied to the embedding)" if tied else ""),
    ]
    if stored:
        lines.append("stored      " + ", ".join(f"{dtype} {_size(n)} ({n:,} bytes)" for dtype, n in stored.items()))
    for dtype, itemsize in DTYPE_BYTES.items():
        per_token = kv_cache_bytes_per_token(args, dtype)
        lines.append(
            f"{dtype:<11} weights {_size(n_params * itemsize)}; KV cache {_size(per_token)} per "
            f"token, {_size(per_token * context)} for the full {context:,}-token context (per sequence)"
        )
    for quantize in FORMATS:  # --quantize: the blocks' linear layers quantized, the rest in bfloat16
        where = " (CUDA only)" if quantize == "int4" else ""
        lines.append(
            f"{quantize:<11} weights {_size(weight_bytes(args, tied, 2, quantize))}: the blocks' linear "
            f"layers in {quantize}, the embedding, output and norms in bfloat16{where}"
        )
    return lines


def describe_published(name: str) -> list[str]:
    """`microllama info`'s lines for a published configuration, from its numbers alone."""
    c = lookup(name)
    return describe(name, c.args(), c.tied, f"the published configuration of {name}")
