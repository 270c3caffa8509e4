"""microllama: a minimal, dense, single-device Llama 3.1 that computes what Meta's reference computes."""

from .generation import Completion, Llama
from .model import ModelArgs, Transformer
from .tokenizer import Tokenizer

__all__ = ["Completion", "Llama", "ModelArgs", "Tokenizer", "Transformer"]
