"""LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` format): CLIP tower + projector + Llama.

Chat format: "USER: <image>\\n{prompt} ASSISTANT:", target " {answer}</s>". Images are padded
to a square first, as LLaVA-1.5's training did (``LlavaAdapter.pad_to_square``).
"""

from __future__ import annotations

from PIL import Image
from torch import Tensor
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from hones.models.base import VLMAdapter
from hones.models.registry import register_adapter


@register_adapter("llava")
class LlavaAdapter(VLMAdapter):
    """Adapter for `LlavaForConditionalGeneration` with a `LlavaProcessor`."""

    model_class = LlavaForConditionalGeneration
    target_prefix = " "
    # LLaVA-1.5 was trained on images padded to a square with the CLIP mean colour
    # ("image_aspect_ratio: pad"); the hub's llava-1.5-7b-hf processor instead crops the centre
    # square, which cuts off a wide image's sides, and with them 16% of the real COCO sample's
    # OCR boxes entirely. False: hand the processor the image as it is.
    pad_to_square = True

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """``image`` padded to a square, centred, with the image processor's mean colour (``pad_to_square``)."""
        if not self.pad_to_square or image.width == image.height:
            return image
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(int(round(255 * m)) for m in mean))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return square

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
