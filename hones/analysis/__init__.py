"""Cross-task analyses of the tasks' selected neurons (HONES_METHOD §4 "Paper analyses").

One module per analysis — ``layer_preference``, ``overlap``, ``cross_ablation``,
``logit_lens`` — with ``report`` (PNG + TensorBoard + JSON/markdown outputs) and the
driver ``run`` (``python -m hones.analysis.run --config configs/analysis/toy_llava.yaml``).
See docs/analysis.md.
"""
