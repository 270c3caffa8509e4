"""The opt-in fast decode path (`Llama.build(..., compile=True)`): a KV cache of one fixed shape and a decode
step whose shapes never change from token to token, compiled once with torch.compile.

The readable model in model.py decodes with tensors that grow by one position per token (the cache is
sliced to `start_pos + 1` keys), so a compiler would see a new shape at every step. Here the step attends
over the whole cache, max_seq_len keys, and a mask hides the positions not written yet; the position comes
in as a tensor, not a Python int. Prefill (many positions at once) stays eager, through the flash (SDPA)
path of model.py, writing the same cache. The modules, their weights and the forward (its mask decided by
model.causal_mask) are model.py's: only the cache's update and the rotations' real form are new here.

Batches are padded up to a power of two (capped at max_batch_size), so at most 1 + log2(max_batch_size)
graphs are ever compiled, one per bucket; prompt lengths never cause one (prefill is not compiled).
Results are not bit-identical to the default path: the flash tolerances of microllama/tolerances.py apply.

Decoding one sequence is reading every weight once per token, so what decides its speed is how close each
vector-by-matrix product comes to the memory's bandwidth. Two settings of inductor do that better than the
library kernels (cuBLAS, oneDNN), which are built for matrices of many rows: on CUDA coordinate descent
tuning, under which inductor writes a one-row product as a multiply and a sum and tunes the Triton kernel
it makes of them (as gpt-fast does); on the CPU the same rewrite, which inductor leaves out there, is
given to it here (vector_matrix_product). RoPE turns q and k in real arithmetic (model.rotate_pairs), which
inductor fuses with what surrounds it, where complex numbers would be a separate kernel.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Union

import torch

from .model import KVCache, Transformer


class StaticKVCache(KVCache):
    """A KVCache that a decode step updates at a position given as a tensor, returning the whole cache:
    (bsz, max_seq_len, n_kv_heads, head_dim) keys and values whatever the position."""

    def update(
        self, start_pos: Union[int, torch.Tensor], xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(start_pos, torch.Tensor):  # prefill, eager: model.py's slices
            return super().update(start_pos, xk, xv)
        bsz = xk.shape[0]
        self.cache_k[:bsz].index_copy_(1, start_pos, xk)
        self.cache_v[:bsz].index_copy_(1, start_pos, xv)
        return self.cache_k[:bsz], self.cache_v[:bsz]


def vector_matrix_product(a: torch.Tensor, b: torch.Tensor) -> Any:
    """A decomposition of aten.mm for inductor on the CPU: one row a (1, k) times b (k, n) as a multiply and a
    sum over k, which inductor generates as one vectorized pass over b (the weight), split over the threads;
    more rows are left to inductor's own rule. Measured on 2 cores (AVX-512), bfloat16 (128256, 2048) and (8192, 2048)
    weights: 42 and 41 GB/s read, against 30 and 39 for F.linear (oneDNN)."""
    from torch._inductor.decomposition import select_decomp_table

    if a.shape[0] == 1:
        return (a.unsqueeze(2) * b.unsqueeze(0)).sum(dim=1)
    return select_decomp_table()[torch.ops.aten.mm.default](a, b)


def cpu_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """torch.compile's backend on the CPU: inductor with freezing (the weights become constants of the compiled
    step) and vector_matrix_product for aten.mm."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: vector_matrix_product}
    return compile_fx(gm, example_inputs, config_patches={"freezing": True}, decompositions=table)


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a decode step is compiled for: powers of two below max_batch_size, and max_batch_size."""
    return [b for b in (2**i for i in range(max_batch_size.bit_length())) if b < max_batch_size] + [max_batch_size]


class CompiledDecoder:
    """A flash-attention Transformer's generation with a static cache and a compiled decode step. It offers
    what generation uses of the model: `kv_cache(max_batch_size, max_seq_len)` and `forward(tokens, start_pos)`.

    backend is torch.compile's (None: the same static-shape step, run eagerly). With "inductor": on CUDA CUDA
    graphs (mode "reduce-overhead") and coordinate descent tuning; elsewhere cpu_backend (weights become
    constants of the compiled step, which inductor may lay out anew: later changes to the weights are not
    seen)."""

    def __init__(self, model: Transformer, backend: Union[str, Callable, None] = "inductor"):
        if not model.params.flash:
            raise ValueError("the compiled decode path runs attention through SDPA: build the model with flash=True")
        p, weight = model.params, model.output.weight
        self.model = model
        # Allocated once for the decoder's lifetime: a new cache would be a new input, and a recompilation.
        model.setup_cache(p.max_batch_size, p.max_seq_len, StaticKVCache)
        self.caches = [layer.attention.cache for layer in model.layers]
        model.clear_cache()
        self.buckets = batch_buckets(p.max_batch_size)
        with torch.inference_mode():  # the rotations as real (cos, sin) pairs: see model.rotate_pairs
            self.cos_sin = torch.view_as_real(model.freqs_cis(weight.device)).clone()
        settings: dict = {}
        if backend == "inductor" and weight.device.type == "cuda":
            settings = {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
        elif backend == "inductor":
            backend = cpu_backend
        self.step = self.decode_step
        if backend is not None:
            self.step = torch.compile(self.decode_step, backend=backend, fullgraph=True, dynamic=False, **settings)

    @contextlib.contextmanager
    def kv_cache(self, max_batch_size: int, max_seq_len: int) -> Iterator[None]:
        """`with decoder.kv_cache(b, n):` the static cache in every layer inside the block (it always holds
        the model's max_batch_size x max_seq_len; b and n are checked against that)."""
        p = self.model.params
        if not (0 < max_seq_len <= p.max_seq_len and 0 < max_batch_size <= p.max_batch_size):
            raise ValueError(
                f"a KV cache of {max_batch_size} x {max_seq_len} positions; the compiled decoder holds "
                f"{p.max_batch_size} x {p.max_seq_len}"
            )
        for layer, cache in zip(self.model.layers, self.caches, strict=True):
            layer.attention.cache = cache
        try:
            yield
        finally:
            self.model.clear_cache()

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (bucket, 1) at position pos (a 1-element tensor) -> float32 logits (bucket, 1, vocab_size): the
        model's forward, rotating by the real (cos, sin) table."""
        return self.model(tokens, pos, rotations=self.cos_sin)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab_size), as Transformer.forward with a cache: several positions
        go through the eager flash path (prefill), one position through the compiled step."""
        bsz, seqlen = tokens.shape
        if seqlen > 1 or self.model.layers[0].attention.cache is None:
            return self.model.forward(tokens, start_pos, last_only=last_only)
        self.model.check_positions(tokens, start_pos)  # the step below sees a tensor position, which it cannot check
        bucket = next(b for b in self.buckets if b >= bsz)
        # A new tensor, not the caller's: a column of the generation buffer has the buffer's width as its
        # stride, and a new stride would be a new graph. Rows past bsz decode a dummy token into cache rows
        # that no sequence uses.
        padded = tokens.new_zeros(bucket, 1)
        padded[:bsz] = tokens
        pos = torch.tensor([start_pos], device=tokens.device)
        logits = self.step(padded, pos)
        # A copy: with CUDA graphs the step's output buffer is overwritten by the next replay.
        return logits[:bsz].clone()
