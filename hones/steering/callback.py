"""``NeuronSteeringCallback``: HONES steering (HONES_METHOD §5) on any LightningModule.

The module only has to expose its VLM (``adapter`` attribute or ``get_adapter()``, see
``hones.steering.protocol``). The callback:

- ``setup``: checks the selection against the model (one-line ``BankError`` naming the
  file and entry, before anything runs), attaches a ``NeuronScaler`` as
  ``pl_module.neuron_scaler`` (so ``pl_module.parameters()`` and checkpoints include s),
  freezes every other weight, and registers the scaling hooks z <- z * (1 + m * s) for
  the whole stage (training, validation, generation);
- ``on_fit_start``: makes sure s is optimised (adds a parameter group with ``lr`` to the
  first optimiser when the module's ``configure_optimizers`` left it out; an error when
  there is no optimiser, or a scheduler that could not follow the new group). s stays
  float32 under ``precision="bf16-true"`` (``NeuronScaler`` keeps its dtype in a half cast);
- ``on_train_batch_end``: after each optimiser step clamps s to [-bound, bound]; logs
  ``steer/scale_abs_mean``, ``steer/scale_abs_max``, ``steer/scale_nonzero_frac`` and
  the ``ce`` / ``kl`` / ``l2`` parts the training step returned (``steer/ce`` ...);
- ``on_fit_end``: writes ``scales.json`` / ``scales.safetensors`` to ``export_dir``;
- ``teardown`` (and ``on_exception``, as Lightning skips ``teardown`` when a stage fails):
  removes the hooks and restores the ``requires_grad`` flags it changed.

The scaling is active only while the callback is part of a Trainer stage. After the stage the
scaler stays attached as ``pl_module.neuron_scaler`` (so the module's ``state_dict`` and
checkpoints keep s) but scales nothing: a later ``trainer.validate`` without the callback runs
the unscaled model. To evaluate learned scales, pass the callback again (or
``NeuronSteeringCallback(pl_module.neuron_scaler)``, or ``load_scales(<exported file>)``) to that Trainer, or wrap
plain code in ``hones.steering.apply_scales(adapter, scales)``.

The loss stays the module's: return ``callback.objective(self, batch).outputs()`` from
``training_step`` for the §5 objective (it encodes the batch's ``items`` with targets when the
batch has no labels; ``steering_objective(self.adapter, self.neuron_scaler, batch)`` needs a
batch encoded with targets, e.g. ``ensure_targets(self.adapter, batch)``). Optimise
``filter(lambda p: p.requires_grad, self.parameters())`` with ``weight_decay=0``: §5's only
penalty on s is the explicit λ·mean(s²).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hones.attribution.bank import BankError
from hones.attribution.batches import ensure_targets
from hones.interventions import NeuronScaler, scale_neurons
from hones.steering.objective import DEFAULT_BETA, DEFAULT_L2_WEIGHT, SteeringLoss, steering_objective
from hones.steering.protocol import freeze_parameters, resolve_adapter, restore_requires_grad
from hones.steering.scales import DEFAULT_SCALE_BOUND, NONZERO_THRESHOLD, export_scales, is_scales_file, load_scales, scale_statistics
from hones.steering.selection import read_neurons, selection_from, validate_neurons

DEFAULT_LR = 5e-4  # §5: AdamW learning rate

NeuronSource = str | os.PathLike | Mapping[int, Tensor | Sequence[int]] | Sequence[Any] | NeuronScaler


class NeuronSteeringCallback(Callback):
    """Learn one scale per selected neuron of any LightningModule exposing a VLMAdapter.

    Args:
        neurons: what to scale: a neuron bank JSON path (either layout), a selection
            ``{layer: neuron ids}``, a list of ``BankEntry`` or ``(layer, neuron)`` pairs, or
            learned scales to evaluate: a ``NeuronScaler`` or an exported scales file
            (``scales.safetensors`` / ``scales.json``, loaded with their values).
        init_scale: initial s (0: no change; 1.0: every neuron x2).
        beta, l2_weight: the §5 loss weights used by :meth:`objective`.
        scale_bound: s is clamped to [-bound, bound] after each optimiser step (§5: 1.5).
        lr: learning rate of the parameter group added when the module's optimiser lacks s.
        stats_threshold: |s| above which a neuron counts as non-zero in the logs.
        export_dir: where to write the learned scales at the end of ``fit`` (None: nowhere).
        attribute: the name under which the scaler is attached to the module.
    """

    def __init__(
        self,
        neurons: NeuronSource,
        init_scale: float = 0.0,
        beta: float = DEFAULT_BETA,
        l2_weight: float = DEFAULT_L2_WEIGHT,
        scale_bound: float = DEFAULT_SCALE_BOUND,
        lr: float = DEFAULT_LR,
        stats_threshold: float = NONZERO_THRESHOLD,
        export_dir: str | os.PathLike | None = None,
        attribute: str = "neuron_scaler",
    ) -> None:
        super().__init__()
        if isinstance(neurons, (str, os.PathLike)) and is_scales_file(neurons):
            if init_scale:
                raise BankError(f"{os.fspath(neurons)}: a scales file sets s itself; drop init_scale={init_scale}")
            neurons = load_scales(neurons)  # learned scales (an export): evaluated as they are
        if isinstance(neurons, NeuronScaler):
            self.source = "scaler"
            self.scaler = neurons.float()
        else:
            if isinstance(neurons, (str, os.PathLike)):
                self.source = str(neurons)
                if os.path.isdir(neurons):
                    raise BankError(
                        f"{neurons}: a directory; give a neuron bank file (e.g. {os.path.join(neurons, 'bank_hones.json')}) "
                        f"or learned scales ({os.path.join(neurons, 'scales.safetensors')})"
                    )
                selection = read_neurons(neurons)  # structure checked now, ranges at setup
            else:
                self.source = "neurons"
                selection = selection_from(neurons, self.source)
            self.scaler = NeuronScaler(selection, init=init_scale).float()
        self.beta, self.l2_weight = float(beta), float(l2_weight)
        self.scale_bound, self.lr = float(scale_bound), float(lr)
        self.stats_threshold = float(stats_threshold)
        self.export_dir = export_dir
        self.attribute = attribute
        self._hooks: ExitStack | None = None
        self._flags: list[tuple[torch.nn.Module, dict[str, bool]]] = []
        self._last_step = 0

    # -- wiring ----------------------------------------------------------------------------
    def attach(self, pl_module: L.LightningModule) -> Any:
        """Validate, attach the scaler, freeze the weights and register the hooks; returns the adapter."""
        adapter = resolve_adapter(pl_module)
        validate_neurons(self.scaler.neurons, adapter.num_layers, adapter.ffn_width, self.source)
        attached = getattr(pl_module, self.attribute, None)
        if attached is None:
            pl_module.add_module(self.attribute, self.scaler)
        elif attached is not self.scaler:
            what = "an earlier NeuronSteeringCallback's scaler" if isinstance(attached, NeuronScaler) else type(attached).__name__
            raise ValueError(
                f"{type(pl_module).__name__}.{self.attribute} already holds {what}; to steer again with it, pass it on: "
                f"NeuronSteeringCallback(module.{self.attribute}); for a new one, `del module.{self.attribute}` first "
                "or give attribute=<another name>"
            )
        self.scaler.to(adapter.device)
        if not self._flags:
            self._flags.append((pl_module, freeze_parameters(pl_module, keep=[self.scaler.s])))
            self._flags.append((adapter.model, freeze_parameters(adapter.model)))
        self.scaler.s.requires_grad_(True)
        if self._hooks is None:
            self._hooks = ExitStack()
            self._hooks.enter_context(scale_neurons(adapter, self.scaler))
        return adapter

    def detach(self) -> None:
        """Remove the hooks and restore the ``requires_grad`` flags (the scaler stays attached)."""
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None
        for module, flags in reversed(self._flags):
            restore_requires_grad(module, flags)
        self._flags = []

    def objective(self, pl_module: L.LightningModule, batch: Mapping[str, Any]) -> SteeringLoss:
        """The §5 loss of ``batch`` (re-encoded with targets from its ``items`` if it has no labels)."""
        adapter = resolve_adapter(pl_module, configure=False)
        return steering_objective(adapter, self.scaler, ensure_targets(adapter, batch), self.beta, self.l2_weight)

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.attach(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning skips ``teardown`` when a stage fails: unhook here, so the model is not left
        scaled and frozen for the code that runs next (a notebook cell, a retry)."""
        self.detach()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = type(pl_module).__name__
        optimizers = [opt for opt in trainer.optimizers if not isinstance(opt, _MockOptimizer)]
        if not optimizers:  # configure_optimizers returned None: Lightning steps a stand-in that trains nothing
            raise RuntimeError(f"{name} configures no optimiser: nothing trains the neuron scales (return one from configure_optimizers)")
        optimised = any(parameter is self.scaler.s for opt in optimizers for group in opt.param_groups for parameter in group["params"])
        if not optimised:
            if trainer.lr_scheduler_configs:  # a scheduler keeps one entry per parameter group it was built with
                raise RuntimeError(
                    f"the optimiser of {name} does not include the neuron scales and has an LR scheduler, so none can be "
                    f"added; optimise `filter(lambda p: p.requires_grad, self.parameters())` in configure_optimizers"
                )
            optimizers[0].add_param_group({"params": [self.scaler.s], "lr": self.lr, "weight_decay": 0.0})
            rank_zero_warn(
                f"the optimiser of {name} did not include the neuron scales; added them "
                f"with lr={self.lr} (optimise `filter(lambda p: p.requires_grad, self.parameters())` instead)"
            )
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._last_step:  # an optimiser step just happened
            self.scaler.clamp_(-self.scale_bound, self.scale_bound)
            self._last_step = trainer.global_step
        values: dict[str, Any] = {
            f"steer/{k}": v for k, v in scale_statistics(self.scaler.s, self.stats_threshold).items()
        }
        if isinstance(outputs, Mapping):
            values.update({f"steer/{k}": outputs[k] for k in ("ce", "kl", "l2") if k in outputs})
        size = batch["input_ids"].shape[0] if isinstance(batch, Mapping) and "input_ids" in batch else 1
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=size)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_dir is not None and trainer.is_global_zero:
            export_scales(self.scaler, self.export_dir, metadata={"source": self.source})
