"""Model adapters (hones/models): structure, encode, batching, generation, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from hones.models import (
    IGNORE_INDEX,
    VLMAdapter,
    build_tiny_llava,
    load_adapter,
    load_module_adapter,
    save_pretrained,
    supported_model_types,
    train_tokenizer,
    wrap_model,
)

PROMPTS = [
    "Question: what color is the square?\nAnswer the question with a short phrase.",
    "Describe the image in one sentence.",
    "Candidate: a red circle.\nDoes the candidate correctly describe the image?\nAnswer exactly Yes or No.",
]
TARGETS = ["red", "a small red circle on the left", "Yes"]
# A non-square image: Qwen gets a different number of image tokens, so rows pad differently.
SIZES = [(64, 64), (96, 64), (64, 64)]


def images(make_image, n: int = 3) -> list:
    return [make_image(seed=i, size=SIZES[i % len(SIZES)]) for i in range(n)]


def test_supported_model_types() -> None:
    assert {"llava", "qwen2_5_vl"} <= set(supported_model_types())


def test_structure(adapter: VLMAdapter) -> None:
    assert (adapter.num_layers, adapter.num_heads, adapter.head_dim) == (4, 4, 32)
    assert (adapter.ffn_width, adapter.hidden_size) == (352, 128)
    assert len(adapter.decoder_layers()) == 4
    assert adapter.attn_out_proj(2).in_features == adapter.num_heads * adapter.head_dim
    mlp = adapter.mlp(1)
    assert mlp.down_proj.in_features == adapter.ffn_width and callable(mlp.act_fn)
    assert adapter.unembedding().shape == (len(adapter.tokenizer), adapter.hidden_size)
    # the language model only: the vision tower's layers are not among the decoder layers
    vision = adapter.model.model.vision_tower if hasattr(adapter.model.model, "vision_tower") else adapter.model.model.visual
    vision_ids = {id(m) for m in vision.modules()}
    assert not any(id(layer) in vision_ids for layer in adapter.decoder_layers())
    assert 0.5e6 < sum(p.numel() for p in adapter.model.parameters()) < 2e6


def test_encode_prompt_only(adapter: VLMAdapter, make_image) -> None:
    batch = adapter.encode(images(make_image), PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.dim() == 2
    assert (mask[:, -1] == 1).all(), "left padding: every row ends with a real token"
    assert (mask.sum(1) < ids.shape[1]).any(), "rows of different length are padded"
    assert (batch["prompt_last_index"] == ids.shape[1] - 1).all()
    assert "labels" not in batch
    first_real = mask.argmax(1)
    assert all((mask[b, first_real[b] :] == 1).all() for b in range(len(PROMPTS)))


def test_encode_labels(adapter: VLMAdapter, make_image) -> None:
    pictures = images(make_image)
    batch = adapter.encode(pictures, PROMPTS, TARGETS)
    prompt_only = adapter.encode(pictures, PROMPTS)
    labels, ids, last = batch["labels"], batch["input_ids"], batch["prompt_last_index"]
    for b, target in enumerate(TARGETS):
        supervised = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        # labels are the contiguous tail of the row, starting right after prompt_last_index
        assert supervised[0] == last[b] + 1 and supervised[-1] == ids.shape[1] - 1
        assert (supervised.diff() == 1).all()
        assert torch.equal(labels[b, supervised], ids[b, supervised])
        assert adapter.tokenizer.decode(labels[b, supervised]).strip() == f"{target}{adapter.end_of_turn}"
        # the prompt part is exactly the prompt-only encoding
        prompt_row = prompt_only["input_ids"][b][prompt_only["attention_mask"][b].bool()]
        row = ids[b][batch["attention_mask"][b].bool()]
        assert torch.equal(row[: len(prompt_row)], prompt_row)
    # logits at prompt_last_index predict the first target token, as after the prompt alone
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.next_token_logits(batch), adapter.next_token_logits(prompt_only), atol=1e-4, rtol=1e-4
        )
        logits = adapter.forward(batch)
    assert logits.shape == (*ids.shape, len(adapter.tokenizer))


def test_batched_forward_matches_single(adapter: VLMAdapter, make_image) -> None:
    pictures = images(make_image)
    with torch.no_grad():
        batched = adapter.next_token_logits(adapter.encode(pictures, PROMPTS))
        single = torch.cat([adapter.next_token_logits(adapter.encode([i], [p])) for i, p in zip(pictures, PROMPTS)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_batched_teacher_forcing_matches_single(adapter: VLMAdapter, make_image) -> None:
    pictures = images(make_image)
    with torch.no_grad():
        batch = adapter.encode(pictures, PROMPTS, TARGETS)
        logits = adapter.forward(batch)
        for b in range(len(PROMPTS)):
            alone = adapter.encode([pictures[b]], [PROMPTS[b]], [TARGETS[b]])
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(logits[b, -n:], adapter.forward(alone)[0], atol=1e-4, rtol=1e-4)


def test_generate_batched_matches_single(adapter: VLMAdapter, make_image) -> None:
    pictures = images(make_image)
    batched = adapter.generate(adapter.encode(pictures, PROMPTS), max_new_tokens=6)
    single = [adapter.generate(adapter.encode([i], [p]), max_new_tokens=6)[0] for i, p in zip(pictures, PROMPTS)]
    assert len(batched) == len(PROMPTS) and all(isinstance(t, str) for t in batched)
    assert batched == single


def test_generate_rejects_targets(adapter: VLMAdapter, make_image) -> None:
    with pytest.raises(ValueError, match="prompt-only"):
        adapter.generate(adapter.encode([make_image()], ["q"], ["a"]))


def test_answer_token_ids(adapter: VLMAdapter) -> None:
    yes, no = adapter.answer_token_ids(["Yes", "No"])
    assert yes != no
    assert adapter.tokenizer.decode([yes]).strip() == "Yes"
    assert adapter.tokenizer.decode([no]).strip() == "No"


def test_chat_format(tiny_llava: VLMAdapter, tiny_qwen2_5_vl: VLMAdapter) -> None:
    assert tiny_llava.format_prompt("hi") == "USER: <image>\nhi ASSISTANT:"
    assert tiny_llava.format_prompt("hi") == tiny_llava.fallback_prompt("hi")
    qwen = tiny_qwen2_5_vl.format_prompt("hi")
    assert qwen == tiny_qwen2_5_vl.fallback_prompt("hi")
    assert qwen.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_save_load_roundtrip(adapter: VLMAdapter, make_image, tmp_path) -> None:
    save_pretrained(adapter.model, adapter.processor, tmp_path)
    loaded = load_adapter(str(tmp_path))
    assert type(loaded) is type(adapter)
    assert loaded.processor.chat_template == adapter.processor.chat_template
    assert loaded.tokenizer.padding_side == "left"
    batch = adapter.encode(images(make_image), PROMPTS, TARGETS)
    reloaded_batch = loaded.encode(images(make_image), PROMPTS, TARGETS)
    for key, value in batch.items():
        assert torch.equal(value, reloaded_batch[key]), key
    with torch.no_grad():
        assert torch.equal(adapter.forward(batch), loaded.forward(batch))


def test_load_bf16(tiny_llava: VLMAdapter, make_image, tmp_path) -> None:
    save_pretrained(tiny_llava.model, tiny_llava.processor, tmp_path)
    loaded = load_adapter(str(tmp_path), dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        logits = loaded.next_token_logits(loaded.encode([make_image()], ["q"]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_load_module_adapter(tiny_llava: VLMAdapter, tmp_path) -> None:
    """What every module's ``configure_model`` uses: the factory, else hparams on the module's device, eval mode."""
    from hones.attribution.pipeline import AttributionModule

    save_pretrained(tiny_llava.model, tiny_llava.processor, tmp_path / "tiny")
    module = AttributionModule(str(tmp_path / "tiny"))
    loaded = load_module_adapter(module)
    assert loaded.device == module.device and not loaded.model.training
    assert load_module_adapter(module, lambda: tiny_llava) is tiny_llava
    with pytest.raises(FileNotFoundError, match=r"models/no-such-model: no such model directory"):
        load_module_adapter(AttributionModule("models/no-such-model"))


def test_unsupported_model_type(tmp_path) -> None:
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        load_adapter(str(tmp_path))
    message = str(error.value)
    assert "'llama'" in message and "llava" in message and "qwen2_5_vl" in message
    assert "\n" not in message


@pytest.mark.parametrize("missing", ["mlp.gate_proj", "self_attn.o_proj"])
def test_missing_piece_is_named(missing: str) -> None:
    model, processor = build_tiny_llava(num_layers=2)
    parent_name, attribute = missing.split(".")
    delattr(getattr(model.model.language_model.layers[1], parent_name), attribute)
    with pytest.raises(ValueError, match=attribute):
        wrap_model(model, processor)


def test_train_tokenizer(tmp_path) -> None:
    tokenizer = train_tokenizer(["red square", "blue circle"] * 5, vocab_size=300, arch="qwen2_5_vl")
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer("<|im_start|><|image_pad|>", add_special_tokens=False)["input_ids"]) == 2
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "left"
    llava = train_tokenizer(["red square"], arch="llava")
    assert llava("red")["input_ids"][0] == llava.bos_token_id
    with pytest.raises(ValueError, match="arch"):
        train_tokenizer(["x"], arch="gpt")


def test_llava_pads_wide_images_to_a_square_as_llava_1_5_trained(tiny_llava: VLMAdapter) -> None:
    """The processor's centre crop would cut off a wide image's sides (and an OCR box there); the
    LLaVA adapter first pads the image to a square with the CLIP mean colour, image centred."""
    from PIL import Image

    wide = Image.new("RGB", (96, 48), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 8, 48))  # a blue strip at the left edge, which a centre crop drops
    square = tiny_llava.prepare_image(wide)
    assert square.size == (96, 96) and square.getpixel((4, 48)) == (0, 0, 255) and square.getpixel((50, 48)) == (255, 0, 0)
    mean = tuple(int(round(255 * m)) for m in tiny_llava.processor.image_processor.image_mean)
    assert square.getpixel((50, 5)) == mean and square.getpixel((50, 90)) == mean
    pixels = tiny_llava.encode([wide], ["what is there?"])["pixel_values"]
    expected = tiny_llava.processor.image_processor(images=[square], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected)
    tiny_llava.pad_to_square = False
    try:
        cropped = tiny_llava.encode([wide], ["what is there?"])["pixel_values"]
    finally:
        del tiny_llava.pad_to_square  # back to the class default
    assert not torch.equal(cropped, pixels)
    assert tiny_llava.prepare_image(square) is square  # a square image is handed on as it is


def test_generate_is_greedy_whatever_the_hub_generation_config(tiny_qwen2_5_vl: VLMAdapter, make_image) -> None:
    """Qwen2.5-VL-Instruct's generation_config.json sets do_sample, a temperature and repetition_penalty 1.05;
    transformers fills what generate() leaves unset from it, so a penalty changed greedy answers."""
    adapter = tiny_qwen2_5_vl
    batch = adapter.encode(images(make_image), PROMPTS)
    greedy = adapter.generate(batch, max_new_tokens=8)
    config = adapter.model.generation_config
    saved = config.to_dict()
    config.update(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=100.0, no_repeat_ngram_size=1)
    try:
        inputs = adapter.model_inputs(batch)
        stop = adapter.stop_token_ids
        with torch.no_grad():
            hub = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=adapter.tokenizer.pad_token_id)
        penalised = [t.strip() for t in adapter.tokenizer.batch_decode(hub[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
        assert penalised != greedy  # the hub settings do change a plain generate() call
        assert adapter.generate(batch, max_new_tokens=8) == greedy  # ... but not the adapter's
        assert adapter.model.generation_config is config and config.repetition_penalty == 100.0  # restored
    finally:
        config.update(**{k: saved.get(k) for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")})
