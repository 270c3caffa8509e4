"""Batched text generation with a KV cache: Meta's decoding loop, greedy or top-p."""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from .args import check_prefill_chunk, check_sampling
from .chat import ChatFormat, DialogError, Message, as_dialog, check_prompt
from .checkpoint.load import Checkpoint, CheckpointError, open_checkpoint
from .compiled import CompiledDecoder
from .distributed import tensor_parallel as parallel
from .distributed.launch import torchrun_world_size
from .files import parse_dtype
from .memory import check_kv_cache, format_bytes
from .model import Transformer
from .quantize import check_quantize
from .tokenizer import Tokenizer


@dataclass
class Completion:
    generation: str
    tokens: list[int]  # generated ids (prompt ids first when echo), without the stop token
    # Log-probability of each id in tokens, as Meta computes it (a generated pad id scores 0).
    logprobs: Optional[list[float]] = None


@dataclass
class Generated:
    tokens: list[list[int]]  # per row: generated ids (prompt ids first when echo), without the stop token
    logprobs: Optional[list[list[float]]]
    stop_tokens: list[Optional[int]]  # per row: the stop token it ended with, None when max_gen_len or max_seq_len


@dataclass
class ChatCompletion:
    message: Message  # the parsed reply: its content, or its tool call (content ""), and its stop reason
    tokens: list[int]  # generated ids, without the stop token
    stop_reason: str  # end_of_turn, end_of_message or out_of_tokens, from the stop token (see ChatFormat)
    stop_token: Optional[int]  # the id that ended the reply (eot, eom, or a base model's end_of_text); None: none did
    logprobs: Optional[list[float]] = None  # log-probability of each id in tokens


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling (Meta's algorithm): keep the most likely tokens until their mass reaches p,
    renormalise, draw one per row. Returns (bsz, 1) token ids."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def next_logprobs(logits: torch.Tensor, next_tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Log-probability (bsz, seqlen) of each next token under float32 logits (bsz, seqlen, vocab), as Meta computes
    it (a pad id scores 0)."""
    return -F.cross_entropy(logits.transpose(1, 2), next_tokens, reduction="none", ignore_index=pad_id)


def output_ends(prompt_lens: Sequence[int], max_gen_len: Optional[int], max_seq_len: int) -> tuple[int, list[int]]:
    """Generation's lengths (Meta's): the token buffer's length, and where each row's output ends at the latest
    (exclusive), after max_gen_len new tokens (None, or max_seq_len or more: max_seq_len - 1) or at the end of the
    buffer; a stop token may end it sooner."""
    if max_gen_len is None or max_gen_len >= max_seq_len:
        max_gen_len = max_seq_len - 1
    total_len = min(max_seq_len, max_gen_len + max(prompt_lens))
    return total_len, [min(n + max_gen_len, total_len) for n in prompt_lens]


class Llama:
    """A model and its tokenizer, with Meta's batched generation loop."""

    @staticmethod
    def build(
        ckpt_dir: Union[str, Path, Checkpoint, None] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[Union[str, torch.dtype]] = None,
        flash: bool = False,
        tokenizer_path: Optional[Union[str, Path]] = None,
        tensor_parallel: bool = False,
        compile: bool = False,
        prefill_chunk: Optional[int] = None,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint: a directory in Meta's or Hugging Face's layout, a tiny checkpoint's name or an
        open Checkpoint (default: the embedded tiny one). dtype defaults to bfloat16 on CUDA and float32
        elsewhere. tensor_parallel: under torchrun, shard the model over the job's ranks as Meta's tensor
        parallelism does (microllama.distributed.tensor_parallel; on CUDA, rank r uses cuda:LOCAL_RANK), each rank
        reading only its slices of the checkpoint; every rank must make the same calls and gets the same tokens.
        compile: decode through microllama.compiled (static cache, torch.compile; implies flash), within the
        flash tolerances of the default path instead of bit-identical; not with tensor_parallel.
        prefill_chunk: prefill prompts that many positions at a time (see Llama).
        quantize: int8, nf4 or int4 (CUDA only), the weights of the blocks' linear layers quantized as they are
        read (microllama.quantize; needs torchao, the quant extra); not with tensor_parallel or compile.
        A KV cache of max_batch_size x max_seq_len positions that cannot fit the device is refused (ValueError,
        one line) before any weight is read."""
        if tensor_parallel and compile:
            raise ValueError("compile and tensor_parallel cannot be combined: the compiled path runs on one device")
        if quantize is not None and (tensor_parallel or compile):
            what = "tensor_parallel" if tensor_parallel else "compile"
            raise ValueError(f"quantize and {what} cannot be combined: a quantized model decodes eagerly on one device")
        check_prefill_chunk(prefill_chunk)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
        dtype = parse_dtype(dtype) if dtype is not None else torch.bfloat16 if device.type == "cuda" else torch.float32
        if quantize is not None:
            check_quantize(quantize, device, dtype)  # before a checkpoint that may take minutes to load
        checkpoint = open_checkpoint(ckpt_dir)
        mesh = None
        if tensor_parallel:
            parallel.check_world_size(checkpoint.args, torchrun_world_size(), checkpoint.source)
            mesh, device = parallel.device_mesh(device)
        # The KV cache's size needs only the configuration: what cannot fit is refused before a weight is read.
        args = checkpoint.model_args(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        check_kv_cache(args, max_batch_size, max_seq_len, dtype, device,
                       None if mesh is None else args.n_kv_heads // mesh.size())  # fmt: skip
        tokenizer = Tokenizer(tokenizer_path, ckpt_dir=checkpoint.dir)
        if checkpoint.args.vocab_size != tokenizer.n_words:
            raise CheckpointError(
                f"{checkpoint.source}: vocab_size {checkpoint.args.vocab_size} differs from the tokenizer's "
                f"{tokenizer.n_words} ({tokenizer.model_path})"
            )
        model = checkpoint.load_model(max_seq_len, max_batch_size, device=device, dtype=dtype, flash=flash or compile,
                                      mesh=mesh, quantize=quantize)  # fmt: skip
        return Llama(model, tokenizer, compile=compile, prefill_chunk=prefill_chunk)

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, compile: bool = False, prefill_chunk: Optional[int] = None
    ):
        """compile: decode through a CompiledDecoder of model (which must have flash attention). prefill_chunk: run
        each prompt through the KV cache that many positions at a time, so that a prefill's activations (the
        attention scores, chunk x positions so far; the logits) stop growing with the square of the prompt.
        Raises ValueError, nothing allocated, if the model's KV cache (max_batch_size x max_seq_len) cannot fit."""
        check_prefill_chunk(prefill_chunk)
        model.check_cache_fits(model.params.max_batch_size, model.params.max_seq_len)
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        # What generation runs: the model itself, or its compiled decoder (same kv_cache and forward).
        self.decoder: Union[Transformer, CompiledDecoder] = CompiledDecoder(model) if compile else model

    def describe_kv_cache(self) -> str:
        """One line: the size of the KV cache generation allocates (max_batch_size x max_seq_len positions)."""
        p, dtype = self.model.params, str(self.model.output.weight.dtype).removeprefix("torch.")
        nbytes = self.model.check_cache_fits(p.max_batch_size, p.max_seq_len)
        per_position = format_bytes(nbytes // (p.max_batch_size * p.max_seq_len))
        return (f"KV cache: {format_bytes(nbytes)} for {p.max_batch_size} x {p.max_seq_len} positions in {dtype} "
                f"({per_position} per position)")  # fmt: skip

    @functools.cached_property
    def formatter(self) -> ChatFormat:
        """Dialogs to ids and replies back; made on first use, so a stand-in tokenizer without Llama 3's special
        tokens still serves generate and text_completion."""
        return ChatFormat(self.tokenizer)

    def check_request(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        temperature: float,
        top_p: float,
        max_gen_len: Optional[int],
        seed: Optional[int] = None,
    ) -> None:
        """Raise ValueError for a request the model cannot serve, before any model work."""
        params = self.model.params
        if not prompt_tokens:
            raise ValueError("no prompts given: the batch is empty")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}")
        for i, t in enumerate(prompt_tokens):
            if not t:
                raise ValueError(f"prompt {i} has no tokens")
            if len(t) >= params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, at or beyond max_seq_len {params.max_seq_len}: "
                    "no room to generate"
                )
        check_sampling(temperature, top_p, max_gen_len, seed)

    def forward(
        self, tokens: torch.Tensor, start: int, end: int, chunk_logprobs: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Run tokens[:, start:end] (bsz, end - start) through the KV cache, at once or prefill_chunk positions at a
        time; return the float32 logits of its last chunk, every position's or only the last one's (bsz, 1, vocab).
        chunk_logprobs (bsz, buffer length): every position's logits are made, those of the chunks before the last
        become the log-probability of each next token there, kept in chunk_logprobs."""
        # The default path projects every position to logits, as Meta's code does: measured on an x86 CPU (torch
        # 2.13), the output matmul of one row takes another kernel than that of many rows, and that row's float32
        # logits differ in the last bits (up to 9.5e-6 on the tiny checkpoints, in 60 of 100 shapes; bfloat16
        # measured equal). Where the arithmetic is not Meta's already (flash, compiled, chunked), the last one only.
        every = chunk_logprobs is not None or (not self.model.params.flash and self.prefill_chunk is None)
        chunk = self.prefill_chunk or end - start
        for s in range(start, end, chunk):
            e = min(s + chunk, end)
            logits = self.decoder.forward(tokens[:, s:e], s, last_only=not every)
            if chunk_logprobs is not None and e < end:
                chunk_logprobs[:, s + 1 : e + 1] = next_logprobs(
                    logits, tokens[:, s + 1 : e + 1], self.tokenizer.pad_id
                )
        return logits

    def generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int] = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        seed: Optional[int] = None,
        on_token: Optional[Callable[[int, int], None]] = None,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt until a stop token or max_gen_len new tokens (default: until
        max_seq_len). Right-padded prompts share one batch: prefill up to the shortest prompt, then
        one position at a time. `seed` seeds a private generator (on CPU the stream Meta draws after
        torch.manual_seed); `on_token(row, id)` sees each new token as it comes."""
        out = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed, on_token)
        return out.tokens, out.logprobs

    @torch.inference_mode()
    def _generate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: Optional[int],
        temperature: float,
        top_p: float,
        logprobs: bool,
        echo: bool,
        seed: Optional[int],
        on_token: Optional[Callable[[int, int], None]],
    ) -> Generated:
        """generate's loop; the result also says which stop token ended each row."""
        self.check_request(prompt_tokens, temperature, top_p, max_gen_len, seed)
        params = self.model.params
        lens = [len(t) for t in prompt_tokens]
        total_len, ends = output_ends(lens, max_gen_len, params.max_seq_len)
        device = self.model.output.weight.device
        bsz = len(prompt_tokens)
        prompt_lens = torch.tensor(lens, device=device)
        min_prompt_len = min(lens)

        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        token_logprobs = torch.zeros_like(tokens, dtype=torch.float) if logprobs else None
        mesh = parallel.mesh_of(self.model)
        if seed is None and temperature > 0 and mesh is not None:
            seed = parallel.shared_seed(mesh)  # tensor-parallel ranks must draw the same tokens
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        input_text_mask = tokens != pad_id
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=device)
        # Where each row's output ends (exclusive), decided here once for the stream and the result:
        # after max_gen_len new tokens, at the end of the buffer, or at its first stop token (below).
        end = torch.tensor(ends, device=device)
        stop_token = torch.full_like(prompt_lens, -1)  # the stop token that ended each row, -1 while none has

        # The cache has Meta's shape (max_batch_size, max_seq_len): the slices attention reads then
        # have Meta's strides too.
        with self.decoder.kv_cache(params.max_batch_size, params.max_seq_len):
            prev_pos = 0
            for cur_pos in range(min_prompt_len, total_len):
                # The prompt's own log-probabilities are returned with echo alone.
                logits = self.forward(tokens, prev_pos, cur_pos, token_logprobs if echo else None)
                if temperature > 0:
                    probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                    next_token = sample_top_p(probs, top_p, generator)
                else:
                    next_token = torch.argmax(logits[:, -1], dim=-1)
                next_token = next_token.reshape(-1)
                # Rows still inside their prompt keep the prompt's token.
                next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                if token_logprobs is not None:
                    first = cur_pos - logits.shape[1]  # the position of logits' first row
                    token_logprobs[:, first + 1 : cur_pos + 1] = next_logprobs(
                        logits, tokens[:, first + 1 : cur_pos + 1], pad_id
                    )
                generated = (prompt_lens <= cur_pos) & (cur_pos < end)  # rows whose output reaches cur_pos
                stopped = generated & torch.isin(next_token, stop_tokens)
                end = torch.where(stopped, cur_pos, end)
                stop_token = torch.where(stopped, next_token, stop_token)
                if on_token is not None:
                    for row in (generated & ~stopped).nonzero().flatten().tolist():
                        on_token(row, int(next_token[row]))
                prev_pos = cur_pos
                if bool((end <= cur_pos + 1).all()):  # every row's output is complete
                    break

        out_tokens, out_logprobs = [], []
        for i, (row, stop) in enumerate(zip(tokens.tolist(), end.tolist(), strict=True)):
            start = 0 if echo else len(prompt_tokens[i])
            out_tokens.append(row[start:stop])
            if token_logprobs is not None:
                out_logprobs.append(token_logprobs[i, start:stop].tolist())
        stops = [None if t < 0 else t for t in stop_token.tolist()]
        return Generated(out_tokens, out_logprobs if logprobs else None, stops)

    def text_completion(
        self,
        prompts: Sequence[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        echo: bool = False,
        logprobs: bool = False,
        seed: Optional[int] = None,
        on_token: Optional[Callable[[int, int], None]] = None,
    ) -> list[Completion]:
        """Complete each prompt. Prompts are encoded as given, with BOS and no added trailing space."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, seed, on_token)
        return [Completion(self.tokenizer.decode(t), t, None if lps is None else lps[i]) for i, t in enumerate(tokens)]

    def chat_completion(
        self,
        dialogs: Sequence[Sequence[Union[Message, dict[str, Any]]]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        seed: Optional[int] = None,
        tool_prompt_format: str = "json",
        on_token: Optional[Callable[[int, int], None]] = None,
    ) -> list[ChatCompletion]:
        """The assistant's reply to each dialog (a list of Message or {"role", "content"} dicts, see chat.py),
        generated until <|eot_id|>, <|eom_id|> or max_gen_len, and parsed as Meta parses it. Custom tool calls
        in earlier assistant turns are written in tool_prompt_format ("json" or "function_tag")."""
        if isinstance(dialogs, (str, dict, Message)) or (dialogs and isinstance(dialogs[0], (dict, Message))):
            raise TypeError("dialogs must be a list of dialogs (each a list of messages), not one dialog")
        if not dialogs:
            raise DialogError("no dialogs given: the batch is empty")
        prompt_tokens = []
        for i, dialog in enumerate(dialogs):
            try:
                messages = as_dialog(dialog)
                check_prompt(messages)
                prompt_tokens.append(self.formatter.encode_dialog_prompt(messages, tool_prompt_format))
            except DialogError as e:
                raise DialogError(f"dialog {i}: {e}") from None
            if len(prompt_tokens[-1]) >= self.model.params.max_seq_len:
                raise DialogError(
                    f"dialog {i} is {len(prompt_tokens[-1])} tokens, at or beyond max_seq_len "
                    f"{self.model.params.max_seq_len}: no room for a reply"
                )
        out = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False, seed, on_token)
        return [
            ChatCompletion(
                self.formatter.decode_reply(tokens, stop), tokens, self.formatter.stop_reason(stop), stop,
                None if out.logprobs is None else out.logprobs[i],
            )
            for i, (tokens, stop) in enumerate(zip(out.tokens, out.stop_tokens, strict=True))
        ]  # fmt: skip
