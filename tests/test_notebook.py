"""notebooks/toy_results.ipynb runs end to end (nbclient, the venv's python3 kernel) on tiny
analysis artifacts generated here, so the notebook cannot rot.

The notebook reads ``HONES_RESULTS_DIR`` (default ``runs/analysis``); the test points it at
a tmp run directory made by ``run_cross_task_analysis`` on a random tiny LLaVA, a tiny toy
world and random banks, plus one ``masking.json`` as ``analyze.py mask`` writes it.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from hones.analysis.run import DataConfig, EvaluationConfig, LogitLensConfig, run_cross_task_analysis
from hones.attribution.bank import BankEntry, write_bank
from hones.attribution.reports import masking_row, write_masking_report
from hones.data.toyworld import ToyWorldConfig, generate_world

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "toy_results.ipynb"
TASKS = ("vqa", "ocr", "caption", "retrieval")


@pytest.fixture(scope="module")
def results_dir(tiny_llava, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("notebook")
    world = root / "world"
    generate_world(world, ToyWorldConfig(seed=0, n_train=0, n_discovery=0, n_dev=0, n_test=2, n_ood=0))
    adapter = tiny_llava
    picks = torch.randperm(adapter.num_layers * adapter.ffn_width, generator=torch.Generator().manual_seed(3))
    neurons = [(p // adapter.ffn_width, p % adapter.ffn_width) for p in picks[:13].tolist()]
    for t, task in enumerate(TASKS):
        chosen = [neurons[0], *neurons[1 + 3 * t : 4 + 3 * t]]  # one general neuron + three own
        write_bank(root / "analyze" / task / "bank_hones.json", [BankEntry(l, i, 1.0, k) for k, (l, i) in enumerate(chosen)])
    write_masking_report(  # what `analyze.py mask` writes next to the banks
        root / "analyze" / "vqa",
        {"task": "vqa", "split": "test", "metric": "VQAAccuracy", "metric_mode": "paper", "num_items": 2,
         "methods": {"hones": masking_row(0.5, 0.25, 4), "random": masking_row(0.5, 0.5, 4)}},
    )  # fmt: skip
    results = root / "results"
    run_cross_task_analysis(
        banks=str(root / "analyze"),
        data=DataConfig(
            annotation_file=str(world / "coco/unified.json"),
            image_root=str(world / "coco/images"),
            split_file=str(world / "splits/test.json"),
            limit=1,
            n_neg=1,
        ),
        out_dir=str(results / "tiny-llava"),
        evaluation=EvaluationConfig(max_new_tokens=2),
        logit_lens=LogitLensConfig(top_k=2),
        adapter=adapter,
    )
    return results


def test_toy_results_notebook_executes(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HONES_RESULTS_DIR", str(results_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    figures = len(list((results_dir / "tiny-llava" / "figures").glob("*.png")))
    assert figures == 8 and len(images) == figures
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "tiny-llava" in text and "most harmful group" in text
    assert "Masking verification: tiny-llava" in text and "50.0" in text  # section 5: masking.json
