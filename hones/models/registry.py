"""Adapter registry: `config.model_type` -> `VLMAdapter` subclass, and `load_adapter`.

Adding an architecture is one file in `hones/models/` whose adapter class is decorated
with `@register_adapter("<model_type>")`; every module of this package is imported on the
first lookup, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from transformers import AutoConfig, PreTrainedModel

from hones.models.base import VLMAdapter, resolve_dtype

_ADAPTERS: dict[str, type[VLMAdapter]] = {}
# Modules of this package that hold no adapter.
_NOT_ADAPTERS = frozenset({"base", "registry", "tiny"})
_discovered = False

AdapterT = TypeVar("AdapterT", bound=type[VLMAdapter])


def register_adapter(model_type: str) -> Callable[[AdapterT], AdapterT]:
    """Class decorator: register an adapter for HF configs with this `model_type`."""

    def decorate(cls: AdapterT) -> AdapterT:
        if model_type in _ADAPTERS and _ADAPTERS[model_type] is not cls:
            raise ValueError(
                f"model_type {model_type!r} already has an adapter: {_ADAPTERS[model_type].__name__}"
            )
        cls.model_type = model_type
        _ADAPTERS[model_type] = cls
        return cls

    return decorate


def _discover_adapters() -> None:
    """Import every adapter module of `hones.models` once, so their decorators run."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("hones.models")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_ADAPTERS and not module.name.startswith("_"):
            importlib.import_module(f"hones.models.{module.name}")
    _discovered = True


def supported_model_types() -> list[str]:
    """The `model_type`s that have an adapter, sorted."""
    _discover_adapters()
    return sorted(_ADAPTERS)


class ModelError(ValueError):
    """A model folder or hub id that cannot be loaded (one-line message naming it; the entry
    points print it without a traceback)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A local model directory that does not exist."""


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= 400 else text[:400] + " ..."


def adapter_class(model_type: str) -> type[VLMAdapter]:
    """The adapter class for `model_type`; a one-line ValueError when there is none."""
    _discover_adapters()
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"hones has no adapter for model_type {model_type!r}; supported: "
            f"{', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type]


def wrap_model(model: PreTrainedModel, processor: Any, name: str = "") -> VLMAdapter:
    """Wrap an in-memory HF model + its image-text processor (``image_processor`` and ``tokenizer``
    attributes, e.g. ``AutoProcessor``'s for a LLaVA folder) in its architecture's adapter.

    For a Qwen2.5-VL folder without a video processor (the toy models, or no torchvision),
    ``AutoProcessor`` returns only the tokenizer: use ``load_processor(path)``.
    """
    cls = adapter_class(model.config.model_type)
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise TypeError(
            f"wrap_model: the processor is a {type(processor).__name__}, not an image-text processor (with "
            f"image_processor and tokenizer); load it with hones.models.load_processor(<model folder or hub id>) "
            "(AutoProcessor returns the bare tokenizer for a Qwen2.5-VL folder without a video processor)"
        )
    return cls(model, processor, name=name)


def load_processor(path_or_hub_id: str, trust_remote_code: bool = False) -> Any:
    """The image-text processor ``wrap_model`` takes for a model folder or hub id (its architecture's
    ``load_processor``: LLaVA's ``LlavaProcessor``; Qwen2.5-VL's tokenizer and image processor,
    without the video processor that ``AutoProcessor`` would need). ``ModelError`` as ``load_adapter``."""
    with _loading(path_or_hub_id):
        config = AutoConfig.from_pretrained(str(path_or_hub_id), trust_remote_code=trust_remote_code)
        return adapter_class(config.model_type).load_processor(str(path_or_hub_id), trust_remote_code=trust_remote_code)


@contextmanager
def _loading(path_or_hub_id: str) -> Iterator[None]:
    """Turn what loading a model folder or hub id raises into a one-line ``ModelError`` naming it
    (a local path that is not a folder is named as such, before any hub lookup)."""
    from safetensors import SafetensorError

    check_local_model(str(path_or_hub_id))
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError, SafetensorError) as error:  # transformers' messages name the missing piece
        raise ModelError(f"{path_or_hub_id}: cannot load the model: {_one_line(error)}") from error


def load_adapter(
    path_or_hub_id: str,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> VLMAdapter:
    """Load a VLM (local directory or hub id) and wrap it in its architecture's adapter.

    Reads the config first (respecting HF_HUB_OFFLINE), dispatches on `config.model_type`.
    `dtype` is "fp32" | "bf16" | "fp16"; with `device_map` (e.g. "auto") accelerate places
    the model and `device` is ignored. A folder or id that cannot be loaded (no or a malformed
    config, an unsupported architecture, missing or damaged weights or tokenizer) is a one-line
    ``ModelError`` naming it.
    """
    resolve_dtype(dtype)  # a caller's mistake, not the model's: a plain ValueError, outside _loading
    with _loading(path_or_hub_id):
        config = AutoConfig.from_pretrained(str(path_or_hub_id), trust_remote_code=trust_remote_code)
        return adapter_class(config.model_type).from_pretrained(
            str(path_or_hub_id),
            dtype=dtype,
            device=device,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            config=config,
            attn_implementation=attn_implementation,
        )


def check_local_model(model: str) -> None:
    """A clear error for a missing local model directory (rather than a failed hub lookup): a
    path that exists, is absolute, has more than two parts (a hub id is ``org/name``) or starts
    with ``.``, ``..`` or ``models`` is a local one."""
    path = Path(model)
    parts = path.parts
    local = path.exists() or path.is_absolute() or len(parts) > 2 or (bool(parts) and parts[0] in (".", "..", "models"))
    if local and not path.is_dir():
        raise ModelNotFoundError(
            f"{model}: no such model directory. The toy models are built with "
            "`python -m hones.training.toy_models fit --config configs/toy/pretrain/<llava|qwen2_5_vl>.yaml`; "
            "or give another model directory or hub id"
        )


def load_module_adapter(module: Any, factory: Callable[[], VLMAdapter] | None = None) -> VLMAdapter:
    """The adapter a LightningModule's ``configure_model`` holds, in eval mode.

    ``factory()`` when given (tests, notebooks); else ``module.hparams.model`` (local directory
    or hub id) with the module's ``dtype`` and ``trust_remote_code``, loaded straight onto the
    process's own device: the strategy's root device (``cuda:<local rank>`` under DDP) once a
    Trainer is attached, else the module's device.
    """
    if factory is not None:
        adapter = factory()
    else:
        hp = module.hparams  # load_adapter names a missing local folder (check_local_model) before any hub lookup
        trainer = module._trainer  # None outside a Trainer (``module.trainer`` would raise)
        device = trainer.strategy.root_device if trainer is not None else module.device
        adapter = load_adapter(hp.model, dtype=hp.dtype, device=str(device), trust_remote_code=hp.trust_remote_code)
    adapter.model.eval()
    return adapter
