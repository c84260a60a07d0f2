"""Model adapters (one file per architecture) and tiny offline model builders."""

from hones.models.base import IGNORE_INDEX, VLMAdapter
from hones.models.llava import LlavaAdapter
from hones.models.qwen2_5_vl import Qwen2_5_VLAdapter, Qwen2_5_VLImageTextProcessor
from hones.models.registry import (
    ModelError,
    ModelNotFoundError,
    check_local_model,
    load_adapter,
    load_module_adapter,
    load_processor,
    register_adapter,
    supported_model_types,
    wrap_model,
)
from hones.models.tiny import build_tiny_llava, build_tiny_qwen2_5_vl, save_pretrained, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ModelError",
    "ModelNotFoundError",
    "LlavaAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen2_5_VLImageTextProcessor",
    "VLMAdapter",
    "build_tiny_llava",
    "build_tiny_qwen2_5_vl",
    "check_local_model",
    "load_adapter",
    "load_module_adapter",
    "load_processor",
    "register_adapter",
    "save_pretrained",
    "supported_model_types",
    "train_tokenizer",
    "wrap_model",
]
