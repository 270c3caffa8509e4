"""The one table of tolerances, per dtype.

Parity with Meta on the default path is exact (max abs diff 0, checked with torch.equal) on the
machine that runs both, so exact checks use no tolerance at all. These bound what is not
bit-identical by construction: the same arithmetic with its sums taken in another order, by another
attention kernel (flash) or in other block shapes (cached decoding against one full forward), and,
in later suites, goldens recorded on another platform.

Measured on the tiny checkpoints (5 batches of 2 x 500 random tokens, CPU, torch 2.13): logits reach
|x| of about 25, flash vs default differs by at most 1.34e-5 in float32 (about 7 units in the last
place at 16..32, where one ulp is 2**-19 = 1.9e-6) and 0.25 in bfloat16 (2 ulps at 16..32, where one
ulp is 2**-3). Each bound below is that worst case with less than 2x headroom, in ulps of the top
binade: 16 ulps for float32, 3 for bfloat16.
"""

import torch

# dtype -> absolute tolerance on logits whose sums were taken in another order.
LOGITS_ATOL = {
    torch.float32: 16 * 2**-19,  # 3.05e-5
    torch.bfloat16: 3 * 2**-3,  # 0.375
}

# microllama against transformers' LlamaForCausalLM on the same fp32 weights (tests/test_hf.py).
# Not bit-identical by construction: transformers applies RoPE as x*cos + rotate_half(x)*sin with cos
# and sin from its own float32 frequency table, where microllama (like Meta) multiplies complex
# numbers from torch.polar; the products round differently in the last bit, and attention and the
# SwiGLU sum in another order. Measured on the tiny checkpoint (logits up to about 25 in magnitude,
# where one fp32 ulp is 2**-19 = 1.9e-6): max abs diff 1.05e-5 at 16 positions, 1.1e-5 at 300,
# 1.2e-5 at 3,000, i.e. about 6 ulps. The bound leaves 3x headroom over that.
TRANSFORMERS_FP32 = (4e-5, 0.0)  # (atol, rtol)
