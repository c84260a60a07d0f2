"""Every attribution speed-up equals the plain computation, on both tiny architectures.

Plain = one item per forward, one head per forward, full model forward (adapter.forward)
and the utility from the full logits. Speed-ups: (1) batched items, (2) several heads per
forward via row_heads, (3) rerun of layers >= l from cached layer inputs, (4) running sums.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from hones.attribution.baselines import ActivationStatisticsCollector, gradient_times_activation
from hones.attribution.batches import encode_items
from hones.attribution.heads import (
    HeadLocalizer,
    metric_head_rows,
    teacher_forced_head_utilities,
    teacher_forced_utility_from_logits,
)
from hones.attribution.neurons import NeuronAttributor
from hones.attribution.rerun import (
    base_hidden_states,
    capture_layer_inputs,
    output_logits,
    replicate_batch,
    run_layers_from,
)
from hones.attribution.stats import ActivationStatistics
from hones.attribution.write_in import item_target_directions, write_in_contributions
from hones.data.records import TaskItem
from hones.interventions import capture_ffn_activations, mean_replace_heads
from hones.models import VLMAdapter

ATOL = 2e-5
SIZES = [(64, 64), (96, 64), (64, 64)]
QA = [("what color is the square?", "red"), ("how many circles are in the picture?", "two circles"), ("is it big?", "no")]
HEADS = [(0, 1), (1, 0), (1, 3), (3, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")


def vqa_items(make_image, n: int = 3) -> list[TaskItem]:
    return [
        TaskItem(uid=f"toy:{k}:vqa", task="vqa", image=make_image(seed=k, size=SIZES[k]), prompt=q, target=a, references=[a])
        for k, (q, a) in enumerate(QA[:n])
    ]


def retrieval_items(make_image, n: int = 3) -> list[TaskItem]:
    prompt = "Candidate: {}\nDoes the candidate correctly describe the image?\nAnswer exactly Yes or No."
    captions = ["a red square", "two blue circles on a table", "nothing"]
    return [
        TaskItem(
            uid=f"toy:{k // 2}:retrieval:cand{k}", task="retrieval", image=make_image(seed=k // 2, size=SIZES[k]),
            prompt=prompt.format(captions[k]), target="Yes" if k % 2 == 0 else "No", references=[],
            group=str(k // 2), label=int(k % 2 == 0),
        )
        for k in range(n)
    ]


def items_for(task: str, make_image) -> list[TaskItem]:
    return vqa_items(make_image) if task == "vqa" else retrieval_items(make_image)


# -- speed-up 3: the rerun itself ----------------------------------------------------------------
def test_layer_rerun_equals_full_forward(adapter: VLMAdapter, make_image) -> None:
    batch = encode_items(adapter, vqa_items(make_image), with_targets=True)
    with torch.no_grad():
        full = adapter.forward(batch)
        with capture_layer_inputs(adapter) as record:
            hidden = base_hidden_states(adapter, batch)
        torch.testing.assert_close(output_logits(adapter, hidden), full, atol=ATOL, rtol=0)
        for layer in range(adapter.num_layers):
            rerun = output_logits(adapter, run_layers_from(adapter, record, layer))
            torch.testing.assert_close(rerun, full, atol=ATOL, rtol=0)
        replicated = output_logits(adapter, run_layers_from(adapter, record, 1, repeats=3))
        torch.testing.assert_close(replicated, full.repeat_interleave(3, dim=0), atol=ATOL, rtol=0)


def test_rerun_with_row_heads_equals_full_forward_per_head(adapter: VLMAdapter, make_image) -> None:
    batch = encode_items(adapter, vqa_items(make_image), with_targets=True)
    chunk = [(2, 0), (2, 1), (2, 3)]
    with torch.no_grad():
        with capture_layer_inputs(adapter, layers=[2]) as record:
            base_hidden_states(adapter, batch)
        with mean_replace_heads(adapter, row_heads=[h for _ in range(3) for h in chunk]):
            rerun = output_logits(adapter, run_layers_from(adapter, record, 2, repeats=len(chunk)))
        for k, head in enumerate(chunk):
            with mean_replace_heads(adapter, heads=[head]):
                plain = adapter.forward(batch)
            torch.testing.assert_close(rerun[k :: len(chunk)], plain, atol=ATOL, rtol=0)
            assert (plain - adapter.forward(batch)).abs().max() > 1e-6  # the intervention does something


def test_replicate_batch_equals_reencoding(adapter: VLMAdapter, make_image) -> None:
    items = vqa_items(make_image)
    batch = encode_items(adapter, items, with_targets=False)
    replicated = replicate_batch(batch, 2)
    again = encode_items(adapter, [item for item in items for _ in range(2)], with_targets=False)
    for key, value in again.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(replicated[key], value, msg=key)
    assert [i.uid for i in replicated["items"]] == [i.uid for i in again["items"]]


# -- head utilities --------------------------------------------------------------------------------
def plain_teacher_forced(adapter: VLMAdapter, items: list[TaskItem], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One item, one head, full forward at a time."""
    baseline, intervened = [], torch.empty(len(HEADS), len(items))
    with torch.no_grad():
        for j, item in enumerate(items):
            single = encode_items(adapter, [item], with_targets=True)
            baseline.append(float(teacher_forced_utility_from_logits(adapter, adapter.forward(single), single, task)[0]))
            for k, head in enumerate(HEADS):
                with mean_replace_heads(adapter, heads=[head]):
                    logits = adapter.forward(single)
                intervened[k, j] = teacher_forced_utility_from_logits(adapter, logits, single, task)[0]
    return torch.tensor(baseline), intervened


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
@pytest.mark.parametrize("rerun", [True, False], ids=["rerun", "full"])
def test_teacher_forced_head_utilities_equal_plain(adapter: VLMAdapter, make_image, task: str, rerun: bool) -> None:
    items = items_for(task, make_image)
    batch = encode_items(adapter, items, with_targets=True)
    # rows_per_forward 6 with 3 items -> 2 heads per forward: chunks and several layers exercised
    baseline, intervened = teacher_forced_head_utilities(adapter, batch, HEADS, task, rows_per_forward=6, rerun=rerun)
    plain_base, plain_heads = plain_teacher_forced(adapter, items, task)
    torch.testing.assert_close(baseline.cpu(), plain_base, atol=1e-4, rtol=0)
    torch.testing.assert_close(intervened.cpu(), plain_heads, atol=1e-4, rtol=0)


def test_head_localizer_running_sums_equal_plain_means(adapter: VLMAdapter, make_image) -> None:
    items = vqa_items(make_image)
    localizer = HeadLocalizer(adapter.num_layers, adapter.num_heads, "vqa", heads=HEADS, rows_per_forward=8)
    localizer.update(adapter, encode_items(adapter, items[:2], with_targets=True))
    localizer.update(adapter, {"items": items[2:]})  # no encoding: re-encoded with targets from items
    scores = localizer.compute()
    plain_base, plain_heads = plain_teacher_forced(adapter, items, "vqa")
    assert scores.num_items == 3
    assert scores.baseline == pytest.approx(float(plain_base.mean()), abs=1e-4)
    for k, head in enumerate(HEADS):
        assert float(scores.delta[head]) == pytest.approx(float(plain_base.mean() - plain_heads[k].mean()), abs=1e-4)
    assert torch.isnan(scores.delta[2, 2])  # not a candidate


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_metric_head_rows_equal_one_head_at_a_time(adapter: VLMAdapter, make_image, task: str) -> None:
    from hones.evaluation import TaskScorer

    scorer = TaskScorer(task, max_new_tokens=4)
    batch = encode_items(adapter, items_for(task, make_image), with_targets=False)
    rows = metric_head_rows(adapter, batch, HEADS, scorer, rows_per_forward=6)
    with torch.no_grad():
        for head in [None, *HEADS]:
            if head is None:
                plain = scorer.predict(adapter, batch)
            else:
                with mean_replace_heads(adapter, heads=[head]):
                    plain = scorer.predict(adapter, batch)
            for fast, slow in zip(rows[head], plain, strict=True):
                assert fast["uid"] == slow["uid"]
                if task == "retrieval":
                    assert fast["score"] == pytest.approx(slow["score"], abs=1e-4)
                else:
                    assert fast["prediction"] == slow["prediction"]


# -- neuron attribution -------------------------------------------------------------------------------
def test_neuron_attribution_equals_plain_full_forwards(adapter: VLMAdapter, make_image) -> None:
    items = vqa_items(make_image)
    heads, deltas = [(1, 0), (3, 2), (2, 1)], [0.5, 1.5, -0.2]  # (2, 1) has Δ <= 0: skipped
    attributor = NeuronAttributor(adapter.num_layers, adapter.ffn_width, heads, deltas, "vqa", rows_per_forward=4)
    attributor.update(adapter, encode_items(adapter, items[:2], with_targets=True))
    attributor.update(adapter, encode_items(adapter, items[2:], with_targets=True))
    result = attributor.compute()
    assert result.heads == [(1, 0), (3, 2)] and result.num_items == 3
    # plain: one item per full forward, u_y from that item alone
    plain_mean = torch.zeros(adapter.num_layers, adapter.ffn_width, dtype=torch.float64)
    plain_heads = torch.zeros(2, adapter.num_layers, adapter.ffn_width, dtype=torch.float64)
    with torch.no_grad():
        for item in items:
            single = encode_items(adapter, [item], with_targets=True)
            dirs = item_target_directions(adapter, [item])
            plain_mean += write_in_contributions(adapter, single, dirs)[0].double() / len(items)
            for k, head in enumerate(result.heads):
                c_h = write_in_contributions(adapter, single, dirs, [mean_replace_heads(adapter, heads=[head])])
                plain_heads[k] += c_h[0].double() / len(items)
    scale = float(plain_mean.abs().max())
    torch.testing.assert_close(result.mean_contribution, plain_mean, atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(result.head_means, plain_heads, atol=1e-4 * scale, rtol=0)
    # below each head's layer c̄^h is exactly c̄
    assert torch.equal(result.head_means[1, :3], result.mean_contribution[:3])
    expected = (0.5 * (plain_mean - plain_heads[0]).clamp_min(0) + 1.5 * (plain_mean - plain_heads[1]).clamp_min(0)) / 2.0
    torch.testing.assert_close(result.importance, expected, atol=1e-4 * scale, rtol=0)
    bank = result.select(top_ratio=0.01)
    assert len(bank) == round(0.01 * adapter.num_layers * adapter.ffn_width)


def test_activation_baseline_is_mean_abs_z_at_the_last_prompt_position(adapter: VLMAdapter, make_image) -> None:
    """§4's activation-magnitude baseline: mean over items of |z| at each item's last prompt position."""
    batch = encode_items(adapter, vqa_items(make_image), with_targets=True)
    attributor = NeuronAttributor(adapter.num_layers, adapter.ffn_width, [(1, 0)], [1.0], "vqa")
    attributor.update(adapter, batch)
    result = attributor.compute()
    with torch.no_grad(), capture_ffn_activations(adapter, positions=batch["prompt_last_index"]) as captured:
        base_hidden_states(adapter, batch)
    z = torch.stack([captured[l] for l in range(adapter.num_layers)], dim=1).double()  # [b, L, I]
    assert bool((z < 0).any())  # gated activations go negative: |z| and z differ
    torch.testing.assert_close(result.baselines["activation"], z.abs().mean(0), atol=1e-6, rtol=1e-5)


def test_activation_statistics_collector_equals_full_capture(adapter: VLMAdapter, make_image) -> None:
    batch = encode_items(adapter, vqa_items(make_image), with_targets=True)
    stats = ActivationStatistics(adapter.num_layers, adapter.ffn_width)
    with torch.no_grad():
        with ActivationStatisticsCollector(stats).observe(adapter, batch), capture_ffn_activations(adapter) as full:
            base_hidden_states(adapter, batch)
    out = stats.compute()
    mask = batch["attention_mask"].bool() & (
        torch.arange(batch["input_ids"].shape[1])[None] <= batch["prompt_last_index"][:, None]
    )
    for layer in range(adapter.num_layers):
        z = full[layer][mask]  # [positions, ffn]
        torch.testing.assert_close(out["activation_probability"][layer], (z > 0).double().mean(0))
        torch.testing.assert_close(out["mean_activation"][layer], z.double().mean(0), atol=1e-6, rtol=1e-5)


def test_gradient_times_activation_matches_finite_differences(adapter: VLMAdapter, make_image) -> None:
    items = vqa_items(make_image, n=2)
    batch = encode_items(adapter, items, with_targets=True)
    with torch.inference_mode():  # as inside Trainer.validate
        inference_batch = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        gxa = gradient_times_activation(adapter, inference_batch, "vqa")
    assert gxa.shape == (2, adapter.num_layers, adapter.ffn_width)
    assert all(p.grad is None for p in adapter.model.parameters())
    layer, row = 2, 1
    neuron = int(gxa[row, layer].abs().argmax())
    last = int(batch["prompt_last_index"][row])
    eps = 1e-2

    def utility(shift: float) -> float:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            z = args[0].clone()
            z[row, last, neuron] = z[row, last, neuron] * (1 + shift)
            return (z,)

        handle = adapter.mlp(layer).down_proj.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                return float(teacher_forced_utility_from_logits(adapter, adapter.forward(batch), batch, "vqa")[row])
        finally:
            handle.remove()

    # d U / d(scale) at scale 1 = z * dU/dz
    finite = (utility(eps) - utility(-eps)) / (2 * eps)
    assert finite == pytest.approx(float(gxa[row, layer, neuron]), rel=2e-2, abs=1e-5)


# -- target directions on a real tokenizer ------------------------------------------------------------
def caption_item(make_image, refs: list[str], seed: int = 0, target: str | None = None) -> TaskItem:
    return TaskItem(uid=f"toy:{seed}:caption", task="caption", image=make_image(seed=seed),
                    prompt="Describe the image in one sentence.", target=refs[0] if target is None else target, references=refs)  # fmt: skip


def test_item_target_directions_follow_the_method(adapter: VLMAdapter, make_image) -> None:
    from hones.attribution.write_in import idf_from_items, target_token_ids

    refs = ["a red square on grass", "two circles", "a red square"]
    caption, other = caption_item(make_image, refs), caption_item(make_image, ["blue sky"], seed=1, target="blue")
    items = [caption, other, *retrieval_items(make_image, n=2), vqa_items(make_image, n=1)[0]]
    idf = idf_from_items(adapter, items)
    dirs = item_target_directions(adapter, items, idf)
    unembedding = adapter.unembedding().float()
    special = set(adapter.tokenizer.all_special_ids)
    # caption: the references joined, as teacher forcing feeds them, IDF-weighted over the 2 caption items' token sets
    encoded = adapter.encode([make_image(seed=0)], ["Describe."], [" ".join(refs)])
    ids = [t for t in encoded["labels"][0].tolist() if t != -100 and t not in special][:128]
    assert ids == target_token_ids(adapter, [" ".join(refs)])[0]
    documents = [set(row) for row in target_token_ids(adapter, [" ".join(refs), "blue sky"], None)]
    weights = torch.tensor([math.log(3 / (sum(t in d for d in documents) + 1)) + 1 for t in ids])
    expected = (weights[:, None] * unembedding[ids]).sum(0)
    torch.testing.assert_close(dirs[0], expected / expected.norm(), atol=1e-5, rtol=1e-5)
    # retrieval: the answer token the margin uses ("Yes" for the positive, "No" for the negative)
    yes_id, no_id = adapter.answer_token_ids(["Yes", "No"])
    torch.testing.assert_close(dirs[2], unembedding[yes_id] / unembedding[yes_id].norm())
    torch.testing.assert_close(dirs[3], unembedding[no_id] / unembedding[no_id].norm())
    # vqa: unweighted even when an IDF is given
    vqa_ids = target_token_ids(adapter, [QA[0][1]])[0]
    plain = unembedding[vqa_ids].sum(0)
    torch.testing.assert_close(dirs[4], plain / plain.norm(), atol=1e-5, rtol=1e-5)


def test_target_tokens_drop_special_tokens_and_keep_at_most_128(adapter: VLMAdapter, make_image) -> None:
    from hones.attribution.write_in import label_token_ids, target_token_ids

    tokenizer = adapter.tokenizer
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.all_special_tokens[0]
    (raw,) = adapter.emitted_token_ids([f"red square {eos} blue"])
    assert special & set(raw)  # the tokenizer keeps the special token in the text
    assert target_token_ids(adapter, [f"red square {eos} blue"]) == [[t for t in raw if t not in special]]
    long_text = " ".join(["red square"] * 100)  # 200 tokens
    (long_ids,) = target_token_ids(adapter, [long_text], None)
    assert len(long_ids) > 128 and target_token_ids(adapter, [long_text]) == [long_ids[:128]]
    # teacher-forcing labels end with the end-of-turn token: it is not part of u_y
    targets = ["two circles", "red"]
    batch = adapter.encode([make_image(seed=0), make_image(seed=1)], ["what?", "which colour?"], targets)
    rows = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
    assert all(row[-1] in special for row in rows)
    assert label_token_ids(batch["labels"], special) == [row[:-1] for row in rows]


def test_target_tokens_are_the_tokens_teacher_forcing_feeds(adapter: VLMAdapter, make_image) -> None:
    """u_y sums the unembeddings of the tokens the model emits: LLaVA answers after a space, and its
    byte-level BPE gives " MUSIC" another id than "MUSIC" (the target tokenized alone, as u_y once was)."""
    from hones.attribution.write_in import label_token_ids, target_token_ids

    targets = ["MUSIC", "right", "A dog runs. A cat sits on a mat."]
    batch = adapter.encode([make_image(seed=k) for k in range(3)], ["what?"] * 3, targets)
    assert target_token_ids(adapter, targets) == label_token_ids(batch["labels"], adapter.tokenizer.all_special_ids)


def test_idf_weights_only_caption_targets(adapter: VLMAdapter, make_image) -> None:
    """§3: w_t is the IDF for captions only; a multi-token vqa target keeps w_t = 1."""
    from hones.attribution.write_in import idf_from_items, target_token_ids

    caption = caption_item(make_image, ["a red square on grass", "two circles", "a red square"])
    question = TaskItem(uid="toy:1:vqa", task="vqa", image=make_image(seed=1), prompt="what is there?",
                        target="two red circles on grass", references=["two red circles on grass"])
    idf = idf_from_items(adapter, [caption, caption_item(make_image, ["two circles"], seed=2), question])
    ids = target_token_ids(adapter, [question.target])[0]
    assert len(set(float(idf[t]) for t in ids)) > 1  # the IDF would change this target's direction
    dirs = item_target_directions(adapter, [caption, question], idf)
    plain = adapter.unembedding().float()[ids].sum(0)
    torch.testing.assert_close(dirs[1], plain / plain.norm(), atol=1e-5, rtol=1e-5)
