"""What a training run is told: `TrainConfig`, one field per flag of `microllama train`. Standard library
only, so that the command line can check flags and show --help without importing torch."""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

MODES = ("full", "lora", "norms")


@dataclass
class TrainConfig:
    """A training run. The resolved configuration is written beside every checkpoint the run saves."""

    data: str  # a .txt or .jsonl file, or a directory of them (see microllama.train.data)
    out_dir: str = "runs/train"  # checkpoints, metrics and final weights; must not hold another run that saved one
    ckpt_dir: Optional[str] = None  # the model to start from: a directory or a tiny checkpoint's name (default tiny)
    mode: str = "full"  # full: every weight trains; lora: adapters only; norms: RMSNorm weights only
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wv"])  # of wq wk wv wo w1 w2 w3
    max_seq_len: int = 256  # tokens per packed row
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps, then cosine down to min_lr at max_steps
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0  # AdamW's, on matrices only (not norm weights)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # largest global gradient norm; 0 leaves gradients as they are
    eval_every: int = 25  # steps between held-out evaluations (and one at the end); 0: only at the end
    eval_fraction: float = 0.05  # documents held out for evaluation
    eval_rows: int = 16  # held-out rows evaluated (at most)
    save_every: int = 50  # steps between checkpoints (and one at the end)
    device: str = "cpu"
    dtype: Optional[str] = None  # weights and activations: float32 on CPU, bfloat16 on CUDA by default
    adapter_dtype: str = "float32"  # LoRA adapters and their AdamW state; other modes train in dtype
    quantize: Optional[str] = None  # nf4 with --mode lora: QLoRA, the frozen weights of the blocks' layers in NF4
    flash: bool = False  # attention through F.scaled_dot_product_attention
    activation_checkpointing: bool = False  # recompute each block in backward instead of keeping its activations
    loss_chunk: int = 0  # positions per cross-entropy chunk (0: whole micro-batch at once)
    seed: int = 0  # the held-out split, the data order, LoRA's initialisation and dropout
    # Each rank takes its block of every micro-batch's rows (--batch_size stays the global micro-batch); fsdp keeps
    # float32 weights and computes in --dtype. A run saved at one world size resumes at any other.
    distributed: str = "none"  # under torchrun: ddp or fsdp over its ranks (microllama.distributed.data_parallel)
    # With fsdp, K > 1 trains on a 2-D mesh of (world size / K) data x K tensor-parallel ranks: each block's layers
    # split over K ranks as tensor-parallel inference splits them, FSDP2 over the data ranks; --batch_size splits
    # over the data ranks only. Modes full and norms.
    tensor_parallel: int = 1  # with fsdp: K ranks per tensor-parallel group (a mesh of world size / K x K)
    # The final weights' layout: meta (params.json, consolidated.NN.pth) or hf (config.json and safetensors: one
    # file in one process or under ddp; under fsdp one file per rank, each tensor whole in one of them, and an index).
    export: str = "meta"  # the final weights' layout: meta or hf (Hugging Face's safetensors)
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    stop_at: Optional[int] = None  # stop after this step, as if interrupted (a checkpoint is saved): --resume goes on
    tokenizer_path: Optional[str] = None  # tokenizer.model (default: beside the checkpoint, or llama-models')
    tensorboard: Optional[str] = None  # also write each step's metrics here for TensorBoard (the tensorboard extra)

    def check(self) -> None:
        """ValueError naming the flag, for settings no run can take."""
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_seq_len", "batch_size", "grad_accum", "max_steps", "eval_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        for name in ("beta1", "beta2", "eval_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"--distributed must be none, ddp or fsdp, got {self.distributed!r}")
        if self.quantize is not None and self.quantize != "nf4":
            raise ValueError(f"--quantize trains nf4 (QLoRA: a frozen base in NF4), got {self.quantize!r}")
        if self.quantize is not None and self.mode != "lora":
            raise ValueError(f"--quantize nf4 is QLoRA: it trains --mode lora only, got --mode {self.mode}")
        if self.export not in ("meta", "hf"):
            raise ValueError(f"--export must be meta or hf, got {self.export!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"--tensor_parallel must be at least 1, got {self.tensor_parallel}")
        if self.tensor_parallel > 1 and self.distributed != "fsdp":
            raise ValueError(f"--tensor_parallel {self.tensor_parallel} trains on a 2-D mesh, FSDP2 over the data "
                             f"ranks: pass --distributed fsdp (got --distributed {self.distributed})")  # fmt: skip
        if self.tensor_parallel > 1 and self.mode == "lora":
            # The plan splits nn.Linear layers; LoRA's adapted layers would need a plan of their own: not built yet.
            raise ValueError(f"--tensor_parallel {self.tensor_parallel} trains --mode full or norms, got --mode lora "
                             "(its adapters have no tensor-parallel plan yet): use --distributed fsdp without "
                             "--tensor_parallel")  # fmt: skip
        if self.stop_at is not None and not 1 <= self.stop_at <= self.max_steps:
            raise ValueError(f"--stop_at must be a step from 1 to --max_steps ({self.max_steps}), got {self.stop_at}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What may differ between a run and its resumption, none changing what is computed: the data is compared by
# content (the corpus's key), not by the path that names it, and out_dir is where the checkpoint was found; a
# data-parallel save (a 2-D one included) resumes at any world size and mesh; tensorboard is only where the
# metrics are copied; export is the final weights' layout only.
RESUMABLE = ("resume", "stop_at", "data", "out_dir", "distributed", "tensor_parallel", "tensorboard", "export")
