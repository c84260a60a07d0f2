"""Interventions (hones/interventions.py) against hand computations and weight edits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
import torch
from torch import Tensor, nn

from hones.interventions import (
    NeuronScaler,
    capture_ffn_activations,
    mean_replace_heads,
    mean_replace_slices,
    scale_neurons,
    zero_neurons,
)
from hones.models import VLMAdapter

PROMPTS = ["what color is the square?", "Describe the image in one sentence.", "how many circles?"]
SIZES = [(64, 64), (96, 64), (64, 64)]
NEURONS = {1: torch.tensor([3, 17, 200]), 3: torch.tensor([0, 351])}


def make_batch(adapter: VLMAdapter, make_image, n: int = 3, targets: list[str] | None = None) -> dict[str, Tensor]:
    pictures = [make_image(seed=i, size=SIZES[i]) for i in range(n)]
    return adapter.encode(pictures, PROMPTS[:n], targets)


@contextmanager
def record_inputs(modules: dict[int, nn.Module]) -> Iterator[dict[int, Tensor]]:
    """Record each module's first positional input (as seen after earlier pre-hooks)."""
    seen: dict[int, Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, key=key: seen.__setitem__(key, args[0].detach().clone()))
        for key, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edited_down_proj(adapter: VLMAdapter, column_scale: dict[int, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Multiply columns of down_proj.weight in place (layer -> (indices, factors)); restore after."""
    saved = {layer: adapter.mlp(layer).down_proj.weight.detach().clone() for layer in column_scale}
    try:
        with torch.no_grad():
            for layer, (index, factor) in column_scale.items():
                adapter.mlp(layer).down_proj.weight[:, index] *= factor.to(saved[layer].dtype)
        yield
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                adapter.mlp(layer).down_proj.weight.copy_(weight)


def all_hook_counts(adapter: VLMAdapter) -> int:
    """Forward (pre-)hooks on all modules; HF installs some of its own on the first forward,
    so tests compare with a count taken after a forward."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in adapter.model.modules())


# ------------------------------------------------------------------ mean replacement
def test_mean_replace_slices_by_hand() -> None:
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)  # 4 heads of size 2
    out = mean_replace_slices(x, torch.tensor([False, True, False, False]), num_heads=4)
    heads = x.view(2, 3, 4, 2)
    expected = heads.clone()
    expected[:, :, 1] = (heads[:, :, 0] + heads[:, :, 2] + heads[:, :, 3]) / 3
    torch.testing.assert_close(out, expected.view(2, 3, 8))
    row_mask = torch.tensor([[False] * 4, [True, False, False, False]])
    out = mean_replace_slices(x, row_mask, num_heads=4)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1].view(3, 4, 2)[:, 0], heads[1, :, 1:].mean(1))


def test_mean_replace_is_local(adapter: VLMAdapter, make_image) -> None:
    layer, head = 2, 1
    batch = make_batch(adapter, make_image)
    inputs = adapter.model_inputs(batch)
    projections = {l: adapter.attn_out_proj(l) for l in range(adapter.num_layers)}
    with torch.no_grad():
        with record_inputs(projections) as base_in:
            base = adapter.model(**inputs, output_hidden_states=True)
        with mean_replace_heads(adapter, heads=[(layer, head)]), record_inputs(projections) as new_in:
            new = adapter.model(**inputs, output_hidden_states=True)
    # hidden_states[i] is the input of layer i: everything up to layer `layer` is untouched
    for i in range(layer + 1):
        assert torch.equal(base.hidden_states[i], new.hidden_states[i]), i
    for i in range(layer):
        assert torch.equal(base_in[i], new_in[i])
    d = adapter.head_dim
    before = base_in[layer].view(*base_in[layer].shape[:2], adapter.num_heads, d)
    after = new_in[layer].view_as(before)
    others = [h for h in range(adapter.num_heads) if h != head]
    assert torch.equal(after[:, :, others], before[:, :, others])
    torch.testing.assert_close(after[:, :, head], before[:, :, others].mean(2), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(base.hidden_states[layer + 1], new.hidden_states[layer + 1])
    assert not torch.allclose(base.logits, new.logits)


def test_row_heads_equal_separate_runs(adapter: VLMAdapter, make_image) -> None:
    row_heads = [(1, 0), None, (3, 2)]
    pictures = [make_image(seed=i, size=SIZES[i]) for i in range(3)]
    with torch.no_grad():
        with mean_replace_heads(adapter, row_heads=row_heads):
            batched = adapter.next_token_logits(adapter.encode(pictures, PROMPTS))
        for row, head in enumerate(row_heads):
            alone = adapter.encode([pictures[row]], [PROMPTS[row]])
            with ExitStack() as stack:
                if head is not None:
                    stack.enter_context(mean_replace_heads(adapter, heads=[head]))
                torch.testing.assert_close(batched[row], adapter.next_token_logits(alone)[0], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="rows"), mean_replace_heads(adapter, row_heads=row_heads[:2]):
            adapter.next_token_logits(adapter.encode(pictures, PROMPTS))


def test_mean_replace_argument_errors(adapter: VLMAdapter) -> None:
    hooks = all_hook_counts(adapter)
    with pytest.raises(ValueError, match="exactly one"), mean_replace_heads(adapter):
        pass
    with pytest.raises(IndexError), mean_replace_heads(adapter, heads=[(0, adapter.num_heads)]):
        pass
    with pytest.raises(IndexError), mean_replace_heads(adapter, heads=[(adapter.num_layers, 0)]):
        pass
    assert all_hook_counts(adapter) == hooks


# --------------------------------------------------------------------- neurons
def test_zero_neurons_equals_zeroed_columns(adapter: VLMAdapter, make_image) -> None:
    batch = make_batch(adapter, make_image, targets=["red", "a cat", "two"])
    with torch.no_grad():
        base = adapter.forward(batch)
        with zero_neurons(adapter, NEURONS):
            masked = adapter.forward(batch)
        zeros = {layer: (index, torch.zeros(len(index))) for layer, index in NEURONS.items()}
        with edited_down_proj(adapter, zeros):
            edited = adapter.forward(batch)
    torch.testing.assert_close(masked, edited, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, masked)


def test_scale_zero_is_identity(adapter: VLMAdapter, make_image) -> None:
    batch = make_batch(adapter, make_image)
    scaler = NeuronScaler(NEURONS)
    with torch.no_grad():
        base = adapter.forward(batch)
        with scale_neurons(adapter, scaler):
            assert torch.equal(adapter.forward(batch), base)


def test_scale_matches_weight_edit_and_has_gradient(adapter: VLMAdapter, make_image) -> None:
    batch = make_batch(adapter, make_image, targets=["red", "a cat", "two"])
    scaler = NeuronScaler(NEURONS)
    with torch.no_grad():
        scaler.s.copy_(torch.linspace(-1.5, 1.5, scaler.num_neurons))
        base = adapter.forward(batch)
    with scale_neurons(adapter, scaler):
        scaled = adapter.forward(batch)
        with torch.no_grad(), scaler.disabled():
            teacher = adapter.forward(batch)
    assert torch.equal(teacher, base)
    scaled.logsumexp(-1).mean().backward()
    assert scaler.s.grad is not None and (scaler.s.grad != 0).all()
    adapter.model.zero_grad(set_to_none=True)
    factors = {layer: (scaler.indices(layer), 1 + scaler.values(layer).detach()) for layer in scaler.layers}
    with torch.no_grad(), edited_down_proj(adapter, factors):
        edited = adapter.forward(batch)
    torch.testing.assert_close(scaled.detach(), edited, atol=1e-5, rtol=1e-5)


def test_scaler_clamp_and_state_dict() -> None:
    scaler = NeuronScaler({4: [5, 1], 0: torch.tensor([7])}, init=3.0)
    assert scaler.layers == [0, 4] and scaler.num_neurons == 3
    assert torch.equal(scaler.indices(4), torch.tensor([5, 1]))
    scaler.clamp_(-1.5, 1.5)
    assert torch.equal(scaler.s.detach(), torch.full((3,), 1.5))
    copy = NeuronScaler.from_state_dict(scaler.state_dict())
    assert copy.layers == scaler.layers and torch.equal(copy.s, scaler.s)
    assert all(torch.equal(copy.indices(l), scaler.indices(l)) for l in scaler.layers)
    z = torch.ones(2, 3, 8)
    out = scaler.scale(4, z)
    assert torch.equal(out[..., [5, 1]], torch.full((2, 3, 2), 2.5)) and out[..., 0].eq(1).all()
    with scaler.disabled():
        assert torch.equal(scaler.scale(4, z), z)
    assert scaler.enabled
    with pytest.raises(ValueError, match="duplicate"):
        NeuronScaler({0: [1, 1]})


def test_capture_equals_hand_computed_z(adapter: VLMAdapter, make_image) -> None:
    batch = make_batch(adapter, make_image)
    mlps = {l: adapter.mlp(l) for l in range(adapter.num_layers)}
    with torch.no_grad():
        with record_inputs(mlps) as mlp_in, capture_ffn_activations(adapter) as z_all:
            adapter.forward(batch)
        with capture_ffn_activations(adapter, layers=[1, 3], positions=batch["prompt_last_index"]) as z_last:
            adapter.forward(batch)
    assert sorted(z_all) == list(range(adapter.num_layers)) and sorted(z_last) == [1, 3]
    for layer, mlp in mlps.items():
        x = mlp_in[layer]
        expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        assert z_all[layer].shape == (*batch["input_ids"].shape, adapter.ffn_width)
        torch.testing.assert_close(z_all[layer], expected, atol=1e-6, rtol=1e-5)
    rows = torch.arange(batch["input_ids"].shape[0])
    for layer in (1, 3):
        assert torch.equal(z_last[layer], z_all[layer][rows, batch["prompt_last_index"]])


def test_capture_new_pass_replaces(adapter: VLMAdapter, make_image) -> None:
    """A second forward (or a rerun of layers without cache) replaces, never appends."""
    batch, other = make_batch(adapter, make_image), make_batch(adapter, make_image, n=2)
    with torch.no_grad(), capture_ffn_activations(adapter, layers=[0, 2]) as z:
        adapter.forward(batch)
        adapter.forward(other)
        assert z[0].shape[:2] == z[2].shape[:2] == other["input_ids"].shape
        first = z[2].clone()
        x = torch.randn(*first.shape[:2], adapter.hidden_size)
        adapter.decoder_layers()[2](x, position_embeddings=(torch.ones(1, x.shape[1], adapter.head_dim),) * 2)
        assert z[2].shape == first.shape and not torch.equal(z[2], first)


def test_nested_contexts_compose(adapter: VLMAdapter, make_image) -> None:
    batch = make_batch(adapter, make_image)
    scaler = NeuronScaler({3: torch.tensor([5, 6])}, init=1.0)
    with torch.no_grad():
        base = adapter.forward(batch)
    hooks = all_hook_counts(adapter)
    with torch.no_grad():
        with zero_neurons(adapter, NEURONS), scale_neurons(adapter, scaler):
            with mean_replace_heads(adapter, heads=[(0, 0), (2, 3)]), capture_ffn_activations(adapter) as z:
                adapter.forward(batch)
        after = adapter.forward(batch)
    assert (z[1][..., NEURONS[1]] == 0).all() and (z[3][..., NEURONS[3]] == 0).all()
    assert all_hook_counts(adapter) == hooks
    assert torch.equal(after, base)


@pytest.mark.parametrize("kind", ["heads", "row_heads", "zero", "scale", "capture"])
def test_hooks_removed_after_exception(adapter: VLMAdapter, make_image, kind: str) -> None:
    batch = make_batch(adapter, make_image)
    managers = {
        "heads": lambda: mean_replace_heads(adapter, heads=[(1, 1)]),
        "row_heads": lambda: mean_replace_heads(adapter, row_heads=[(1, 1), None, (0, 2)]),
        "zero": lambda: zero_neurons(adapter, NEURONS),
        "scale": lambda: scale_neurons(adapter, NeuronScaler(NEURONS, init=0.5)),
        "capture": lambda: capture_ffn_activations(adapter),
    }
    with torch.no_grad():
        base = adapter.forward(batch)
        hooks = all_hook_counts(adapter)  # after a forward: HF adds some hooks of its own lazily
        with pytest.raises(RuntimeError, match="boom"), managers[kind]():
            assert all_hook_counts(adapter) > hooks
            adapter.forward(batch)
            raise RuntimeError("boom")
        assert all_hook_counts(adapter) == hooks
        assert torch.equal(adapter.forward(batch), base)


# -------------------------------------------------------------------- generation
@contextmanager
def edited_o_proj(adapter: VLMAdapter, heads: list[tuple[int, int]]) -> Iterator[None]:
    """Fold head mean replacement into o_proj.weight (the replacement is linear in the o_proj
    input): each replaced head's columns W_h are zeroed and W_h / (H - 1) is added to every
    other head's columns, all from the original weight; restore after."""
    layers = sorted({layer for layer, _ in heads})
    saved = {layer: adapter.attn_out_proj(layer).weight.detach().clone() for layer in layers}
    d, num_heads = adapter.head_dim, adapter.num_heads
    try:
        with torch.no_grad():
            for layer, head in heads:
                original = saved[layer].view(-1, num_heads, d)
                weight = adapter.attn_out_proj(layer).weight.view(-1, num_heads, d)
                others = [h for h in range(num_heads) if h != head]
                weight[:, head] -= original[:, head]
                weight[:, others] += original[:, head : head + 1] / (num_heads - 1)
        yield
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                adapter.attn_out_proj(layer).weight.copy_(weight)


def run_generation(adapter: VLMAdapter, batch: dict[str, Tensor], steps: int = 4) -> tuple[list[str], Tensor, Tensor]:
    """adapter.generate's texts, plus the greedy tokens [b, steps] and raw logits [b, steps, vocab]
    of the same decoding forced to `steps` new tokens (so runs can be compared step by step)."""
    texts = adapter.generate(batch, max_new_tokens=steps)
    inputs = adapter.model_inputs(batch)
    stop = adapter.stop_token_ids
    with torch.no_grad():
        out = adapter.model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            num_beams=1,
            eos_token_id=stop,
            pad_token_id=adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else stop[0],
            output_logits=True,
            return_dict_in_generate=True,
        )
    return texts, out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind", ["heads", "row_heads", "zero", "scale", "capture"])
def test_generate_under_intervention(adapter: VLMAdapter, make_image, kind: str) -> None:
    """Each intervention acts on every decoding step exactly as the equivalent weight edit does
    (o_proj columns for head mean replacement, down_proj columns for zeroing / scaling); capture
    and a neutral scaler leave generation untouched."""
    batch = make_batch(adapter, make_image)
    heads, row_heads = [(1, 1), (3, 0)], [(1, 1), None, (0, 2)]
    scaler = NeuronScaler(NEURONS, init=0.5)
    managers = {
        "heads": lambda: mean_replace_heads(adapter, heads=heads),
        "row_heads": lambda: mean_replace_heads(adapter, row_heads=row_heads),
        "zero": lambda: zero_neurons(adapter, NEURONS),
        "scale": lambda: scale_neurons(adapter, scaler),
        "capture": lambda: capture_ffn_activations(adapter, layers=[2]),
    }
    base_texts, base_tokens, base_logits = run_generation(adapter, batch)
    with managers[kind]() as captured:
        texts, tokens, logits = run_generation(adapter, batch)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    if kind == "capture":
        assert texts == base_texts and torch.equal(tokens, base_tokens) and torch.equal(logits, base_logits)
        # the last generate's prefill + 3 cached steps (the 4th token is never fed back)
        assert captured[2].shape == (3, batch["input_ids"].shape[1] + 3, adapter.ffn_width)
        return
    if kind == "scale":
        with scale_neurons(adapter, NeuronScaler(NEURONS, init=0.0)):
            neutral = run_generation(adapter, batch)
        assert neutral[0] == base_texts and torch.equal(neutral[1], base_tokens)
        torch.testing.assert_close(neutral[2], base_logits, atol=0, rtol=0)
    references = {
        "heads": lambda: edited_o_proj(adapter, heads),
        "zero": lambda: edited_down_proj(adapter, {l: (i, torch.zeros(len(i))) for l, i in NEURONS.items()}),
        "scale": lambda: edited_down_proj(
            adapter, {l: (scaler.indices(l), 1 + scaler.values(l).detach()) for l in scaler.layers}
        ),
    }
    if kind == "row_heads":  # row r from a whole-batch run under row r's head as a weight edit
        runs = []
        for head in row_heads:
            with edited_o_proj(adapter, [] if head is None else [head]):
                runs.append(run_generation(adapter, batch))
        ref_texts = [run[0][row] for row, run in enumerate(runs)]
        ref_tokens = torch.stack([run[1][row] for row, run in enumerate(runs)])
        ref_logits = torch.stack([run[2][row] for row, run in enumerate(runs)])
    else:
        with references[kind]():
            ref_texts, ref_tokens, ref_logits = run_generation(adapter, batch)
    assert texts == ref_texts and torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits, base_logits, atol=1e-3, rtol=1e-3)  # the intervention does change it


def test_generation_hooks_act_on_new_positions(adapter: VLMAdapter, make_image) -> None:
    """With a KV cache, masking by hook equals masking by weight edit token after token."""
    batch = make_batch(adapter, make_image)
    neurons = {layer: torch.arange(0, adapter.ffn_width, 2) for layer in range(adapter.num_layers)}
    base = adapter.generate(batch, max_new_tokens=6)
    with zero_neurons(adapter, neurons):
        masked = adapter.generate(batch, max_new_tokens=6)
    zeros = {layer: (index, torch.zeros(len(index))) for layer, index in neurons.items()}
    with edited_down_proj(adapter, zeros):
        edited = adapter.generate(batch, max_new_tokens=6)
    assert masked == edited
    assert masked != base


def test_capture_stitches_generation_steps(adapter: VLMAdapter, make_image) -> None:
    """Under generate, the full capture equals one forward over the generated sequence."""
    batch = make_batch(adapter, make_image, n=1)
    inputs = adapter.model_inputs(batch)
    with torch.no_grad():
        with capture_ffn_activations(adapter, layers=[1]) as stitched:
            output = adapter.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        full = {**batch, "input_ids": output[:, :-1], "attention_mask": torch.ones_like(output[:, :-1])}
        if "mm_token_type_ids" in batch:
            pad = torch.zeros(1, 3, dtype=batch["mm_token_type_ids"].dtype)
            full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], pad], dim=1)
        last = torch.tensor([output.shape[1] - 2])
        with capture_ffn_activations(adapter, layers=[1]) as whole:
            adapter.forward(full)
        with capture_ffn_activations(adapter, layers=[1], positions=last) as at_last:
            adapter.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.testing.assert_close(stitched[1], whole[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(at_last[1], whole[1][:, -1], atol=1e-4, rtol=1e-4)


def test_a_half_cast_keeps_the_scales_float32() -> None:
    """What precision="bf16-true" does to the module: s keeps its dtype (and Parameter), buffers and devices follow."""
    scaler = NeuronScaler({0: torch.tensor([1, 2]), 2: torch.tensor([5])})
    parameter = scaler.s
    scaler.to(torch.bfloat16)
    assert scaler.s is parameter and scaler.s.dtype == torch.float32 and scaler.index_0.dtype == torch.long
    scaler.half()
    assert scaler.s.dtype == torch.float32
    scaler.double()  # a widening cast is the user's
    assert scaler.s.dtype == torch.float64
