"""Attribution math on hand-made tensors: importance, selection, baselines, accumulators, bank I/O."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hones.attribution.bank import (
    BankEntry,
    BankError,
    bank_mask,
    bank_to_layer_dict,
    load_head_scores,
    load_matrices,
    neurons_per_layer,
    parse_bank,
    read_bank,
    read_head_list,
    save_head_scores,
    save_matrices,
    validate_bank,
    whole_layer_bank,
    write_bank,
    write_head_list,
)
from hones.attribution.baselines import (
    ape_selection,
    budget_from_ratio,
    counted_positions,
    random_selection,
    select_top_neurons,
)
from hones.attribution.heads import (
    DEFAULT_TOP_K,
    HeadScores,
    MetricHeadAccumulator,
    candidate_heads,
    head_score_agreement,
    heads_by_layer,
    row_head_list,
)
from hones.attribution.neurons import NeuronAttribution, NeuronAttributor, head_conditioned_importance, positive_heads
from hones.attribution.stats import ActivationStatistics, HeadUtilityAccumulator, RunningMean, StackedRunningMean
from hones.attribution.write_in import caption_idf, label_token_ids, projected_directions, target_directions, write_in


# -- importance (HONES_METHOD §3) --------------------------------------------------------------
def test_importance_hand_case_with_positive_part() -> None:
    c_mean = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5]])
    c_h1 = torch.tensor([[0.0, 3.0, 0.0], [1.0, -2.0, 0.5]])  # diffs [[1,-1,0],[2,1,0]]
    c_h2 = torch.tensor([[1.0, 0.0, -1.0], [3.0, 0.0, 0.0]])  # diffs [[0,2,1],[0,-1,0.5]]
    deltas = torch.tensor([1.0, 3.0])
    expected = (1.0 * torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]]) + 3.0 * torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 0.5]])) / 4.0
    got = head_conditioned_importance(c_mean, torch.stack([c_h1, c_h2]), deltas)
    torch.testing.assert_close(got, expected.double())


def test_importance_positive_part_of_difference_of_means_not_mean_of_positive_parts() -> None:
    # one head; the difference of the means is negative, so the neuron gets 0 even if some
    # items had a positive difference (§3: "the positive part is taken of the difference of the means")
    c_mean = torch.tensor([[0.0]])
    c_h = torch.tensor([[[0.5]]])
    assert float(head_conditioned_importance(c_mean, c_h, torch.tensor([2.0]))) == 0.0


def test_importance_ignores_nonpositive_heads_and_falls_back() -> None:
    c_mean = torch.tensor([[1.0, -2.0]])
    c_h = torch.tensor([[[0.0, 0.0]], [[5.0, -9.0]]])
    only_first = head_conditioned_importance(c_mean, c_h, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(only_first, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    for deltas in (torch.tensor([0.0, -1.0]), torch.tensor([float("nan"), -0.1])):
        fallback = head_conditioned_importance(c_mean, c_h, deltas)
        torch.testing.assert_close(fallback, c_mean.double())
    empty = head_conditioned_importance(c_mean, torch.zeros(0, 1, 2), torch.zeros(0))
    torch.testing.assert_close(empty, c_mean.double())
    heads, kept = positive_heads([(0, 1), (2, 3), (4, 0)], [0.2, 0.0, 1.5])
    assert heads == [(0, 1), (4, 0)] and kept.tolist() == [0.2, 1.5]


def test_attributor_warns_about_unused_heads() -> None:
    with pytest.warns(UserWarning, match=r"vqa: 1 of 2 heads have Δ ≤ 0") as record:
        NeuronAttributor(2, 3, [(0, 1), (1, 0)], [0.5, -0.1], task="vqa")
    assert "falls back" not in str(record[0].message)
    with pytest.warns(UserWarning, match=r"2 of 2 heads .* falls back to c̄"):
        NeuronAttributor(2, 3, [(0, 1), (1, 0)], [0.0, float("nan")], task="ocr")


# -- selection -------------------------------------------------------------------------------------
def test_top_one_percent_global_selection() -> None:
    scores = torch.zeros(4, 50)  # 200 neurons -> top 1% = 2
    scores[3, 7], scores[0, 1], scores[2, 9] = 5.0, 4.0, 3.0
    assert budget_from_ratio(4, 50, 0.01) == 2
    bank = select_top_neurons(scores, top_ratio=0.01)
    assert [(e.layer, e.neuron, e.rank) for e in bank] == [(3, 7, 0), (0, 1, 1)]
    assert bank[0].score == 5.0
    # paper size: 1% of 32 x 11008
    assert budget_from_ratio(32, 11008, 0.01) == 3523


def test_selection_ties_and_nan() -> None:
    scores = torch.tensor([[1.0, float("nan"), 1.0], [1.0, 0.0, 2.0]])
    bank = select_top_neurons(scores, count=3)
    assert [(e.layer, e.neuron) for e in bank] == [(1, 2), (0, 0), (0, 2)]  # ties: (layer, neuron) order
    assert len(select_top_neurons(scores, count=10)) == 5  # NaN never selected


def test_attribution_select_defaults_to_the_global_top_one_percent() -> None:
    importance = torch.arange(4 * 50, dtype=torch.float64).flip(0).view(4, 50)  # 200 neurons, best first
    result = NeuronAttribution(importance, importance, torch.zeros(0, 4, 50), [], torch.zeros(0))
    assert [(e.layer, e.neuron) for e in result.select()] == [(0, 0), (0, 1)]  # §3 default top_ratio 0.01


def test_random_baseline_bank_keeps_the_reference_per_layer_counts() -> None:
    importance = torch.rand(4, 20, dtype=torch.float64)
    result = NeuronAttribution(importance, importance, torch.zeros(0, 4, 20), [], torch.zeros(0), baselines={"write_in": importance})
    reference = [BankEntry(3, 1, 1.0, 0), BankEntry(1, 4, 0.9, 1), BankEntry(3, 7, 0.8, 2), BankEntry(3, 2, 0.7, 3)]
    banks = result.baseline_banks(reference, seed=5)
    assert neurons_per_layer(banks["random"], 4).tolist() == [0, 1, 0, 3]  # §4: same per-layer counts
    assert len(banks["write_in"]) == len(reference)


def test_random_baseline_has_same_per_layer_counts_and_is_seeded() -> None:
    reference = [BankEntry(0, 1, 1.0, 0), BankEntry(2, 3, 0.9, 1), BankEntry(2, 8, 0.8, 2), BankEntry(3, 0, 0.7, 3)]
    state = torch.random.get_rng_state()
    first = random_selection(reference, ffn_width=10, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert neurons_per_layer(first, 4).tolist() == neurons_per_layer(reference, 4).tolist() == [1, 0, 2, 1]
    def pairs(entries: list[BankEntry]) -> list[tuple[int, int]]:
        return [(e.layer, e.neuron) for e in entries]

    assert pairs(first) == pairs(random_selection(reference, ffn_width=10, seed=7))
    assert pairs(first) != pairs(random_selection(reference, ffn_width=10, seed=8))
    validate_bank(first, 4, 10)
    with pytest.raises(ValueError, match="FFN has 10"):
        random_selection([11], ffn_width=10)


def test_ape_selection_prefers_low_entropy_neurons_of_their_task() -> None:
    ap = {
        "vqa": torch.tensor([[0.9, 0.5, 0.0, 0.3]]),
        "ocr": torch.tensor([[0.0, 0.5, 0.0, 0.1]]),
    }
    picked = ape_selection(ap, count=2)
    # vqa: neuron 0 (entropy 0), neuron 1 (tie 0.5/0.5 -> argmax picks vqa, entropy ln2), neuron 3 (entropy H(.75,.25))
    assert [(e.layer, e.neuron) for e in picked["vqa"]] == [(0, 0), (0, 3)]
    assert picked["ocr"] == []  # ocr is never the argmax; neuron 2 is dead everywhere
    assert picked["vqa"][0].score == pytest.approx(0.0)


def test_counted_positions_are_nonpadding_prompt_positions() -> None:
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    last = torch.tensor([3, 2])
    expected = torch.tensor([[False, True, True, True, False], [True, True, True, False, False]])
    assert torch.equal(counted_positions(mask, last), expected)


# -- write-in math --------------------------------------------------------------------------------
def test_target_direction_weights_and_normalisation() -> None:
    unembedding = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    u = target_directions(unembedding, [[0, 1], [2], [0, 0, 1]])
    torch.testing.assert_close(u[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(u[1], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(u[2], torch.tensor([2.0, 1.0]) / math.sqrt(5))  # occurrences count
    weighted = target_directions(unembedding, [[0, 1]], torch.tensor([3.0, 1.0, 1.0]))
    torch.testing.assert_close(weighted[0], torch.tensor([3.0, 1.0]) / math.sqrt(10))
    with pytest.raises(ValueError, match="no target token"):
        target_directions(unembedding, [[0], []])


def test_label_token_ids_drop_ignored_and_special_tokens_and_keep_at_most_128() -> None:
    labels = torch.tensor([[-100, -100, 7, 2, 9, 2], [-100, 5, 1, -100, 6, -100]])
    assert label_token_ids(labels, special_ids=[1, 2]) == [[7, 9], [5, 6]]
    long = torch.arange(10, 310)[None]  # 300 target tokens
    assert label_token_ids(long, special_ids=[]) == [list(range(10, 138))]


def test_caption_idf_formula() -> None:
    idf = caption_idf([[1, 2, 2], [2, 3], [2]], vocab_size=5)
    n = 3
    expected = [math.log((n + 1) / (0 + 1)) + 1, math.log(4 / 2) + 1, math.log(4 / 4) + 1, math.log(4 / 2) + 1, math.log(4) + 1]
    torch.testing.assert_close(idf, torch.tensor(expected, dtype=torch.float32))


def test_caption_idf_agrees_with_data_module_helper() -> None:
    from hones.data.tasks import caption_idf as dict_idf

    sets = [[1, 2], [2, 3, 3], [4]]
    reference = dict_idf(sets)
    ours = caption_idf(sets, vocab_size=6)
    for token, value in reference.items():
        assert float(ours[token]) == pytest.approx(value)


def test_write_in_contribution_vectorised_matches_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden, ffn, layers, batch = 6, 5, 3, 2
    down = [torch.randn(hidden, ffn, generator=generator) for _ in range(layers)]
    u = torch.randn(batch, hidden, generator=generator)
    z = torch.randn(batch, layers, ffn, generator=generator)
    c = write_in(z, projected_directions(down, u))
    for b in range(batch):
        for l in range(layers):
            for i in range(ffn):
                assert float(c[b, l, i]) == pytest.approx(float(z[b, l, i] * (down[l][:, i] @ u[b])), rel=1e-5, abs=1e-6)


# -- accumulators ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_running_means_match_plain_means() -> None:
    values = torch.randn(7, 3, 4)
    metric = RunningMean((3, 4))
    metric.update(values[:3])
    metric.update(values[3:])
    torch.testing.assert_close(metric.compute(), values.double().mean(0))
    stacked = StackedRunningMean(2, (3, 4))
    stacked.update(torch.tensor([0, 1, 0]), values[:3])
    stacked.update(torch.tensor([1, 1, 0, 0]), values[3:])
    torch.testing.assert_close(stacked.compute()[0], values[[0, 2, 5, 6]].double().mean(0))
    torch.testing.assert_close(stacked.compute()[1], values[[1, 3, 4]].double().mean(0))
    with pytest.raises(ValueError, match="before any update"):
        RunningMean((2,)).compute()


def test_head_utility_accumulator() -> None:
    acc = HeadUtilityAccumulator(2, 3)
    acc.update(torch.tensor([1.0, 3.0]), [(0, 1), (1, 2)], torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    acc.update(torch.tensor([2.0]), [(0, 1)], torch.tensor([[4.0]]))
    out = acc.compute()
    assert float(out["baseline"]) == pytest.approx(2.0)
    assert float(out["intervened"][0, 1]) == pytest.approx(5.0 / 3)
    assert float(out["delta"][1, 2]) == pytest.approx(0.0)
    assert math.isnan(float(out["delta"][0, 0]))


def test_metric_head_delta_is_baseline_minus_intervened() -> None:
    # §2: Δ = P(θ) − P(θ with I_h); a head whose intervention hurts the metric gets Δ > 0
    acc = MetricHeadAccumulator("vqa", [(0, 1), (1, 0)], num_layers=2, num_heads=2)
    right = [{"uid": "a", "prediction": "red", "references": ["red"]}, {"uid": "b", "prediction": "two", "references": ["two"]}]
    one_wrong = [right[0], {**right[1], "prediction": "three"}]
    both_wrong = [{**row, "prediction": "blue"} for row in right]
    acc.update({None: right, (0, 1): both_wrong, (1, 0): one_wrong})
    out = acc.compute()
    assert float(out["baseline"]) == 1.0
    assert float(out["delta"][0, 1]) == pytest.approx(1.0) and float(out["delta"][1, 0]) == pytest.approx(0.5)
    assert math.isnan(float(out["delta"][0, 0]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_running_sums_merge_by_addition() -> None:
    # distributed accumulation: every state is a sum, so two shards merged equal one pass
    values = torch.randn(5, 2, 3)
    first, second = RunningMean((2, 3)), RunningMean((2, 3))
    first.update(values[:2])
    second.update(values[2:])
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), values.double().mean(0))
    slots = torch.tensor([0, 1, 0, 0, 1])
    stacked_a, stacked_b = StackedRunningMean(2, (2, 3)), StackedRunningMean(2, (2, 3))
    stacked_a.update(slots[:3], values[:3])
    stacked_b.update(slots[3:], values[3:])
    stacked_a.merge_state(stacked_b)
    torch.testing.assert_close(stacked_a.compute()[0], values[[0, 2, 3]].double().mean(0))
    torch.testing.assert_close(stacked_a.compute()[1], values[[1, 4]].double().mean(0))
    acc_a, acc_b = HeadUtilityAccumulator(1, 2), HeadUtilityAccumulator(1, 2)
    acc_a.update(torch.tensor([1.0, 3.0]), [(0, 1)], torch.tensor([[0.0, 1.0]]))
    acc_b.update(torch.tensor([5.0]), [(0, 1)], torch.tensor([[8.0]]))
    acc_a.merge_state(acc_b)
    out = acc_a.compute()
    assert float(out["baseline"]) == pytest.approx(3.0) and float(out["intervened"][0, 1]) == pytest.approx(3.0)


def test_activation_statistics() -> None:
    stats = ActivationStatistics(1, 2)
    stats.update(torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[3.0, 1.0]]), 4)
    out = stats.compute()
    torch.testing.assert_close(out["activation_probability"], torch.tensor([[0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out["mean_activation"], torch.tensor([[0.75, -0.25]], dtype=torch.float64))


# -- heads bookkeeping ---------------------------------------------------------------------------
def test_head_ranking_chunks_and_agreement() -> None:
    delta = torch.tensor([[0.1, float("nan")], [0.5, 0.1]], dtype=torch.float64)
    scores = HeadScores(delta=delta, intervened=-delta, baseline=0.0)
    assert scores.ranked_heads() == [(1, 0), (0, 0), (1, 1)]
    assert scores.top_heads(2) == [(1, 0), (0, 0)]
    assert list(heads_by_layer([(1, 0), (0, 1), (1, 1), (1, 2)], 2)) == [(0, [(0, 1)]), (1, [(1, 0), (1, 1)]), (1, [(1, 2)])]
    assert row_head_list([(0, 1), (0, 2)], 2) == [(0, 1), (0, 2), (0, 1), (0, 2)]
    assert candidate_heads(2, 2, layers=[1]) == [(1, 0), (1, 1)]
    same = head_score_agreement(scores, scores, k=2)
    assert same["spearman"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0
    flipped = HeadScores(delta=-delta, intervened=delta, baseline=0.0)
    assert head_score_agreement(scores, flipped, k=1)["spearman"] < 0


def test_default_top_k_is_the_papers() -> None:
    assert DEFAULT_TOP_K == {"llava": 30, "qwen2_5_vl": 25}  # §2: |H*| for LLaVA-1.5-7B / Qwen2.5-VL-7B


# -- bank I/O and validation --------------------------------------------------------------------
def test_bank_round_trip_and_layer_dict(tmp_path) -> None:
    entries = [BankEntry(2, 5, 0.9, 0), BankEntry(0, 1, 0.5, 1), BankEntry(2, 3, float("nan"), 2)]
    path = write_bank(tmp_path / "bank.json", entries)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = read_bank(path, num_layers=3, ffn_width=8)
    assert [(e.layer, e.neuron, e.rank) for e in loaded] == [(2, 5, 0), (0, 1, 1), (2, 3, 2)]
    assert math.isnan(loaded[2].score)
    layer_dict = bank_to_layer_dict(loaded)
    assert sorted(layer_dict) == [0, 2] and layer_dict[2].tolist() == [3, 5]
    assert bank_mask(loaded, 3, 8).sum() == 3


def test_whole_layer_bank() -> None:
    entries = whole_layer_bank([2, 0], ffn_width=3)
    assert [(e.layer, e.neuron, e.rank) for e in entries] == [(2, 0, 0), (2, 1, 1), (2, 2, 2), (0, 0, 3), (0, 1, 4), (0, 2, 5)]
    assert all(math.isnan(e.score) for e in entries)
    assert bank_mask(whole_layer_bank(range(3), 4), 3, 4).all()


def test_bank_per_layer_layout(tmp_path) -> None:
    path = tmp_path / "released.json"
    path.write_text(json.dumps({"10": [4, 2], "3": [7], 5: []}))
    loaded = read_bank(path, num_layers=32, ffn_width=11008)
    assert [(e.layer, e.neuron, e.rank) for e in loaded] == [(3, 7, 0), (10, 4, 1), (10, 2, 2)]
    assert all(math.isnan(e.score) for e in loaded)
    assert [(e.layer, e.neuron) for e in parse_bank({1: [0]})] == [(1, 0)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "empty neuron bank"),
        ([{"layer": 4, "neuron": 0, "score": 1.0, "rank": 0}], r"layer 4 out of range \[0, 4\)"),
        ([{"layer": 0, "neuron": 10, "score": 1.0, "rank": 0}], r"neuron 10 of layer 0 out of range \[0, 10\)"),
        ([{"layer": -1, "neuron": 0}], "layer -1 out of range"),
        ([{"layer": 1, "neuron": 2}, {"layer": 1, "neuron": 2}], "duplicate entry layer 1 neuron 2"),
        ({"1": [3, 3]}, "duplicate entry layer 1 neuron 3"),
        ({"x": [1]}, "layer key 'x' must be an integer"),
        ({"1": 3}, "must map to a list"),
        ([{"layer": 1}], "must be an object with 'layer' and 'neuron'"),
        ([{"layer": 1, "neuron": 2, "score": "abc"}], "entry 0 score must be a number or null; got 'abc'"),
        ([{"layer": 1, "neuron": 2, "score": True}], "entry 0 score must be a number or null; got True"),
        ([{"layer": 1, "neuron": 2, "score": [1]}], r"entry 0 score must be a number or null; got \[1\]"),
        ("nope", "a neuron bank is a list"),
    ],
)
def test_bank_validation_errors_are_one_line(tmp_path, data, message) -> None:
    path = tmp_path / "bank.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BankError, match=message) as info:
        read_bank(path, num_layers=4, ffn_width=10)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_bank_file(tmp_path) -> None:
    with pytest.raises(BankError, match="not found"):
        read_bank(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("tensors", "metadata", "message"),
    [
        ({"intervened": torch.zeros(2, 2), "baseline": torch.tensor(1.0)}, {"utility": "u", "task": "vqa", "num_items": "3"}, "lacks delta"),
        ({"delta": torch.zeros(2, 2), "intervened": torch.zeros(2, 2), "baseline": torch.tensor(1.0)}, {"task": "vqa"}, "lacks num_items, utility"),
        ({"delta": torch.zeros(2, 2), "intervened": torch.zeros(2, 3), "baseline": torch.tensor(1.0)},
         {"utility": "u", "task": "vqa", "num_items": "3"}, r"must be \[layers, heads\] of one shape"),
        ({"delta": torch.zeros(2, 2), "intervened": torch.zeros(2, 2), "baseline": torch.tensor(1.0)},
         {"utility": "u", "task": "vqa", "num_items": "x"}, "num_items must be a whole number"),
    ],
)
def test_bad_head_scores_file_is_one_line(tmp_path, tensors, metadata, message) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "head_scores.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(BankError, match=message) as info:
        load_head_scores(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(BankError, match="head scores file not found"):
        load_head_scores(tmp_path / "absent.safetensors")


def test_head_scores_and_matrices_round_trip(tmp_path) -> None:
    delta = torch.tensor([[0.3, -0.1], [float("nan"), 0.7]], dtype=torch.float64)
    scores = HeadScores(delta=delta, intervened=1.0 - delta, baseline=1.0, utility="teacher_forced", task="vqa", num_items=5)
    save_head_scores(tmp_path / "h.safetensors", scores)
    back = load_head_scores(tmp_path / "h.safetensors")
    torch.testing.assert_close(back.delta, delta, equal_nan=True)
    assert (back.baseline, back.task, back.utility, back.num_items) == (1.0, "vqa", "teacher_forced", 5)
    write_head_list(tmp_path / "heads.json", scores)
    rows = read_head_list(tmp_path / "heads.json", num_layers=2, num_heads=2)
    assert [(r["layer"], r["head"], r["rank"]) for r in rows] == [(1, 1, 0), (0, 0, 1), (0, 1, 2)]
    data = json.loads((tmp_path / "heads.json").read_text())
    assert data["baseline"] == 1.0 and data["heads"][0]["intervened"] == pytest.approx(0.3)
    with pytest.raises(BankError, match="head 1 out of range"):
        read_head_list(tmp_path / "heads.json", num_layers=2, num_heads=1)
    importance = torch.rand(3, 4, dtype=torch.float64)
    save_matrices(tmp_path / "imp.safetensors", {"importance": importance}, {"task": "vqa"})
    torch.testing.assert_close(load_matrices(tmp_path / "imp.safetensors")["importance"], importance)
