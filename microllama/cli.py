"""The `microllama` command: generate text, chat, train, build the tiny checkpoint, verify against goldens,
convert and describe checkpoints, on the command line of microllama.flags."""

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .flags import run
from .train.command import train

# torch takes seconds to import, longer on a loaded machine, and `microllama --help` or a misspelt flag should
# not wait for it: this module imports only the standard library, fire and the flags of `train` (TrainConfig's),
# and each command imports what it needs when it runs.

DEFAULT_PROMPT = "Clearly, the meaning of life is"
# Said on stderr before --compile's first output: the first decode step of each batch size compiles first.
COMPILING = (
    "--compile: the first decode step compiles the model (seconds on a CPU for small models; on CUDA, where "
    "coordinate descent tuning times each kernel, about a minute for 8B)"
)


def generate(
    prompt: Optional[str] = None,
    *,
    prompts: Optional[list[str]] = None,
    ckpt_dir: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 64,
    max_seq_len: int = 512,
    seed: Optional[int] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    flash: bool = False,
    prefill_chunk: Optional[int] = None,
    tokenizer_path: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
) -> None:
    """Complete PROMPT (default: "Clearly, the meaning of life is"), streamed as it comes, or each of --prompts,
    a JSON list of strings: --prompts '["first", "second"]'. The tiny default's random weights produce
    fluent-looking nonsense. Launched by torchrun with several ranks
    (torchrun --nproc_per_node N -m microllama.cli generate ...), the model is tensor-parallel over them and
    rank 0 prints.

    Args:
        prompt: the text to complete, exactly as given (no space added)
        prompts: a JSON list of texts, completed as one batch
        ckpt_dir: a checkpoint directory (Meta's or Hugging Face's layout) or a tiny checkpoint's name; tiny if none
        temperature: 0 for greedy decoding; higher samples more freely
        top_p: nucleus sampling: the smallest set of tokens whose probabilities reach top_p
        max_gen_len: the most tokens to generate per prompt
        max_seq_len: the longest sequence (prompt and completion) the KV cache holds
        seed: makes sampling reproducible (on the CPU, what Meta draws after torch.manual_seed(seed))
        device: cpu, cuda or cuda:N
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 elsewhere)
        flash: attention through torch's scaled_dot_product_attention (not bit-identical to Meta's)
        prefill_chunk: prefill the prompt this many positions at a time (less memory for long prompts; within
            tolerance of Meta's one-shot prefill, not bit for bit)
        tokenizer_path: a tokenizer.model (default: $MICROLLAMA_TOKENIZER, the checkpoint's, else llama-models')
        compile: the compiled decode path (static KV cache, torch.compile, flash attention; one process only)
        quantize: int8, nf4 or int4 (CUDA only): the blocks' linear layers quantized as they load (needs torchao:
            pip install 'microllama[quant]')
    """
    if prompt is not None and prompts is not None:
        raise ValueError("give --prompt or --prompts, not both")
    texts = prompts if prompts is not None else [DEFAULT_PROMPT if prompt is None else prompt]
    from .args import check_prefill_chunk, check_sampling
    from .distributed.launch import is_rank_0, torchrun_world_size
    from .generation import Llama
    from .terminal import StreamPrinter

    check_sampling(temperature, top_p, max_gen_len, seed)  # before a checkpoint that may take minutes to load
    check_prefill_chunk(prefill_chunk)
    if max_seq_len < 1:
        raise ValueError(f"--max_seq_len must be at least 1, got {max_seq_len}")
    llama = Llama.build(ckpt_dir, max_seq_len, len(texts), device=device, dtype=dtype, flash=flash,
                        prefill_chunk=prefill_chunk,
                        tokenizer_path=tokenizer_path, tensor_parallel=torchrun_world_size() > 1,
                        compile=compile, quantize=quantize)  # fmt: skip
    # The whole request is checked before the prompt is echoed, so that an error does not follow it.
    tokens = [llama.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    llama.check_request(tokens, temperature, top_p, max_gen_len, seed)
    if not is_rank_0():  # every rank computes the same tokens; one prints them
        llama.text_completion(texts, temperature, top_p, max_gen_len, seed=seed)
        return
    if compile:
        print(COMPILING, file=sys.stderr, flush=True)
    print(llama.describe_kv_cache(), file=sys.stderr, flush=True)
    if len(texts) == 1:
        print(texts[0], end="", flush=True)
        llama.text_completion(texts, temperature, top_p, max_gen_len, seed=seed,
                              on_token=StreamPrinter(llama.tokenizer.decode))  # fmt: skip
        print()
        return
    for p, c in zip(texts, llama.text_completion(texts, temperature, top_p, max_gen_len, seed=seed), strict=True):
        print(f"{p}{c.generation}\n{'=' * 40}")


def make_tiny(out_dir: str, name: str = "tiny", seed: int = 0) -> None:
    """Write the tiny Meta-layout checkpoint NAME (tiny, tiny-hd128, tiny-kv4; params.json,
    consolidated.00.pth) into OUT_DIR; seed 0 gives the embedded one's weights."""
    from .checkpoint import tiny

    path = tiny.make_tiny(Path(out_dir), name, seed)
    print(f"wrote {path} (sha256 {(path / 'sha256.txt').read_text().strip()})")


def convert(src: str, dst: str, to: str, shards: int = 1) -> None:
    """Rewrite checkpoint SRC (Meta or Hugging Face layout) into DST in layout --to meta|hf, bit for bit;
    --shards N splits a Meta-layout output over N tensor-parallel ranks as Meta's fairscale code does."""
    from .checkpoint.load import convert as convert_checkpoint

    path = convert_checkpoint(src, Path(dst), to, shards)  # src: a name or a path, as open_checkpoint reads it
    split = f", {shards} shards" if to == "meta" and shards > 1 else ""
    print(f"wrote {path} ({to} layout{split})")


def info(target: str) -> None:
    """Configuration, parameter count, weight bytes and KV-cache bytes of TARGET: a checkpoint directory
    (either layout) or a model name (llama3.1-8b, llama3.1-70b, llama3.1-405b, llama3.2-1b, llama3.2-3b, tiny)."""
    from .checkpoint import family

    # A published configuration is numbers alone, described without importing torch (open_checkpoint does); a
    # directory of that name here goes through open_checkpoint, which says which of the two it takes.
    if target in family.FAMILY and not Path(target).is_dir():
        print("\n".join(family.describe_published(target)))
        return
    from .checkpoint.load import open_checkpoint

    print("\n".join(open_checkpoint(target).describe()))


def verify(
    golden_dir: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    device: Optional[str] = None,
    *,
    other_checkpoint: bool = False,
    compile: bool = False,
    all: bool = False,
) -> None:
    """Check microllama against the golden set in GOLDEN_DIR (recorded from Meta's code): a table per
    capture point, the completions and chat replies (or, for a training set, each step of microllama's
    trainer), the first divergent check and a verdict on stdout, progress on stderr; exit status 1 when the
    check fails. ckpt_dir defaults to the set's own checkpoint (a directory, or tiny / tiny-hd128); one whose
    sha256 is not the recording's fails at once unless --other_checkpoint says that is intended. Launched by
    torchrun with several ranks, an inference set's model is tensor-parallel over them (bit-identical to a set
    Meta recorded at that world size) and rank 0 reports.
    --compile checks the compiled decode path instead of the default one (values within tolerance; completions
    and chat replies identical, or parting from the recording only where the tolerance allows).
    --all checks every set in GOLDEN_DIR (default: this checkout's goldens/), each on its own checkpoint, and
    prints one summary table and one verdict (the reports of the sets that fail come first)."""
    if all:
        return _verify_all(golden_dir, device, ckpt_dir=ckpt_dir, other_checkpoint=other_checkpoint, compile=compile)
    if golden_dir is None:
        raise ValueError("verify needs GOLDEN_DIR (a golden or training set), or --all")
    from .golden.training_set import is_training_set

    if is_training_set(golden_dir):  # a training set: microllama's trainer against Meta's fine-tune
        from .golden.verify_training import format_training_comparison, verify_training

        training = verify_training(golden_dir, ckpt_dir, device, other_checkpoint=other_checkpoint)
        print(format_training_comparison(training))
        if not training.passed:
            sys.exit(1)
        return
    from .distributed.launch import is_rank_0, torchrun_world_size
    from .golden.verify import format_comparison
    from .golden.verify import verify as verify_golden_set

    comparison = verify_golden_set(golden_dir, ckpt_dir, device, other_checkpoint=other_checkpoint,
                                   progress=is_rank_0(), tensor_parallel=torchrun_world_size() > 1,
                                   compile=compile)  # fmt: skip
    if is_rank_0():
        print(format_comparison(comparison))
    if not comparison.passed:
        sys.exit(1)


# The committed golden sets of this checkout (the package is installed from it with pip install -e).
COMMITTED_GOLDENS = Path(__file__).resolve().parent.parent / "goldens"


def _verify_all(root: Optional[str], device: Optional[str], **refused: Any) -> None:
    given = [f"--{name}" for name, value in refused.items() if value]
    if given:
        raise ValueError(f"verify --all checks each set on its own checkpoint, on the default path: {given[0]} "
                         "is for one set")  # fmt: skip
    from .golden.verify_all import format_summary, verify_all

    results = verify_all(root if root is not None else COMMITTED_GOLDENS, device, progress=True)
    for r in results:
        if not r.passed:
            print(r.report + "\n")
    print(format_summary(results))
    if not all(r.passed for r in results):
        sys.exit(1)


def chat(
    *,
    ckpt_dir: Optional[str] = None,
    system: Optional[str] = None,
    dialogs: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 128,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    seed: Optional[int] = None,
    tool_prompt_format: str = "json",
    device: str = "cpu",
    dtype: Optional[str] = None,
    flash: bool = False,
    prefill_chunk: Optional[int] = None,
    tokenizer_path: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
) -> None:
    """Talk with a model in Llama 3.1's dialog format: an interactive session (--system TEXT: a system prompt;
    type /reset, /system TEXT, /tool TEXT or /exit; Ctrl-C stops a reply), or with --dialogs FILE the reply to
    each line of a JSONL file (a JSON list of {"role": ..., "content": ...} messages per line, answered in
    batches of --max_batch_size) written to stdout as JSONL. The tiny default's random weights reply with nonsense.

    Args:
        ckpt_dir: a checkpoint directory (Meta's or Hugging Face's layout) or a tiny checkpoint's name; tiny if none
        system: the system prompt of the interactive session
        dialogs: a JSONL file of dialogs to answer instead of a session
        temperature: 0 for greedy decoding; higher samples more freely
        top_p: nucleus sampling: the smallest set of tokens whose probabilities reach top_p
        max_gen_len: the most tokens of a reply
        max_seq_len: the longest dialog (prompt and reply) the KV cache holds
        max_batch_size: with --dialogs, how many are answered at once
        seed: makes sampling reproducible
        tool_prompt_format: how tool calls are asked for: json or function_tag
        device: cpu, cuda or cuda:N
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 elsewhere)
        flash: attention through torch's scaled_dot_product_attention (not bit-identical to Meta's)
        prefill_chunk: prefill each dialog this many positions at a time (less memory for long dialogs; within
            tolerance of Meta's one-shot prefill, not bit for bit)
        tokenizer_path: a tokenizer.model (default: $MICROLLAMA_TOKENIZER, the checkpoint's, else llama-models')
        compile: the compiled decode path (static KV cache, torch.compile; the first step compiles)
        quantize: int8, nf4 or int4 (CUDA only): the blocks' linear layers quantized as they load (needs torchao:
            pip install 'microllama[quant]')
    """
    from .args import check_prefill_chunk, check_sampling
    from .chat import TOOL_PROMPT_FORMATS

    check_sampling(temperature, top_p, max_gen_len, seed)  # before a checkpoint that may take minutes to load
    check_prefill_chunk(prefill_chunk)
    for flag, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ValueError(
            f"--tool_prompt_format must be one of {', '.join(TOOL_PROMPT_FORMATS)}, got {tool_prompt_format!r}"
        )
    if dialogs is not None and system is not None:
        raise ValueError("--system is for the interactive session; with --dialogs, put system messages in the file")
    from .checkpoint.load import open_checkpoint
    from .generation import Llama
    from .terminal import COMMANDS_HELP, ChatSession, answer_dialogs, read_dialogs

    read = read_dialogs(Path(dialogs)) if dialogs is not None else None  # a bad file is reported before loading
    checkpoint = open_checkpoint(ckpt_dir)
    batch = min(max_batch_size, len(read)) if read is not None else 1
    llama = Llama.build(checkpoint, max_seq_len, batch, device=device, dtype=dtype, flash=flash,
                        prefill_chunk=prefill_chunk,
                        tokenizer_path=tokenizer_path, compile=compile, quantize=quantize)  # fmt: skip
    if compile:
        print(COMPILING, file=sys.stderr, flush=True)
    print(llama.describe_kv_cache(), file=sys.stderr, flush=True)
    sampling = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, seed=seed,
                    tool_prompt_format=tool_prompt_format)  # fmt: skip
    if read is not None:
        answer_dialogs(llama, Path(dialogs), read, **sampling)
        return
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    nonsense = " (random weights: its replies are nonsense)" if checkpoint.tiny else ""
    print(f"microllama chat: {checkpoint.name}{nonsense}, max_seq_len {max_seq_len}, max_gen_len {max_gen_len}")
    print(COMMANDS_HELP)
    ChatSession(llama, system, **sampling).run()


def plot(run_dir: str) -> None:
    """Write RUN_DIR/loss.png, the training and held-out loss of a run (needs matplotlib: pip install
    'microllama[plot]')."""
    from .train.loop import plot as plot_run

    print(f"wrote {plot_run(run_dir)}")


def compare_losses(a: str, b: str, rtol: Optional[float] = None) -> None:
    """Compare the loss curves A and B (each a training run's directory or metrics.jsonl, or a loss-curve golden
    such as goldens/losses/tiny-fp32-cpu-ws1.json) step by step: losses and gradient norms within rtol, relative
    to B's (default: microllama.tolerances.LOSS_CURVE_RTOL; 0 asks for bit for bit). Names the first step that
    parts, exit status 1 then."""
    from .golden.loss_curve import compare, max_relative_difference, read_curve
    from .tolerances import LOSS_CURVE_RTOL

    rtol = LOSS_CURVE_RTOL if rtol is None else rtol
    if not (rtol >= 0):
        raise ValueError(f"--rtol must be 0 or more, got {rtol}")
    curve_a, curve_b = read_curve(a), read_curve(b)
    parting = compare(curve_a, curve_b, rtol)
    if parting is not None:
        print(f"A and B part at {parting.line(rtol)}")
        sys.exit(1)
    worst = max_relative_difference(curve_a, curve_b)
    print(f"A and B agree over {len(curve_a)} steps within {rtol:.3g} relative (largest difference {worst:.3g})")


COMMANDS = {
    "generate": generate,
    "make-tiny": make_tiny,
    "verify": verify,
    "convert": convert,
    "info": info,
    "chat": chat,
    "train": train,
    "plot": plot,
    "compare-losses": compare_losses,
}


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(COMMANDS, argv, "microllama")


def script_main() -> None:
    """`python -m microllama` and `python -m microllama.cli` (as torchrun starts them): main, then every rank done
    with the process group leaves it."""
    main()
    if "torch.distributed" in sys.modules:  # imported by a command that used it (torch itself imports it)
        from .distributed.launch import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    script_main()
