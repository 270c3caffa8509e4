"""microllama: a minimal, dense, single-device Llama 3.1 that computes what Meta's reference computes."""

import importlib
from typing import Any

# Imported on first use, so that `microllama --help` does not wait for torch to import.
_EXPORTS = {
    "ChatCompletion": "generation",
    "Checkpoint": "checkpoint.load",
    "Completion": "generation",
    "Llama": "generation",
    "Message": "chat",
    "ModelArgs": "args",
    "Tokenizer": "tokenizer",
    "Transformer": "model",
    "open_checkpoint": "checkpoint.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'microllama' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
