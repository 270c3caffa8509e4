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
A packed training row against each of its documents run alone (the same weights, positions restarting at 0
in each document): the attention of a longer row sums over more masked, zero-weighted keys, grouped otherwise
by the kernels. Measured over 300 hypothesis examples on small random models, at most 7.2e-7 (default and
flash paths); on the tiny checkpoint (5 rows of up to 256 positions, 30 documents) 1.05e-5 (default) and 9.5e-6
(flash) in float32; in bfloat16 the default path measured exactly equal on those 30 documents, flash 0.16. A merged
LoRA model against the unmerged one (W + BA folded in float32, then cast): 1.3e-5 in float32, 0.27 in
bfloat16 on the tiny checkpoint with rank-8 adapters on every linear layer.
Cached decoding against one full forward: at most 1.1e-5 on the tiny checkpoint in float32 (1.1e-6 on
small random models, logits ~2; grouped-query attention against its multi-head twin: 6e-7); in
bfloat16 the default path measured exactly equal, and a test checks that with torch.equal.
A prompt prefilled in chunks (Llama's prefill_chunk) is cached decoding with steps of the chunk's size, and its
last position's logits are projected as one row where Meta's prefill projects every position (the one-row
output matmul takes another kernel: up to 9.5e-6 apart in float32 on the tiny checkpoints, in 60 of 100 shapes;
bfloat16 equal in all 120). Against the default path's one-shot prefill, on the tiny checkpoints (2 rows of 300
and 700 positions, chunks of 1 to 700): float32 at most 1.05e-5; bfloat16 exactly equal for chunks of 2 positions
or more, 0.125 (1 ulp) for chunks of 1; flash at most 8.6e-6 and 0.125. The bounds above hold them.
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

# dtype -> bound on gradients computed with their sums in another order (the step split into micro-batches
# of other sizes, the cross-entropy in chunks, transformers' RoPE), relative to the step's largest gradient
# element over all parameters: |g - g'| <= GRAD_RTOL * max|g|. (Relative to each parameter's own largest
# element would not do: where a gradient is zero in exact arithmetic, such as wq's and wk's when every query
# sees a single key, it is rounding noise of 1e-9 whose order changes with the grouping.) Measured: on small
# random models over 400 hypothesis examples, float32 at most 5.4e-7 (micro-batches) and 5.7e-7 (chunks);
# on the tiny checkpoint (4 x 64 packed tokens, some targets ignored) 2.5e-7 and 4.7e-7, bfloat16 5.5e-3 and
# 3.4e-4 (bfloat16's unit in the last place is 2**-8 = 3.9e-3 of the largest value); transformers vs
# microllama in float32, 1.2e-6 of each parameter's own largest element. Bounds: 2**-18 (float32, 6.7x the
# worst seen) and 4 * 2**-8 (bfloat16, 2.9x).
GRAD_RTOL = {
    torch.float32: 2**-18,  # 3.8e-6
    torch.bfloat16: 4 * 2**-8,  # 0.0156
}

# dtype -> the same bound where the platform differs from the recording's (Check.across_platforms, in
# microllama.golden.verify): another CPU's kernels block the matrix products otherwise and compute exp, log and rsqrt
# with other vector code, so more than the order of the sums changes. Measured on the training goldens, checked on an
# AVX-512 EPYC under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (the same figures an AVX2-only EPYC printed)
# against their AVX-512 recordings: float32 first-step gradient norms 5.53e-6 of the largest (world size 1 and 2;
# GRAD_RTOL's 3.8e-6 does not hold across platforms), step gradient norms 1.8e-6 relative, losses 1.34e-5 (within
# LOGITS_ATOL), final weight norms 8.6e-8 relative (within TRAINED_WEIGHTS_RTOL); bfloat16 6.7e-4, 1.9e-3, 7.2e-3 and
# 3.3e-5. Bounds: 2**-16 (float32, 2.8x the worst seen) and GRAD_RTOL's 4 * 2**-8 (bfloat16, 8.2x).
PLATFORM_GRAD_RTOL = {
    torch.float32: 2**-16,  # 1.5e-5
    torch.bfloat16: 4 * 2**-8,  # 0.0156
}

# dtype -> bound on each trained weight's norm after the training goldens' 4 AdamW steps, taken with sums in
# another order (Meta at world size 2 against dense microllama), relative to that norm. On the training
# goldens microllama's trainer reproduces Meta's at world size 1 bit for bit (losses, gradient norms, every
# final weight, float32 and bfloat16); at world size 2 it measured: float32 losses within 1.9e-6 (1 ulp),
# step gradient norms 1.9e-6 relative, first-step gradient norms 6.1e-8 of the largest, final weight norms
# 8.6e-8 relative; bfloat16 5.5e-3, 1.9e-3, 6.0e-4 and 3.6e-5. Losses are checked against LOGITS_ATOL, gradient
# norms against GRAD_RTOL, weight norms against these: 2**-20 (float32, 11x) and 2**-12 (bfloat16, 6.9x).
TRAINED_WEIGHTS_RTOL = {
    torch.float32: 2**-20,  # 9.5e-7
    torch.bfloat16: 2**-12,  # 2.4e-4
}

# Data-parallel training (microllama.distributed.data_parallel, DDP or FSDP2 at world size 2, gloo) against one process
# on the same global batch, float32, tiny checkpoint, 3 AdamW steps of 2 rows of 32 tokens: every step's loss measured
# equal; gradient norms equal under DDP and within 1.1e-6 relative under FSDP (the norm of sharded gradients is
# summed in another order); final weights within 7.2e-7 (DDP) and 1.4e-6 (FSDP) of one process's, the ranks'
# gradients being added after each rank's own sums instead of in one sum. Bounds: losses and gradient norms 2**-19
# relative (1.9e-6: 1.7x the worst seen; torchtune holds its FSDP recipe to 1e-4), weights 2**-17 absolute (7.6e-6,
# 5.6x). The other modes, 3 steps at 2 ranks against one process with the same settings: lora (dropout 0.1, 2
# micro-batches per step, activation checkpointing) losses within 9.7e-8 relative, gradient norms 1.1e-7 (DDP) and
# equal (FSDP), merged weights 3.0e-8, adapters 1.9e-7; norms (chunked loss) losses 1.0e-7, gradient norms equal
# (DDP) and 1.1e-7 (FSDP), weights equal; QLoRA under DDP losses 1.0e-7, weights 3.0e-8; QLoRA under FSDP2 (tiny-hd128,
# the NF4 base sharded, stopped after step 2 and resumed) losses 9.8e-8, gradient norms 1.1e-7, merged weights 2.2e-8,
# adapters 2.5e-6 (one element of layers.1's w2 lora_a, 3x under the weights' bound; the other 16,383 within 1e-7).
# The same bounds hold them.
DATA_PARALLEL_RTOL = 2**-19
DATA_PARALLEL_WEIGHTS_ATOL = 2**-17

# 2-D training, FSDP2 x tensor parallelism at 4 gloo ranks as 2 data x 2 tensor ranks (--tensor_parallel 2), against
# one process, the same run as above: losses within 1.0e-7 relative, gradient norms 1.4e-6 to 1.6e-6 (tensor
# parallelism adds the row-parallel layers' partial sums across ranks and the norm is summed per mesh, in another
# order), held-out losses 2.3e-7; never bit-identical. Final weights within 1.1e-5 of one process's after 3 steps:
# AdamW moves an element by about lr whatever its gradient's size, so an element whose gradient is near zero
# (m / sqrt(v) of a few ulps) carries its relative difference into the weight (2 of 14,336 elements of w3 over
# 1e-6; the others within 1.8e-6). Activation checkpointing changes none of these. --mode norms (chunked loss):
# losses within 1.0e-7, gradient norms 1.1e-7, weights 6.0e-8. Bounds: 2**-18 relative (3.8e-6, 2.4x) and 2**-15
# absolute (3.1e-5, 2.9x). The loss-curve recipe at 2 x 2 stays within DATA_PARALLEL_CURVE_RTOL of the golden
# (measured 1.8e-6 over its first 10 steps, 2.0e-6 over 20).
TENSOR_DATA_PARALLEL_RTOL = 2**-18
TENSOR_DATA_PARALLEL_WEIGHTS_ATOL = 2**-15

# At 4 gloo ranks, on a second shape (tiny-kv4: dim 128, 8 heads, 4 kv heads; a global micro-batch of 4 rows of 32
# tokens, 3 AdamW steps, float32) against one process: FSDP2 losses within 2.0e-7 relative, held-out losses equal,
# gradient norms 7.3e-8 (lora), 7.6e-8 (norms) and 3.0e-6 (full), final weights within 1.9e-6 (full), 3.0e-8 (lora,
# merged) and 1.2e-7 (norms); 2-D at 2 x 2 (full): losses 2.0e-7, gradient norms 3.1e-6, weights 8.7e-6. The full
# runs' gradient norms part most, and not for their gradients: the squares of the 16.4M-element embedding and output
# gradients are summed in float32 in 4 row blocks instead of one (the 2-D run, whose plan cuts those tensors into
# the same 4 blocks, has step 1's norm bit-identical to FSDP2's; float32 vector_norm of 16.4M normal values parts
# from float64's by 6.6e-4 whole and by 8.4e-5 in 4 blocks). Bound for losses and gradient norms at 4 ranks: 2**-17
# relative (7.6e-6, 2.5x); the weights stay within the 2-rank bounds above.
DATA_PARALLEL_4_RANKS_RTOL = 2**-17

# dtype -> bound on the logits of an int8-quantized model (microllama.quantize) against the dense model holding its
# dequantized weights (codes times scales, in the model's dtype). torchao's int8 weight-only linear multiplies the
# activations by the int8 codes and then each output column by its row's scale, where the dense twin multiplies by
# weights rounded one by one; in bfloat16 it also casts the float32 scale to bfloat16 (a relative error of up to
# 2**-9 shared by a whole row) and rounds the product before scaling, so more than the order of a sum changes.
# nf4 needs no bound: its linear dequantizes, then multiplies, and measured bit-identical (float32 and bfloat16).
# Measured on the tiny checkpoints (tiny, tiny-hd128, tiny-kv4; 8 batches of 2 x 400 random tokens; |logits| up to
# 27): float32 at most 1.9e-5, bfloat16 0.39 (over LOGITS_ATOL's 0.375). Bounds: 32 * 2**-19 (float32, 3.2x the
# worst seen) and 8 * 2**-3 (bfloat16, 2.6x).
INT8_LOGITS_ATOL = {
    torch.float32: 32 * 2**-19,  # 6.1e-5
    torch.bfloat16: 8 * 2**-3,  # 1.0
}

# Loss curves (microllama.golden.loss_curve: the committed golden's recipe, 20 AdamW steps of the tiny checkpoint in
# float32, 2 rows of 32 tokens), each step's loss and gradient norm relative to the golden's. One process on the
# recording's platform reproduces it bit for bit (measured; checked exactly). Measured against it: one process under
# an AVX2 CPU's kernels (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) at most 1.9e-6; DDP at 2 gloo ranks 2.1e-7,
# FSDP2 1.3e-6 (its gradient norms, summed over shards in another order, 6e-7 to 1.3e-6 at every step; losses at
# most 2.2e-7). The differences do not grow over the 20 steps. Bounds: another platform 2**-17 (7.6e-6, 4x), data
# parallel 2**-18 (3.8e-6, 2.9x); `microllama compare-losses` defaults to 2**-16 (1.5e-5), which holds both at
# once: a run that parts by more computed something else (a planted 2x learning rate parts by 4.5e-3 at step 2).
LOSS_CURVE_PLATFORM_RTOL = 2**-17
DATA_PARALLEL_CURVE_RTOL = 2**-18
LOSS_CURVE_RTOL = 2**-16

# Format -> bounds on what quantizing a trained model costs against the dense model (microllama.train.quality): the
# held-out loss's relative change, the least top-1 agreement and the largest mean KL(dense || quantized), nats. Not
# a rounding tolerance: the error of 8 or 4 bits per weight, measured on a model that has learnt something (random
# weights carry nothing to lose). Measured in float32 on x86 CPUs (torch 2.13, torchao 0.18) on the tiny checkpoint
# trained as tests/conftest.py's TRAINED_TINY (20 steps; held-out loss 5.09), over 16 held-out rows (496 positions):
# int8 +0.021% (2.1e-4), 99.60% (2 positions of 496 differ), 1.7e-4; nf4 +0.97%, 90.52%, 0.041. On the README's
# 60-step run (held-out loss 1.77; tools/bench_quality.py, all 2,731 held-out positions): int8 +0.028%, 99.34%,
# 8.3e-5; nf4 +1.27%, 93.08%, 0.018. Bounds, on the first: about 2x each cost and a margin of agreement (another
# CPU's rounding trains slightly other weights), holding the second too; int8 well inside the 1% of loss expected.
QUANTIZED_QUALITY = {
    "int8": {"loss_change": 5e-4, "top1_agreement": 0.99, "mean_kl": 4e-4},
    "nf4": {"loss_change": 2e-2, "top1_agreement": 0.85, "mean_kl": 8e-2},
}
