"""`VLMAdapter`: one interface over Hugging Face vision-language models.

An adapter owns the HF model (`.model`), its processor (`.processor`) and tokenizer, and
hides the architecture-specific parts: the chat format, the pixel inputs and where the
language model's layers live. Everything HONES touches is in the language model:
decoder layers, each attention output projection (`o_proj`), each gated FFN
(`gate_proj`/`up_proj`/`down_proj`/`act_fn`) and the unembedding (`lm_head`).

Subclasses (one file per architecture, registered with `@register_adapter`) set
`model_class` and implement `load_processor`, `fallback_prompt` and `end_of_turn`;
see `llava.py` and `qwen2_5_vl.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

IGNORE_INDEX = -100

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Batch keys that are adapter bookkeeping, never passed to the HF model.
_ADAPTER_KEYS = ("labels", "prompt_last_index")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "fp32" | "bf16" | "fp16" (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def to_rgb_image(image: Image.Image | str | Path) -> Image.Image:
    """A PIL RGB image from a PIL image or a path."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@contextmanager
def plain_generation_config(model: PreTrainedModel) -> Iterator[None]:
    """Give ``model`` a default ``GenerationConfig`` for the duration (restored on exit).

    ``generate`` fills every setting its caller leaves unset from ``model.generation_config``,
    and a hub model's file can carry logits processors that change even a greedy choice:
    Qwen2.5-VL-Instruct's sets ``repetition_penalty: 1.05``, which would push down every token
    already in the prompt. With a default config, greedy decoding (§1) is the argmax at each step.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class VLMAdapter:
    """Shared logic of every architecture's adapter.

    Attributes:
        model: the HF `...ForConditionalGeneration` model (in eval mode).
        processor: the HF processor (image processor + tokenizer + chat template).
        tokenizer: `processor.tokenizer`.
        name: a short label (the directory or hub id it came from).
    """

    model_type: ClassVar[str] = ""
    model_class: ClassVar[type[PreTrainedModel]]
    # Text between the generation prompt and the target ("ASSISTANT:" + " " + answer).
    target_prefix: ClassVar[str] = ""
    # Keys of `encode()`'s output the HF model accepts (besides input_ids/attention_mask).
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)

    def __init__(self, model: PreTrainedModel, processor: Any, name: str = "") -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or self.model_type
        self.check_structure()

    # ----------------------------------------------------------------- loading
    @classmethod
    def load_processor(cls, path_or_hub_id: str, trust_remote_code: bool = False) -> Any:
        """The architecture's processor for a local directory or hub id."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        dtype: str | torch.dtype = "fp32",
        device: str | torch.device = "cpu",
        device_map: str | dict | None = None,
        trust_remote_code: bool = False,
        config: PretrainedConfig | None = None,
        attn_implementation: str = "sdpa",
    ) -> VLMAdapter:
        """Load model + processor. With `device_map` the model is dispatched by accelerate;
        otherwise it is moved to `device`."""
        kwargs: dict[str, Any] = {
            "dtype": resolve_dtype(dtype),
            "trust_remote_code": trust_remote_code,
            "attn_implementation": attn_implementation,
        }
        if config is not None:
            kwargs["config"] = config
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = cls.model_class.from_pretrained(path_or_hub_id, **kwargs)
        if device_map is None:
            model = model.to(device)
        model.eval()
        processor = cls.load_processor(path_or_hub_id, trust_remote_code=trust_remote_code)
        return cls(model, processor, name=Path(str(path_or_hub_id)).name or str(path_or_hub_id))

    # --------------------------------------------------------------- structure
    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config (head counts, widths)."""
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm), without the lm_head."""
        return self.model.model.language_model

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.decoder_layers()[0].self_attn, "head_dim", None)
        return int(head_dim or self.hidden_size // self.num_heads)

    @property
    def ffn_width(self) -> int:
        return int(self.mlp(0).down_proj.in_features)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.unembedding().device

    @property
    def dtype(self) -> torch.dtype:
        return self.unembedding().dtype

    def decoder_layers(self) -> list[nn.Module]:
        """The language model's decoder layers, in order (L of them)."""
        return list(self.language_model.layers)

    def attn_out_proj(self, layer: int) -> nn.Linear:
        """Layer `layer`'s attention output projection; its input is [batch, seq, H * d_h]."""
        return self.decoder_layers()[layer].self_attn.o_proj

    def mlp(self, layer: int) -> nn.Module:
        """Layer `layer`'s gated FFN (gate_proj, up_proj, down_proj, act_fn)."""
        return self.decoder_layers()[layer].mlp

    def unembedding(self) -> Tensor:
        """U, the lm_head weight: [vocab, hidden]."""
        return self.model.get_output_embeddings().weight

    def check_structure(self) -> None:
        """Raise a clear error when the model lacks a piece HONES needs."""
        where = f"{type(self.model).__name__} ({self.name}, model_type {self.model_type!r})"
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "language_model"):
            raise ValueError(f"{where}: no model.language_model; cannot find the language model")
        if not hasattr(self.language_model, "layers"):
            raise ValueError(f"{where}: model.language_model has no `layers`")
        if self.model.get_output_embeddings() is None:
            raise ValueError(f"{where}: no output embeddings (lm_head)")
        for index, layer in enumerate(self.decoder_layers()):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not isinstance(getattr(attn, "o_proj", None), nn.Linear):
                raise ValueError(f"{where}: decoder layer {index} has no self_attn.o_proj (nn.Linear)")
            mlp = getattr(layer, "mlp", None)
            for part in ("gate_proj", "up_proj", "down_proj", "act_fn"):
                if mlp is None or not hasattr(mlp, part):
                    raise ValueError(
                        f"{where}: decoder layer {index} has no mlp.{part}; HONES needs a gated FFN "
                        "(gate_proj, up_proj, down_proj, act_fn)"
                    )
        expected = self.num_heads * self.head_dim
        if self.attn_out_proj(0).in_features != expected:
            raise ValueError(
                f"{where}: o_proj input width {self.attn_out_proj(0).in_features} != "
                f"num_heads * head_dim = {self.num_heads} * {self.head_dim}"
            )

    # ------------------------------------------------------------------ format
    def fallback_prompt(self, prompt: str) -> str:
        """The chat-formatted user turn + generation prompt, for processors without a template."""
        raise NotImplementedError

    @property
    def end_of_turn(self) -> str:
        """The text that closes the assistant's turn (appended after a target)."""
        raise NotImplementedError

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end greedy generation."""
        return [int(self.tokenizer.eos_token_id)]

    def format_prompt(self, prompt: str) -> str:
        """User text -> the model's chat format with one image placeholder and the generation
        prompt (e.g. "USER: <image>\\n{prompt} ASSISTANT:")."""
        if getattr(self.processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
            ]
            return self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
        return self.fallback_prompt(prompt)

    def format_target(self, target: str) -> str:
        """The text appended to a formatted prompt for teacher forcing: target + end of turn."""
        return f"{self.target_prefix}{target}{self.end_of_turn}"

    def _raw_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of texts without image expansion (placeholders stay single tokens)."""
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------------ encode
    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The RGB image as the architecture's own preprocessing hands it to the processor (identity here)."""
        return image

    def encode(
        self,
        images: Sequence[Image.Image | str | Path],
        prompts: Sequence[str],
        targets: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Chat-format, tokenize and left-pad a batch.

        Returns `input_ids` [b, s], `attention_mask` [b, s], the pixel inputs, and
        `prompt_last_index` [b] (the position whose logits predict the first target token).
        Without targets the sequence is prompt + generation prompt (`prompt_last_index` = s-1).
        With targets it is prompt + target + end of turn and `labels` [b, s] is -100 except on
        the target tokens and the end-of-turn token.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(targets)} targets but {len(prompts)} prompts")
        prompt_texts = [self.format_prompt(p) for p in prompts]
        texts = prompt_texts
        if targets is not None:
            texts = [p + self.format_target(t) for p, t in zip(prompt_texts, targets)]
        encoded = self.processor(
            images=[self.prepare_image(to_rgb_image(image)) for image in images],
            text=texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        batch = {key: value for key, value in encoded.items() if isinstance(value, Tensor)}
        input_ids = batch["input_ids"]
        if bool((batch["attention_mask"][:, -1] == 0).any()):
            raise RuntimeError("expected left padding: the last column has padding")
        seq_len = input_ids.shape[1]
        if targets is None:
            batch["prompt_last_index"] = torch.full((len(texts),), seq_len - 1, dtype=torch.long)
            return batch
        # Target length = tokens after the longest prefix shared with the prompt alone
        # (placeholders are single special tokens, so the image expansion cannot differ).
        target_lengths = [
            len(full) - _common_prefix_length(prompt, full)
            for prompt, full in zip(self._raw_ids(prompt_texts), self._raw_ids(texts))
        ]
        lengths = torch.tensor(target_lengths, dtype=torch.long)
        positions = torch.arange(seq_len)
        is_target = positions[None, :] >= (seq_len - lengths)[:, None]
        batch["labels"] = input_ids.masked_fill(~is_target, IGNORE_INDEX)
        batch["prompt_last_index"] = seq_len - lengths - 1
        return batch

    # ----------------------------------------------------------------- forward
    def position_ids(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Explicit position ids for a forward pass ([b, s]), or None to let the model decide."""
        return None

    def model_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The HF model's keyword inputs for `batch`: adapter keys dropped, tensors moved to
        the model's device, floating pixel inputs cast to its dtype."""
        inputs: dict[str, Tensor] = {}
        for key, value in batch.items():
            if key in _ADAPTER_KEYS or not isinstance(value, Tensor):
                continue
            value = value.to(self.device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            inputs[key] = value
        return inputs

    def forward(self, batch: dict[str, Tensor], **kwargs: Any) -> Tensor:
        """Logits [b, s, vocab] over the whole sequence."""
        inputs = self.model_inputs(batch)
        position_ids = self.position_ids(inputs)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        return self.model(**inputs, use_cache=False, **kwargs).logits

    def next_token_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits [b, vocab] at `prompt_last_index` (the last position for prompt-only batches),
        i.e. the distribution of the first token after the generation prompt."""
        seq_len = batch["input_ids"].shape[1]
        last = batch.get("prompt_last_index")
        if last is None or bool((last == seq_len - 1).all()):
            return self.forward(batch, logits_to_keep=1)[:, -1]
        logits = self.forward(batch)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, last.to(logits.device)]

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int = 24) -> list[str]:
        """Greedy decoding; returns the decoded new tokens per row (special tokens skipped,
        whitespace stripped). `batch` must come from `encode(images, prompts)` without targets."""
        if "labels" in batch:
            raise ValueError("generate() needs a prompt-only batch: call encode() without targets")
        inputs = self.model_inputs(batch)
        stop = self.stop_token_ids
        with plain_generation_config(self.model):
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=stop,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stop[0],
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [text.strip() for text in texts]

    # ----------------------------------------------------------------- answers
    def emitted_token_ids(self, answers: Sequence[str]) -> list[list[int]]:
        """For each answer, the tokens that follow the generation prompt when the model emits it:
        ``format_target(answer)`` tokenized in context after a formatted prompt, as teacher forcing
        feeds it (end-of-turn included). Not the answer tokenized alone: where the model answers
        after a space (LLaVA's " " prefix), a byte-level BPE gives " MUSIC" another id than "MUSIC"."""
        prompt = self.format_prompt("Answer.")
        prompt_ids = self._raw_ids([prompt])[0]
        out = []
        for answer, full in zip(answers, self._raw_ids([prompt + self.format_target(a) for a in answers])):
            start = _common_prefix_length(prompt_ids, full)
            if start >= len(full):
                raise ValueError(f"answer {answer!r} adds no token after the prompt")
            out.append([int(t) for t in full[start:]])
        return out

    def answer_token_ids(self, answers: Sequence[str]) -> list[int]:
        """For each answer, the first token the model emits for it right after the
        generation prompt (e.g. the ids of "Yes" and "No" for the retrieval margin)."""
        return [ids[0] for ids in self.emitted_token_ids(answers)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, layers={self.num_layers}, heads={self.num_heads}, "
            f"head_dim={self.head_dim}, ffn={self.ffn_width}, hidden={self.hidden_size})"
        )
