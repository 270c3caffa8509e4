"""The `train` command of `microllama train` and `python -m microllama.train`: TrainConfig's fields are its
flags, checked (and --help shown) without importing torch; the training loop is imported when it runs."""

from typing import Any, Optional

from ..flags import Command, config_command, field_comments, run
from .config import TrainConfig  # the standard library only: --help stays fast


def _train(config: Any) -> None:
    from ..distributed.launch import is_rank_0, leave_process_group
    from .loop import train as run_training

    summary = run_training(config)
    if is_rank_0():  # under torchrun, rank 0 speaks for the job
        print(summary.line())
    leave_process_group()  # under torchrun, every rank done


def _train_command() -> Command:
    command = config_command(TrainConfig, _train)
    command.__doc__ = (
        "Train or fine-tune from DATA (a .txt or .jsonl file, or a directory of them): --mode full|lora|norms, "
        "checkpoints and metrics.jsonl in --out_dir, final weights in OUT_DIR/final (Meta layout, or --export hf)."
    ) + field_comments(TrainConfig)
    return command


train = _train_command()


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m microllama.train ...`: the same flags and checks as `microllama train`."""
    run(train, argv, "python -m microllama.train")
