"""What weight-only quantization costs a trained model, measured on a training run's held-out documents: the
run's final weights loaded dense and quantized (microllama.quantize), both run over every held-out row, and
compared at each position that has a target. Random weights say nothing about this (their logits carry no
knowledge to lose); a run of `microllama train` on the shipped corpus gives weights that do.

    from microllama.train.quality import measure
    for q in measure("runs/tales", ["int8", "nf4"]):
        print(q.quantize, q.loss_change, q.top1_agreement, q.mean_kl)
"""

import fcntl
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint.load import open_checkpoint
from ..checkpoint.tiny import cache_dir
from ..files import file_sha256, parse_dtype
from ..model import Transformer
from ..tokenizer import Tokenizer
from . import run_dir as ckpts
from .config import TrainConfig
from .data import IGNORE_INDEX, Batch, data_files, held_out_batches, load_corpus, split_documents
from .loop import train


@dataclass
class Quality:
    """A quantized model against the dense one over the same held-out positions (those with a target)."""

    quantize: str
    positions: int
    dense_loss: float  # mean next-token cross-entropy of the dense model, nats
    loss: float  # the quantized model's
    top1_agreement: float  # share of positions where both models' most likely next token is the same
    mean_kl: float  # mean over positions of KL(dense || quantized) between next-token distributions, nats

    @property
    def loss_change(self) -> float:
        """(loss - dense_loss) / dense_loss: the held-out loss's relative change."""
        return (self.loss - self.dense_loss) / self.dense_loss


@torch.no_grad()
def compare(dense: Transformer, quantized: dict[str, Transformer], batches: Sequence[Batch]) -> list[Quality]:
    """Run the dense model and each quantized one (by format) over batches, one row at a time (a row's float32
    logits: seq_len x vocab_size), and compare them at the positions that have a target."""
    n, dense_nll = 0, 0.0
    sums = {name: [0.0, 0.0, 0.0] for name in quantized}  # summed loss, agreements, KL
    for batch in tqdm(batches, desc=f"held-out rows, dense and {', '.join(quantized)}", unit="batch", disable=None):
        for tokens, targets, documents in zip(batch.tokens, batch.targets, batch.documents, strict=True):
            keep = targets != IGNORE_INDEX
            if not keep.any():
                continue
            wanted = targets[keep, None]
            p = F.log_softmax(dense(tokens[None], documents=documents[None])[0, keep], dim=-1)
            top1 = p.argmax(-1)
            dense_nll -= p.gather(-1, wanted).sum().item()
            n += int(keep.sum())
            for name, model in quantized.items():
                q = F.log_softmax(model(tokens[None], documents=documents[None])[0, keep], dim=-1)
                sums[name][0] -= q.gather(-1, wanted).sum().item()
                sums[name][1] += (q.argmax(-1) == top1).sum().item()
                sums[name][2] += F.kl_div(q, p, log_target=True, reduction="sum").item()  # sum of exp(p) * (p - q)
    if n == 0:
        raise ValueError("no held-out position has a target: nothing to compare")
    return [Quality(name, n, dense_nll / n, nll / n, agree / n, kl / n) for name, (nll, agree, kl) in sums.items()]


def held_out(cfg: TrainConfig, rows: Optional[int] = None, corpus_key: Optional[str] = None) -> list[Batch]:
    """The held-out rows of the run cfg describes, as its trainer split and packed them: the first `rows` (None:
    all, not only its eval_rows), in batches of its batch_size. corpus_key: the run's (its record's), checked
    against the data read now, so that no other data is taken for the run's held-out documents."""
    checkpoint = open_checkpoint(cfg.ckpt_dir)
    tokenizer = Tokenizer(cfg.tokenizer_path, checkpoint.dir)
    corpus = load_corpus(cfg.data, tokenizer, cache_dir() / "data")
    if corpus_key is not None and corpus.key != corpus_key:
        raise ValueError(f"{cfg.data} is not the data the run trained on (its contents have changed)")
    _, eval_docs = split_documents(len(corpus), cfg.eval_fraction, cfg.seed)
    return held_out_batches(corpus, eval_docs, cfg.max_seq_len, cfg.batch_size, rows, tokenizer.pad_id)


def measure(
    run: Union[str, Path], formats: Sequence[str] = ("int8", "nf4"), dtype: str = "float32", rows: Optional[int] = None
) -> list[Quality]:
    """The final weights of the finished training run in directory run (RUN/final), loaded dense in dtype and in
    each of formats, compared over the first `rows` held-out rows of that run (None: all; its train_config.json
    says which they are)."""
    final = Path(run) / ckpts.FINAL
    if not (final / ckpts.RECORD).is_file():
        raise FileNotFoundError(f"{final / ckpts.RECORD} not found: {run} is not a finished run of microllama train")
    record = ckpts.read_record(final)
    cfg = TrainConfig(**record["config"])
    batches, checkpoint = held_out(cfg, rows, record["data"]["corpus"]), open_checkpoint(final)
    torch_dtype = parse_dtype(dtype)
    dense = checkpoint.load_model(cfg.max_seq_len, dtype=torch_dtype)
    quantized = {q: checkpoint.load_model(cfg.max_seq_len, dtype=torch_dtype, quantize=q) for q in formats}
    return compare(dense, quantized, batches)


def trained_run(recipe: dict[str, Any]) -> Path:
    """A finished run of recipe (TrainConfig's fields but out_dir) under $MICROLLAMA_CACHE/runs, in a directory
    named by a digest of the recipe, its data's bytes and torch's version: trained on first use (a run killed
    half-way is resumed from its last checkpoint), then reused. Processes asking at once train it once (a lock)."""
    fields = {k: v for k, v in recipe.items() if k != "data"}
    data = [file_sha256(f) for f in data_files(recipe["data"])]
    text = json.dumps({"recipe": fields, "data": data, "torch": torch.__version__}, sort_keys=True)
    run = cache_dir() / "runs" / f"run-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (run / ckpts.FINAL / ckpts.RECORD).is_file():
            train(TrainConfig(**recipe, out_dir=str(run), resume=(run / ckpts.CHECKPOINT).is_dir()))
    return run
