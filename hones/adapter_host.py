"""The lazy adapter loading that every HONES LightningModule shares.

A module that mixes in :class:`AdapterHost` holds one VLM adapter (``self.adapter``), loaded
once per process in ``configure_model`` (on the strategy's device, see
``hones.models.load_module_adapter``) and registered as ``self.vlm`` so that Lightning moves
it; ``setup`` hands the adapter's encoder to the trainer's datamodule. ``hones.models`` is
imported only when the model is loaded, so importing a module stays light.
"""

from __future__ import annotations

from typing import Any


def trainer_datamodule(module: Any) -> Any:
    """The datamodule of the Trainer the module is attached to (None when there is none)."""
    return getattr(module.trainer, "datamodule", None) if module._trainer is not None else None


class AdapterHost:
    """Mixin for a LightningModule with ``self.adapter = None`` and ``self._adapter_factory`` set in ``__init__``."""

    adapter: Any
    _adapter_factory: Any

    def configure_model(self) -> None:
        if self.adapter is not None:
            return
        from hones.models import load_module_adapter

        self.adapter = load_module_adapter(self, self._adapter_factory)
        self.vlm = self.adapter.model  # registered so that Lightning moves it to the device

    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = trainer_datamodule(self)
        if datamodule is not None and hasattr(datamodule, "set_encoder"):
            datamodule.set_encoder(self.adapter.encode)
