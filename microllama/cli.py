"""The `microllama` command: generate text, build the tiny checkpoint, verify against goldens, convert and
describe checkpoints."""

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import fire
import torch

from . import family, goldens, tiny
from .checkpoint import args_from_params, checkpoint_params, config_path, layout, stored_bytes
from .checkpoint import convert as convert_checkpoint
from .generation import Llama, check_sampling
from .hf import read_config
from .model import ffn_hidden_dim


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
    print(f"wrote {path} ({to} layout{f', {shards} shards' if to == 'meta' else ''})")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def info(target: str) -> None:
    """Configuration, parameter count, weight bytes and KV-cache bytes of TARGET: a checkpoint directory
    (either layout) or a model name (llama3.1-8b, llama3.1-70b, llama3.1-405b, llama3.2-1b, llama3.2-3b, tiny)."""
    known = {**tiny.CONFIGS, **family.FAMILY}
    if target in known and not Path(target).exists():
        params, source, stored, tied = known[target], "published configuration", None, target in family.TIED
    else:
        params, source, stored = checkpoint_params(target), str(config_path(target)), stored_bytes(target)
        tied = layout(target) == "hf" and read_config(target)[1]
    args = args_from_params(params, source)
    hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
    name = family.match(vars(args), hidden)
    n_params = family.parameter_count(args, tied)
    s = args.rope_scaling
    context = family.CONTEXT if args.use_scaled_rope else s.original_context
    rope = f"rope_theta={args.rope_theta:g}" + (
        f" scaled (factor {s.factor:g}, low {s.low_freq_factor:g}, high "
        f"{s.high_freq_factor:g}, original context {s.original_context})"
        if args.use_scaled_rope
        else ""
    )
    print(f"model       {target}" + (f" (matches {name})" if name and name != target else ""))
    print(f"config      {source}: dim={args.dim} n_layers={args.n_layers} n_heads={args.n_heads} "
          f"n_kv_heads={args.n_kv_heads} head_dim={args.head_dim} vocab_size={args.vocab_size} "
          f"ffn_hidden={hidden} "
          f"norm_eps={args.norm_eps:g}")  # fmt: skip
    print(f"rope        {rope}")
    print(f"parameters  {n_params:,}" + (" (output tied to the embedding)" if tied else ""))
    if stored:
        print("stored      " + ", ".join(f"{dtype} {_size(n)} ({n:,} bytes)" for dtype, n in stored.items()))
    for dtype in (torch.bfloat16, torch.float32):
        per_token = family.kv_cache_bytes_per_token(args, dtype)
        print(
            f"{str(dtype)[6:]:<11} weights {_size(n_params * dtype.itemsize)}; KV cache {_size(per_token)} per "
            f"token, {_size(per_token * context)} for the full {context:,}-token context (per sequence)"
        )


def verify(golden_dir: str, ckpt_dir: Optional[str] = None, device: Optional[str] = None) -> None:
    """Check microllama against the golden set in GOLDEN_DIR (recorded from Meta's code): a table per
    capture point and the first divergent one; exit status 1 on divergence. ckpt_dir defaults to the
    set's own checkpoint (a directory, or tiny / tiny-hd128)."""
    comparison = goldens.verify(golden_dir, ckpt_dir, device)
    print(goldens.format_comparison(comparison))
    if comparison.diverged:
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
