"""The dense Llama 3.1 transformer: Meta's reference model with nn.Linear and nn.Embedding for fairscale's parallel
layers, the same computation op for op on one device. Top to bottom (its configuration, ModelArgs, is in args.py), the
pieces in the order a token meets them: norm, RoPE, attention with its KV cache, feed-forward, block, model."""

import contextlib
import math
from collections.abc import Iterator
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .args import ModelArgs, RopeScaling, ffn_hidden_dim
from .memory import check_kv_cache


class RMSNorm(nn.Module):
    """x divided by its root mean square over the last dimension, times a learned gain; no mean subtracted, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: Meta's order, which decides the bf16 bits.
        return self._norm(x.float()).type_as(x) * self.weight


def apply_scaling(freqs: torch.Tensor, scaling: RopeScaling = RopeScaling()) -> torch.Tensor:
    """Llama 3.1 RoPE frequency scaling: short wavelengths kept, long ones divided by scaling.factor,
    a smooth interpolation between. Same expression order as Meta's, so the same float32 bits."""
    scale_factor, low_freq_factor, high_freq_factor = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    low_freq_wavelen = scaling.original_context / low_freq_factor
    high_freq_wavelen = scaling.original_context / high_freq_factor
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, freqs)
    smooth = (scaling.original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return torch.where(
        (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
        (1 - smooth) * new_freqs / scale_factor + smooth * new_freqs,
        new_freqs,
    )


def precompute_freqs_cis(
    dim: int,
    end: int,
    theta: float = 10000.0,
    use_scaled: bool = False,
    device: Optional[torch.device] = None,
    scaling: RopeScaling = RopeScaling(),
) -> torch.Tensor:
    """Rotations e^(i * t * freq) for positions t < end: complex64 of shape (end, dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=device, dtype=torch.float32)
    if use_scaled:
        freqs = apply_scaling(freqs, scaling)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE: turn each pair of features of q and k by an angle proportional to the token's position, so that
    q . k depends on how far apart two tokens are. Shapes are kept: (bsz, seqlen, heads, head_dim).
    freqs_cis: (seqlen, head_dim // 2), the same positions for every row, or (bsz, seqlen, head_dim // 2).
    A real freqs_cis, (..., head_dim // 2, 2) as torch.view_as_real makes it, turns in real arithmetic (see
    rotate_pairs)."""
    if not freqs_cis.is_complex():
        return rotate_pairs(xq, freqs_cis), rotate_pairs(xk, freqs_cis)
    # Features (x0, x1), (x2, x3), ... become complex numbers x0 + i x1, so that turning is multiplying:
    # (bsz, seqlen, heads, head_dim) -> (bsz, seqlen, heads, head_dim // 2, 2) -> complex (..., head_dim // 2).
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    # (seqlen or bsz x seqlen, head_dim // 2) -> (1 or bsz, seqlen, 1, head_dim // 2): the same turn for every head.
    freqs_cis = freqs_cis.view(-1, xq_.shape[1], 1, xq_.shape[-1])
    # Turn, then back to real pairs, flattened to (bsz, seqlen, heads, head_dim); float32 until the cast back.
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def rotate_pairs(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb's turn for one of q and k, with the complex product written out: (a + ib)(c + is) =
    (ac - bs) + i(as + bc). The compiled decode path's (microllama/compiled.py): torch.compile makes no code
    for complex numbers, so the complex product is a separate kernel there. Run eagerly on x86 CPUs it measured
    bit-identical to the complex product; compiled, a multiply and an add may be fused into one rounding: within
    the tolerances of microllama/tolerances.py.
    cos_sin: (seqlen or bsz x seqlen, head_dim // 2, 2), each rotation's (cos, sin)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, heads, head_dim // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos_sin = cos_sin.view(-1, x.shape[1], 1, x.shape[-1] // 2, 2)  # the same turn for every head
    c, s = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(3).type_as(x)


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, for up to max_batch_size sequences of up to
    max_seq_len positions; exists only while generating."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, **factory):
        super().__init__()
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        # Buffers follow the model's .to(device); not persistent, so never saved with the weights.
        self.register_buffer("cache_k", torch.zeros(shape, **factory), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, **factory), persistent=False)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store xk, xv (bsz, seqlen, n_kv_heads, head_dim) at start_pos; return the keys and values of all
        positions so far, (bsz, start_pos + seqlen, n_kv_heads, head_dim)."""
        bsz, seqlen = xk.shape[:2]
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv
        return self.cache_k[:bsz, : start_pos + seqlen], self.cache_v[:bsz, : start_pos + seqlen]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: each of the n_kv_heads serves n_rep query heads (repeat_interleave on dim 2)."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


def document_starts(documents: torch.Tensor) -> torch.Tensor:
    """(bsz, seqlen) document ids -> True where a document begins. A document is a run of consecutive positions
    with one id, so an id that comes back later starts another document."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return starts


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(bsz, seqlen) document ids -> each token's position in its own document: RoPE restarts at 0 for each."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    return index - torch.where(document_starts(documents), index, 0).cummax(1).values


def causal_mask(
    seqlen: int,
    start_pos: Union[int, torch.Tensor],
    flash: bool,
    like: torch.Tensor,
    documents: Optional[torch.Tensor] = None,
    capacity: int = 0,
) -> tuple[Optional[torch.Tensor], bool]:
    """How queries at start_pos .. start_pos + seqlen - 1 are kept from later keys, as SDPA's (attn_mask,
    is_causal); is_causal only with flash. The mask is Meta's: (seqlen, start_pos + seqlen), in like's dtype.
    documents (bsz, seqlen), for packed rows from position 0: a query sees only earlier keys of its own
    document, whatever the path: an additive (bsz, 1, seqlen, seqlen) mask. start_pos a 1-element tensor: one
    token against all `capacity` slots of a static cache (compiled.py), later ones not written yet: (1, capacity)."""
    if documents is not None:
        runs = document_starts(documents).cumsum(1)  # 1, 1, 1, 2, 2, ...: which document each token is in
        seen = (runs[:, :, None] == runs[:, None, :]).tril()  # (bsz, query, key): same document, not later
        mask = torch.zeros(seen.shape, device=like.device).masked_fill(~seen, float("-inf"))
        return mask[:, None].type_as(like), False
    if isinstance(start_pos, torch.Tensor):  # the same shape at every position: one compiled graph
        written = torch.arange(capacity, device=like.device) <= start_pos
        return torch.where(written, 0.0, float("-inf"))[None].type_as(like), False
    if seqlen == 1:
        return None, False  # one new token: every key so far is at or before it
    if flash and start_pos == 0:
        return None, True  # square scores, where SDPA's own is_causal (aligned top-left) is exact: no mask tensor
    # Row i is position start_pos + i: it sees every cached position and itself, not later ones.
    mask = torch.full((seqlen, seqlen), float("-inf"), device=like.device)
    mask = torch.triu(mask, diagonal=1)
    return torch.hstack([torch.zeros((seqlen, start_pos), device=like.device), mask]).type_as(like), False


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv_heads <= n_heads), RoPE and an optional KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        # The heads this module computes: all of them, or one rank's share under tensor parallelism
        # (microllama/parallel.py divides both counts by the world size, as Meta's n_local_heads).
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.n_rep = args.n_heads // args.n_kv_heads
        self.head_dim = args.head_dim
        self.flash = args.flash
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None  # set by Transformer.setup_cache while generating

    def forward(
        self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool
    ) -> torch.Tensor:
        """x (bsz, seqlen, dim) at positions start_pos onwards -> (bsz, seqlen, dim); mask, is_causal: causal_mask's."""
        bsz, seqlen, _ = x.shape
        # Project each token to queries, keys and values, split into heads.
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)  # (bsz, seqlen, n_heads, head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)  # (bsz, seqlen, n_kv_heads, head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)  # rotate q and k by position; v is not rotated

        # With a cache (generating): store these keys and values, attend over every position so far.
        keys, values = (xk, xv) if self.cache is None else self.cache.update(start_pos, xk, xv)
        # Grouped-query: repeat k and v so that each query head has the keys and values of its group.
        keys = repeat_kv(keys, self.n_rep)  # (bsz, start_pos + seqlen, n_heads, head_dim)
        values = repeat_kv(values, self.n_rep)

        # Heads become a batch dimension: (bsz, n_heads, seqlen or start_pos + seqlen, head_dim).
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        if self.flash:  # one fused kernel for the scores, mask, softmax and weighted sum below
            output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=is_causal)
        else:
            # Every query against every key, scaled so the scores' variance does not grow with head_dim.
            scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask  # (bsz, n_heads, seqlen, start_pos + seqlen); -inf on later positions
            # Softmax in float32, then back to the activation dtype, as Meta does.
            scores = F.softmax(scores.float(), dim=-1).type_as(xq)
            output = torch.matmul(scores, values)  # (bsz, n_heads, seqlen, head_dim)
        # Heads side by side again, (bsz, seqlen, n_heads * head_dim), then mixed back to dim by wo.
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class FeedForward(nn.Module):
    """SwiGLU: silu(w1 x) gates w3 x, per feature; w2 brings the hidden size back to dim."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, is_causal)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids -> embeddings -> n_layers blocks -> final norm -> logits over the vocabulary."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # Not a buffer: Module.to(dtype) would cast the complex rotations to a real dtype.
        self._freqs_cis: Optional[torch.Tensor] = None
        # Training switch: keep only each block's input and recompute the block in backward (less memory).
        self.activation_checkpointing = False

    def freqs_cis(self, device: torch.device) -> torch.Tensor:
        """RoPE rotations for 2 * max_seq_len positions (Meta's table size), computed on `device` as
        Meta computes them on its default device: sin and cos differ in their last bits across devices."""
        # A table made under inference_mode cannot be saved for backward: a training forward remakes it.
        stale = self._freqs_cis is not None and self._freqs_cis.is_inference() and not torch.is_inference_mode_enabled()
        if self._freqs_cis is None or self._freqs_cis.device != device or stale:
            p = self.params
            self._freqs_cis = precompute_freqs_cis(p.head_dim, p.max_seq_len * 2, p.rope_theta, p.use_scaled_rope,
                                                   device, p.rope_scaling)  # fmt: skip
        return self._freqs_cis

    def check_cache_fits(self, max_batch_size: int, max_seq_len: int) -> int:
        """The bytes of a KV cache of max_batch_size x max_seq_len positions; ValueError, one line and nothing
        allocated, unless the model and its device have room for it (memory.check_kv_cache)."""
        weight = self.output.weight
        # Each attention's own kv heads: under tensor parallelism a rank caches only its share.
        return check_kv_cache(self.params, max_batch_size, max_seq_len, weight.dtype, weight.device,
                              self.layers[0].attention.n_kv_heads)  # fmt: skip

    def setup_cache(self, max_batch_size: int, max_seq_len: int, kind: type[KVCache] = KVCache) -> None:
        """Allocate a KV cache (a `kind`) in every layer, in the model's dtype and on its device, for generation."""
        self.check_cache_fits(max_batch_size, max_seq_len)
        weight = self.output.weight
        for layer in self.layers:
            # Each attention's own kv heads: under tensor parallelism a rank caches only its share.
            layer.attention.cache = kind(
                max_batch_size, max_seq_len, layer.attention.n_kv_heads, self.params.head_dim,
                dtype=weight.dtype, device=weight.device,
            )  # fmt: skip

    def clear_cache(self) -> None:
        """Free every layer's KV cache: forward is back to whole sequences from position 0."""
        for layer in self.layers:
            layer.attention.cache = None

    @contextlib.contextmanager
    def kv_cache(self, max_batch_size: int, max_seq_len: int) -> Iterator[None]:
        """`with model.kv_cache(b, n):` a KV cache in every layer inside the block, freed on exit, even on error."""
        self.setup_cache(max_batch_size, max_seq_len)
        try:
            yield
        finally:
            self.clear_cache()

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor] = 0,
        documents: Optional[torch.Tensor] = None,
        rotations: Optional[torch.Tensor] = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab_size) for tokens (bsz, seqlen) placed at start_pos. documents:
        (bsz, seqlen) ids of packed documents (consecutive tokens of one document share an id): attention stays
        inside each document and its positions start at 0 (training rows; no cache, start_pos 0). last_only: the
        last position's logits alone, (bsz, 1, vocab_size), as a prefill needs them (see generation.py on bits)."""
        h = self.final_hidden(tokens, start_pos, documents, rotations)
        return self.output(h[:, -1:] if last_only else h).float()

    def check_positions(self, tokens: torch.Tensor, start_pos: int, documents: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError unless tokens (bsz, seqlen) at start_pos fit the model, or the KV cache if there is one."""
        bsz, seqlen = tokens.shape
        cache = self.layers[0].attention.cache
        if start_pos and cache is None:
            raise ValueError(f"start_pos={start_pos} needs a KV cache: use `with model.kv_cache(...)` or setup_cache()")
        owner, limit = ("model's", self.params.max_seq_len) if cache is None else ("KV cache's", cache.max_seq_len)
        if start_pos + seqlen > limit:
            raise ValueError(f"positions up to {start_pos + seqlen} exceed the {owner} limit of {limit} (max_seq_len)")
        if cache is not None and bsz > cache.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds the KV cache's max_batch_size {cache.max_batch_size}")
        if documents is not None and (cache is not None or documents.shape != tokens.shape):
            raise ValueError(f"documents {tuple(documents.shape)} must match tokens {tuple(tokens.shape)}, no cache")

    def final_hidden(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor] = 0,
        documents: Optional[torch.Tensor] = None,
        rotations: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The final norm's output (bsz, seqlen, dim): forward without the output layer. compiled.py's decode step
        passes a 1-element tensor start_pos (checked as an int before) and rotations, its RoPE table as real pairs."""
        if not isinstance(start_pos, torch.Tensor):
            self.check_positions(tokens, start_pos, documents)
        seqlen, cache = tokens.shape[1], self.layers[0].attention.cache
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        table = self.freqs_cis(h.device) if rotations is None else rotations
        # These positions' rotations: (seqlen, head_dim // 2), or per row (bsz, seqlen, ...) for packed documents.
        positions = start_pos if isinstance(start_pos, torch.Tensor) else slice(start_pos, start_pos + seqlen)
        freqs_cis = table[positions] if documents is None else table[document_positions(documents)]
        capacity = 0 if cache is None else cache.max_seq_len  # a static cache's keys: all of its slots
        mask, is_causal = causal_mask(seqlen, start_pos, self.params.flash, h, documents, capacity)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, start_pos, freqs_cis, mask, is_causal, use_reentrant=False)
            else:
                h = layer(h, start_pos, freqs_cis, mask, is_causal)
        return self.norm(h)

    def loss(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int = -100,
        documents: Optional[torch.Tensor] = None,
        reduction: str = "mean",
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy of a full forward (no cache), targets equal to ignore_index skipped: their
        mean, or with reduction "sum" their sum. chunk_size: logits are made that many positions at a time and
        remade in backward, so the float32 (positions x vocab_size) logits never exist at once."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        h, targets = self.final_hidden(tokens, 0, documents).flatten(0, 1), targets.flatten()
        if chunk_size is None:
            return F.cross_entropy(self.output(h).float(), targets, ignore_index=ignore_index, reduction=reduction)
        chunks = zip(h.split(chunk_size), targets.split(chunk_size), strict=True)
        total = sum(checkpoint(self._cross_entropy_sum, x, t, ignore_index, use_reentrant=False) for x, t in chunks)
        return total if reduction == "sum" else total / (targets != ignore_index).sum()

    def _cross_entropy_sum(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return F.cross_entropy(self.output(h).float(), targets, ignore_index=ignore_index, reduction="sum")
