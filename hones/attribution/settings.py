"""Settings of an attribution run (``analyze.py``), as dataclasses: the config schema.

One ``AnalyzeConfig`` describes HONES attribution of one model over one or more tasks:
critical heads (§2) and neuron importance (§3) on the discovery split, baseline
selections at the same budget, and masking verification (§4) on the test split.
``analyze.py`` builds it from YAML + command line with jsonargparse (the type hints are
the schema); tests build it directly.

Stage fingerprints (``stage_fingerprint``) are the settings each stage's result depends
on; ``state.json`` stores them so that a rerun skips finished stages only when they were
computed with the same settings. Runtime settings that do not change a result (up to
floating-point rounding) are left out: batch size, rows per forward, the layer rerun,
workers, trainer/devices, checkpoint period, progress bars.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hones.choices import TASKS, DType, MetricMode, SettingsError, Utility, check_limit
from hones.io import file_digest

if TYPE_CHECKING:
    from hones.data.datamodule import HonesDataModule

# neuron selections compared by masking (§4): HONES, the baselines, and the AP/MA/APE selections
METHODS = ("hones", "random", "activation", "write_in", "grad_x_act", "ap", "ma", "ape")
STAGES = ("heads", "neurons", "ape", "mask")


@dataclass
class DataSettings:
    """``HonesDataModule`` arguments shared by the discovery and test passes.

    Args:
        dataset: "coco_unified" (the paper's splits are image-disjoint COCO, §6).
        annotation_file: the unified JSON; image_root: its images.
        batch_size: items per batch (per device).
        num_workers: data-loading workers; seed: subsampling and retrieval-negative seed.
        lenient: skip and count bad records instead of stopping.
        cache_dir: the datamodule's parsed-annotation cache (None: none).
        toy_world: generate the toy world on first use, e.g. ``{"dir": "toyworld_data"}``
            (None: the annotation files must exist).
    """

    dataset: str = "coco_unified"
    annotation_file: str = "toyworld_data/coco/unified.json"
    image_root: str | None = "toyworld_data/coco/images"
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    lenient: bool = False
    cache_dir: str | None = None
    toy_world: dict[str, Any] | None = None


# HonesDataModule arguments a data-settings object gives when it has them (DataSettings: all).
DATA_MODULE_FIELDS = (
    "dataset",
    "annotation_file",
    "image_root",
    "seed",
    "batch_size",
    "num_workers",
    "lenient",
    "cache_dir",
    "toy_world",
)


def make_datamodule(data: Any, task: str, split: str, **arguments: Any) -> HonesDataModule:
    """A ``HonesDataModule`` of ``task`` on ``split`` (not set up) from a data-settings object.

    ``data`` (a ``DataSettings``, or another settings object such as the analysis
    ``DataConfig``) gives those of ``DATA_MODULE_FIELDS`` it has; the module's defaults
    stand for the others. ``arguments`` are the remaining ``HonesDataModule`` arguments
    (split_file, limit, n_neg, ...).
    """
    from hones.data.datamodule import HonesDataModule

    shared = {name: getattr(data, name) for name in DATA_MODULE_FIELDS if hasattr(data, name)}
    return HonesDataModule(**shared, task=task, split=split, **arguments)


@dataclass
class SplitSettings:
    """One split of a run.

    Args:
        split: "discovery" (heads and neurons, §2-3) or "test" (masking, §4).
        split_file: JSON list of image ids of the split.
        limit: at most this many images (seeded subsample; §6: discovery ≤ 5000, test ≤ 3000).
        retrieval_negatives: retrieval candidates per image besides the positive. On the
            test split: hard negatives ranked with the positive (§1: 49, NDCG@5). On the
            discovery split: negatives (target "No") kept beside the positive (target
            "Yes"); 0 = positives only, as §3 defines the retrieval target.
    """

    split: str = "discovery"
    split_file: str | None = None
    limit: int | None = None
    retrieval_negatives: int = 0


@dataclass
class HeadSettings:
    """Critical head localization (§2).

    Args:
        utility: "teacher_forced" (fast; log-probability of the target, Yes−No margin for
            retrieval) or "metric" (the paper's: the task metric of greedy generations).
        top_k: |H*| (None: §2's 30 for LLaVA, 25 for Qwen2.5-VL, capped at L·H).
        compare_utility: a second utility scored in the same pass, for the agreement
            report §2 asks for when the fast utility is used (None: skip).
        retrieval_negatives: hard negatives ranked with each discovery positive in the
            retrieval heads pass (None: ``discovery.retrieval_negatives``). The metric
            utility is NDCG@5 over those candidates, so it needs > 0; the teacher-forced
            margin counts a negative's margin sign-flipped. (The neuron pass keeps
            ``discovery.retrieval_negatives``: §3 attributes toward "Yes" on positives.)
        metric_mode, max_new_tokens: for the metric utility (§1: 24 tokens).
        rows_per_forward, rerun: exact speed-ups (items × heads per forward; rerun of
            layers ≥ l only).
    """

    utility: Utility = "teacher_forced"
    top_k: int | None = None
    compare_utility: Utility | None = None
    retrieval_negatives: int | None = None
    metric_mode: MetricMode = "paper"
    max_new_tokens: int = 24
    rows_per_forward: int = 64
    rerun: bool = True


@dataclass
class NeuronSettings:
    """Head-conditioned neuron attribution (§3) and the baselines' statistics (§4).

    Args:
        top_ratio: the budget, a global fraction of the L × I neurons (§3: 0.01).
        caption_idf: weight caption target tokens by their IDF over the discovery captions (§3).
        gradient_baseline: also accumulate gradient × activation (one backward per batch).
        baseline_seed: seed of the random baseline (same per-layer counts as HONES).
        rows_per_forward: items × heads per rerun (speed only).
    """

    top_ratio: float = 0.01
    caption_idf: bool = True
    gradient_baseline: bool = True
    baseline_seed: int = 0
    rows_per_forward: int = 64


@dataclass
class MaskingSettings:
    """Causal verification by masking on the test split (§4).

    Args:
        methods: selections to mask, among ``METHODS`` (each reported against the
            unmasked model on the same items).
        metric_mode: "paper" | "official" (docs/metrics.md).
        max_new_tokens: greedy generation budget (§1: 24).
    """

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    metric_mode: MetricMode = "paper"
    max_new_tokens: int = 24


@dataclass
class TrainerSettings:
    """The Lightning Trainer that runs every pass (``trainer.predict``).

    ``strategy: ddp`` with several ``devices`` splits the items over processes (an
    unrepeated sampler: each item counted once); accumulators are summed across them.
    Never use ``strategy: ddp`` inside pytest (ENV_NOTES).
    """

    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | None = None
    enable_progress_bar: bool = True


@dataclass
class AnalyzeConfig:
    """An attribution run of one model over tasks (see the module docstring).

    Args:
        model: hub id or local directory (``hones.models.load_adapter``).
        model_name: the run folder's name (default: the model path's last component).
        dtype: fp32 | bf16 | fp16; trust_remote_code: passed to the loader.
        tasks: tasks to run, a list or a comma-separated string ("vqa,ocr").
        task: a single task; overrides ``tasks`` when given (``--task ocr``).
        output_root: runs go to ``<output_root>/<model_name>/<task>/``.
        overwrite: recompute the requested stages even when ``state.json`` records them
            (with other settings too), and forget the stages that depend on them.
        checkpoint_every_n_batches: save the heads/neurons/masking accumulators this often so that
            an interrupted pass resumes mid-split (0: never).
        data, discovery, test, heads, neurons, masking, trainer: see their classes.
    """

    model: str = "models/toy-llava"
    model_name: str | None = None
    dtype: DType = "fp32"
    trust_remote_code: bool = False
    tasks: list[str] | str = field(default_factory=lambda: list(TASKS))
    task: str | None = None
    output_root: str = "runs/analyze"
    overwrite: bool = False
    checkpoint_every_n_batches: int = 50
    data: DataSettings = field(default_factory=DataSettings)
    discovery: SplitSettings = field(
        default_factory=lambda: SplitSettings("discovery", "toyworld_data/splits/discovery.json", None, 0)
    )
    test: SplitSettings = field(default_factory=lambda: SplitSettings("test", "toyworld_data/splits/test.json", None, 49))
    heads: HeadSettings = field(default_factory=HeadSettings)
    neurons: NeuronSettings = field(default_factory=NeuronSettings)
    masking: MaskingSettings = field(default_factory=MaskingSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_namespace(cls, namespace: Any) -> AnalyzeConfig:
        """The config from a parsed (and instantiated) jsonargparse namespace holding its fields
        (a field the parser left out, e.g. the scripts' ``overwrite``, keeps its default)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})

    # -- derived values -----------------------------------------------------------------
    def task_list(self) -> list[str]:
        """The tasks to run, in ``TASKS`` order of appearance as given."""
        if self.task:
            chosen = [self.task]
        elif isinstance(self.tasks, str):
            chosen = [t.strip() for t in self.tasks.split(",") if t.strip()]
        else:
            chosen = list(self.tasks)
        unknown = [t for t in chosen if t not in TASKS]
        if unknown or not chosen:
            raise SettingsError(f"tasks must be among {', '.join(TASKS)}; got {chosen or 'none'}")
        return list(dict.fromkeys(chosen))

    def name(self) -> str:
        """The model's run-folder name."""
        return self.model_name or Path(self.model.rstrip("/\\")).name

    def run_dir(self, task: str) -> Path:
        """``<output_root>/<model_name>/<task>``."""
        return Path(self.output_root) / self.name() / task

    def validate(self) -> None:
        """One-line SettingsErrors for settings that cannot work."""
        self.task_list()
        unknown = [m for m in self.masking.methods if m not in METHODS]
        if unknown:
            raise SettingsError(f"masking.methods must be among {', '.join(METHODS)}; got {unknown}")
        if "grad_x_act" in self.masking.methods and not self.neurons.gradient_baseline:
            raise SettingsError("masking.methods has grad_x_act but neurons.gradient_baseline is false")
        if not 0 < self.neurons.top_ratio <= 1:
            raise SettingsError(f"neurons.top_ratio must be in (0, 1]; got {self.neurons.top_ratio}")
        if self.heads.top_k is not None and self.heads.top_k < 1:
            raise SettingsError(f"heads.top_k must be >= 1 or null; got {self.heads.top_k}")
        if self.heads.retrieval_negatives is not None and self.heads.retrieval_negatives < 0:
            raise SettingsError("heads.retrieval_negatives must be >= 0 or null")
        if self.checkpoint_every_n_batches < 0:
            raise SettingsError("checkpoint_every_n_batches must be >= 0")
        for name, split in (("discovery", self.discovery), ("test", self.test)):
            if split.retrieval_negatives < 0:
                raise SettingsError(f"{name}.retrieval_negatives must be >= 0")
            check_limit(f"{name}.limit", split.limit)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON-able data (recorded in ``state.json``)."""
        return asdict(self)


# -- fingerprints ---------------------------------------------------------------------------
def _data_identity(config: AnalyzeConfig) -> dict[str, Any]:
    data = config.data
    return {
        "dataset": data.dataset,
        "annotation_file": os.path.normpath(data.annotation_file),
        "image_root": None if data.image_root is None else os.path.normpath(data.image_root),
        "seed": data.seed,
        "lenient": data.lenient,
        "data_files": {"annotation_file": file_digest(data.annotation_file)},  # a file regenerated at the same path differs
    }


def _split_identity(split: SplitSettings, task: str) -> dict[str, Any]:
    identity: dict[str, Any] = {
        "split": split.split,
        "split_file": None if split.split_file is None else os.path.normpath(split.split_file),
        "limit": split.limit,
        "data_files": {"split_file": file_digest(split.split_file)},
    }
    if task == "retrieval":  # the other tasks' items do not depend on it
        identity["retrieval_negatives"] = split.retrieval_negatives
    return identity


def heads_retrieval_negatives(config: AnalyzeConfig) -> int:
    """Negatives per positive in the retrieval heads pass (``heads.retrieval_negatives`` or the discovery's)."""
    value = config.heads.retrieval_negatives
    return config.discovery.retrieval_negatives if value is None else int(value)


FULL_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 64 << 10


def model_identity(model: str) -> str | None:
    """A content digest of a local model directory (None for a hub id: the id alone identifies it).

    SHA-256 over every file's name and size and its bytes: all of them for files up to
    64 MiB (configs, tokenizers, the toy models), 64 evenly spaced 64 KiB blocks of larger
    weight files (a retrained or replaced model changes them; reading 4 MiB per file keeps
    this instant for 7B checkpoints).
    """
    root = Path(model)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if size <= FULL_HASH_BYTES:
                digest.update(handle.read())
                continue
            for k in range(SAMPLE_BLOCKS):
                handle.seek(k * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
                digest.update(handle.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()


def stage_fingerprint(config: AnalyzeConfig, task: str, stage: str, identity: str | None = None) -> dict[str, Any]:
    """The settings a stage's result depends on (nested dict, JSON-able).

    ``stage``: "heads", "neurons", "ape" or "mask/<method>". Each includes its inputs'
    fingerprints, so a change upstream also shows as a mismatch downstream.
    ``identity``: ``model_identity(config.model)``, so that results of a model directory
    whose contents changed since are not reused.
    """
    head_settings = {k: v for k, v in asdict(config.heads).items() if k not in ("rows_per_forward", "rerun", "retrieval_negatives")}
    if task == "retrieval":
        head_settings["retrieval_negatives"] = heads_retrieval_negatives(config)
    heads = {
        "model": config.model,
        "model_identity": identity,
        "dtype": config.dtype,
        "task": task,
        "data": _data_identity(config),
        "discovery": _split_identity(config.discovery, task),
        "heads": head_settings,
    }
    if stage == "heads":
        return heads
    neurons = {**heads, "neurons": {k: v for k, v in asdict(config.neurons).items() if k != "rows_per_forward"}}
    if stage == "neurons":
        return neurons
    if stage == "ape":
        # APE normalises AP over the four tasks: every task's neurons stage, same settings
        return {**{k: v for k, v in neurons.items() if k != "task"}, "ape_tasks": list(TASKS)}
    if stage.startswith("mask/"):
        method = stage.split("/", 1)[1]
        upstream = stage_fingerprint(config, task, "ape", identity) if method == "ape" else neurons
        masking = {"metric_mode": config.masking.metric_mode, "max_new_tokens": config.masking.max_new_tokens}
        return {**upstream, "task": task, "method": method, "test": _split_identity(config.test, task), "masking": masking}
    raise ValueError(f"unknown stage {stage!r}")


# Fingerprint keys that came in after runs had been recorded: compared only where the stored
# record has them, so a record made before is reused as it was (the data files' digests). A
# digest recorded as null (the file did not exist yet, e.g. a toy world generated by that very
# run) is not compared either.
RECORDED_SINCE = ("data_files",)


def align_to_stored(stored: Any, current: Any, _within: bool = False) -> Any:
    """``current`` without the ``RECORDED_SINCE`` keys that ``stored`` lacks, at any depth, and
    with null where ``stored`` has null inside them."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return {
            k: align_to_stored(stored.get(k), v, _within or k in RECORDED_SINCE)
            for k, v in current.items()
            if k in stored or k not in RECORDED_SINCE
        }
    if _within and stored is None:
        return None
    return current


def matches_stored(stored: Any, current: Any) -> bool:
    """Whether a recorded fingerprint (or tag) is ``current``'s, as ``align_to_stored`` compares them."""
    return stored == align_to_stored(stored, current)


def fingerprint_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two fingerprints differ, as ``key: stored -> current``."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in stored:
                out.append(f"{name}: (absent) -> {current[key]!r}")
            elif key not in current:
                out.append(f"{name}: {stored[key]!r} -> (absent)")
            else:
                out.extend(fingerprint_differences(stored[key], current[key], name))
        return out
    return [] if stored == current else [f"{prefix or 'value'}: {stored!r} -> {current!r}"]
