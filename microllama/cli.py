"""The `microllama` command: generate text, build the tiny checkpoint, verify against goldens, convert and
describe checkpoints."""

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import fire

from . import tiny
from .checkpoint import convert as convert_checkpoint
from .checkpoint import open_checkpoint
from .generation import Llama, check_sampling
from .verify import format_comparison
from .verify import verify as verify_golden_set


class StreamPrinter:
    """Prints one row's tokens as text as they come, holding back bytes that do not yet form a character."""

    def __init__(self, decode, out=None):
        self.decode, self.out = decode, out or sys.stdout
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown :])
            self.out.flush()
            self.shown = len(text)


def generate(
    prompt: Union[str, Sequence[str]] = "Clearly, the meaning of life is",
    ckpt_dir: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 64,
    max_seq_len: int = 512,
    seed: Optional[int] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    flash: bool = False,
    tokenizer_path: Optional[str] = None,
) -> None:
    """Complete one prompt (streamed) or a list of prompts (--prompt '["a", "b"]'). ckpt_dir defaults
    to the embedded tiny checkpoint, whose random weights produce fluent-looking nonsense."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"--prompt must be text; fire read {prompt!r} as a Python literal: quote it twice")
    check_sampling(temperature, top_p, max_gen_len)  # before a checkpoint that may take minutes to load
    llama = Llama.build(ckpt_dir, max_seq_len, len(prompts), device=device, dtype=dtype, flash=flash,
                        tokenizer_path=tokenizer_path)  # fmt: skip
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        llama.text_completion(prompts, temperature, top_p, max_gen_len, seed=seed,
                              on_token=StreamPrinter(llama.tokenizer.decode))  # fmt: skip
        print()
        return
    for p, c in zip(prompts, llama.text_completion(prompts, temperature, top_p, max_gen_len, seed=seed), strict=True):
        print(f"{p}{c.generation}\n{'=' * 40}")


def make_tiny(out_dir: str, name: str = "tiny", seed: int = tiny.DEFAULT_SEED) -> None:
    """Write a tiny Meta-layout checkpoint (params.json, consolidated.00.pth) into OUT_DIR."""
    path = tiny.make_tiny(Path(out_dir), name, seed)
    print(f"wrote {path} (sha256 {(path / 'sha256.txt').read_text().strip()})")


def convert(src: str, dst: str, to: str, shards: int = 1) -> None:
    """Rewrite checkpoint SRC (Meta or Hugging Face layout) into DST in layout --to meta|hf, bit for bit;
    --shards N splits a Meta-layout output over N tensor-parallel ranks as Meta's fairscale code does."""
    path = convert_checkpoint(Path(src), Path(dst), to, shards)
    split = f", {shards} shards" if to == "meta" and shards > 1 else ""
    print(f"wrote {path} ({to} layout{split})")


def info(target: str) -> None:
    """Configuration, parameter count, weight bytes and KV-cache bytes of TARGET: a checkpoint directory
    (either layout) or a model name (llama3.1-8b, llama3.1-70b, llama3.1-405b, llama3.2-1b, llama3.2-3b, tiny)."""
    print("\n".join(open_checkpoint(target).describe()))


def verify(
    golden_dir: str, ckpt_dir: Optional[str] = None, device: Optional[str] = None, other_checkpoint: bool = False
) -> None:
    """Check microllama against the golden set in GOLDEN_DIR (recorded from Meta's code): a table per
    capture point, the first divergent one and a verdict on stdout, progress on stderr; exit status 1 when
    the check fails. ckpt_dir defaults to the set's own checkpoint (a directory, or tiny / tiny-hd128); one whose
    sha256 is not the recording's fails the check unless --other_checkpoint says that is intended."""
    comparison = verify_golden_set(golden_dir, ckpt_dir, device, other_checkpoint=other_checkpoint, progress=True)
    print(format_comparison(comparison))
    if not comparison.passed:
        sys.exit(1)


COMMANDS = {"generate": generate, "make-tiny": make_tiny, "verify": verify, "convert": convert, "info": info}


def main(argv: Optional[list[str]] = None) -> None:
    try:
        fire.Fire(COMMANDS, command=argv, name="microllama")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"microllama: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
