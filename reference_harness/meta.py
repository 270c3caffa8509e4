"""The one door to Meta's reference code (llama-models 0.3.0 with fairscale).

Everything odd about running it is handled here, once:

- torchvision. `llama_models.llama3.generation` imports the multimodal model, whose image transform
  imports torchvision at module level. torchvision cannot be installed beside the CPU torch wheel, and
  the text path never calls it, so `import_meta()` registers stand-in `torchvision` modules while
  Meta's modules import (and removes them after, so libraries probing for torchvision do not see them).
  Touching anything in them raises, so a vision code path fails loudly instead of computing nonsense.
- Model parallelism. Meta's layers are fairscale's ColumnParallelLinear, RowParallelLinear and
  VocabParallelEmbedding, which need torch.distributed and fairscale's model-parallel groups even
  for one process: `init_model_parallel()` makes a gloo group (CPU) or nccl group (CUDA). Under
  torchrun it joins the group torchrun describes; in-process it makes a group of one.
- Global state. Meta's checkpoint loader sets torch's default tensor type to bfloat16, and
  `Llama3.build` sets the default device. `restore_torch_defaults()` puts both back; Meta's
  `generate` makes its tensors on the default device, so `meta_completions` sets it for the call.
  Meta's sampling draws from torch's global generator: `meta_generate` seeds it for the call and
  gives the caller's state back after.
- Its tokenizer. `Llama3` needs a tokenizer only for pad and stop ids, each result's text, and the
  `<|image|>` id its ChatFormat looks up; `meta_generator` hands it a stand-in over any vocabulary, so
  Meta's loop runs on small random models fed token ids directly.
- Its stream. `Llama3.generate` yields one result per row per step, for every row until the batch
  ends, past a row's stop token and past its own max_gen_len; `cut_stream` reads each row's
  completion off it as microllama returns it.
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import time
import types
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch


class _Unavailable(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"torchvision.{name} was used, but reference_harness stands in for torchvision "
            "(only Meta's vision model needs it; microllama's harness runs the text model)"
        )


def _stub_torchvision() -> list[str]:
    """Register the stand-in modules; returns their names (none when torchvision is really there)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return []
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    for name in names:
        sys.modules[name] = _Unavailable(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    return names


def import_meta() -> types.SimpleNamespace:
    """Meta's modules: model, args, tokenizer, generation (llama_models.llama3.*)."""
    stubbed = _stub_torchvision()
    names = ("model", "args", "tokenizer", "generation")
    try:
        return types.SimpleNamespace(**{n: importlib.import_module(f"llama_models.llama3.{n}") for n in names})
    finally:
        # Meta's modules keep what they imported; other libraries probing for torchvision later
        # (transformers calls importlib.util.find_spec) must not find a module without a spec.
        for name in stubbed:
            del sys.modules[name]


def init_model_parallel(world_size: int = 1, device: str = "cpu") -> None:
    """torch.distributed and fairscale's model-parallel groups, of world_size ranks (1 in-process)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # in-process, not under torchrun
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
        else:
            dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(world_size)


@contextlib.contextmanager
def restore_torch_defaults() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_default_device(None)


def meta_model_from_state_dict(
    params: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    max_seq_len: int,
    max_batch_size: int,
    device: str = "cpu",
) -> torch.nn.Module:
    """Meta's Transformer for a params.json dict, in `dtype` (its KV cache too), holding state_dict
    (world size 1). Meta's RoPE scaling is its hard-coded Llama 3.1 one."""
    meta = import_meta()
    init_model_parallel(1, device)
    with restore_torch_defaults():
        torch.set_default_dtype(dtype)
        torch.set_default_device(device)
        model = meta.model.Transformer(
            meta.args.ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def meta_forward_for_training(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of Meta's Transformer with autograd on: its forward is wrapped in torch.inference_mode, so the
    function it wraps is called (Meta's code is not edited). That forward writes every position into its KV
    cache tensors, which then hold a graph: they are replaced by fresh zeros first, so each call stands alone."""
    for layer in model.layers:
        layer.attention.cache_k = torch.zeros_like(layer.attention.cache_k)
        layer.attention.cache_v = torch.zeros_like(layer.attention.cache_v)
    return type(model).forward.__wrapped__(model, tokens, 0)


def meta_loss(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of Meta's Transformer on tokens (targets -100 ignored), differentiable."""
    logits = meta_forward_for_training(model, tokens)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def meta_transformer(
    ckpt_dir: Union[str, Path], dtype: torch.dtype, max_seq_len: int, max_batch_size: int, device: str = "cpu"
) -> torch.nn.Module:
    """Meta's Transformer in `dtype`, holding ckpt_dir's consolidated.00.pth (world size 1)."""
    import json

    params = json.loads((Path(ckpt_dir) / "params.json").read_text())
    state_dict = torch.load(Path(ckpt_dir) / "consolidated.00.pth", map_location=device, weights_only=True)
    return meta_model_from_state_dict(params, state_dict, dtype, max_seq_len, max_batch_size, device)


def meta_llama(
    ckpt_dir: Union[str, Path], dtype: torch.dtype, max_seq_len: int, max_batch_size: int, seed: int = 1,
    device: str = "cpu", world_size: int = 1,
) -> Any:  # fmt: skip
    """Meta's own `Llama3.build` (which seeds torch's global generator with `seed`), in `dtype`.

    On CPU, build leaves the model in bfloat16 (its loader's default tensor type); float32 is the same
    bf16 checkpoint converted exactly, as microllama converts it."""
    meta = import_meta()
    init_model_parallel(world_size, device)
    with restore_torch_defaults():
        llama = meta.generation.Llama3.build(
            str(ckpt_dir), max_seq_len, max_batch_size, world_size=world_size, seed=seed, device=device
        )
    llama.model.to(dtype)
    return llama


def meta_completions(
    llama: Any, prompts: Sequence[str], temperature: float, top_p: float, max_gen_len: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Generated ids per prompt from Meta's `Llama3.completion` stream, and Meta's log-probability of
    each, cut as microllama cuts them: at the first stop token (excluded) or after max_gen_len tokens."""
    with restore_torch_defaults():
        # Meta's generate makes its token tensors on the default device, which its build set globally.
        torch.set_default_device(next(llama.model.parameters()).device)
        settings = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=True)
        steps = list(llama.completion(list(prompts), **settings))
    return cut_stream(steps, len(prompts), llama.tokenizer.stop_tokens, max_gen_len)


def cut_stream(
    steps: Iterable[Sequence[Any]], n_rows: int, stop_tokens: Sequence[int], max_gen_len: Optional[int]
) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's ids and log-probabilities from a stream of Meta's per-step GenerationResults, as
    microllama returns them: echoed prompt ids (source "input") first, then generated ids up to the
    first stop token (excluded) or max_gen_len of them. Log-probabilities are the generated ids' only:
    the stream reports the prompt's as zeros, before it has computed them. With max_gen_len None the
    stream itself ends each row, at max_seq_len."""
    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    generated = [0] * n_rows
    done = [False] * n_rows
    for step in steps:
        for r in step:
            i = r.batch_idx
            if r.ignore_token or done[i]:
                continue
            if r.source == "input":
                tokens[i].append(r.token)
            elif r.token in stop_tokens:
                done[i] = True
            else:
                tokens[i].append(r.token)
                logprobs[i].extend(r.logprobs or [])
                generated[i] += 1
                done[i] = max_gen_len is not None and generated[i] >= max_gen_len
    return tokens, logprobs


@dataclass
class StandInTokenizer:
    """What Meta's Llama3 reads of its tokenizer when fed token ids: pad and stop ids, a text for each
    result (here the id), and the `<|image|>` id its ChatFormat looks up (here one no model emits)."""

    pad_id: int
    stop_tokens: list[int]
    special_tokens: dict[str, int] = field(default_factory=lambda: {"<|image|>": -2})

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))


def meta_generator(model: torch.nn.Module, pad_id: int, stop_tokens: Sequence[int]) -> Any:
    """Meta's `Llama3` (its generation loop) around Meta's Transformer `model`, with a stand-in tokenizer
    of pad_id and stop_tokens."""
    meta = import_meta()
    return meta.generation.Llama3(model, StandInTokenizer(pad_id, list(stop_tokens)), model.params)


def meta_generate(
    llama: Any,
    prompt_tokens: Sequence[Sequence[int]],
    max_gen_len: Optional[int],
    temperature: float,
    top_p: float,
    echo: bool = False,
    seed: Optional[int] = None,
    step_times: Optional[list[float]] = None,
    logprobs: bool = True,
) -> tuple[list[list[int]], list[list[float]]]:
    """Meta's `Llama3.generate` on token ids, after `torch.manual_seed(seed)` when seed is given, read
    with cut_stream: per row the ids microllama's `generate` returns, and the generated ids' Meta
    log-probabilities. step_times: a list that gets time.perf_counter() as each step's results arrive
    (Meta's stream yields them as Python ints: the step's work is done). logprobs=False spares Meta's loop
    computing them (the log-probabilities returned are then empty)."""
    from llama_models.llama3.chat_format import LLMInput

    inputs = [LLMInput(tokens=list(t)) for t in prompt_tokens]
    settings = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=logprobs, echo=echo)
    device = next(llama.model.parameters()).device
    with restore_torch_defaults(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_default_device(device)
        if seed is not None:
            torch.manual_seed(seed)
        steps = []
        for step in llama.generate(inputs, **settings):
            steps.append(step)
            if step_times is not None:
                step_times.append(time.perf_counter())
    return cut_stream(steps, len(inputs), llama.tokenizer.stop_tokens, max_gen_len)


def meta_merged_state_dict(ckpt_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Meta's own `maybe_reshard_state_dict` on ckpt_dir's *.pth shards, at model-parallel size 1:
    the dense tensors Meta's loader makes of a sharded checkpoint."""
    import json

    import_meta()
    from llama_models.checkpoint import maybe_reshard_state_dict

    init_model_parallel(1)
    params = json.loads((Path(ckpt_dir) / "params.json").read_text())
    with restore_torch_defaults():  # it sets the default tensor type to bfloat16
        return maybe_reshard_state_dict(
            sorted(Path(ckpt_dir).glob("*.pth")), n_kv_heads=params.get("n_kv_heads") or params["n_heads"]
        )


def meta_ffn_hidden_dims(configs: Iterable[tuple[int, int, Optional[float]]]) -> list[int]:
    """For each (dim, multiple_of, ffn_dim_multiplier), the SwiGLU hidden size Meta's FeedForward gives
    a model of width dim: its w1's out-features. Each is built one input wide: FeedForward sizes the
    hidden layer from its hidden_dim argument (4 * dim) alone, so even a 405B's size costs nothing."""
    feed_forward = import_meta().model.FeedForward
    init_model_parallel(1)
    return [feed_forward(1, 4 * dim, multiple_of, m).w1.weight.shape[0] for dim, multiple_of, m in configs]


def meta_arch_args(descriptor: str) -> dict[str, Any]:
    """A model's params.json as Meta's llama_models.sku_list registers it (descriptor e.g. 'Llama3.1-8B')."""
    from llama_models.sku_list import resolve_model

    return dict(resolve_model(descriptor).arch_args)


def meta_chat_format() -> Any:
    """Meta's ChatFormat over Meta's tokenizer."""
    import_meta()
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer.get_instance())


def meta_message(message: dict[str, Any]) -> Any:
    """Meta's RawMessage of a message in microllama's dict form ({"role", "content", "context", "stop_reason",
    "tool_calls": [{"tool_name", "arguments", "call_id"}]})."""
    import_meta()
    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    calls = [ToolCall(call_id=c.get("call_id", ""), tool_name=c["tool_name"], arguments=c["arguments"])
             for c in message.get("tool_calls", [])]  # fmt: skip
    stop = message.get("stop_reason")
    return RawMessage(role=message["role"], content=message["content"], context=message.get("context"),
                      stop_reason=None if stop is None else StopReason(stop), tool_calls=calls)  # fmt: skip


def meta_tool_prompt_format(name: str) -> Any:
    import_meta()
    from llama_models.datatypes import ToolPromptFormat

    return ToolPromptFormat(name)


def plain_message(message: Any) -> dict[str, Any]:
    """A RawMessage as microllama's dict form, tool names as strings, without call ids (Meta's are random)."""
    d = {"role": message.role, "content": message.content}
    if message.stop_reason is not None:
        d["stop_reason"] = message.stop_reason.value
    if message.tool_calls:
        d["tool_calls"] = [{"tool_name": getattr(c.tool_name, "value", c.tool_name), "arguments": c.arguments}
                           for c in message.tool_calls]  # fmt: skip
    return d


def meta_chat_prompt_ids(llama: Any, dialogs: Sequence[Sequence[dict[str, Any]]]) -> list[list[int]]:
    """The ids Meta's `Llama3.chat_completion` gives its generate for each dialog (microllama's dict form):
    its ChatFormat's `encode_dialog_prompt`, called as chat_completion calls it (tool calls in json)."""
    return [llama.formatter.encode_dialog_prompt([meta_message(m) for m in dialog]).tokens for dialog in dialogs]


def meta_chat_completions(
    llama: Any, dialogs: Sequence[Sequence[dict[str, Any]]], temperature: float, top_p: float, max_gen_len: int
) -> list[dict[str, Any]]:
    """Meta's `Llama3.chat_completion` on dialogs in microllama's dict form: per dialog the generated ids (cut as
    microllama cuts them: at the first stop token, excluded, or after max_gen_len), the stop token (None
    without one), the log-probability of each id, and the reply parsed by Meta's ChatFormat.

    llama-models 0.3.0's chat_completion yields tokens and leaves parsing to its caller. The parse here is the
    one Meta's earlier `Llama.chat_completion` (llama-models 0.0.x) made: the ids with their stop token through
    `decode_assistant_message`, end_of_turn for <|eot_id|>, end_of_message for <|eom_id|>, out_of_tokens
    without a stop token. <|end_of_text|>, at which Meta's generate also stops, has no reason of Meta's; it is
    end_of_turn here, as in microllama, and not part of the parsed text."""
    from llama_models.datatypes import StopReason

    tok = llama.tokenizer
    rows = [{"tokens": [], "stop_token": None, "logprobs": []} for _ in dialogs]
    done = [False] * len(dialogs)
    with restore_torch_defaults():
        torch.set_default_device(next(llama.model.parameters()).device)
        batch = [[meta_message(m) for m in dialog] for dialog in dialogs]
        settings = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=True)
        steps = list(llama.chat_completion(batch, **settings))
    for step in steps:
        for r in step:
            i, row = r.batch_idx, rows[r.batch_idx]
            if r.ignore_token or done[i]:
                continue
            if r.token in tok.stop_tokens:
                row["stop_token"], done[i] = r.token, True
            else:
                row["tokens"].append(r.token)
                row["logprobs"].extend(r.logprobs)
                done[i] = len(row["tokens"]) >= max_gen_len
    eot, eom = tok.special_tokens["<|eot_id|>"], tok.special_tokens["<|eom_id|>"]
    for row in rows:
        stop = row["stop_token"]
        reason = {None: StopReason.out_of_tokens, eom: StopReason.end_of_message}.get(stop, StopReason.end_of_turn)
        ids = row["tokens"] + ([stop] if stop in (eot, eom) else [])
        row["stop_reason"] = reason.value
        row["message"] = plain_message(llama.formatter.decode_assistant_message(ids, reason))
    return rows
