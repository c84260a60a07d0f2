"""``HonesDataModule``: one (dataset, task, split) as a LightningDataModule of TaskItems.

The batches are encoded by the model adapter (docs/INTERFACES.md ``encode(images, prompts,
targets=None)``), which the module receives through :meth:`HonesDataModule.set_encoder`.
A batch is the encoder's dict of tensors plus ``"items"``: the batch's TaskItems (with
their images loaded), for metrics, groups and labels.

Distributed evaluation: when ``torch.distributed`` is initialised with more than one
process, the validation / test / predict loaders shard the items with Lightning's
``UnrepeatedDistributedSampler`` (rank r gets items r, r + W, r + 2W, ...). Unlike the
default ``DistributedSampler`` it never pads with duplicates, so every item is counted
exactly once and ranks may run one batch more or less than each other; metrics must
therefore synchronise once at epoch end (torchmetrics ``compute``), never inside a step.
Lightning keeps a sampler that is already a ``DistributedSampler``, so this works with
``Trainer(use_distributed_sampler=True)`` (the default) as well as ``False`` (what the
evaluation configs set, docs/distributed.md). Training keeps Lightning's shuffling sampler,
in a loader that a ``fit`` resumed mid-epoch continues exactly (``hones.data.resumable``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from hones.choices import SettingsError, Task, check_limit
from hones.data.errors import SkipReport
from hones.data.formats import DATASETS, load_records
from hones.data.records import SourceRecord, TaskItem, load_image
from hones.data.resumable import ResumableBatchSampler, ResumableLoader
from hones.data.tasks import N_NEGATIVES, TASKS, TRAIN_NEGATIVES, build_task_items
from hones.data.toyworld import ToyWorldConfig, ensure_world

Encoder = Callable[..., dict[str, torch.Tensor]]


class TaskItemDataset(Dataset[TaskItem]):
    """TaskItems whose ``image`` is loaded (RGB, OCR box drawn) on access.

    A few recently loaded images are kept, since retrieval candidates of one image follow
    each other.
    """

    def __init__(self, items: Sequence[TaskItem], cache_size: int = 4) -> None:
        self.items = list(items)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, ...], Image.Image] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TaskItem:
        item = self.items[index]
        key = (item.image if isinstance(item.image, str) else id(item.image), getattr(item, "box", None))
        image = self._cache.get(key)
        if image is None:
            image = load_image(item)
            self._cache[key] = image
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return TaskItem(
            uid=item.uid,
            task=item.task,
            image=image,
            prompt=item.prompt,
            target=item.target,
            references=list(item.references),
            group=item.group,
            label=item.label,
        )


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised default process group; ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def evaluation_sampler(dataset: Dataset[Any]) -> Sampler[int] | None:
    """The sampler of an evaluation loader: unrepeated sharding across processes, else None (in order).

    Raises ``SettingsError`` when there are fewer items than processes: a process without a
    batch would skip the epoch-end synchronisation and leave the others waiting.
    """
    world_size, rank = distributed_world()
    if world_size == 1:
        return None
    size = len(dataset)  # type: ignore[arg-type]
    if size < world_size:
        raise SettingsError(
            f"{size} evaluation item(s) for {world_size} processes: every process needs at least one item "
            "(use fewer processes or more items)"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)


class TaskCollate:
    """Collate TaskItems with ``encoder(images, prompts, targets=None)``; adds ``"items"``."""

    def __init__(self, encoder: Encoder, with_targets: bool) -> None:
        self.encoder = encoder
        self.with_targets = with_targets

    def __call__(self, items: list[TaskItem]) -> dict[str, Any]:
        images = [item.image for item in items]
        prompts = [item.prompt for item in items]
        targets = [item.target for item in items] if self.with_targets else None
        batch = dict(self.encoder(images, prompts, targets=targets))
        batch["items"] = list(items)
        return batch


class HonesDataModule(LightningDataModule):
    """One (dataset, task, split) of HONES as TaskItem batches.

    Hooks: ``prepare_data`` (generate the toy world when ``toy_world`` is set),
    ``setup`` (load + validate annotations, build the task view),
    ``train_dataloader`` (shuffled, seeded), ``val_dataloader`` / ``test_dataloader`` /
    ``predict_dataloader`` (in order; without duplicates across processes, see the module
    docstring).

    Args:
        dataset: "coco_unified" | "gqa" | "textvqa" | "flickr30k".
        annotation_file: the dataset's annotation file (see ``hones.data.formats``).
        task: "vqa" | "ocr" | "caption" | "retrieval".
        split: the HONES split these items form ("train", "discovery", "dev", "test").
        image_root: folder of the images (None: paths from the annotations, not checked).
        split_file: JSON list of image ids to keep.
        limit, seed: seeded subsample of at most ``limit`` records (images or questions).
        training: training items (retrieval: positive + ``train_negatives`` negatives);
            default ``split == "train"``.
        with_targets: pass targets to the encoder (labels for teacher forcing); default
            ``training``.
        lenient: skip and count bad items instead of raising (see ``skips``).
        toy_world: generate the toy world on first use (``prepare_data``): ``{"dir": folder}``
            plus any ``hones.data.toyworld.ToyWorldConfig`` field (seed, n_test, ...); the
            annotation paths should then point inside that folder. None: data must exist.
    """

    def __init__(
        self,
        dataset: str,
        annotation_file: str,
        task: Task,
        split: str = "test",
        image_root: str | None = None,
        split_file: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        lenient: bool = False,
        training: bool | None = None,
        with_targets: bool | None = None,
        n_neg: int = N_NEGATIVES,
        train_negatives: int = TRAIN_NEGATIVES,
        verify_images: bool = False,
        source_split: str | None = None,
        cache_dir: str | None = None,
        toy_world: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise SettingsError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
        if task not in TASKS:
            raise SettingsError(f"unknown task {task!r}; expected one of {TASKS}")
        if source_split is not None and dataset != "flickr30k":
            raise SettingsError("source_split applies to flickr30k only")
        check_limit("data.limit", limit)
        if toy_world is not None and "dir" not in toy_world:
            raise SettingsError("toy_world needs a 'dir' entry (the toy world folder), e.g. {dir: toyworld_data}")
        self.save_hyperparameters()
        self.training = split == "train" if training is None else training
        self.with_targets = self.training if with_targets is None else with_targets
        self.skips = SkipReport(annotation_file)
        self.records: list[SourceRecord] | None = None
        self.items: list[TaskItem] | None = None
        self._encoder: Encoder | None = None

    def set_encoder(self, encoder: Encoder) -> None:
        """Give the batch encoder (the model adapter's ``encode``)."""
        self._encoder = encoder

    def prepare_data(self) -> None:
        """Generate the toy world when ``toy_world`` asks for it and it is absent (one process per node)."""
        if self.hparams.toy_world is None:
            return
        settings = dict(self.hparams.toy_world)
        ensure_world(settings.pop("dir"), ToyWorldConfig(**settings))

    def _loader_options(self) -> dict[str, Any]:
        hp = self.hparams
        options: dict[str, Any] = dict(
            split_file=hp.split_file,
            limit=hp.limit,
            seed=hp.seed,
            lenient=hp.lenient,
            verify_images=hp.verify_images,
            skips=self.skips,
        )
        if hp.dataset != "gqa":
            options["cache_dir"] = hp.cache_dir
        if hp.dataset == "coco_unified":
            options["tasks"] = (hp.task,)
        if hp.dataset == "flickr30k":
            options["source_split"] = hp.source_split
        return options

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the annotations, then build the task view (once)."""
        if self.items is not None:
            return
        hp = self.hparams
        self.records = load_records(hp.dataset, hp.annotation_file, hp.image_root, **self._loader_options())
        self.items = build_task_items(
            self.records,
            hp.task,
            hp.split,
            training=self.training,
            seed=hp.seed,
            n_neg=hp.n_neg,
            train_negatives=hp.train_negatives,
        )

    @property
    def dataset(self) -> TaskItemDataset:
        """The TaskItem dataset (after ``setup``)."""
        if self.items is None:
            raise RuntimeError("HonesDataModule: call setup() first")
        return TaskItemDataset(self.items)

    def collate(self) -> TaskCollate:
        """The batch collate; needs :meth:`set_encoder` first."""
        if self._encoder is None:
            raise RuntimeError("HonesDataModule: no encoder; call set_encoder(adapter.encode) first")
        return TaskCollate(self._encoder, self.with_targets)

    def _loader(self, shuffle: bool) -> DataLoader[TaskItem]:
        """Training (``shuffle``): seeded shuffling, sharded by Lightning, resumable mid-epoch
        (:class:`~hones.data.resumable.ResumableLoader`). Evaluation: in order, sharded without
        duplicates by :func:`evaluation_sampler` when distributed."""
        hp = self.hparams
        dataset = self.dataset
        common: dict[str, Any] = dict(
            num_workers=hp.num_workers, collate_fn=self.collate(), persistent_workers=hp.num_workers > 0
        )
        if not shuffle:
            return DataLoader(dataset, batch_size=hp.batch_size, sampler=evaluation_sampler(dataset), **common)
        # the order DataLoader(shuffle=True, generator=g, num_workers=0) gives, for any num_workers,
        # from a batch sampler that can resume (the workers' seeds come from a generator of their own)
        shuffle_generator = torch.Generator().manual_seed(hp.seed)
        batches = ResumableBatchSampler(RandomSampler(dataset, generator=shuffle_generator), hp.batch_size, drop_last=False)
        return ResumableLoader(
            dataset, batch_sampler=batches, generator=torch.Generator().manual_seed(hp.seed), trained=self._trained_batches,
            **common,
        )  # fmt: skip

    def _trained_batches(self) -> tuple[int, bool]:
        """The batches of the current epoch the attached Trainer's fit loop has processed, and
        whether they end the epoch (all of them, or ``limit_train_batches``)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            raise RuntimeError("HonesDataModule: the training loader's position is only known inside Trainer.fit")
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return processed, processed >= trainer.num_training_batches

    def train_dataloader(self) -> DataLoader[TaskItem]:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader[TaskItem]:
        return self._loader(shuffle=False)

    def test_dataloader(self) -> DataLoader[TaskItem]:
        return self._loader(shuffle=False)

    def predict_dataloader(self) -> DataLoader[TaskItem]:
        return self._loader(shuffle=False)
