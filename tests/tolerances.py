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

# float32 unit roundoff, for bounds derived op by op. RoPE angles are float32 products t * freq
# (freq <= 1), each off by up to half an ulp: a rotation to position t is off by up to t * 2**-24
# radians, plus a few roundings in cos, sin and the complex product.
FP32_UNIT_ROUNDOFF = 2.0**-24

# The same float32 computation through matmuls of other shapes, which sum in another order: cached
# decoding against the full-sequence forward (one query row against the cache instead of the whole
# square), and grouped-query attention against its multi-head twin (wk, wv with repeated rows).
# Measured on this machine: cache vs full, max abs diff 1.1e-6 on small random models with logits of
# magnitude ~2 and 1.1e-5 on the tiny checkpoint (logits ~21), default and flash paths alike; GQA vs
# multi-head 6e-7 on small random models. The bound leaves a factor of about 3. In bfloat16 the default
# path measured exactly equal cached and uncached (activations rounded to bf16 after every op absorb
# the order), checked with torch.equal.
RESHAPED_LOGITS = {torch.float32: (3e-5, 3e-6)}
