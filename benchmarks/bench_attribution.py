"""Attribution throughput and memory on CPU or one GPU: the optimised paths vs the straightforward loop.

    python benchmarks/bench_attribution.py                         # toy model, 32 items; memory 200 vs 2000
    python benchmarks/bench_attribution.py --items 16 --memory-items 100 1000   # quicker
    python benchmarks/bench_attribution.py --model models/toy-qwen2_5_vl
    python benchmarks/bench_attribution.py --device cuda           # the same comparison on a GPU
    python benchmarks/bench_attribution.py --device auto           # cuda if available, else cpu

``--device`` (cpu | cuda | auto) puts the model, and so every path (optimised and
straightforward) and the memory worker, on that device; on cuda the clock is read after
``torch.cuda.synchronize()``.

Heads stage (HONES_METHOD §2, teacher-forced utility, every head of every layer):
- optimised: ``HeadLocalizer`` — batched items, several head interventions per forward
  (``row_heads``), rerun of layers >= l from the cached layer-l input, running sums;
- also reported: batched + ``row_heads`` with full forwards (``rerun=False``), to show the
  share of the rerun;
- straightforward: for each item (batch 1) and each head, one full ``adapter.forward`` under
  ``mean_replace_heads(heads=[head])``, the utility from the full logits.
Neurons stage (§3, H* = the heads stage's top-k): ``NeuronAttributor`` (one base forward per
batch, c̄^h from reruns of layers >= l, several heads per rerun, running sums) vs, per item and
per head, a full forward capturing z (``write_in_contributions``).
Both paths start from the same TaskItems (encoding included) and must agree (allclose);
items/s and the speed-up ratios are printed (targets: heads >= 10x, neurons >= 5x), with the
decoder-layer passes per item of each path (the exact savings alone; the rest is batching).
Also reported: the heads stage with the paper's utility (greedy generation scored by VQA
accuracy): batched ``row_heads`` generation vs one generation per item and head.

Counted FLOPs: per stage, one extra untimed call of each path on the first ``--batch-size``
items under ``torch.utils.flop_counter.FlopCounterMode`` gives GFLOP per item of both paths,
their ratio (the work the exact savings remove; compare the decoder-layer pass ratio), and
the achieved GFLOP/s (GFLOP per item x items/s of the timed runs, which run without the
counter). The counter sees matmuls and convolutions, and the fused attention kernels that
CUDA runs (flash / efficient / cudnn SDPA; counted by ``sdpa_flops``, which also takes grouped
key/value heads); not elementwise ops, norms or indexing, and not
torch's CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``: on CPU attention's
QK^T and AV are left out). The figures are thus the dense-algebra work: equal achieved
GFLOP/s on both paths means the speed-up is the FLOP ratio alone; a higher one on the
optimised path means batching raised the arithmetic rate.

Memory: neuron scoring over N synthetic items streamed in batches, each N in a fresh
process. Reported: peak resident set size (``resource.getrusage(...).ru_maxrss``: every byte
the process touched, torch's CPU allocator included), its growth over the same process after
one warm-up batch, the accumulator state (torchmetrics sum states: fixed ``[K, L, I]`` etc.),
and the Python-heap peak from ``tracemalloc`` (Python objects only: catches per-item lists;
torch storage is not allocated through Python's allocator); on cuda also the peak of
``torch.cuda.max_memory_allocated()`` (RSS says nothing about GPU memory). Target: peak RSS
(and, on cuda, peak GPU memory) for 2000 items within 10 % of that for 200 items.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.flop_counter import FlopCounterMode

from hones.attribution.batches import encode_items
from hones.attribution.heads import HeadLocalizer, HeadScores, teacher_forced_head_utilities, teacher_forced_utility_from_logits
from hones.attribution.neurons import NeuronAttributor, head_conditioned_importance, positive_heads
from hones.attribution.write_in import item_target_directions, write_in_contributions
from hones.data.records import TaskItem
from hones.data.tasks import task_prompt
from hones.interventions import mean_replace_heads

T = TypeVar("T")
DEFAULT_MODEL = "models/toy-llava"
QUESTIONS = (
    ("what color is the square?", "red"),
    ("how many circles are in the picture?", "two"),
    ("is there a triangle?", "no"),
    ("what shape is to the left of the blue star?", "a circle"),
    ("what is written on the sign?", "stop"),
)
COLORS = ((220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 40), (250, 250, 250))


# -- inputs ------------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """``cpu`` | ``cuda`` | ``auto`` (cuda if available, else cpu) -> the device to run on."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device (torch {torch.__version__}); use --device cpu or auto")
    return name


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def load_model(spec: str, device: str = "cpu") -> Any:
    """The adapter of a model directory, or a random tiny LLaVA (``tiny`` / directory absent), on ``device``."""
    from hones.models import build_tiny_llava, load_adapter, wrap_model

    if spec != "tiny" and Path(spec).is_dir():
        return load_adapter(spec, device=device)
    if spec not in ("tiny", DEFAULT_MODEL):
        raise FileNotFoundError(f"{spec}: no such model directory")
    print(f"# {DEFAULT_MODEL} not found: random-weight tiny LLaVA of the same architecture", file=sys.stderr)
    adapter = wrap_model(*build_tiny_llava(seed=0), name="tiny-llava")
    adapter.model.to(device)  # the adapter has no .to(); its .device follows the wrapped model's weights
    return adapter


def synthetic_items(count: int, seed: int = 0, size: int = 64) -> Iterator[TaskItem]:
    """``count`` vqa items with random shapes on noise, made one at a time (nothing is kept)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x, y = (int(v) for v in rng.integers(0, size - 16, size=2))
            draw.rectangle((x, y, x + 14, y + 14), fill=COLORS[int(rng.integers(len(COLORS)))])
        question, answer = QUESTIONS[index % len(QUESTIONS)]
        yield TaskItem(
            uid=f"bench:{index}:vqa", task="vqa", image=image, prompt=task_prompt("vqa", question=question),
            target=answer, references=[answer], group=str(index),
        )


def chunks(items: Sequence[T] | Iterator[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` elements."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA kernels (no-op on CPU), so that the clock covers the work."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def timed(function: Callable[[], T], device: str | torch.device = "cpu") -> tuple[T, float]:
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one fused SDPA forward, q ``[batch, heads, s_q, d]``, k / v ``[batch, kv_heads, s_k, d]``.

    QK^T and AV as if the key/value heads were repeated to the query's (GQA: Qwen2.5-VL has
    4 KV heads for 28 query heads). torch < 2.13's own formula asserts equal head counts.
    """
    batch, heads, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * batch * heads * s_q * s_k * (d + d_v)


# the fused CUDA attention kernels, counted by ``sdpa_flops`` (GQA-aware on every torch)
SDPA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_efficient_attention: sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention: sdpa_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention: sdpa_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` whose SDPA formula accepts grouped key/value heads."""
    return FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS)


def counted_flops(function: Callable[[], Any], count: int) -> float:
    """FLOPs per item of one untimed call of ``function`` over ``count`` items.

    ``FlopCounterMode`` counts only the ops it has formulas for: matmuls (mm, bmm, addmm,
    baddbmm), convolutions and the CUDA fused scaled-dot-product-attention kernels (flash,
    efficient, cudnn). Elementwise ops (activations, residual adds, the mean replacement),
    norms, softmax, indexing and reductions are not counted, nor is torch's CPU SDPA kernel
    (``_scaled_dot_product_flash_attention_for_cpu`` has no formula), so on CPU attention's
    QK^T / AV products are missing (small next to the projections at ~100 tokens). Its
    dispatch hooks slow every op, so it never wraps a timed run.
    """
    with flop_counter() as counter:
        function()
    return counter.get_total_flops() / max(count, 1)


def flops_line(plain_per_item: float, fast_per_item: float, plain_rate: float, fast_rate: float) -> str:
    """``counted GFLOP per item: ...; achieved GFLOP/s: ...`` (rates in items/s from the timed runs)."""
    g_plain, g_fast = plain_per_item / 1e9, fast_per_item / 1e9
    ratio = f"{g_plain / g_fast:.2f}x fewer" if g_fast > 0 else "n/a"
    return (
        f"counted GFLOP per item: straightforward {g_plain:.3f}, optimised {g_fast:.3f} (ratio {ratio}); "
        f"achieved GFLOP/s: {g_plain * plain_rate:.2f} vs {g_fast * fast_rate:.2f}"
    )


# -- heads stage -------------------------------------------------------------------------------
def all_heads(adapter: Any) -> list[tuple[int, int]]:
    """Every (layer, head) of the language model, layer-major."""
    return [(l, h) for l in range(adapter.num_layers) for h in range(adapter.num_heads)]


@torch.no_grad()
def heads_optimised(
    adapter: Any, items: Sequence[TaskItem], batch_size: int, rows_per_forward: int, heads: Sequence[tuple[int, int]] | None = None
) -> HeadScores:
    """HONES_METHOD §2 as ``analyze.py`` runs it: ``HeadLocalizer`` over encoded batches (default: every head)."""
    localizer = HeadLocalizer(adapter.num_layers, adapter.num_heads, "vqa", heads=heads, rows_per_forward=rows_per_forward)
    localizer = localizer.to(adapter.device)  # running sums on the model's device, as the callbacks keep them
    for batch in chunks(items, batch_size):
        localizer.update(adapter, encode_items(adapter, batch, with_targets=True))
    return localizer.compute()


@torch.no_grad()
def heads_batched_full_forward(adapter: Any, items: Sequence[TaskItem], batch_size: int, rows_per_forward: int) -> torch.Tensor:
    """Batched items + ``row_heads``, but full forwards (no rerun): Δ ``[L, H]``."""
    heads = all_heads(adapter)
    base_sum, head_sum = 0.0, torch.zeros(len(heads), dtype=torch.float64)
    for batch in chunks(items, batch_size):
        encoded = encode_items(adapter, batch, with_targets=True)
        baseline, intervened = teacher_forced_head_utilities(adapter, encoded, heads, "vqa", rows_per_forward, rerun=False)
        base_sum += float(baseline.double().sum())
        head_sum += intervened.double().sum(dim=1).cpu()
    return (base_sum - head_sum).view(adapter.num_layers, adapter.num_heads) / len(items)


@torch.no_grad()
def heads_plain(adapter: Any, items: Sequence[TaskItem], heads: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """One item, one head, one full forward at a time: Δ ``[L, H]`` (NaN for heads not given)."""
    heads = list(heads) if heads is not None else all_heads(adapter)
    base_sum, head_sum = 0.0, torch.zeros(len(heads), dtype=torch.float64)
    for item in items:
        single = encode_items(adapter, [item], with_targets=True)
        base_sum += float(teacher_forced_utility_from_logits(adapter, adapter.forward(single), single, "vqa")[0])
        for k, head in enumerate(heads):
            with mean_replace_heads(adapter, heads=[head]):
                logits = adapter.forward(single)
            head_sum[k] += float(teacher_forced_utility_from_logits(adapter, logits, single, "vqa")[0])
    delta = torch.full((adapter.num_layers, adapter.num_heads), float("nan"), dtype=torch.float64)
    for k, head in enumerate(heads):
        delta[head] = (base_sum - head_sum[k]) / len(items)
    return delta


@torch.no_grad()
def heads_metric_optimised(
    adapter: Any, items: Sequence[TaskItem], batch_size: int, rows_per_forward: int, max_new_tokens: int
) -> HeadScores:
    """§2 with the paper's utility (VQA accuracy of greedy generations): batched, ``row_heads`` generation."""
    localizer = HeadLocalizer(
        adapter.num_layers, adapter.num_heads, "vqa", utility="metric", rows_per_forward=rows_per_forward,
        max_new_tokens=max_new_tokens,
    ).to(adapter.device)  # fmt: skip
    for batch in chunks(items, batch_size):
        localizer.update(adapter, encode_items(adapter, batch, with_targets=False))
    return localizer.compute()


@torch.no_grad()
def heads_metric_plain(adapter: Any, items: Sequence[TaskItem], max_new_tokens: int) -> torch.Tensor:
    """One item (batch 1), one head, one greedy generation at a time; Δ of VQA accuracy ``[L, H]``."""
    from hones.evaluation import TaskScorer
    from hones.metrics import build_metric

    scorer = TaskScorer("vqa", max_new_tokens)
    heads = all_heads(adapter)
    metrics = {head: build_metric("vqa", "paper") for head in [None, *heads]}
    for item in items:
        single = encode_items(adapter, [item], with_targets=False)
        scorer.update(metrics[None], scorer.predict(adapter, single))
        for head in heads:
            with mean_replace_heads(adapter, heads=[head]):
                scorer.update(metrics[head], scorer.predict(adapter, single))
    baseline = float(metrics[None].compute())
    delta = torch.empty(adapter.num_layers, adapter.num_heads, dtype=torch.float64)
    for head in heads:
        delta[head] = baseline - float(metrics[head].compute())
    return delta


# -- neurons stage -----------------------------------------------------------------------------
@torch.no_grad()
def neurons_optimised(
    adapter: Any, items: Sequence[TaskItem] | Iterator[TaskItem], heads: Sequence[tuple[int, int]], deltas: Sequence[float],
    batch_size: int, rows_per_forward: int, on_batch: Callable[[int], None] | None = None,
) -> tuple[NeuronAttributor, torch.Tensor]:
    """HONES_METHOD §3 with ``NeuronAttributor``; returns it and Imp ``[L, I]``."""
    attributor = NeuronAttributor(
        adapter.num_layers, adapter.ffn_width, heads, deltas, "vqa", rows_per_forward=rows_per_forward,
        activation_statistics=False,
    ).to(adapter.device)
    for index, batch in enumerate(chunks(items, batch_size)):
        attributor.update(adapter, encode_items(adapter, batch, with_targets=True))
        if on_batch is not None:
            on_batch(index)
    return attributor, attributor.compute().importance


@torch.no_grad()
def neurons_plain(adapter: Any, items: Sequence[TaskItem], heads: Sequence[tuple[int, int]], deltas: Sequence[float]) -> torch.Tensor:
    """Per item (batch 1): c from one full forward, c^h from one full forward per head: Imp ``[L, I]``."""
    kept, kept_deltas = positive_heads(heads, deltas)
    mean = torch.zeros(adapter.num_layers, adapter.ffn_width, dtype=torch.float64)
    head_means = torch.zeros(len(kept), adapter.num_layers, adapter.ffn_width, dtype=torch.float64)
    for item in items:
        single = encode_items(adapter, [item], with_targets=True)
        directions = item_target_directions(adapter, [item])
        mean += write_in_contributions(adapter, single, directions)[0].double().cpu()
        for k, head in enumerate(kept):
            intervention = [mean_replace_heads(adapter, heads=[head])]
            head_means[k] += write_in_contributions(adapter, single, directions, intervention)[0].double().cpu()
    return head_conditioned_importance(mean / len(items), head_means / len(items), kept_deltas)


# -- memory (one fresh process per item count) -------------------------------------------------
def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_worker(args: argparse.Namespace) -> None:
    """Neuron scoring over ``args.memory_worker`` streamed items; prints one JSON line."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    adapter = load_model(args.model, device)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    heads = [(l, h) for l in range(adapter.num_layers) for h in range(min(2, adapter.num_heads))][: args.top_k]
    deltas = [1.0] * len(heads)
    marks: dict[str, float] = {}

    def after_batch(index: int) -> None:
        if index == 0:
            marks["after_first_batch"] = peak_rss_mib()

    tracemalloc.start()
    (attributor, importance), seconds = timed(
        lambda: neurons_optimised(
            adapter, synthetic_items(args.memory_worker, seed=1), heads, deltas, args.batch_size, args.rows_per_forward, after_batch
        ),
        device,
    )
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    state_bytes = sum(buffer.numel() * buffer.element_size() for buffer in attributor.buffers())
    state_bytes += sum(
        value.numel() * value.element_size()
        for metric in attributor.modules() if hasattr(metric, "_defaults")
        for value in (getattr(metric, name) for name in metric._defaults) if isinstance(value, torch.Tensor)
    )
    extra = {"cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20} if is_cuda(device) else {}
    print(json.dumps({
        "items": args.memory_worker, "seconds": seconds, "num_items_seen": int(attributor.item_count.compute()),
        "peak_rss_mib": peak_rss_mib(), "rss_after_first_batch_mib": marks.get("after_first_batch", float("nan")),
        "state_mib": state_bytes / 2**20, "python_heap_peak_mib": python_peak / 2**20,
        "importance_finite": bool(torch.isfinite(importance).all()), **extra,
    }))  # fmt: skip


def measure_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for count in args.memory_items:
        command = [sys.executable, __file__, "--memory-worker", str(count), "--model", args.model, "--threads", str(args.threads),
                   "--device", args.device, "--batch-size", str(args.batch_size), "--rows-per-forward", str(args.rows_per_forward),
                   "--top-k", str(args.top_k)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker for {count} items failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def layer_passes(num_layers: int, heads: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Decoder-layer passes per item: (straightforward, optimised).

    Straightforward: 1 + n full forwards of L layers. Optimised: one base forward, then
    layers l..L-1 per head (the rerun); batching does not change this count, only how
    efficiently each pass runs. Their ratio is the ceiling of the exact savings alone.
    """
    return (1 + len(heads)) * num_layers, num_layers + sum(num_layers - l for l, _ in heads)


# -- report ------------------------------------------------------------------------------------
def machine_line(threads: int, device: str = "cpu") -> str:
    load = os.getloadavg()
    where = f"device {device}"
    if is_cuda(device):
        where = f"device {device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    return (
        f"# machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {where}, {threads} intra-op thread(s), "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"
    )


def report_speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = args.device
    adapter = load_model(args.model, device)
    items = list(synthetic_items(args.items))
    n_heads = adapter.num_layers * adapter.num_heads
    print(f"# model: {adapter.name or args.model} ({adapter.num_layers} layers x {adapter.num_heads} heads, "
          f"FFN {adapter.ffn_width}) on {adapter.device}")
    print(f"# {args.items} vqa items, batch {args.batch_size}, rows_per_forward {args.rows_per_forward}; teacher-forced utility")
    warm = items[: min(2, len(items))]
    flop_items = items[: max(1, min(args.batch_size, len(items)))]  # one batch: the counted (untimed) calls
    heads_optimised(adapter, warm, args.batch_size, args.rows_per_forward)  # warm-up (allocator, kernels)
    heads_plain(adapter, warm[:1])

    # Outputs are compared on the CPU: the straightforward paths accumulate there in float64,
    # the optimised ones keep their sums on the model's device.
    scores, t_fast = timed(lambda: heads_optimised(adapter, items, args.batch_size, args.rows_per_forward), device)
    delta_mid, t_mid = timed(lambda: heads_batched_full_forward(adapter, items, args.batch_size, args.rows_per_forward), device)
    delta_plain, t_plain = timed(lambda: heads_plain(adapter, items), device)
    delta_fast = scores.delta.detach().double().cpu()
    delta_mid = delta_mid.double().cpu()
    error_fast = float((delta_fast - delta_plain).abs().max())
    error_mid = float((delta_mid - delta_plain).abs().max())
    same = torch.allclose(delta_fast, delta_plain, atol=1e-4, rtol=0) and torch.allclose(delta_mid, delta_plain, atol=1e-4, rtol=0)
    flops_fast = counted_flops(lambda: heads_optimised(adapter, flop_items, args.batch_size, args.rows_per_forward), len(flop_items))
    flops_plain = counted_flops(lambda: heads_plain(adapter, flop_items), len(flop_items))
    print(f"\n## heads stage: {n_heads} heads per item")
    print(f"{'path':52s} {'items/s':>9s} {'speed-up':>9s} {'max |ΔΔ|':>10s}")
    print(f"{'straightforward (batch 1, 1 head, full forward)':52s} {args.items / t_plain:9.2f} {1.0:8.1f}x {0.0:10.1e}")
    print(f"{'batched + row_heads, full forward':52s} {args.items / t_mid:9.2f} {t_plain / t_mid:8.1f}x {error_mid:10.1e}")
    print(f"{'optimised (+ rerun from layer l, running sums)':52s} {args.items / t_fast:9.2f} {t_plain / t_fast:8.1f}x {error_fast:10.1e}")
    print(f"outputs allclose (atol 1e-4): {same}; speed-up {t_plain / t_fast:.1f}x (target >= 10x)")
    plain_passes, fast_passes = layer_passes(adapter.num_layers, all_heads(adapter))
    print(f"decoder-layer passes per item: {plain_passes} vs {fast_passes} ({plain_passes / fast_passes:.1f}x fewer; "
          f"vision tower 1 vs {1 + n_heads} passes); the rest of the speed-up is batching")
    print(flops_line(flops_plain, flops_fast, args.items / t_plain, args.items / t_fast) + f" ({len(flop_items)} items counted)")

    if args.metric_items > 0:
        metric_items = items[: args.metric_items]
        metric_flop_items = metric_items[: max(1, min(args.batch_size, len(metric_items)))]
        heads_metric_optimised(adapter, warm, args.batch_size, args.rows_per_forward, args.max_new_tokens)
        metric_scores, t_fast = timed(
            lambda: heads_metric_optimised(adapter, metric_items, args.batch_size, args.rows_per_forward, args.max_new_tokens), device
        )
        metric_plain, t_plain = timed(lambda: heads_metric_plain(adapter, metric_items, args.max_new_tokens), device)
        metric_fast = metric_scores.delta.detach().double().cpu()
        error = float((metric_fast - metric_plain).abs().max())
        flops_fast = counted_flops(
            lambda: heads_metric_optimised(adapter, metric_flop_items, args.batch_size, args.rows_per_forward, args.max_new_tokens),
            len(metric_flop_items),
        )
        flops_plain = counted_flops(lambda: heads_metric_plain(adapter, metric_flop_items, args.max_new_tokens), len(metric_flop_items))
        n = len(metric_items)
        print(f"\n## heads stage, the paper's utility (VQA accuracy of greedy generations, <= {args.max_new_tokens} tokens), {n} items")
        print(f"{'path':52s} {'items/s':>9s} {'speed-up':>9s} {'max |ΔΔ|':>10s}")
        print(f"{'straightforward (batch 1, 1 head, generate)':52s} {n / t_plain:9.2f} {1.0:8.1f}x {0.0:10.1e}")
        print(f"{'optimised (batched, row_heads generation, sums)':52s} {n / t_fast:9.2f} {t_plain / t_fast:8.1f}x {error:10.1e}")
        print(f"outputs allclose (atol 1e-6): {torch.allclose(metric_fast, metric_plain, atol=1e-6, rtol=0)}")
        print(flops_line(flops_plain, flops_fast, n / t_plain, n / t_fast) + f" ({len(metric_flop_items)} items counted)")

    top = scores.top_heads(args.top_k)
    deltas = [max(float(scores.delta[h]), 1e-3) for h in top]  # Δ > 0 so every head of H* counts
    neurons_optimised(adapter, warm, top, deltas, args.batch_size, args.rows_per_forward)
    (_, importance_fast), t_fast = timed(
        lambda: neurons_optimised(adapter, items, top, deltas, args.batch_size, args.rows_per_forward), device
    )
    importance_plain, t_plain = timed(lambda: neurons_plain(adapter, items, top, deltas), device)
    importance_fast = importance_fast.detach().double().cpu()
    importance_plain = importance_plain.double().cpu()
    scale = float(importance_plain.abs().max()) or 1.0
    error = float((importance_fast - importance_plain).abs().max())
    same = torch.allclose(importance_fast, importance_plain, atol=1e-4 * scale, rtol=0)
    flops_fast = counted_flops(
        lambda: neurons_optimised(adapter, flop_items, top, deltas, args.batch_size, args.rows_per_forward), len(flop_items)
    )
    flops_plain = counted_flops(lambda: neurons_plain(adapter, flop_items, top, deltas), len(flop_items))
    print(f"\n## neurons stage: |H*| = {len(top)} heads {top}, {adapter.num_layers} x {adapter.ffn_width} neurons")
    print(f"{'path':52s} {'items/s':>9s} {'speed-up':>9s} {'max |ΔImp|':>10s}")
    print(f"{'straightforward (batch 1, 1 + |H*| full forwards)':52s} {args.items / t_plain:9.2f} {1.0:8.1f}x {0.0:10.1e}")
    print(f"{'optimised (batched, row_heads, rerun, running sums)':52s} {args.items / t_fast:9.2f} {t_plain / t_fast:8.1f}x {error:10.1e}")
    print(f"outputs allclose (atol 1e-4 x max|Imp| = {1e-4 * scale:.1e}): {same}; speed-up {t_plain / t_fast:.1f}x (target >= 5x)")
    plain_passes, fast_passes = layer_passes(adapter.num_layers, top)
    print(f"decoder-layer passes per item: {plain_passes} vs {fast_passes} ({plain_passes / fast_passes:.1f}x fewer; "
          f"vision tower 1 vs {1 + len(top)} passes); the rest of the speed-up is batching")
    print(flops_line(flops_plain, flops_fast, args.items / t_plain, args.items / t_fast) + f" ({len(flop_items)} items counted)")


def report_memory(args: argparse.Namespace) -> None:
    rows = measure_memory(args)
    print(f"\n## neuron scoring memory (optimised path, |H*| = {args.top_k}, batch {args.batch_size}; one process per row)")
    with_cuda = any("cuda_peak_mib" in row for row in rows)  # GPU memory: RSS does not see it
    print(
        f"{'items':>6s} {'s':>7s} {'peak RSS MiB':>13s} {'after 1st batch':>16s} {'growth':>8s} {'state MiB':>10s} {'py heap MiB':>12s}"
        + (f" {'CUDA peak MiB':>14s}" if with_cuda else "")
    )
    for row in rows:
        growth = row["peak_rss_mib"] - row["rss_after_first_batch_mib"]
        print(
            f"{row['items']:6d} {row['seconds']:7.1f} {row['peak_rss_mib']:13.1f} {row['rss_after_first_batch_mib']:16.1f} "
            f"{growth:8.1f} {row['state_mib']:10.2f} {row['python_heap_peak_mib']:12.2f}"
            + (f" {row.get('cuda_peak_mib', float('nan')):14.1f}" if with_cuda else "")
        )
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        ratio = last["peak_rss_mib"] / first["peak_rss_mib"] - 1.0
        print(f"peak RSS {last['items']} vs {first['items']} items: {100 * ratio:+.1f} % (target < 10 %)")
        if with_cuda and first.get("cuda_peak_mib") and "cuda_peak_mib" in last:
            ratio = last["cuda_peak_mib"] / first["cuda_peak_mib"] - 1.0
            print(f"peak CUDA memory {last['items']} vs {first['items']} items: {100 * ratio:+.1f} % (target < 10 %)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model directory, or 'tiny' (random tiny LLaVA)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], or auto (cuda if available, else cpu)")
    parser.add_argument("--items", type=int, default=32, help="items for the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-forward", type=int, default=64, help="items x heads per forward (optimised)")
    parser.add_argument("--top-k", type=int, default=4, help="|H*| for the neurons stage")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--metric-items", type=int, default=8, help="items for the generation-utility rows (0: skip)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="generation budget of the metric utility (§1: 24)")
    parser.add_argument("--memory-items", type=int, nargs="*", default=[200, 2000], help="item counts of the memory rows ('' to skip)")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory rows")
    parser.add_argument("--memory-worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = resolve_device(args.device)
    if args.memory_worker is not None:
        memory_worker(args)
        return
    print(machine_line(args.threads, args.device))
    if not args.skip_speed:
        report_speed(args)
    if args.memory_items:
        report_memory(args)


if __name__ == "__main__":
    main()
