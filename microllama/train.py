"""Train or fine-tune a Llama 3.1-shaped model: one loop, read top to bottom (data, forward, loss, backward,
step, log, save), with features as switches on it.

    microllama train corpus/tinytales.txt --out_dir runs/tales
    python -m microllama.train chats.jsonl --mode lora --ckpt_dir ~/llama/Meta-Llama-3.1-8B --device cuda

- Data (microllama.data): documents packed into rows of max_seq_len tokens; attention stays inside each
  document and its positions restart at 0 (Transformer's `documents`); chats train on assistant turns only.
- Loss: the sum of a step's token losses over the number of targets in the whole step, every micro-batch
  counted, so that gradient accumulation computes the gradient of one large batch.
- Modes: full; lora (microllama.lora; frozen weights stay in the model's dtype, adapters and their AdamW
  state in adapter_dtype); norms (RMSNorm weights only). Otherwise AdamW's state is in the weights' dtype.
- Memory: activation checkpointing per block, a chunked cross-entropy, fused AdamW.
- Saves (microllama.train_checkpoint) are atomic; a resumed run is bit-identical to one that never stopped.
  The final weights go out in Meta's layout, LoRA merged, for `microllama generate`, `verify` and `convert`.
"""

import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from . import distributed
from . import train_checkpoint as ckpts
from .checkpoint import Checkpoint, open_checkpoint
from .data import Batch, Batches, Corpus, load_corpus, make_batch, pack, split_documents
from .files import atomic_dir, parse_dtype
from .lora import adapter_state_dict, apply_lora, check_lora, merge_lora
from .meta_layout import save_meta
from .model import Transformer
from .tiny import cache_dir
from .tokenizer import Tokenizer
from .train_config import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says at which step and what was kept."""


@dataclass
class Summary:
    steps: int
    seconds: float
    tokens_per_s: float
    peak_memory_gib: float
    first_loss: Optional[float]
    last_loss: Optional[float]
    first_eval_loss: Optional[float]
    last_eval_loss: Optional[float]
    final_dir: Optional[Path]

    def line(self) -> str:
        losses = f"train loss {self.first_loss:.3f} -> {self.last_loss:.3f}" if self.first_loss is not None else ""
        if self.first_eval_loss is not None:
            losses += f", held-out loss {self.first_eval_loss:.3f} -> {self.last_eval_loss:.3f}"
        where = f"; final weights in {self.final_dir} (Meta layout)" if self.final_dir else ""
        return (f"done: step {self.steps} in {self.seconds:.0f} s ({self.tokens_per_s:,.0f} tok/s, peak memory "
                f"{self.peak_memory_gib:.2f} GiB): {losses}{where}")  # fmt: skip


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


def select_trainable(model: Transformer, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Set which weights train (mode full, lora or norms); returns them. Frozen weights keep their dtype."""
    if cfg.mode == "lora":
        return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                          parse_dtype(cfg.adapter_dtype))  # fmt: skip
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
    Transformer, or the Ranks whose loss runs it through DDP or FSDP."""
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
    the gradients are complete (the training goldens record them). ranks: data-parallel, each rank computing
    its rows of every (global) micro-batch."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_targets = sum(b.n_targets() for b in micro_batches)  # the whole step's: accumulation changes nothing
    loss = torch.zeros((), device=micro_batches[0].tokens.device)
    for batch in micro_batches:
        if ranks is None:
            micro_loss = step_loss(model, batch, n_targets, cfg.loss_chunk)
            micro_loss.backward()
        else:  # DDP and FSDP average the ranks' gradients: times world_size makes it their sum
            micro_loss = step_loss(ranks, ranks.rows(batch), n_targets, cfg.loss_chunk)
            (micro_loss * ranks.world_size).backward()
        loss += micro_loss.detach()
    loss = (loss if ranks is None else ranks.sum(loss)).item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite loss ({loss})")
    if inspect_gradients is not None:
        inspect_gradients()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: sharded norms
    grad_norm = grad_norm.item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(
    model: Transformer, batches: list[Batch], cfg: TrainConfig, ranks: Optional[distributed.Ranks] = None
) -> float:
    """Mean token loss over the held-out rows (dropout off); data-parallel, every rank computes all of them."""
    model.eval()
    loss_fn = model.loss if ranks is None else ranks.loss
    total = sum(loss_fn(b.tokens, b.targets, documents=b.documents, reduction="sum",
                        chunk_size=cfg.loss_chunk or None).item() for b in batches)  # fmt: skip
    model.train()
    return total / max(1, sum(b.n_targets() for b in batches))


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
    model: Transformer, checkpoint: Checkpoint, run_dir: Path, record: dict[str, Any],
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> Path:  # fmt: skip
    """run_dir/final: the trained model in Meta's layout (adapters merged into their weights) with the run's
    record; and for LoRA the adapters alone, run_dir/adapters.pth (microllama.lora.load_adapters reads them).
    state_dict: the whole weights, gathered from a data-parallel run's ranks."""
    adapters = adapter_state_dict(model)
    if adapters:
        ckpts.save_adapters(run_dir, adapters)
    state_dict = merge_lora(model).state_dict() if state_dict is None else state_dict
    with atomic_dir(run_dir / ckpts.FINAL, replace=True) as tmp:
        save_meta(state_dict, checkpoint.params, tmp)
        ckpts.write_record(tmp, record)
    return run_dir / ckpts.FINAL


def train(cfg: TrainConfig) -> Summary:
    """Run cfg: every check first (nothing is written before the data and model are known good), then the loop."""
    cfg.check()
    if cfg.mode == "lora":
        check_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = parse_dtype(cfg.dtype) if cfg.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    ranks = distributed.join(cfg.distributed, cfg.batch_size, device)  # None: this process trains alone
    is_main = ranks is None or ranks.is_rank_0  # the one that writes the run's files and prints
    run_dir = Path(cfg.out_dir)
    resumed = ckpts.load_checkpoint(run_dir) if cfg.resume else ckpts.check_new_run_dir(run_dir) if is_main else None

    # Data: tokenized once into the cache, a held-out split, rows packed per epoch in a seeded order.
    checkpoint = open_checkpoint(cfg.ckpt_dir)
    tokenizer = Tokenizer(cfg.tokenizer_path, checkpoint.dir)
    with contextlib.nullcontext() if ranks is None else ranks.rank_0_first():  # one rank tokenizes
        corpus = load_corpus(cfg.data, tokenizer, cache_dir() / "data")
    train_docs, eval_docs = split_documents(len(corpus), cfg.eval_fraction, cfg.seed)
    batches = Batches(corpus, train_docs, cfg.max_seq_len, cfg.batch_size, cfg.seed, tokenizer.pad_id)
    packing = batches.packing(0)
    eval_rows = pack(corpus.lengths(), eval_docs, cfg.max_seq_len).rows[: cfg.eval_rows]
    eval_batches = [make_batch(corpus, eval_rows[i : i + cfg.batch_size], cfg.max_seq_len, tokenizer.pad_id)
                    for i in range(0, len(eval_rows), cfg.batch_size)]  # fmt: skip
    if is_main:
        print(f"data: {len(train_docs):,} documents ({packing.tokens:,} tokens) in {len(packing.rows):,} rows of "
              f"{cfg.max_seq_len} ({packing.tokens / (len(packing.rows) * cfg.max_seq_len):.0%} filled), "
              f"{packing.n_split} split for being longer than a row; {len(eval_docs)} held out",
              flush=True)  # fmt: skip

    # Model: the checkpoint's weights in dtype (fsdp: float32, computing in dtype); what trains depends on the mode.
    weights_dtype = torch.float32 if ranks is not None and ranks.kind == "fsdp" else dtype
    model = checkpoint.load_model(cfg.max_seq_len, 1, device, weights_dtype, cfg.flash).train()
    if model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr():
        model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())  # a tied model trains untied
    model.activation_checkpointing = cfg.activation_checkpointing
    torch.manual_seed(cfg.seed)  # LoRA's initialisation, then dropout
    params = select_trainable(model, cfg)
    if ranks is not None:
        ranks.wrap(model, dtype)
        params = [p for p in model.parameters() if p.requires_grad]  # FSDP's sharded parameters replace them
    optimizer = make_optimizer(params, cfg, device)
    record = run_record(cfg, checkpoint, corpus, dtype)

    step = saved_step = targets_seen = 0
    if resumed:
        state, saved_record = resumed
        ckpts.check_resumable(saved_record, record, run_dir / ckpts.CHECKPOINT)
        if state.dcp is not None:  # saved by a data-parallel run, at any world size
            ckpts.load_sharded_weights(state.dcp, model, optimizer)
        elif ranks is not None and ranks.kind == "fsdp":
            raise ckpts.TrainCheckpointError(f"{run_dir / ckpts.CHECKPOINT} was saved by one process: resume it so")
        else:
            model.load_state_dict(state.weights, strict=False)
            optimizer.load_state_dict(state.optimizer)
        ckpts.restore_rng(state.rng)
        batches.position, step, saved_step, targets_seen = state.data, state.step, state.step, state.targets_seen
        if is_main:
            ckpts.truncate_metrics(run_dir, step)
    elif is_main:
        ckpts.start_run_dir(run_dir, record)
    metrics = open(run_dir / ckpts.METRICS, "a") if is_main else None

    def log(**values: Any) -> None:
        if metrics is not None:
            metrics.write(json.dumps(values) + "\n")
            metrics.flush()

    losses, eval_losses = [], []
    if eval_batches and step == 0:
        eval_losses.append(evaluate(model, eval_batches, cfg, ranks))
        log(step=0, eval_loss=eval_losses[-1])
    start, tokens = time.perf_counter(), 0
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train ({cfg.mode})", unit="step", dynamic_ncols=True,
               disable=not is_main)  # fmt: skip
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        micro_batches = [batches.next_batch().to(device) for _ in range(cfg.grad_accum)]
        try:
            loss, grad_norm = train_step(model, params, optimizer, micro_batches, lr, cfg, ranks=ranks)
        except FloatingPointError as e:
            kept = f"the last good checkpoint, of step {saved_step}, is in {run_dir / ckpts.CHECKPOINT}" if saved_step \
                else "no checkpoint had been saved"  # fmt: skip
            raise TrainingError(f"{e} at step {step + 1}: training stopped before updating the weights; "
                                f"{kept}") from None  # fmt: skip
        n_targets = sum(b.n_targets() for b in micro_batches)
        step, targets_seen = step + 1, targets_seen + n_targets

        tokens += sum(b.tokens.numel() for b in micro_batches)
        tokens_per_s, memory = tokens / (time.perf_counter() - start), peak_memory_gib(device)
        losses.append(loss)
        log(step=step, loss=loss, lr=lr, grad_norm=grad_norm, targets=n_targets, tokens_per_s=round(tokens_per_s, 1),
            peak_memory_gib=round(memory, 3))  # fmt: skip
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mem=f"{memory:.2f}G")
        bar.update()
        if eval_batches and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
            eval_losses.append(evaluate(model, eval_batches, cfg, ranks))
            log(step=step, eval_loss=eval_losses[-1])
            bar.write(f"step {step}: held-out loss {eval_losses[-1]:.4f}")
        if (cfg.save_every and step % cfg.save_every == 0) or step in (cfg.max_steps, cfg.stop_at):
            if ranks is None:
                state = ckpts.TrainState(step, trainable_state(model), optimizer.state_dict(), batches.position,
                                         targets_seen, ckpts.capture_rng())  # fmt: skip
                ckpts.save_checkpoint(run_dir, state, record)
            else:
                state = ckpts.TrainState(step, {}, {}, batches.position, targets_seen, ckpts.capture_rng())
                ckpts.save_sharded_checkpoint(run_dir, state, record, model, optimizer, ranks.is_rank_0)
            saved_step = step
        if step == cfg.stop_at:
            break
    bar.close()
    if metrics is not None:
        metrics.close()

    final = None
    if step == cfg.max_steps:
        whole = None if ranks is None else ranks.full_state_dict(model, dtype)  # every rank takes part
        final = export_final(model, checkpoint, run_dir, record, whole) if is_main else None
    seconds = time.perf_counter() - start
    first_last = [x for values in (losses, eval_losses) for x in ((values[0], values[-1]) if values else (None, None))]
    return Summary(step, seconds, tokens / max(seconds, 1e-9), peak_memory_gib(device), *first_last, final)


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


if __name__ == "__main__":  # python -m microllama.train
    from .train_command import main

    main()
