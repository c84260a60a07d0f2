"""Qwen2.5-VL (`Qwen/Qwen2.5-VL-7B-Instruct` format): windowed ViT + patch merger + Qwen2.

Chat format (Qwen's ChatML):
"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n",
target "{answer}<|im_end|>". Images give `pixel_values` (flattened patches) and
`image_grid_thw`; the HF model builds the 3-D (mrope) positions from `mm_token_type_ids`.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)

from hones.models.base import VLMAdapter
from hones.models.registry import register_adapter

DEFAULT_SYSTEM = "You are a helpful assistant."


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images only: no video processor (which would need
    torchvision). Attributes: `image_processor` (a Qwen2VLImageProcessor) and `tokenizer`."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@register_adapter("qwen2_5_vl")
class Qwen2_5_VLAdapter(VLMAdapter):
    """Adapter for `Qwen2_5_VLForConditionalGeneration`."""

    model_class = Qwen2_5_VLForConditionalGeneration
    target_prefix = ""

    @classmethod
    def load_processor(
        cls, path_or_hub_id: str, trust_remote_code: bool = False
    ) -> Qwen2_5_VLImageTextProcessor:
        """Tokenizer + image processor of `path_or_hub_id`; the chat template comes with the
        tokenizer (chat_template.jinja or tokenizer_config.json)."""
        tokenizer = AutoTokenizer.from_pretrained(path_or_hub_id, trust_remote_code=trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(
            path_or_hub_id, trust_remote_code=trust_remote_code
        )
        return Qwen2_5_VLImageTextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=getattr(tokenizer, "chat_template", None),
        )

    def fallback_prompt(self, prompt: str) -> str:
        return (
            f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{self.processor.image_token}<|vision_end|>{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    @property
    def end_of_turn(self) -> str:
        return "<|im_end|>"

    @property
    def stop_token_ids(self) -> list[int]:
        ids = []
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != self.tokenizer.unk_token_id:
                ids.append(int(token_id))
        return ids or [int(self.tokenizer.eos_token_id)]
