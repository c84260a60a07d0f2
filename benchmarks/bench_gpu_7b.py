"""Random-weight LLaVA-1.5-7B and Qwen2.5-VL-7B on one CUDA GPU: throughput and fraction of peak.

    python benchmarks/bench_gpu_7b.py                          # both models (CUDA only; otherwise one skip line)
    python benchmarks/bench_gpu_7b.py --arch llava --batch-sizes 1 8 16
    python benchmarks/bench_gpu_7b.py --smoke                  # same code path, tiny sizes, on CPU (no GPU needed)
    python benchmarks/bench_gpu_7b.py --arch llava --save /tmp/llava-7b-random   # write the random model, no timing

``--save DIR`` writes the random model (bf16 safetensors, about 14 GB for LLaVA-1.5-7B) and
its offline processor as a local model folder, so that the real-model configs
(``configs/analyze/llava-1.5-7b.yaml``, ``configs/steering/llava-1.5-7b_*.yaml``) can run
end to end at the 7B shapes without a download: ``--model DIR`` in place of the hub id.
The vocabulary is the offline tokenizer's, padded to the real size; the outputs are noise.

The models are built offline from their known sizes (no download): LLaVA-1.5-7B = CLIP
ViT-L/14-336 (24 layers, 1024 wide, 576 image tokens) + 2-layer GELU projector + Llama-2-7B
text model (32 layers x 32 heads, hidden 4096, FFN 11008, vocab 32064); Qwen2.5-VL-7B = the
windowed ViT (32 blocks, 1280 wide, window 112 px, full attention in blocks 7/15/23/31,
2x2 patch merger; a 448 px image gives 256 tokens) + Qwen2 text model (28 layers x 28 heads,
4 KV heads, hidden 3584, FFN 18944, vocab 152064, mrope [16, 24, 24]). Weights are random
(seed 0) in bf16, built directly on the GPU; the processors are the project's offline ones
(byte-level BPE tokenizer trained on the spot, the real image geometry).

Reported per model:
1. prefill forward (vision + language model, next-token logits; ``adapter.encode`` batches
   of synthetic vqa items): tokens/s, TFLOP/s from ``torch.utils.flop_counter.FlopCounterMode``
   (every matmul, convolution and attention of one forward), and that as a fraction of the
   GPU's dense bf16 peak (spec sheet, ``--peak-tflops`` to override) and of a measured
   8192^3 bf16 matmul;
2. the attribution stages as ``analyze.py`` runs them (``HeadLocalizer`` teacher-forced on a
   subset of heads in every layer; ``NeuronAttributor`` with |H*| = 30 / 25) vs the
   straightforward loop (batch 1, one head, full forward) on a few items: items/s and ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribution import flop_counter, heads_optimised, heads_plain, neurons_optimised, neurons_plain, synthetic_items  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 989.4),
    (("H100", "PCIE"), 756.5),
    (("H100", "NVL"), 835.5),
    (("H100",), 989.4),
    (("GH200",), 989.4),
    (("B200",), 2250.0),
    (("A100",), 312.0),
    (("L40S",), 362.1),
    (("A10G",), 70.0),
    (("L4",), 121.0),
)


@dataclass(frozen=True)
class Sizes:
    """Architecture sizes (vision tower + text model) of one benchmarked model."""

    image_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    top_k: int  # |H*| (HONES_METHOD §2: 30 for LLaVA, 25 for Qwen2.5-VL)


LLAVA_7B = Sizes(336, 1024, 24, 16, 4096, 4096, 32, 32, 32, 11008, 32064, 30)
QWEN_7B = Sizes(448, 1280, 32, 16, 3420, 3584, 28, 28, 4, 18944, 152064, 25)
LLAVA_SMOKE = Sizes(56, 64, 2, 2, 128, 128, 4, 4, 4, 352, 1000, 3)
QWEN_SMOKE = Sizes(56, 64, 4, 2, 128, 128, 4, 4, 2, 352, 1000, 3)
PATCH = 14


# -- models ------------------------------------------------------------------------------------
def llava_model(sizes: Sizes, device: str, dtype: torch.dtype) -> Any:
    """A random LLaVA-1.5 of ``sizes`` as a VLMAdapter (processor with the real geometry)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from hones.models import build_tiny_llava, wrap_model

    _, processor = build_tiny_llava(  # only its processor: tokenizer, chat template, image geometry
        image_size=sizes.image_size, patch_size=PATCH, hidden_size=32, num_layers=1, num_heads=2,
        intermediate_size=64, vision_hidden=32, vision_layers=1, vision_heads=2,
    )  # fmt: skip
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size, patch_size=PATCH, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=max(sizes.vocab, len(tokenizer)), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(sizes.image_size // PATCH) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu", pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = _random_model(LlavaForConditionalGeneration, config, device, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return wrap_model(model, processor, name="llava-1.5-7b-random" if sizes == LLAVA_7B else "llava-smoke")


def qwen_model(sizes: Sizes, device: str, dtype: torch.dtype) -> Any:
    """A random Qwen2.5-VL of ``sizes`` as a VLMAdapter (processor with the real geometry)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from hones.models import build_tiny_qwen2_5_vl, wrap_model

    _, processor = build_tiny_qwen2_5_vl(
        image_size=sizes.image_size, patch_size=PATCH, merge_size=2, hidden_size=32, num_layers=1, num_heads=2,
        intermediate_size=64, vision_hidden=32, vision_layers=1, vision_heads=2, num_kv_heads=1,
    )  # fmt: skip
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = sizes.hidden // sizes.heads
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # 128 -> [16, 24, 24]
    full_attention = [i for i in range(sizes.vision_layers) if i % 8 == 7] or [sizes.vision_layers - 1]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": max(sizes.vocab, len(tokenizer)), "hidden_size": sizes.hidden,
            "intermediate_size": sizes.intermediate, "num_hidden_layers": sizes.layers,
            "num_attention_heads": sizes.heads, "num_key_value_heads": sizes.kv_heads,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": sizes.vision_layers, "hidden_size": sizes.vision_hidden,
            "intermediate_size": sizes.vision_intermediate, "num_heads": sizes.vision_heads,
            "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": sizes.hidden, "window_size": 112 if sizes == QWEN_7B else 2 * 2 * PATCH,
            "fullatt_block_indexes": full_attention,
        },
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
    )  # fmt: skip
    model = _random_model(Qwen2_5_VLForConditionalGeneration, config, device, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [token_id("<|im_end|>"), token_id("<|endoftext|>")]
    return wrap_model(model, processor, name="qwen2.5-vl-7b-random" if sizes == QWEN_7B else "qwen2.5-vl-smoke")


def _random_model(model_class: Any, config: Any, device: str, dtype: torch.dtype) -> Any:
    """``model_class(config)`` with seeded random weights, allocated and initialised on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# -- measurements ------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(function: Callable[[], Any], device: str, warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        function()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def spec_peak_tflops(device: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak (spec sheet), ``override`` if given, None if unknown."""
    if override is not None:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device).upper()
    for keys, peak in PEAK_BF16_TFLOPS:
        if all(key in name for key in keys):
            return peak
    return None


def matmul_tflops(device: str, dtype: torch.dtype, size: int, iterations: int = 10) -> float:
    """Achieved TFLOP/s of a ``size``^3 matmul in ``dtype`` (the practical ceiling)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: a @ b, device, warmup=3, iterations=iterations)
    return 2 * size**3 / seconds / 1e12


@torch.no_grad()
def forward_row(adapter: Any, batch_size: int, device: str, warmup: int, iterations: int) -> dict[str, float]:
    """One prefill forward of ``batch_size`` items: tokens/s and TFLOP/s."""
    from hones.attribution.batches import encode_items
    from hones.attribution.rerun import model_inputs

    batch = encode_items(adapter, list(synthetic_items(batch_size)), with_targets=False)
    inputs = model_inputs(adapter, batch)

    def run() -> Any:
        return adapter.model(**inputs, use_cache=False, logits_to_keep=1)

    with flop_counter() as counter:
        run()
    flops = counter.get_total_flops()
    seconds = seconds_per_call(run, device, warmup, iterations)
    tokens = int(batch["attention_mask"].sum())
    return {"batch": batch_size, "seq": int(batch["input_ids"].shape[1]), "tokens_per_s": tokens / seconds,
            "ms": 1e3 * seconds, "tflops": flops / seconds / 1e12}  # fmt: skip


def spread_heads(num_layers: int, num_heads: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` distinct (layer, head) pairs drawn at random (a stand-in H* for random weights)."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(num_layers * num_heads, generator=generator)[:count].tolist()
    return sorted(divmod(int(i), num_heads) for i in flat)


def attribution_rows(adapter: Any, sizes: Sizes, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(stage, optimised items/s, straightforward items/s) for the heads and neurons stages."""
    items = list(synthetic_items(args.attr_items, seed=2))
    few = items[: args.plain_items]
    per_layer = min(args.heads_per_layer, adapter.num_heads)
    heads = [(l, h) for l in range(adapter.num_layers) for h in range(per_layer)]
    device = args.device
    heads_optimised(adapter, items[:1], args.attr_batch, args.rows_per_forward, heads)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    heads_optimised(adapter, items, args.attr_batch, args.rows_per_forward, heads)
    synchronize(device)
    fast = len(items) / (time.perf_counter() - start)
    start = time.perf_counter()
    heads_plain(adapter, few, heads)
    synchronize(device)
    plain = len(few) / (time.perf_counter() - start)
    rows = [(f"heads (§2), {len(heads)} of {adapter.num_layers * adapter.num_heads} heads", fast, plain)]

    top = spread_heads(adapter.num_layers, adapter.num_heads, sizes.top_k)
    deltas = [1.0] * len(top)
    neurons_optimised(adapter, items[:1], top, deltas, args.attr_batch, args.rows_per_forward)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    neurons_optimised(adapter, items, top, deltas, args.attr_batch, args.rows_per_forward)
    synchronize(device)
    fast = len(items) / (time.perf_counter() - start)
    start = time.perf_counter()
    neurons_plain(adapter, few, top, deltas)
    synchronize(device)
    plain = len(few) / (time.perf_counter() - start)
    rows.append((f"neurons (§3), |H*| = {len(top)}", fast, plain))
    return rows


# -- report ------------------------------------------------------------------------------------
def sizes_and_builder(arch: str, smoke: bool) -> tuple[Sizes, Callable[[Sizes, str, torch.dtype], Any]]:
    """The sizes of ``arch`` (7B, or the tiny stand-ins with ``smoke``) and the function that builds it."""
    if arch == "llava":
        return (LLAVA_SMOKE if smoke else LLAVA_7B), llava_model
    return (QWEN_SMOKE if smoke else QWEN_7B), qwen_model


def bench_model(arch: str, args: argparse.Namespace, peak: float | None, matmul_peak: float | None) -> None:
    sizes, build = sizes_and_builder(arch, args.smoke)
    dtype = torch.bfloat16
    start = time.perf_counter()
    adapter = build(sizes, args.device, dtype)
    synchronize(args.device)
    params = sum(p.numel() for p in adapter.model.parameters())
    print(f"\n## {adapter.name}: {params / 1e9:.2f} B parameters, {adapter.num_layers} layers x {adapter.num_heads} heads, "
          f"FFN {adapter.ffn_width}, bf16, built in {time.perf_counter() - start:.0f} s")  # fmt: skip
    print(f"{'batch':>5s} {'seq':>5s} {'ms/forward':>11s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'of peak':>8s} {'of matmul':>9s}")
    for batch_size in args.batch_sizes:
        row = forward_row(adapter, batch_size, args.device, args.warmup, args.iterations)
        of_peak = f"{100 * row['tflops'] / peak:7.1f}%" if peak else f"{'n/a':>8s}"
        of_matmul = f"{100 * row['tflops'] / matmul_peak:8.1f}%" if matmul_peak else f"{'n/a':>9s}"
        print(f"{row['batch']:5d} {row['seq']:5d} {row['ms']:11.1f} {row['tokens_per_s']:10.0f} {row['tflops']:8.1f} {of_peak} {of_matmul}")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.attr_items > 0:
        print(f"{'attribution stage':45s} {'optimised items/s':>18s} {'straightforward':>16s} {'speed-up':>9s}")
        for name, fast, plain in attribution_rows(adapter, sizes, args):
            print(f"{name:45s} {fast:18.2f} {plain:16.2f} {fast / plain:8.1f}x")
    del adapter
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["llava", "qwen2_5_vl", "both"], default="both")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: spec table)")
    parser.add_argument("--attr-items", type=int, default=16, help="items for the attribution rows (0: skip them)")
    parser.add_argument("--plain-items", type=int, default=2, help="items for the straightforward loop")
    parser.add_argument("--attr-batch", type=int, default=8)
    parser.add_argument("--rows-per-forward", type=int, default=64)
    parser.add_argument("--heads-per-layer", type=int, default=2, help="heads of every layer in the heads stage")
    parser.add_argument("--smoke", action="store_true", help="tiny stand-in sizes on CPU: checks the code path, no GPU needed")
    parser.add_argument("--save", default=None, help="write the random model and processor to this folder and stop (one --arch)")
    args = parser.parse_args(argv)
    if args.save is not None and args.arch == "both":
        parser.error("--save writes one model: give --arch llava or --arch qwen2_5_vl")
    args.device = "cpu" if args.smoke else "cuda"
    return args


def save_random_model(args: argparse.Namespace) -> int:
    """Write the random model of ``args.arch`` (bf16) and its processor to ``args.save``."""
    from hones.models import save_pretrained

    sizes, build = sizes_and_builder(args.arch, args.smoke)
    start = time.perf_counter()
    adapter = build(sizes, args.device, torch.bfloat16)
    save_pretrained(adapter.model, adapter.processor, args.save)
    params = sum(p.numel() for p in adapter.model.parameters())
    print(f"{adapter.name}: {params / 1e9:.2f} B parameters (random, bf16) written to {args.save} "
          f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save is not None:
        if not args.smoke and not torch.cuda.is_available():
            args.device = "cpu"  # building 7B on the CPU is slow but works
        return save_random_model(args)
    if not args.smoke and not torch.cuda.is_available():
        print(f"bench_gpu_7b: skipped — no CUDA device (torch {torch.__version__}); use --smoke for a CPU check of the code path")
        return 0
    if args.smoke:
        torch.set_num_threads(1)
        args.batch_sizes = [min(b, 2) for b in args.batch_sizes[:2]]
        args.attr_items, args.plain_items, args.attr_batch = min(args.attr_items, 2), min(args.plain_items, 1), 2
        print("# smoke run: tiny stand-in sizes on CPU (figures are not meaningful)")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    peak = spec_peak_tflops(args.device, args.peak_tflops)
    matmul_peak = None if args.smoke else matmul_tflops(args.device, torch.bfloat16, 8192)
    if peak is not None:
        print(f"# dense bf16 peak (spec): {peak:.0f} TFLOP/s")
    if matmul_peak is not None:
        print(f"# measured 8192^3 bf16 matmul: {matmul_peak:.0f} TFLOP/s")
    for arch in (["llava", "qwen2_5_vl"] if args.arch == "both" else [args.arch]):
        bench_model(arch, args, peak, matmul_peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
