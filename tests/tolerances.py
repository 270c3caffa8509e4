"""The one table of tolerances. Parity with Meta on the default path is exact (max abs diff 0) on the
machine that runs both, so exact checks use torch.equal, not this table. These bound what is not
bit-identical by construction: the flash path (a different attention kernel, summing in another
order) and, in later suites, goldens recorded on another platform.

Logits of the tiny checkpoints reach magnitudes of about 16. In bf16 one unit in the last place at
8..16 is 2**-4 = 0.0625 and at 16..32 is 0.125; activations are rounded to bf16 after every op, so a
kernel that sums in another order moves logits by a few such units. In fp32 the same argument gives
about 1e-6 relative per op, a few 1e-5 absolute on logits after two layers.
"""

import torch

# dtype -> (atol, rtol) for logits compared across attention kernels or platforms.
LOGITS = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (0.5, 0.02),
}

# microllama against transformers' LlamaForCausalLM on the same fp32 weights (tests/test_hf.py).
# Not bit-identical by construction: transformers applies RoPE as x*cos + rotate_half(x)*sin with cos
# and sin from its own float32 frequency table, where microllama (like Meta) multiplies complex
# numbers from torch.polar; the products round differently in the last bit, and attention and the
# SwiGLU sum in another order. Measured on the tiny checkpoint (logits up to about 25 in magnitude,
# where one fp32 ulp is 2**-19 = 1.9e-6): max abs diff 1.05e-5 at 16 positions, 1.1e-5 at 300,
# 1.2e-5 at 3,000, i.e. about 6 ulps. The bound leaves 3x headroom over that.
TRANSFORMERS_FP32 = (4e-5, 0.0)  # (atol, rtol)
