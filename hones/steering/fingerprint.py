"""What a steering fit's result depends on, as JSON data: the settings fingerprints.

``train.py compare`` records each method's row with its fingerprint (``Comparison.method_fingerprint``)
and tags each trained method's resume checkpoint with it; ``train.py fit`` tags its resume
checkpoint with ``fit_fingerprint``, and a resume with other settings stops with one line
naming them (``FitCheckpoint``). Settings known not to change a result are left out (a
logger, a progress bar, the loader's worker count; for a fit, its validation settings), so
changing them keeps a row or a resume.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hones.attribution.settings import model_identity
from hones.io import file_digest

# Settings no result depends on (left out of every fingerprint) ...
UNUSED_MODEL_KEYS = ("output_dir", "stats_threshold", "adapter_factory")
UNUSED_DATA_KEYS = ("num_workers",)
UNUSED_TRAINER_KEYS = ("logger", "enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir", "enable_checkpointing")
# ... settings only the trained methods use ...
TRAINING_MODEL_KEYS = ("beta", "l2_weight", "lr", "min_lr_ratio", "weight_decay", "random_seed")
TRAINING_TRAINER_KEYS = (
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "limit_train_batches", "limit_val_batches", "val_check_interval",
    "check_val_every_n_epoch", "num_sanity_val_steps", "reload_dataloaders_every_n_epochs",
)  # fmt: skip
# Trainer settings of in-fit validation and profiling only: they do not change a fit's scales.
VALIDATION_TRAINER_KEYS = (
    "limit_val_batches", "val_check_interval", "num_sanity_val_steps", "check_val_every_n_epoch", "limit_test_batches",
    "limit_predict_batches", "profiler",
)  # fmt: skip
# The process count: evaluation gives the 1-process numbers on any number of processes
# (docs/distributed.md), while a fit's global batch grows with it.
PROCESS_TRAINER_KEYS = ("devices", "num_nodes", "strategy", "sync_batchnorm")
# ... and what the base model (no steering) does not use either.
STEERING_MODEL_KEYS = ("bank", "scales", "random_neurons", "init_scale", "scale_bound")
# Path settings, compared after os.path.normpath ("./a/b" is "a/b").
# The data files whose contents a result depends on (their digests are part of the fingerprints).
DATA_FILE_KEYS = ("annotation_file", "split_file")
PATH_KEYS = ("model", "bank", "scales", "annotation_file", "image_root", "split_file", "cache_dir", "test_split_file", "dev_split_file")


def plain(namespace: Any) -> dict[str, Any]:
    """A jsonargparse ``Namespace`` (or a mapping) as a dict."""
    return namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def normalised_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the path values of ``PATH_KEYS`` normalised (nested dicts too), without
    jsonargparse's ``__path__`` entries (the file a section came from, not a setting)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(key, str) and key.startswith("__"):
            continue
        if isinstance(value, dict):
            value = normalised_paths(value)
        elif key in PATH_KEYS and isinstance(value, str) and value:
            value = os.path.normpath(value)
        out[key] = value
    return out


def data_files(data: dict[str, Any], keys: tuple[str, ...] = DATA_FILE_KEYS) -> dict[str, str | None]:
    """Digests of a data section's files (``annotation_file``, ``split_file``): a file regenerated
    at the same path is another input."""
    return {key: file_digest(data.get(key)) for key in keys}


def without(settings: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}


def fit_fingerprint(model: dict[str, Any], data: dict[str, Any], trainer: dict[str, Any], seed: Any) -> dict[str, Any]:
    """The settings one ``train.py fit`` depends on: the ``SteeringModule``, ``HonesDataModule``
    and ``Trainer`` arguments (less ``UNUSED_*``, ``VALIDATION_TRAINER_KEYS`` and the trainer's
    callbacks, which a resume may add or drop: monitors, a stop), digests of the model folder,
    bank, scales, annotation and split files, and the seed."""
    model = without(model, UNUSED_MODEL_KEYS)
    steers = model.get("steer", True)
    return jsonable(
        normalised_paths(
            {
                "model": model,
                "model_identity": model_identity(str(model["model"])),
                "bank_digest": file_digest(model.get("bank")) if steers else None,
                "scales_digest": file_digest(model.get("scales")) if steers else None,
                "data": without(data, UNUSED_DATA_KEYS),
                "data_files": data_files(data),
                "trainer": without(trainer, (*UNUSED_TRAINER_KEYS, *VALIDATION_TRAINER_KEYS, "callbacks")),
                "seed": seed,
            }
        )
    )
