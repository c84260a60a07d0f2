"""LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` format): CLIP tower + projector + Llama.

Chat format: "USER: <image>\\n{prompt} ASSISTANT:", target " {answer}</s>".
"""

from __future__ import annotations

from torch import Tensor
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from hones.models.base import VLMAdapter
from hones.models.registry import register_adapter


@register_adapter("llava")
class LlavaAdapter(VLMAdapter):
    """Adapter for `LlavaForConditionalGeneration` with a `LlavaProcessor`."""

    model_class = LlavaForConditionalGeneration
    target_prefix = " "

    @classmethod
    def load_processor(cls, path_or_hub_id: str, trust_remote_code: bool = False) -> LlavaProcessor:
        return LlavaProcessor.from_pretrained(path_or_hub_id, trust_remote_code=trust_remote_code)

    def fallback_prompt(self, prompt: str) -> str:
        return f"USER: {self.processor.image_token}\n{prompt} ASSISTANT:"

    @property
    def end_of_turn(self) -> str:
        return str(self.tokenizer.eos_token)

    def position_ids(self, batch: dict[str, Tensor]) -> Tensor:
        """[b, s] positions counted from each row's first real token (left padding), as
        `generate` does, so a padded row sees the same positions as the row alone."""
        mask = batch["attention_mask"].long()
        return (mask.cumsum(-1) - 1).clamp(min=0)
