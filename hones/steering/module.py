"""``SteeringModule``: learn sparse per-neuron scales for one task (HONES_METHOD §5).

The default LightningModule of ``train.py``. Every model weight is frozen; the only
trainable tensor is s (``NeuronScaler``), one value per selected neuron, applied as
z <- z * (1 + m * s) around every forward of the module (training, validation,
generation). The frozen VLM stays in eval mode, so the KL teacher (the same model with
scaling off) and the student differ only by the scales.

Hooks implemented: ``configure_model`` (load the adapter, check the selection, build the
scaler), ``setup`` (give the adapter's encoder to the datamodule), ``training_step``
(the §5 objective), ``optimizer_step`` (clamp s after each step), ``on_train_batch_end``
(scale statistics), ``on_{validation,test}_epoch_start`` / ``*_step`` / ``*_epoch_end``
(the task metric with ``TaskScorer``, logged as ``val/<task>/<metric>`` and
``<eval_tag>/<task>/<metric>``), ``on_fit_end`` (export the scales),
``configure_optimizers`` (AdamW + cosine decay to ``min_lr_ratio`` · lr),
``on_save_checkpoint`` (only the scaler is checkpointed, never the frozen VLM).

Data: ``training_step`` needs teacher-forcing batches (an item batch without ``labels`` is
re-encoded with its targets); evaluation re-encodes prompt-only batches. Validation scores
the datamodule's items as they are: a ``training: true`` datamodule serves retrieval as
1 positive + 4 negatives per image, so ``val/retrieval/...`` during ``fit`` is a proxy of
NDCG@5; ``compare`` (and ``test`` with ``training: false``) use the 1 + 49 groups of §1.
With the shipped configs, validation during ``fit`` runs on the dev split the scales are
trained on (§5 has no other split for it), so ``val/...`` follows the fit, not held-out
performance: held-out numbers come from ``test`` on the test split (``compare`` does that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from hones import io
from hones.choices import DType, MetricMode, SettingsError, Task
from hones.adapter_host import AdapterHost
from hones.attribution.batches import batch_size, ensure_prompt_only, ensure_targets
from hones.attribution.bank import BankError, read_bank
from hones.attribution.provenance import check_bank_model, check_scales_model
from hones.attribution.settings import model_identity
from hones.evaluation import METRIC_MODES, EpochScoring, TaskScorer, skipped_items, summarize_epoch
from hones.interventions import NeuronScaler, scale_neurons
from hones.metrics import build_metric
from hones.steering.objective import DEFAULT_BETA, DEFAULT_L2_WEIGHT, steering_objective
from hones.steering.protocol import freeze_parameters
from hones.steering.scales import (
    DEFAULT_SCALE_BOUND,
    NONZERO_THRESHOLD,
    export_scales,
    float32_default,
    load_scales,
    scale_statistics,
)
from hones.steering.selection import random_neurons_like, read_neurons

# §5 optimisation defaults (the Trainer ones live in hones.steering.cli.TRAINER_DEFAULTS).
DEFAULT_LR = 5e-4
DEFAULT_MIN_LR_RATIO = 0.1


def cosine_decay_factor(step: int, total_steps: int, floor: float = DEFAULT_MIN_LR_RATIO) -> float:
    """lr multiplier at optimiser step ``step``: cosine from 1 to ``floor`` over ``total_steps``."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lazy_cosine_decay(total_steps: Callable[[], float], floor: float = DEFAULT_MIN_LR_RATIO) -> Callable[[int], float]:
    """``cosine_decay_factor`` whose length ``total_steps()`` is read once, at the first step
    after 0 (step 0 is 1.0 whatever the length). A plain function on purpose: ``LambdaLR``
    checkpoints the ``__dict__`` of callable objects, and this one holds the Trainer."""
    length: list[int] = []

    def factor(step: int) -> float:
        if step <= 0:
            return 1.0
        if not length:
            total = total_steps()
            if not math.isfinite(total):
                raise SettingsError("set trainer max_epochs or max_steps: the cosine schedule needs a length")
            length.append(int(total))
        return cosine_decay_factor(step, length[0], floor)

    return factor


class SteeringModule(AdapterHost, EpochScoring, L.LightningModule):
    """HONES steering of one model on one task.

    Args:
        model: hub id or local directory of a supported VLM (``hones.models``).
        task: vqa | ocr | caption | retrieval.
        bank: neuron bank JSON (HONES_METHOD §3 selection) — the neurons to scale.
        scales: learned scales (``.json`` / ``.safetensors``) to start from or to evaluate;
            their neurons replace the bank's.
        random_neurons: RandNeuron (§5): random neurons with the bank's per-layer counts (not with ``scales``).
        random_seed: seed of those random neurons.
        init_scale: initial s of the bank's neurons (Fixed-Amp: 1.0, i.e. x2); with ``scales``, only 0.
        steer: False evaluates the unsteered model (Base); nothing is trained then.
        beta: weight of KL(p_original ‖ p_scaled) (§5: 0.05; 0 = HONES w/o KL).
        l2_weight: λ of mean(s²) (§5: 1e-5).
        lr, min_lr_ratio, weight_decay: AdamW lr (§5: 5e-4) with per-step cosine decay to
            ``min_lr_ratio`` · lr (§5: 0.1); weight decay is not in §5 (0: the λ term
            already regularises s).
        scale_bound: s is clamped to [-bound, bound] after each optimiser step (§5: 1.5).
        metric_mode: headline metric mode ("paper" or "official"); both are logged.
        dtype: fp32 | bf16 | fp16 of the loaded model (s always stays float32).
        max_new_tokens: greedy generation budget for evaluation (§1: 24).
        output_dir: scales (``scales.json``, ``scales.safetensors``) after ``fit``, and
            ``metrics_<stage>.json`` / ``predictions_<stage>.jsonl`` after evaluation
            (None: the scales go to the logger's log dir, if any; no evaluation files).
        stats_threshold: |s| above which a neuron counts as non-zero in the logs.
        adapter_factory: optional callable returning a ready adapter (tests, comparisons).

    ``eval_tag`` (attribute, default "test") names what ``trainer.test`` evaluates
    (e.g. "ood"); it prefixes the test logs and files.
    """

    def __init__(
        self,
        model: str = "models/toy-llava",
        task: Task = "vqa",
        bank: str | None = None,
        scales: str | None = None,
        random_neurons: bool = False,
        random_seed: int = 0,
        init_scale: float = 0.0,
        steer: bool = True,
        beta: float = DEFAULT_BETA,
        l2_weight: float = DEFAULT_L2_WEIGHT,
        lr: float = DEFAULT_LR,
        min_lr_ratio: float = DEFAULT_MIN_LR_RATIO,
        weight_decay: float = 0.0,
        scale_bound: float = DEFAULT_SCALE_BOUND,
        metric_mode: MetricMode = "paper",
        dtype: DType = "fp32",
        max_new_tokens: int = 24,
        trust_remote_code: bool = False,
        output_dir: str | None = None,
        stats_threshold: float = NONZERO_THRESHOLD,
        adapter_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        if metric_mode not in METRIC_MODES:
            raise SettingsError(f"metric_mode must be one of {METRIC_MODES}; got {metric_mode!r}")
        if steer and bank is None and scales is None:
            raise SettingsError("steering needs a neuron `bank` (or learned `scales`); use steer=False for the base model")
        if beta < 0 or l2_weight < 0 or scale_bound <= 0:
            raise SettingsError("beta and l2_weight must be >= 0 and scale_bound > 0")
        if scales is not None and (random_neurons or init_scale != 0.0):
            raise SettingsError(
                f"scales ({scales}) gives the neurons and their starting scales; random_neurons and init_scale "
                "apply to a bank and would be ignored: drop them or the scales file"
            )
        self.save_hyperparameters(ignore=["adapter_factory"])
        if steer and bank is not None and scales is None:
            read_bank(bank)  # fail fast on a missing, malformed or empty bank, before loading a model
            check_bank_model(bank, str(model))  # ... or one selected on another model
        if steer and scales is not None:
            check_scales_model(scales, str(model))  # scales learned on another model
        self.scorer = TaskScorer(task, max_new_tokens)
        self.metrics = nn.ModuleDict({mode: build_metric(task, mode) for mode in METRIC_MODES})
        self._adapter_factory = adapter_factory
        self.adapter: Any = None
        self.scaler: NeuronScaler | None = None
        self.strict_loading = False  # checkpoints hold the scaler only
        self.eval_tag = "test"
        self.results: dict[str, Any] = {}
        self.exported: dict[str, Path] = {}
        self._rows: list[dict[str, Any]] = []

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.adapter is not None:
            return
        hp = self.hparams
        from hones.models import load_module_adapter

        adapter = load_module_adapter(self, self._adapter_factory)
        freeze_parameters(adapter.model)
        scaler = self.build_scaler(adapter) if hp.steer else None
        self.adapter = adapter
        self.vlm = adapter.model  # registered, so Lightning moves it to the device
        if scaler is not None:
            self.scaler = scaler.to(adapter.device)

    def build_scaler(self, adapter: Any) -> NeuronScaler:
        """The scaler of the configured method, checked against the adapter's sizes (BankError)."""
        hp = self.hparams
        if hp.scales is not None:
            return load_scales(hp.scales, adapter.num_layers, adapter.ffn_width)
        neurons = read_neurons(hp.bank, adapter.num_layers, adapter.ffn_width)
        if hp.random_neurons:
            neurons = random_neurons_like(neurons, adapter.ffn_width, hp.random_seed)
        with torch.device("cpu"), float32_default():
            scaler = NeuronScaler(neurons)
        with torch.no_grad():
            scaler.s.fill_(float(hp.init_scale))
        return scaler

    def to(self, *args: Any, **kwargs: Any) -> SteeringModule:
        """Move/cast the module; s stays float32 (bf16 steps of 5e-4 would round away)."""
        moved = super().to(*args, **kwargs)
        if self.scaler is not None:
            self.scaler.float()
        return moved

    def train(self, mode: bool = True) -> SteeringModule:
        """Lightning switches modes per stage; the frozen VLM always stays in eval mode."""
        super().train(mode)
        if self.adapter is not None:
            self.adapter.model.eval()
        return self

    @contextmanager
    def steering(self) -> Iterator[NeuronScaler | None]:
        """Scaling active inside the block (nothing for the base model)."""
        if self.scaler is None:
            yield None
        else:
            with scale_neurons(self.adapter, self.scaler) as scaler:
                yield scaler

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        if self.scaler is None:
            raise RuntimeError("steer=False (Base) has nothing to train")
        batch = ensure_targets(self.adapter, batch)
        with self.steering():
            loss = steering_objective(self.adapter, self.scaler, batch, self.hparams.beta, self.hparams.l2_weight)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=1)
        self.log_dict(
            {f"train/{k}": v for k, v in loss.outputs().items()},
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size(batch),
        )
        return loss.outputs()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.scaler is not None:
            self.scaler.clamp_(-self.hparams.scale_bound, self.hparams.scale_bound)  # §5: after each step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.scaler is not None:
            stats = scale_statistics(self.scaler.s, self.hparams.stats_threshold)
            self.log_dict({f"steer/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.scaler is None:
            raise RuntimeError("steer=False (Base) has nothing to optimise")
        hp = self.hparams
        optimizer = torch.optim.AdamW([self.scaler.s], lr=hp.lr, weight_decay=hp.weight_decay)
        trainer = self.trainer
        if trainer.max_steps == -1 and trainer.max_epochs in (None, -1):
            raise SettingsError("set trainer max_epochs or max_steps: the cosine schedule needs a length")
        # The length is read at the first step, not here: reading estimated_stepping_batches in
        # configure_optimizers builds the training loader before a resumed fit restores its state,
        # so the loader would not resume (Lightning issue #20550; hones.data.resumable).
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lazy_cosine_decay(lambda: trainer.estimated_stepping_batches, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.scaler is None or not self.trainer.is_global_zero:
            return
        directory = self.hparams.output_dir
        if directory is None and self.trainer.logger is not None:
            directory = self.trainer.log_dir  # next to the logs; without a logger nothing is written
        if directory is None:
            return
        self.exported = export_scales(self.scaler, directory, metadata=self.scale_metadata())

    def scale_metadata(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "model": hp.model, "model_identity": model_identity(str(hp.model)) or "", "task": hp.task, "bank": hp.bank,
            "random_neurons": hp.random_neurons, "beta": hp.beta,
        }  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("scaler.")}

    # -- evaluation --------------------------------------------------------------------------
    validation_tag = "val"

    def test_tag(self) -> str:
        return self.eval_tag

    def journal_directory(self, tag: str) -> Path | None:
        return None if not self.hparams.output_dir else Path(self.hparams.output_dir) / f".journal_{tag}"

    def _predict_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Greedy predictions with the scaling on (prompt-only encodings)."""
        with self.steering():
            return self.scorer.predict(self.adapter, ensure_prompt_only(self.adapter, batch))

    def _end(self, stage: str) -> None:
        task = self.hparams.task
        headline = self.hparams.metric_mode
        values, rows, self.results = summarize_epoch(
            self.metrics, self._rows, task, self.hparams.model, stage, headline, metric_name=self.metrics[headline].name,
            **skipped_items(self._trainer),
        )  # fmt: skip
        for mode, value in values.items():
            # compute() synchronised the metric: every process holds the same value (the mean is a no-op)
            self.log(f"{stage}/{task}/{self.metrics[mode].name}", value, sync_dist=True)
        if self.hparams.output_dir and self.global_rank == 0 and not self.trainer.sanity_checking:
            out = Path(self.hparams.output_dir)
            io.write_json(out / f"metrics_{stage}.json", self.results)
            io.write_jsonl(out / f"predictions_{stage}.jsonl", rows)


__all__ = ["BankError", "SteeringModule", "cosine_decay_factor"]
