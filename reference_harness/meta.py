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
"""

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

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


def meta_transformer(
    ckpt_dir: Union[str, Path], dtype: torch.dtype, max_seq_len: int, max_batch_size: int, device: str = "cpu"
) -> torch.nn.Module:
    """Meta's Transformer in `dtype`, holding ckpt_dir's consolidated.00.pth (world size 1)."""
    import json

    meta = import_meta()
    init_model_parallel(1, device)
    params = json.loads((Path(ckpt_dir) / "params.json").read_text())
    state_dict = torch.load(Path(ckpt_dir) / "consolidated.00.pth", map_location=device, weights_only=True)
    with restore_torch_defaults():
        torch.set_default_dtype(dtype)
        torch.set_default_device(device)
        model = meta.model.Transformer(
            meta.args.ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        )
    model.load_state_dict(state_dict, strict=True)
    return model


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
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with restore_torch_defaults():
        # Meta's generate makes its token tensors on the default device, which its build set globally.
        torch.set_default_device(next(llama.model.parameters()).device)
        settings = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, logprobs=True)
        steps = list(llama.completion(list(prompts), **settings))
    for step in steps:
        for r in step:
            i = r.batch_idx
            if r.ignore_token or done[i]:
                continue
            if r.token in llama.tokenizer.stop_tokens:
                done[i] = True
            else:
                tokens[i].append(r.token)
                logprobs[i].extend(r.logprobs)
                done[i] = len(tokens[i]) >= max_gen_len
    return tokens, logprobs


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
