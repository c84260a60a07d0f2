#!/usr/bin/env bash
# Reproduce the README's toy-model numbers for one model, from the shipped checkpoint (all but the
# rows of the first toy models of commit 88a73c2 and the probes the README marks "not shipped"):
#   bash scripts/toy_results.sh llava          # or qwen2_5_vl
# 1. test-split scores of the model, 2. attribution + masking on all four tasks (analyze.py all),
# 3. the cross-task analyses, 4. the steering comparison of every §5 method per task,
# 5. the same at a 5% budget (70 neurons: attribution, masking, steering on all four tasks),
# 6. HONES against 8 more random draws (scripts/random_spread.py) at both budgets,
# 7. the budget sweep: HONES and random at 10% and 20%, 8. whole-layer FFN masking per task,
# 9. steering with every neuron's scale free (Base and HONES), 10. steering on a 2000-image dev split,
# 11. masking read teacher-forced (target log-probability, retrieval margin gap) at both budgets,
# 12. the learned steering scales read teacher-forced on the test split,
# 13. HONES against random draws on a 3000-image test split (generation tasks, both budgets; retrieval
#     on 1000 of its images at 1%),
# 14. the steering comparison (Base, RandNeuron, HONES) tested on that split (retrieval: 1000 images),
# 15. the one-off checks: image reliance, 20%-bank steering on VQA, and for llava the paper's metric
#     utility for the heads stage at 5% and the OCR placement probe.
# The analyze.py stages and the train.py compare methods resume or skip finished work when rerun
# (OVERWRITE=1 recomputes them); the other steps rerun.
set -euo pipefail
model="${1:?usage: bash scripts/toy_results.sh llava|qwen2_5_vl}"
case "$model" in llava|qwen2_5_vl) ;; *) echo "unknown model '$model' (llava or qwen2_5_vl)" >&2; exit 2;; esac
py="${PYTHON:-.venv/bin/python}"
overwrite=$([ "${OVERWRITE:-0}" = 1 ] && echo true || echo false)
cd "$(dirname "$0")/.."
"$py" scripts/eval_toy_models.py --models "models/toy-$model" --out "runs/toy_eval/toy-$model"
"$py" analyze.py all --config "configs/analyze/toy_$model.yaml" --overwrite "$overwrite"
"$py" analyze.py table --runs "runs/analyze/toy-$model"
"$py" -m hones.analysis.run --config "configs/analysis/toy_$model.yaml"
for task in vqa ocr caption retrieval; do
  "$py" train.py compare --config "configs/steering/toy_${model}_${task}.yaml" --compare.overwrite "$overwrite"
done
# 5% budget: same heads, 70 neurons per selection; every baseline, AP / MA / APE included
five=(--model_name "toy-$model-5pct" --neurons.top_ratio 0.05)
"$py" analyze.py all --config "configs/analyze/toy_$model.yaml" "${five[@]}" --overwrite "$overwrite"
"$py" analyze.py table --runs "runs/analyze/toy-$model-5pct"
for task in vqa ocr caption retrieval; do
  "$py" train.py compare --config "configs/steering/toy_${model}_${task}.yaml" --compare.overwrite "$overwrite" \
    --model.bank "runs/analyze/toy-$model-5pct/$task/bank_hones.json" \
    --model.output_dir "runs/steering/toy-$model-5pct/$task" --compare.output_dir "runs/steering/toy-$model-5pct/$task/compare"
done
for task in vqa ocr caption retrieval; do
  "$py" scripts/random_spread.py --config "configs/analyze/toy_$model.yaml" --task "$task" --draws 8
  "$py" scripts/random_spread.py --config "configs/analyze/toy_$model.yaml" "${five[@]}" --task "$task" --draws 8
done
for pct in 10 20; do
  "$py" analyze.py all --config "configs/analyze/toy_$model.yaml" --model_name "toy-$model-${pct}pct" \
    --neurons.top_ratio "0.$pct" --masking.methods "[hones, random]" --overwrite "$overwrite"
done
# 8. how much each task depends on the FFNs at all: every layer's whole FFN masked (retrieval on 100 test images)
for task in vqa ocr caption; do
  "$py" scripts/ffn_dependence.py --config "configs/analyze/toy_$model.yaml" --task "$task"
done
"$py" scripts/ffn_dependence.py --config "configs/analyze/toy_$model.yaml" --task retrieval --test.limit 100
# 9. steering with every neuron's scale free (Base and HONES only): the §5 objective when the bank is not the limit
"$py" scripts/every_neuron_bank.py --model "models/toy-$model" --out "runs/steering/toy-$model-all/bank_all.json"
for task in vqa ocr caption retrieval; do
  "$py" train.py compare --config "configs/steering/toy_${model}_${task}.yaml" --compare.overwrite "$overwrite" \
    --model.bank "runs/steering/toy-$model-all/bank_all.json" --compare.methods "[base, hones]" \
    --model.output_dir "runs/steering/toy-$model-all/$task" --compare.output_dir "runs/steering/toy-$model-all/$task/compare"
done
# 10. a paper-sized dev split (§6: up to 2000 images): the same world with 2000 dev images (images are made
# per index, so every other split is unchanged), the 14-neuron banks, Base and HONES
"$py" -m hones.data.toyworld --out runs/toyworld_dev2000 --n-train 0 --n-dev 2000 --if-missing
W=runs/toyworld_dev2000
for task in vqa ocr caption retrieval; do
  "$py" train.py compare --config "configs/steering/toy_${model}_${task}.yaml" --compare.overwrite "$overwrite" \
    --data.annotation_file "$W/coco/unified.json" --data.image_root "$W/coco/images" --data.split_file "$W/splits/dev.json" \
    --compare.test_split_file "$W/splits/test.json" --compare.methods "[base, hones]" \
    --model.output_dir "runs/steering/toy-$model-dev2000/$task" --compare.output_dir "runs/steering/toy-$model-dev2000/$task/compare"
done
# 11. the same masks read below the metric: teacher-forced score of every selection and 8 more random draws
for extra in "" "${five[*]}"; do
  for task in vqa ocr caption; do
    # shellcheck disable=SC2086
    "$py" scripts/teacher_forced_masking.py --config "configs/analyze/toy_$model.yaml" $extra --task "$task" --draws 8
  done
  # shellcheck disable=SC2086
  "$py" scripts/teacher_forced_masking.py --config "configs/analyze/toy_$model.yaml" $extra --task retrieval --test.limit 100 --draws 8
done
# 12. the learned 14-neuron scales read teacher-forced on the test split (retrieval on 100 images)
for task in vqa ocr caption retrieval; do
  limit=$([ "$task" = retrieval ] && echo "--limit 100" || true)
  # shellcheck disable=SC2086
  "$py" scripts/steering_test_likelihood.py --model "models/toy-$model" --task "$task" $limit \
    --compare_dir "runs/steering/toy-$model/$task/compare"
done
# 13. the same banks on a 3000-image test split (§6's largest; images are made per index, so its first
# 300 are the test split above): HONES, the seeded random row and 8 more draws, generation tasks
"$py" -m hones.data.toyworld --out runs/toyworld_test3000 --n-train 0 --n-dev 0 --n-test 3000 --n-ood 10 --if-missing
for extra in "" "${five[*]}"; do
  for task in vqa ocr caption; do
    # shellcheck disable=SC2086
    "$py" scripts/random_spread.py --config "configs/analyze/toy_$model.yaml" $extra --task "$task" --draws 8 \
      --test_world runs/toyworld_test3000
  done
done
# retrieval on a seeded sample of 1000 of those images (50,000 candidates; 35-60 min per model and budget on one core)
for extra in "" "${five[*]}"; do
  # shellcheck disable=SC2086
  "$py" scripts/random_spread.py --config "configs/analyze/toy_$model.yaml" $extra --task retrieval --draws 8 \
    --test_world runs/toyworld_test3000 --test.limit 1000
done
# 14. Base, RandNeuron and HONES steering (the 14-neuron banks, the same 200 dev images, so the same
# learned scales) tested on 3000 test images (retrieval: a seeded sample of 1000, 50 candidates each); no OOD
"$py" -m hones.data.toyworld --out runs/toyworld_dev200_test3000 --n-train 0 --n-dev 200 --n-test 3000 --n-ood 10 --if-missing
W=runs/toyworld_dev200_test3000
for task in vqa ocr caption retrieval; do
  limit=$([ "$task" = retrieval ] && echo "--compare.test_limit 1000" || true)
  # shellcheck disable=SC2086
  "$py" train.py compare --config "configs/steering/toy_${model}_${task}.yaml" --compare.overwrite "$overwrite" \
    --data.annotation_file "$W/coco/unified.json" --data.image_root "$W/coco/images" --data.split_file "$W/splits/dev.json" \
    --compare.test_split_file "$W/splits/test.json" $limit --compare.methods "[base, rand_neuron, hones]" --compare.ood null \
    --model.output_dir "runs/steering/toy-$model-test3000/$task" --compare.output_dir "runs/steering/toy-$model-test3000/$task/compare"
done
# 15. one-off checks quoted in the README: does the model use its images (right vs shifted images),
# steering VQA with the 20% bank (282 neurons; Base and HONES)
"$py" scripts/image_reliance.py "models/toy-$model"
"$py" train.py compare --config "configs/steering/toy_${model}_vqa.yaml" --compare.overwrite "$overwrite" \
  --model.bank "runs/analyze/toy-$model-20pct/vqa/bank_hones.json" --compare.methods "[base, hones]" \
  --model.output_dir "runs/steering/toy-$model-20pct/vqa" --compare.output_dir "runs/steering/toy-$model-20pct/vqa/compare"
if [ "$model" = llava ]; then
  # the paper's metric utility for the heads stage at 5% (HONES and random), and whether OCR can be
  # learned with plates at any pixel offset vs on the 8-px patch grid (a fresh toy LLaVA, 300 steps each)
  "$py" analyze.py all --config configs/analyze/toy_llava.yaml --model_name toy-llava-5pct-metric --tasks vqa,ocr,caption \
    --neurons.top_ratio 0.05 --heads.utility metric --heads.compare_utility null --masking.methods "[hones, random]" \
    --overwrite "$overwrite"
  for placement in free grid; do
    "$py" scripts/ocr_probe.py --placement "$placement"
  done
fi
