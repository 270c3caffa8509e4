"""The one table of tolerances, per dtype (here, not in tests/, because `microllama verify` applies it).

Parity with Meta on the default path is exact (max abs diff 0, checked with torch.equal or sha256)
on the machine that runs both, so exact checks use no tolerance at all; so is microllama tensor-parallel
(microllama/parallel.py) against Meta at the same world size (measured at 2 and 4 ranks: every golden value
and Meta run live, max abs diff 0), because DTensor's row-wise layers add the same partial sums with the same
all-reduce as fairscale's. This bounds what is not
bit-identical by construction: the same arithmetic with its sums taken in another order, by another
attention kernel (flash), in other block shapes (cached decoding against one full forward), by
Meta's tensor-parallel ranks (row-parallel partial sums added after the matmul, world size 2 or 4),
on another platform (another CPU ISA, BLAS or GPU), or by transformers' LlamaForCausalLM on the same
weights (RoPE as x*cos + rotate_half(x)*sin from its own float32 table, where Meta and microllama
multiply complex numbers from torch.polar). It applies to logits and to every golden capture point.

Measured on the tiny checkpoints (CPU, torch 2.13), where logits reach |x| of about 25: flash vs
default differs by at most 1.34e-5 in float32 (about 7 units in the last place at 16..32, where one
ulp is 2**-19 = 1.9e-6) and 0.25 in bfloat16 (2 ulps at 16..32, where one ulp is 2**-3), over
5 batches of 2 x 500 random tokens; transformers vs microllama in float32 by at most 1.2e-5 (16 to
3,000 positions); Meta at world size 2 vs dense microllama by at most 9.5e-6 on logits and 1.7e-6 on
activations in float32, 0.19 on logits in bfloat16 (4 ranks: 1.34e-5 and 0.19). The bounds are in
ulps of that top binade, 16 for float32 and 3 for bfloat16: between 1.5x and 3.2x the worst case seen.
Cached decoding against one full forward: at most 1.1e-5 on the tiny checkpoint in float32 (1.1e-6 on
small random models, logits ~2; grouped-query attention against its multi-head twin: 6e-7); in
bfloat16 the default path measured exactly equal, and a test checks that with torch.equal.
"""

import torch

# dtype -> absolute tolerance on logits and activations whose sums were taken in another order.
LOGITS_ATOL = {
    torch.float32: 16 * 2**-19,  # 3.05e-5
    torch.bfloat16: 3 * 2**-3,  # 0.375
}

# float32 unit roundoff, for bounds derived op by op. RoPE angles are float32 products t * freq
# (freq <= 1), each off by up to half an ulp: a rotation to position t is off by up to t * 2**-24
# radians, plus a few roundings in cos, sin and the complex product.
FP32_UNIT_ROUNDOFF = 2.0**-24
