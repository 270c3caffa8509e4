"""The configuration of a Llama model: Meta's params.json fields (ModelArgs), Llama 3.1's RoPE scaling
constants (RopeScaling), the SwiGLU hidden size a configuration implies (ffn_hidden_dim), the one check that a
number is an integer or a finite real and not a bool, and the check of generation's sampling settings
(check_sampling). The standard library only, as Meta's llama3/args.py sits beside its model.py: the sizes of a
model are known without torch."""

import dataclasses
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Optional


def is_int(value: Any) -> bool:
    """An integer, not a bool (True is an int to Python, never a size or a count to microllama)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(owner: str, name: str, value: Any, kind: str, positive: bool = True) -> None:
    """Raise TypeError unless value is an integer (kind 'int') or a finite real number (kind 'real'),
    booleans excluded; ValueError unless it is positive when asked."""
    if not (is_int(value) if kind == "int" else is_finite(value)):
        expected = "an integer" if kind == "int" else "a finite number"
        raise TypeError(f"{owner}.{name} must be {expected}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (see apply_scaling); the defaults are the constants Meta hard-codes.
    Llama 3.2's 1B and 3B publish a factor of 32. Their params.json keys are in PARAMS_KEYS."""

    factor: float = 8.0  # frequencies whose wavelength exceeds original_context / low_freq_factor are divided by it
    low_freq_factor: float = 1.0  # sets the long-wavelength bound, original_context / low_freq_factor
    high_freq_factor: float = 4.0  # wavelengths below original_context / high_freq_factor are kept as they are
    original_context: int = 8192  # the context length of pre-training, before the 128K extension

    PARAMS_KEYS = {
        "factor": "rope_scale_factor",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_context": "rope_original_context",
    }

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            _check_number("RopeScaling", name, getattr(self, name), "real")
        _check_number("RopeScaling", "original_context", self.original_context, "int")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "RopeScaling.high_freq_factor must exceed low_freq_factor, got "
                f"{self.high_freq_factor!r} and {self.low_freq_factor!r}"
            )


@dataclass
class ModelArgs:
    """Meta's `params.json` fields, plus the run-time sizes and switches microllama adds."""

    # From a checkpoint's params.json; defaults as in Meta's ModelArgs, with Llama 3's vocab_size.
    dim: int = 4096  # width of the residual stream: the vector each token is between blocks
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads, each of head_dim = dim // n_heads
    n_kv_heads: Optional[int] = None  # key/value heads, each shared by n_heads // n_kv_heads query heads; None: n_heads
    vocab_size: int = 128256  # Llama 3's tokenizer: 128,000 BPE tokens and 256 special tokens
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # scales the SwiGLU hidden size (1.3 in 3.1 8B and 70B, 1.2 in 405B)
    norm_eps: float = 1e-5  # RMSNorm's epsilon, added to the mean square before the square root
    rope_theta: float = 500000.0  # RoPE base: pair i of a head turns by position * rope_theta ** (-2i / head_dim)
    use_scaled_rope: bool = False  # Llama 3.1's long-context frequency scaling, with the constants below
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)

    # Chosen when the model is built, not stored in the checkpoint.
    max_seq_len: int = 2048  # longest sequence; the RoPE table covers twice this, as Meta's does
    max_batch_size: int = 32  # sequences generated at once: the KV cache's batch size
    flash: bool = False  # attention through F.scaled_dot_product_attention instead of Meta's explicit softmax

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                     "max_batch_size"):  # fmt: skip
            _check_number("ModelArgs", name, getattr(self, name), "int")
        for name in ("norm_eps", "rope_theta"):
            _check_number("ModelArgs", name, getattr(self, name), "real")
        if self.ffn_dim_multiplier is not None:
            _check_number("ModelArgs", "ffn_dim_multiplier", self.ffn_dim_multiplier, "real")
        for name in ("use_scaled_rope", "flash"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ModelArgs.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"ModelArgs.rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs.dim / n_heads must be even for RoPE, got head_dim {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        """Width of one attention head; queries, keys and values are split into heads of this size."""
        return self.dim // self.n_heads

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a Meta `params.json` dict; keys ModelArgs does not know are ignored, as Meta does.
        The RopeScaling constants are read from their params.json keys (RopeScaling.PARAMS_KEYS)."""
        merged = {**params, **overrides}
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in merged.items() if k in known}
        rope = {name: merged[key] for name, key in RopeScaling.PARAMS_KEYS.items() if key in merged}
        if rope:
            args["rope_scaling"] = dataclasses.replace(args.get("rope_scaling", RopeScaling()), **rope)
        return cls(**args)

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size: 2/3 of 4 * dim, times the multiplier, rounded up to multiple_of (Meta's formula)."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def check_sampling(temperature: float, top_p: float, max_gen_len: Optional[int], seed: Optional[int] = None) -> None:
    """Raise ValueError for sampling settings no model can serve (checked before anything is loaded)."""
    if not is_finite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not is_finite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if max_gen_len is not None and (not is_int(max_gen_len) or max_gen_len < 1):
        raise ValueError(f"max_gen_len must be an integer >= 1, got {max_gen_len!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")


def check_prefill_chunk(prefill_chunk: Optional[int]) -> None:
    """Raise ValueError unless prefill_chunk is None (prefill at once) or a whole number of positions >= 1."""
    if prefill_chunk is not None and (not is_int(prefill_chunk) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be an integer >= 1 (positions per chunk), got {prefill_chunk!r}")
