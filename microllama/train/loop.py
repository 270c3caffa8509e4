"""Train or fine-tune a Llama 3.1-shaped model: one loop, read top to bottom (data, forward, loss, backward,
step, log, save), with features as switches on it.

    microllama train corpus/tinytales.txt --out_dir runs/tales
    python -m microllama.train chats.jsonl --mode lora --ckpt_dir ~/llama/Meta-Llama-3.1-8B --device cuda

- Data (microllama.train.data): documents packed into rows of max_seq_len tokens; attention stays inside each
  document and its positions restart at 0 (Transformer's `documents`); chats train on assistant turns only.
- Loss: the sum of a step's token losses over the number of targets in the whole step, every micro-batch
  counted, so that gradient accumulation computes the gradient of one large batch.
- Modes: full; lora (microllama.train.lora; frozen weights stay in the model's dtype, or in NF4 with --quantize
  nf4: QLoRA; adapters and their AdamW state in adapter_dtype); norms (RMSNorm weights only). Otherwise AdamW's
  state is in the weights' dtype.
- Memory: activation checkpointing per block, a chunked cross-entropy, fused AdamW.
- Saves (microllama.train.run_dir) are atomic; a resumed run is bit-identical to one that never stopped.
  The final weights go out in Meta's layout, LoRA merged, for `microllama generate`, `verify` and `convert`.
"""

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from ..args import ModelArgs
from ..checkpoint.hf_layout import (
    file_owners,
    hf_file_name,
    hf_name,
    save_hf,
    write_config,
    write_hf_file,
    write_index,
)
from ..checkpoint.load import Checkpoint, open_checkpoint
from ..checkpoint.meta_layout import rank_range, save_meta, shard_count, shard_dim, shard_name, write_params
from ..checkpoint.params import expected_shapes
from ..checkpoint.tiny import cache_dir
from ..distributed import data_parallel as distributed
from ..distributed.launch import rank_device, torchrun_world_size
from ..files import atomic_dir, own_tensors, parse_dtype
from ..model import Transformer
from ..quantize import check_nf4_split, check_quantize, tensor_bytes
from ..tokenizer import Tokenizer
from . import run_dir as ckpts
from .config import TrainConfig
from .data import Batch, Batches, Corpus, held_out_batches, load_corpus, split_documents
from .lora import (
    adapter_state_dict,
    apply_lora,
    check_lora,
    draw_sharded_adapters,
    fold_shard,
    is_adapter,
    merge_lora_state_dict,
)
from .metrics import TensorBoard, flops_per_token, peak_bf16_flops


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says at which step and what was kept."""


@dataclass
class Summary:
    steps: int  # the run's steps so far, those of the runs it resumed included
    max_steps: int
    trained: int  # steps this call took: 0 when it resumed a run that had already finished
    seconds: float
    tokens_per_s: float
    peak_memory_gib: float
    first_loss: Optional[float]  # the run's first and latest training loss (kept in its metrics.jsonl)
    last_loss: Optional[float]
    first_eval_loss: Optional[float]  # the run's first and latest held-out loss, and their steps
    last_eval_loss: Optional[float]
    first_eval_step: Optional[int]
    last_eval_step: Optional[int]
    final_dir: Optional[Path]
    final_shards: int = 1  # consolidated.NN.pth (or .safetensors) files in final_dir
    final_layout: str = "meta"  # TrainConfig.export
    export_held_bytes: Optional[int] = None  # FSDP2: the most tensor bytes this rank held at once while exporting
    weight_bytes: Optional[int] = None  # the model's weights this rank holds (FSDP2: its shards; NF4: codes, scales)

    def line(self) -> str:
        shards = f", {self.final_shards} {'shards' if self.final_layout == 'meta' else 'files'}" \
            if self.final_shards > 1 else ""  # fmt: skip
        layout = "Meta layout" if self.final_layout == "meta" else "Hugging Face safetensors"
        where = f"final weights in {self.final_dir} ({layout}{shards})"
        if self.trained == 0:
            return f"already finished: step {self.steps} of {self.max_steps}; {where}"
        losses = [f"train loss {self.first_loss:.3f} -> {self.last_loss:.3f}"]
        if self.first_eval_loss is not None:
            since = (f" -> {self.last_eval_loss:.3f} at step {self.last_eval_step}"
                     if self.last_eval_step != self.first_eval_step else ", none since")  # fmt: skip
            losses.append(f"held-out loss {self.first_eval_loss:.3f} at step {self.first_eval_step}{since}")
        if self.steps < self.max_steps:
            status, end = f"stopped at step {self.steps} of {self.max_steps} (--stop_at; --resume goes on)", ""
        else:
            status, end = f"done: step {self.steps} of {self.max_steps}", f"; {where}"
        return (f"{status} in {self.seconds:.0f} s ({self.tokens_per_s:,.0f} tok/s, peak memory "
                f"{self.peak_memory_gib:.2f} GiB): {', '.join(losses)}{end}")  # fmt: skip


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps (nanoGPT's)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocated bytes on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30


def select_trainable(
    model: Transformer, cfg: TrainConfig, rows_of: tuple[int, int] = (0, 1)
) -> list[torch.nn.Parameter]:
    """Set which weights train (mode full, lora or norms); returns them. Frozen weights keep their dtype.
    rows_of: this process's (rank, world_size), for LoRA's dropout on its rows of the global batch."""
    if cfg.mode == "lora":
        return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                          parse_dtype(cfg.adapter_dtype), rows_of)  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(cfg.mode == "full" or name.endswith("norm.weight"))
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, fused into one kernel per step where torch has it."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def step_loss(
    model: Union[Transformer, distributed.Ranks], batch: Batch, n_targets: int, loss_chunk: int = 0
) -> torch.Tensor:
    """This micro-batch's summed token losses over the whole step's target count: the step's loss is the sum
    of these, whatever the split into micro-batches (not the mean of per-micro-batch means). model: the
    Transformer, or the Ranks whose loss runs it (through DDP or FSDP in a data-parallel job)."""
    total = model.loss(batch.tokens, batch.targets, documents=batch.documents, reduction="sum",
                       chunk_size=loss_chunk or None)  # fmt: skip
    return total / max(1, n_targets)


def train_step(
    model: Transformer,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    lr: float,
    cfg: TrainConfig,
    inspect_gradients: Optional[Callable[[], None]] = None,
    ranks: Optional[distributed.Ranks] = None,
) -> tuple[float, float]:
    """One optimizer step: step_loss's gradients accumulated over the micro-batches, the global norm clipped to
    cfg.grad_clip, AdamW at learning rate lr. Returns the step's loss and the gradient norm before clipping.
    A non-finite loss raises FloatingPointError before any weight changes. inspect_gradients is called once
    the gradients are complete (the training goldens record them). ranks: the job's (wrapped), each rank
    computing its rows of every (global) micro-batch; by default model trains alone."""
    ranks = distributed.Ranks.alone(model) if ranks is None else ranks
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_targets = sum(b.n_targets() for b in micro_batches)  # the whole step's: accumulation changes nothing
    loss = torch.zeros((), device=micro_batches[0].tokens.device)
    for batch in micro_batches:
        micro_loss = step_loss(ranks, ranks.rows(batch), n_targets, cfg.loss_chunk)
        # DDP and FSDP average the data ranks' gradients: times their count makes it their sum (times 1 is exact).
        (micro_loss * ranks.dp_size).backward()
        loss += micro_loss.detach()
    loss = ranks.sum(loss).item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite loss ({loss})")
    if inspect_gradients is not None:
        inspect_gradients()
    grad_norm = ranks.clip_grad_norm(params, cfg.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model: Transformer, ranks: distributed.Ranks, batches: list[Batch], cfg: TrainConfig) -> float:
    """Mean token loss over the held-out rows (dropout off); data-parallel, every rank computes all of them."""
    model.eval()
    total = sum(ranks.loss(b.tokens, b.targets, documents=b.documents, reduction="sum",
                           chunk_size=cfg.loss_chunk or None).item() for b in batches)  # fmt: skip
    model.train()
    return total / max(1, sum(b.n_targets() for b in batches))


def check_attention_memory(cfg: TrainConfig, args: ModelArgs, rows: int, dtype: torch.dtype) -> None:
    """ValueError naming --max_seq_len when one micro-batch's attention cannot fit this machine's memory (CPU:
    its RAM; CUDA: the device's), before anything is written: every step makes the packed documents' mask,
    rows x max_seq_len^2 float32 values, and without --flash one layer's scores, n_heads times as many in dtype."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    per_value = 4 + (0 if cfg.flash else args.n_heads * dtype.itemsize)
    need = rows * cfg.max_seq_len**2 * per_value
    if need > total:
        scores = "" if cfg.flash else f" and one layer's {args.n_heads} heads of scores"
        raise ValueError(
            f"--max_seq_len {cfg.max_seq_len}: the attention of {rows} rows of it (the documents' mask{scores}) "
            f"needs at least {need / 2**30:,.0f} GiB, more than the {total / 2**30:,.0f} GiB of this {device.type}'s "
            "memory; choose a smaller --max_seq_len or --batch_size"
        )


def run_record(cfg: TrainConfig, checkpoint: Checkpoint, corpus: Corpus, dtype: torch.dtype) -> dict[str, Any]:
    """The resolved configuration: written beside every checkpoint, and compared on resume."""
    return {
        "config": cfg.to_dict(),
        "model": {
            "checkpoint": str(checkpoint.dir),
            "params": checkpoint.params,
            "fingerprint": ckpts.files_fingerprint(list(checkpoint.weight_files)),
        },
        "data": {"corpus": corpus.key, "documents": len(corpus)},
        "data_files": list(corpus.files),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__},
    }


def export_final(
    state_dict: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], checkpoint: Checkpoint, run_dir: Path,
    record: dict[str, Any], layout: str = "meta",
) -> Path:  # fmt: skip
    """run_dir/final: the trained model's whole weights (adapters merged into them) in Meta's layout (or Hugging
    Face's, layout hf) with the run's record; and for LoRA the adapters alone, run_dir/adapters.pth
    (microllama.train.lora.load_adapters reads them)."""
    if adapters:
        ckpts.save_adapters(run_dir, adapters)
    with atomic_dir(run_dir / ckpts.FINAL, replace=True) as tmp:
        (save_hf if layout == "hf" else save_meta)(state_dict, checkpoint.params, tmp)
        ckpts.write_record(tmp, record)
    return run_dir / ckpts.FINAL


def train(cfg: TrainConfig) -> Summary:
    """Run cfg: every check first (nothing is written before the data and model are known good), then the loop."""
    trainer = Trainer(cfg)
    if trainer.finished:  # resumed at its last step, its final weights written
        return trainer.summary()
    trainer.build()  # the model, its trainable weights and AdamW; restored from the checkpoint on --resume
    with trainer.progress(), trainer.failing_cleanly():
        trainer.start()  # the run directory written (or truncated to the checkpoint); the held-out loss at step 0
        while trainer.step < cfg.max_steps:
            micro_batches = trainer.next_micro_batches()  # data
            loss, grad_norm = trainer.train_step(micro_batches)  # forward, loss, backward, AdamW's step
            trainer.log(micro_batches, loss, grad_norm)
            trainer.evaluate_if_due()
            trainer.save_if_due()
            if trainer.step == cfg.stop_at:
                break
    return trainer.finish()  # the final weights at max_steps


class Trainer:
    """One run of a TrainConfig on this process's rank of the job (the one rank of a process that trains alone):
    its data, model, AdamW and run directory, and the run's history of losses. Rank 0 writes the run's files and
    prints; every rank computes and saves its part."""

    def __init__(self, cfg: TrainConfig):
        """Every check, the data and what a resume starts from; nothing written yet."""
        cfg.check()
        if cfg.mode == "lora":
            check_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        self.cfg, self.device, self.run_dir = cfg, torch.device(cfg.device), Path(cfg.out_dir)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
        self.device = rank_device(self.device)  # under torchrun, each rank its own GPU (cuda:LOCAL_RANK)
        default_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = parse_dtype(cfg.dtype) if cfg.dtype else default_dtype
        if cfg.quantize is not None:
            check_quantize(cfg.quantize, self.device, self.dtype)  # torchao installed, before the data is read
        self.checkpoint = open_checkpoint(cfg.ckpt_dir)
        if cfg.quantize is not None and cfg.distributed == "fsdp":  # whole blocks of NF4's scales on every rank
            check_nf4_split(expected_shapes(self.checkpoint.args), torchrun_world_size(), self.checkpoint.source)
        self.ranks = distributed.join(cfg.distributed, cfg.batch_size, self.device, cfg.tensor_parallel,
                                      self.checkpoint.args, self.checkpoint.source)  # fmt: skip
        check_attention_memory(cfg, self.checkpoint.args, cfg.batch_size // self.ranks.dp_size, self.dtype)
        resumed = ckpts.load_checkpoint(self.run_dir) if cfg.resume else None
        if resumed is None and self.ranks.is_rank_0:
            ckpts.check_new_run_dir(self.run_dir)
        self.load_data()
        self.record = run_record(cfg, self.checkpoint, self.corpus, self.dtype)
        self.resumed = resumed is not None
        self.state: Optional[ckpts.TrainState] = None  # what build restores, then drops (a copy of the weights)
        self.step = self.saved_step = self.targets_seen = 0
        self.losses: list[float] = []  # the run's, from its first step
        self.eval_losses: list[tuple[int, float]] = []  # (step, held-out loss)
        if resumed is not None:
            self.state, saved_record = resumed
            ckpts.check_resumable(saved_record, self.record, self.run_dir / ckpts.CHECKPOINT)
            self.step = self.saved_step = self.state.step
            self.targets_seen = self.state.targets_seen
            self.batches.position = self.state.data
            self.read_history()
        self.finished = self.step == self.cfg.max_steps and (self.run_dir / ckpts.FINAL).is_dir()
        self.start_time, self.tokens, self.trained = time.perf_counter(), 0, 0  # start_time: reset by start
        self.tensorboard: Optional[TensorBoard] = None  # opened by start, on rank 0
        self.export_held_bytes: Optional[int] = None  # set by export_sharded
        self.weight_bytes: Optional[int] = None  # set by build
        if cfg.tensorboard is not None:
            TensorBoard.check_installed()
        self.flops_per_token = flops_per_token(self.checkpoint.args, cfg.max_seq_len, cfg.mode == "full")
        self.peak_flops = self.device_peak_flops()

    def device_peak_flops(self) -> Optional[float]:
        """The device's peak dense bfloat16 FLOP/s, for MFU: on CUDA in bfloat16, from the table; else None
        (said once on CUDA)."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = peak_bf16_flops(name) if self.dtype == torch.bfloat16 else None
        if peak is None and self.ranks.is_rank_0:
            why = f"{name} is not in" if self.dtype == torch.bfloat16 else f"{self.dtype} is not the bfloat16 of"
            print(f"MFU omitted from the metrics: {why} microllama.train.metrics.PEAK_BF16_FLOPS", flush=True)
        return peak

    def load_data(self) -> None:
        """Tokenized once into the cache (by rank 0, then read by the others), a held-out split, rows packed per
        epoch in a seeded order."""
        cfg = self.cfg
        self.tokenizer = Tokenizer(cfg.tokenizer_path, self.checkpoint.dir)
        with self.ranks.rank_0_first():
            self.corpus = load_corpus(cfg.data, self.tokenizer, cache_dir() / "data")
        self.train_docs, self.eval_docs = split_documents(len(self.corpus), cfg.eval_fraction, cfg.seed)
        pad_id = self.tokenizer.pad_id
        self.batches = Batches(self.corpus, self.train_docs, cfg.max_seq_len, cfg.batch_size, cfg.seed, pad_id)
        self.eval_batches = held_out_batches(self.corpus, self.eval_docs, cfg.max_seq_len, cfg.batch_size,
                                             cfg.eval_rows, pad_id)  # fmt: skip

    def read_history(self) -> None:
        """The losses of the steps the checkpoint holds, from the run's metrics.jsonl."""
        kept = [m for m in ckpts.read_metrics(self.run_dir) if m["step"] <= self.step]
        self.losses = [m["loss"] for m in kept if "loss" in m]
        self.eval_losses = [(m["step"], m["eval_loss"]) for m in kept if "eval_loss" in m]

    def build(self) -> None:
        """The checkpoint's weights in dtype (fsdp: float32, computing in dtype); what trains depends on the mode;
        AdamW; on --resume, the checkpoint's weights, AdamW state and random states."""
        cfg, packing = self.cfg, self.batches.packing(0)
        if self.ranks.is_rank_0:
            print(f"data: {len(self.train_docs):,} documents ({packing.tokens:,} tokens) in {len(packing.rows):,} "
                  f"rows of {cfg.max_seq_len} ({packing.tokens / (len(packing.rows) * cfg.max_seq_len):.0%} "
                  f"filled), {packing.n_split} split for being longer than a row; {len(self.eval_docs)} held out",
                  flush=True)  # fmt: skip
        rows_of = (self.ranks.dp_rank, self.ranks.dp_size)
        if self.ranks.kind == "fsdp":  # float32 weights, built on the meta device, sharded, each rank reading its part

            def shard(model: Transformer) -> None:  # on the meta device: the adapters go in before fully_shard
                select_trainable(model, cfg, rows_of)
                self.ranks.shard(model, self.dtype, cfg.activation_checkpointing)  # (on a 2-D mesh: TP first)

            # QLoRA: the NF4 base quantized from dtype, as in one process; each rank holds its rows of it
            model = self.checkpoint.load_sharded(shard, cfg.max_seq_len, self.device, torch.float32, cfg.flash,
                                                 self.ranks.tensor_part, cfg.quantize, self.dtype).train()  # fmt: skip
        else:
            model = self.checkpoint.load_model(cfg.max_seq_len, 1, self.device, self.dtype, cfg.flash,
                                               quantize=cfg.quantize).train()  # fmt: skip
            if model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr():  # (load_sharded: untied)
                model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())  # trains untied
            model.activation_checkpointing = cfg.activation_checkpointing
        # LoRA's initialisation, then dropout: every rank draws the same (each the whole batch's dropout masks).
        torch.manual_seed(cfg.seed)
        if self.ranks.kind != "fsdp":
            trainable = select_trainable(model, cfg, rows_of)
        else:  # chosen before sharding; fully_shard's parameters are what trains
            trainable = [p for p in model.parameters() if p.requires_grad]
            if cfg.mode == "lora":  # drawn whole on every rank, as one process draws them; each keeps its rows
                with torch.no_grad():
                    draw_sharded_adapters(model, cfg.lora_targets, distributed.shard_rows(model))
        self.model, self.params = model, self.ranks.wrap(model, self.dtype, trainable)
        self.weight_bytes = sum(tensor_bytes(p) for p in model.parameters())
        self.optimizer = make_optimizer(self.params, cfg, self.device)
        if self.state is not None:
            self.restore(self.state)
            self.state = None

    def restore(self, state: ckpts.TrainState) -> None:
        if state.dcp is not None:  # saved by a data-parallel run, at any world size
            ckpts.load_sharded_weights(state.dcp, self.model, self.optimizer)
        elif self.ranks.kind == "fsdp":  # saved by one process: its whole tensors, each rank keeping its shard
            ckpts.load_whole_into_sharded(state, self.model, self.optimizer)
        else:
            self.model.load_state_dict(state.weights, strict=False)
            self.optimizer.load_state_dict(state.optimizer)
        ckpts.restore_rng(state.rng)

    @contextlib.contextmanager
    def progress(self) -> Iterator[None]:
        """A progress bar on rank 0, ended (its line finished) however the loop ends, errors included."""
        with tqdm(total=self.cfg.max_steps, initial=self.step, desc=f"train ({self.cfg.mode})", unit="step",
                  dynamic_ncols=True, disable=not self.ranks.is_rank_0) as self.bar:  # fmt: skip
            yield

    @contextlib.contextmanager
    def failing_cleanly(self) -> Iterator[None]:
        """A non-finite loss or running out of memory becomes a TrainingError that says what the run directory
        holds and how to go on from it."""
        try:
            yield
        except FloatingPointError as e:  # train_step's, raised before the weights change
            raise TrainingError(f"{e} at step {self.step + 1}: training stopped before updating the weights; "
                                f"{self.kept()}") from None  # fmt: skip
        except RuntimeError as e:  # torch.OutOfMemoryError; torch's CPU allocator raises a plain RuntimeError
            if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
                raise
            raise TrainingError(f"out of memory after step {self.step} ({str(e).splitlines()[0]}); "
                                f"{self.kept()}") from None  # fmt: skip

    def kept(self) -> str:
        if self.saved_step:
            return (f"the last good checkpoint, of step {self.saved_step}, is in {self.run_dir / ckpts.CHECKPOINT}: "
                    "--resume continues from it")  # fmt: skip
        return f"no checkpoint had been saved: run the same command without --resume to start again in {self.run_dir}"

    def start(self) -> None:
        if self.ranks.is_rank_0:
            if not self.resumed:
                ckpts.start_run_dir(self.run_dir, self.record)
            else:
                ckpts.truncate_metrics(self.run_dir, self.step)
        self.metrics = open(self.run_dir / ckpts.METRICS if self.ranks.is_rank_0 else os.devnull, "a")
        if self.cfg.tensorboard is not None and self.ranks.is_rank_0:
            self.tensorboard = TensorBoard(Path(self.cfg.tensorboard))
        if self.eval_batches and self.step == 0:
            self.evaluate()
        self.start_time = time.perf_counter()

    def next_micro_batches(self) -> list[Batch]:
        return [self.batches.next_batch().to(self.device) for _ in range(self.cfg.grad_accum)]

    def train_step(self, micro_batches: list[Batch]) -> tuple[float, float]:
        self.lr = lr_at(self.step, self.cfg)
        loss, grad_norm = train_step(self.model, self.params, self.optimizer, micro_batches, self.lr, self.cfg,
                                     ranks=self.ranks)  # fmt: skip
        self.step, self.trained = self.step + 1, self.trained + 1
        self.targets_seen += sum(b.n_targets() for b in micro_batches)
        self.losses.append(loss)
        return loss, grad_norm

    def write_metrics(self, **values: Any) -> None:
        """A line of metrics.jsonl, and the same scalars to TensorBoard with --tensorboard."""
        self.metrics.write(json.dumps(values) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(values["step"], values)

    def log(self, micro_batches: list[Batch], loss: float, grad_norm: float) -> None:
        """The step's line of metrics.jsonl, and the progress bar's. tokens_per_s: the job's (every rank's rows of
        the global batches, padding included) since this run started; tokens_per_s_per_rank: that over the ranks;
        mfu (CUDA, bfloat16, a device in the table): model FLOPs per token times tokens_per_s_per_rank over the
        device's peak (microllama.train.metrics)."""
        self.tokens += sum(b.tokens.numel() for b in micro_batches)  # the global micro-batches'
        tokens_per_s, memory = self.tokens / (time.perf_counter() - self.start_time), peak_memory_gib(self.device)
        per_rank = tokens_per_s / self.ranks.world_size
        mfu = {} if self.peak_flops is None else {"mfu": round(per_rank * self.flops_per_token / self.peak_flops, 4)}
        self.write_metrics(step=self.step, loss=loss, lr=self.lr, grad_norm=grad_norm,
                           targets=sum(b.n_targets() for b in micro_batches), tokens_per_s=round(tokens_per_s, 1),
                           tokens_per_s_per_rank=round(per_rank, 1), **mfu,
                           peak_memory_gib=round(memory, 3))  # fmt: skip
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                             mem=f"{memory:.2f}G")  # fmt: skip
        self.bar.update()

    def evaluate(self) -> None:
        self.eval_losses.append((self.step, evaluate(self.model, self.ranks, self.eval_batches, self.cfg)))
        self.write_metrics(step=self.step, eval_loss=self.eval_losses[-1][1])

    def evaluate_if_due(self) -> None:
        """Every eval_every steps, and at max_steps."""
        every = self.cfg.eval_every
        if self.eval_batches and ((every and self.step % every == 0) or self.step == self.cfg.max_steps):
            self.evaluate()
            self.bar.write(f"step {self.step}: held-out loss {self.eval_losses[-1][1]:.4f}")

    def save_if_due(self) -> None:
        """Every save_every steps, at max_steps and at stop_at: one process's state.pth, or a data-parallel
        job's torch.distributed.checkpoint written by every rank."""
        cfg = self.cfg
        if not ((cfg.save_every and self.step % cfg.save_every == 0) or self.step in (cfg.max_steps, cfg.stop_at)):
            return
        if self.ranks.kind == "none":
            state = ckpts.TrainState(self.step, trainable_state(self.model), self.optimizer.state_dict(),
                                     self.batches.position, self.targets_seen, ckpts.capture_rng())  # fmt: skip
            ckpts.save_checkpoint(self.run_dir, state, self.record)
        else:
            state = ckpts.TrainState(self.step, {}, {}, self.batches.position, self.targets_seen, ckpts.capture_rng())
            ckpts.save_sharded_checkpoint(self.run_dir, state, self.record, self.model, self.optimizer,
                                          self.ranks.is_rank_0)  # fmt: skip
        self.saved_step = self.step

    def finish(self) -> Summary:
        """At max_steps, the final weights (gathered from every rank, written by rank 0); the summary."""
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.step == self.cfg.max_steps and self.ranks.kind == "fsdp" and self.cfg.export == "hf":
            self.export_hf_sharded()
        elif self.step == self.cfg.max_steps and self.ranks.kind == "fsdp":
            self.export_sharded()
        elif self.step == self.cfg.max_steps:
            whole = self.ranks.full_state_dict(self.model)  # every rank calls it; rank 0 gets the weights
            if self.ranks.is_rank_0:
                # Gathered first, then merged: FSDP's shards are whole tensors again before B A is folded into W.
                # QLoRA: the layers without adapters are dequantized too, for a checkpoint in full precision.
                merged = merge_lora_state_dict(whole, self.cfg.lora_alpha / self.cfg.lora_rank)
                merged = {k: v.to(self.dtype) for k, v in merged.items()}
                export_final(merged, adapter_state_dict(whole), self.checkpoint, self.run_dir, self.record,
                             self.cfg.export)  # fmt: skip
        return self.summary()

    def export_sharded(self) -> None:
        """FSDP2's final weights, written by every rank without gathering the model: Meta's shard i by rank i (on
        a 2-D mesh, by tensor-parallel rank i of the first data rank: K shards, its slices; a count Meta's layout
        cannot split the model into: the largest count that divides it and that Meta's layout allows, each tensor
        gathered whole in turn), LoRA folded in block by block (the adapters, small, gathered whole), params.json,
        the record and adapters.pth by rank 0 (write_final: atomic)."""
        ranks, args, cfg = self.ranks, self.checkpoint.args, self.cfg
        n = shard_count(args, ranks.meta_shards)  # on a 2-D mesh: K, the tensor-parallel slices
        if n < ranks.meta_shards and ranks.is_rank_0:
            print(f"final weights: Meta's layout cannot split this model (n_heads {args.n_heads}, n_kv_heads "
                  f"{args.n_kv_heads}) into {ranks.meta_shards} shards; writing {n}, each tensor gathered whole in "
                  "turn", flush=True)  # fmt: skip
        index = ranks.meta_index(n)
        params = dict(self.model.named_parameters())
        adapters = {k: ranks.whole(p) for k, p in params.items() if is_adapter(k)}  # every rank, the same
        shard, in_flight = {}, 0
        with torch.no_grad():
            for key, shape in expected_shapes(args).items():
                dim = shard_dim(key)
                block = ranks.meta_block(params[key], dim, n)  # every rank calls it: a collective
                whole_bytes = params[key].numel() * params[key].element_size()
                gathered = n < ranks.meta_shards or dim is None  # the whole tensor, or one Meta shard of it
                in_flight = max(in_flight, whole_bytes if gathered else whole_bytes // n)
                if block is None:
                    continue
                prefix = key.removesuffix(".weight")
                if f"{prefix}.lora_a" in adapters:
                    rows = rank_range(shape[dim], (index, n)) if dim is not None else (0, 0)
                    block = fold_shard(block, adapters[f"{prefix}.lora_a"], adapters[f"{prefix}.lora_b"],
                                       cfg.lora_alpha / cfg.lora_rank, dim, rows)  # fmt: skip
                shard[key] = block.to(self.dtype)
        self.export_held_bytes = (sum(t.nbytes for t in shard.values()) + sum(t.nbytes for t in adapters.values())
                                  + in_flight)  # fmt: skip

        def write(tmp: Path) -> None:
            if shard:
                torch.save(own_tensors(shard), tmp / shard_name(index))
            if ranks.is_rank_0:
                write_params(tmp, self.checkpoint.params)

        self.write_final(write, adapters)

    def export_hf_sharded(self) -> None:
        """--export hf under FSDP2: Hugging Face's safetensors, one file per rank (hf_layout.file_owners: each
        tensor whole in one file, about 1/N of the model in each), written by every rank without gathering the
        model: each tensor is gathered whole in turn (full_tensor, every rank) and kept by its file's rank only,
        LoRA folded in; config.json (untied), the index, the record and adapters.pth by rank 0 (write_final)."""
        ranks, args, cfg = self.ranks, self.checkpoint.args, self.cfg
        shapes = expected_shapes(args)
        owners = file_owners(shapes, ranks.world_size)
        n_files = max(owners.values()) + 1
        params = dict(self.model.named_parameters())
        adapters = {k: ranks.whole(p) for k, p in params.items() if is_adapter(k)}  # every rank, the same
        mine, in_flight = {}, 0
        with torch.no_grad():
            for key in shapes:
                whole = ranks.whole(params[key])  # every rank calls it: a collective
                in_flight = max(in_flight, whole.nbytes)
                if owners[key] != ranks.rank:
                    continue
                prefix = key.removesuffix(".weight")
                if f"{prefix}.lora_a" in adapters:
                    whole = fold_shard(whole, adapters[f"{prefix}.lora_a"], adapters[f"{prefix}.lora_b"],
                                       cfg.lora_alpha / cfg.lora_rank, None, (0, 0))  # fmt: skip
                mine[key] = whole.to(self.dtype)
        self.export_held_bytes = (sum(t.nbytes for t in mine.values()) + sum(t.nbytes for t in adapters.values())
                                  + in_flight)  # fmt: skip

        def write(tmp: Path) -> None:
            if mine:
                write_hf_file(mine, self.checkpoint.params, tmp / hf_file_name(ranks.rank, n_files))
            if ranks.is_rank_0:
                write_config(tmp, self.checkpoint.params, False, self.dtype)
                weight_map = {hf_name(k): hf_file_name(owners[k], n_files) for k in shapes}
                write_index(tmp, weight_map, self.dtype.itemsize * sum(math.prod(s) for s in shapes.values()))

        self.write_final(write, adapters)

    def write_final(self, write: Callable[[Path], None], adapters: dict[str, torch.Tensor]) -> None:
        """run_dir/final written by every rank (write(directory): its own files; rank 0 also the record, then
        adapters.pth beside it). Atomic: rank 0 renames the directory once every rank has written its part; if any
        rank fails, run_dir/final is as it was."""
        ranks, final = self.ranks, self.run_dir / ckpts.FINAL
        with atomic_dir(final, replace=True) if ranks.is_rank_0 else contextlib.nullcontext() as tmp:
            tmp = ranks.from_rank_0(tmp)
            error = None
            try:
                write(tmp)
                if ranks.is_rank_0:
                    ckpts.write_record(tmp, self.record)
            except Exception as e:  # every rank must still reach all_succeeded
                error = e
            if not ranks.all_succeeded(error is None, self.device):  # every part written before rank 0 renames
                raise error or TrainingError(f"another rank failed to write its part of {final}; it is as it was")
        ranks.barrier()  # rank 0 has renamed it: every rank finds final in place
        if adapters and ranks.is_rank_0:
            ckpts.save_adapters(self.run_dir, adapters)

    def summary(self) -> Summary:
        seconds = time.perf_counter() - self.start_time
        (first_step, first_eval), (last_step, last_eval) = (self.eval_losses[0], self.eval_losses[-1]) \
            if self.eval_losses else ((None, None), (None, None))  # fmt: skip
        first_loss, last_loss = (self.losses[0], self.losses[-1]) if self.losses else (None, None)
        final = self.run_dir / ckpts.FINAL if self.step == self.cfg.max_steps else None
        files = len([f for f in final.glob("*") if f.suffix in (".pth", ".safetensors")]) if final else 1
        return Summary(self.step, self.cfg.max_steps, self.trained, seconds, self.tokens / max(seconds, 1e-9),
                       peak_memory_gib(self.device), first_loss, last_loss, first_eval, last_eval, first_step,
                       last_step, final, files, self.cfg.export, self.export_held_bytes,
                       self.weight_bytes)  # fmt: skip


def plot(run_dir: str) -> Path:
    """Write RUN_DIR/loss.png: training and held-out loss against the step (needs matplotlib: the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("microllama plot needs matplotlib: pip install 'microllama[plot]'") from None
    metrics = ckpts.read_metrics(run_dir)
    train_pts = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    eval_pts = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train_pts:
        raise RuntimeError(f"{Path(run_dir) / ckpts.METRICS} holds no steps yet")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train_pts, strict=True), label="train", linewidth=1)
    if eval_pts:
        ax.plot(*zip(*eval_pts, strict=True), "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=str(run_dir))
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
