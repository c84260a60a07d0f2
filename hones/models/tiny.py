"""Tiny, randomly initialised VLMs built offline (tests, and the trainable "toy world").

`build_tiny_llava` and `build_tiny_qwen2_5_vl` return `(model, processor)` with the real
architectures (CLIP + Llama for LLaVA, the windowed ViT + Qwen2 for Qwen2.5-VL) at ~1M
parameters, a byte-level BPE tokenizer trained on the spot (`train_tokenizer`) and the
model's chat template. `save_pretrained(model, processor, dir)` writes a directory that
`hones.models.load_adapter(dir)` loads back. All sizes are keyword arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from hones.models.qwen2_5_vl import DEFAULT_SYSTEM, Qwen2_5_VLImageTextProcessor

try:  # transformers >= 5: the PIL backends, usable without torchvision
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
    from transformers import Qwen2VLImageProcessorPil as _Qwen2VLImageProcessor
except ImportError:  # transformers 4.x: the default classes are the PIL ones
    from transformers import CLIPImageProcessor as _CLIPImageProcessor
    from transformers import Qwen2VLImageProcessor as _Qwen2VLImageProcessor

ARCHS = ("llava", "qwen2_5_vl")

LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Chat-format text each tokenizer always sees, so the template words become few tokens.
_FORMAT_TEXT = {
    "llava": ["USER: ", " ASSISTANT:", "USER:", "ASSISTANT: "],
    "qwen2_5_vl": ["system\n", f"{DEFAULT_SYSTEM}\n", "user\n", "assistant\n"],
}

# A small corpus for `tokenizer=None`: the HONES task prompts and toy-world words.
DEFAULT_CORPUS = (
    "Question: what color is the square?\nAnswer the question with a short phrase.",
    "Question: how many circles are there?\nAnswer the question with a short phrase.",
    "Transcribe the text inside the blue box.\nOutput text only.",
    "Describe the image in one sentence.",
    "Candidate: a red circle and a blue square.\nDoes the candidate correctly describe the image?\n"
    "Answer exactly Yes or No.",
    "Yes No yes no",
    "red green blue yellow white black orange purple",
    "circle square triangle star cross ring",
    "zero one two three four five six seven eight nine",
    "a small red circle on the left and a large blue square on the right",
    "there are two green triangles above one yellow star",
    "a photo of a cat sitting on a table next to a cup",
    "the word stop is written in white letters",
)

# Chat templates of the tiny models (same rendering as the released checkpoints' formats).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def train_tokenizer(
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    arch: str = "llava",
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with `arch`'s special tokens.

    LLaVA: <unk> <s> </s> <pad> <image>, BOS prepended, eos "</s>", pad "<pad>".
    Qwen2.5-VL: <|endoftext|> (pad) <|im_start|> <|im_end|> (eos) <|vision_start|>
    <|vision_end|> <|image_pad|> <|video_pad|>, no BOS. Padding side is left.
    `vocab_size` is an upper bound (a small corpus may stop merging earlier).
    """
    _check_arch(arch)
    specials = LLAVA_SPECIAL_TOKENS if arch == "llava" else QWEN_SPECIAL_TOKENS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        yield from _FORMAT_TEXT[arch]
        yield from corpus

    backend.train_from_iterator(texts(), trainer)
    if arch == "llava":
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            padding_side="left",
            extra_special_tokens={"image_token": "<image>"},
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )


def _seeded_model(model_class: type[PreTrainedModel], config: Any, seed: int) -> PreTrainedModel:
    """Build `model_class(config)` with weights drawn from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def _prepare_build(
    arch: str,
    tokenizer: PreTrainedTokenizerFast | None,
    image_size: int,
    unit: int,
    unit_name: str,
    head_dim: int | None = None,
) -> PreTrainedTokenizerFast:
    """Validate a builder's sizes and return its tokenizer (None: one trained for `arch` on `DEFAULT_CORPUS`).

    `image_size` must be a multiple of `unit` (the pixels per image-token side, named
    `unit_name` in the error); `head_dim`, when given, must be even (rotary embeddings).
    """
    if image_size % unit:
        raise ValueError(f"image_size {image_size} is not a multiple of {unit_name}")
    if head_dim is not None and head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")
    return tokenizer if tokenizer is not None else train_tokenizer(arch=arch)


def _text_config_fields(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    max_position_embeddings: int,
    initializer_range: float,
) -> dict[str, Any]:
    """The language-model config fields both builders share (`num_kv_heads` None: `num_heads`, no GQA)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads or num_heads,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_llava(
    tokenizer: PreTrainedTokenizerFast | None = None,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 352,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    num_kv_heads: int | None = None,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA-1.5-architecture model (CLIP tower, 2-layer GELU projector, Llama) + processor.

    The image becomes (image_size / patch_size)^2 tokens (CLS dropped, "default" strategy).
    `tokenizer` None trains one on `DEFAULT_CORPUS`.
    """
    tokenizer = _prepare_build("llava", tokenizer, image_size, patch_size, f"patch_size {patch_size}")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        initializer_range=initializer_range,
    )
    text_fields = _text_config_fields(
        tokenizer, hidden_size, intermediate_size, num_layers, num_heads,
        num_kv_heads, max_position_embeddings, initializer_range,
    )
    text_config = LlamaConfig(**text_fields, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2 if vision_layers > 1 else -1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded_model(LlavaForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = _CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (time, height, width) like Qwen's [16, 24, 24]."""
    half = head_dim // 2
    time = half // 4
    height = (half - time) // 2
    return [time, height, half - time - height]


def build_tiny_qwen2_5_vl(
    tokenizer: PreTrainedTokenizerFast | None = None,
    image_size: int = 64,
    patch_size: int = 8,
    merge_size: int = 2,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 352,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    num_kv_heads: int | None = 2,
    vision_heads: int = 2,
    vision_intermediate: int | None = None,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLImageTextProcessor]:
    """A Qwen2.5-VL-architecture model + image-only processor.

    A square image is resized to image_size x image_size (min_pixels = max_pixels =
    image_size^2) and becomes (image_size / (patch_size * merge_size))^2 tokens. The last
    vision block uses full attention, the others windows of 2x2 merged patches.
    `tokenizer` None trains one on `DEFAULT_CORPUS`.
    """
    unit = patch_size * merge_size
    head_dim = hidden_size // num_heads
    tokenizer = _prepare_build(
        "qwen2_5_vl", tokenizer, image_size, unit, f"patch_size * merge_size = {unit}", head_dim=head_dim
    )
    token_id = tokenizer.convert_tokens_to_ids
    vision_config = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate or 2 * vision_hidden,
        "num_heads": vision_heads,
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden_size,
        "window_size": 2 * unit,
        "fullatt_block_indexes": [vision_layers - 1],
        "initializer_range": initializer_range,
    }
    text_fields = _text_config_fields(
        tokenizer, hidden_size, intermediate_size, num_layers, num_heads,
        num_kv_heads, max_position_embeddings, initializer_range,
    )
    text_config = {
        **text_fields,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(head_dim),
        },
        "bos_token_id": None,
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    model = _seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    model.generation_config.eos_token_id = [token_id("<|im_end|>"), token_id("<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = _Qwen2VLImageProcessor(
        min_pixels=image_size * image_size,
        max_pixels=image_size * image_size,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )
    processor = Qwen2_5_VLImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    return model, processor


def save_pretrained(model: PreTrainedModel, processor: Any, directory: str | Path) -> Path:
    """Write model weights/config and processor files (tokenizer, image processor, chat
    template) to `directory`, loadable with `hones.models.load_adapter(directory)`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
