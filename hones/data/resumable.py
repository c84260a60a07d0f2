"""A training DataLoader that a Lightning ``fit`` resumed mid-epoch continues exactly.

Lightning saves a loader's ``state_dict()`` in each checkpoint and hands it back to
``load_state_dict()`` when ``fit(ckpt_path=...)`` restarts inside an epoch, before the
loader is iterated (the ``_Stateful`` protocol of Lightning's fit loop). ``ResumableLoader``
keeps there:

- ``batches`` and ``epoch_done``: the batches of the current epoch the model has trained
  on, and whether that ends the epoch (all of them, or Lightning's ``limit_train_batches``).
  The loader cannot tell what the Trainer has consumed, so it asks ``trained()``
  (``HonesDataModule`` passes the fit loop's processed-batch count);
- ``generator``: the state of the shuffling generator when the epoch began (one process:
  ``RandomSampler`` draws each epoch's permutation from it, so epoch 2's order depends on
  epoch 1 having drawn), and ``generator_after``, its state now (where the next epoch
  draws from when the saved epoch had ended);
- ``epoch``: the epoch of a sampler with ``set_epoch`` (Lightning's ``DistributedSampler``
  under DDP, which Lightning sets only after the resumed loader has been iterated);
- ``items``, ``batch_size``, ``processes``: a resume with other values stops with a
  ``LoaderLayoutError`` (the saved position would name other batches), e.g. a job requeued
  onto a node with another GPU count under ``devices: auto``.

The next pass after ``load_state_dict`` draws the same permutation and skips the batches
already trained on, by index (no item is loaded for them), or, when the saved epoch had
ended, starts the next epoch as the uninterrupted fit did. So the resumed fit trains on
the batches an uninterrupted one would have, in the same order.

The order is the one ``DataLoader(dataset, shuffle=True, generator=g)`` with
``num_workers=0`` gives a Lightning fit (it draws its workers' base seed from ``g`` before
each epoch's permutation), whatever ``num_workers`` is: ``ResumableBatchSampler`` makes
the generator's draws itself, at each epoch's start, and the loader is given a generator
of its own for the workers' seeds. (One exception: with ``limit_train_batches`` cutting
an epoch whose last batch is partial, that loader skips one draw that this one makes.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

STATE_KEYS = ("batches", "epoch_done", "generator", "generator_after", "epoch")
LAYOUT_KEYS = ("items", "batch_size", "processes")


class LoaderLayoutError(ValueError):
    """A resume whose training loader has other items, batch size or process count than the
    checkpoint's (one-line message for the command line)."""


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose next pass can start from a saved position.

    Same signature as ``BatchSampler`` (Lightning re-creates it around a
    ``DistributedSampler`` under DDP). ``resume_from(state)`` makes the next ``__iter__``
    restore the generator and the epoch, then skip the batches already trained on.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.epoch_start_generator: torch.Tensor | None = None
        self.pending: dict[str, Any] | None = None  # a loaded state the next pass has not used yet

    @property
    def generator(self) -> torch.Generator | None:
        """The sampler's shuffling generator (``RandomSampler``), if it has one."""
        return getattr(self.sampler, "generator", None)

    def resume_from(self, state: dict[str, Any]) -> None:
        """Make the next pass continue where ``state`` was saved (see the module docstring)."""
        self.pending = dict(state)

    def __iter__(self) -> Iterator[list[int]]:
        skip = 0
        if self.pending is not None:
            skip = self._restore(self.pending)
            self.pending = None
        generator = self.generator
        self.epoch_start_generator = None if generator is None else generator.get_state()
        if generator is not None:  # the base-seed draw of DataLoader(shuffle=True, generator=g), num_workers=0
            torch.empty((), dtype=torch.int64).random_(generator=generator)
        indices = self._epoch_indices()
        size = self.batch_size
        stop = len(indices) - len(indices) % size if self.drop_last else len(indices)
        for index, start in enumerate(range(0, stop, size)):
            if index >= skip:
                yield indices[start : start + size]

    def _epoch_indices(self) -> list[int]:
        """The epoch's indices, drawn whole at its start, so that the generator's draws do not depend
        on how far ahead the batches are fetched (DataLoader workers fetch past a Trainer's last batch).

        A ``RandomSampler`` (no replacement) draws ``randperm(n)`` and, once iterated past its end,
        one more for its empty remainder. A one-process loader whose batches are taken up to the
        last one, as Lightning takes them, gets there only to fill a last, partial batch; that
        draw is made here in that case, and only then."""
        sampler = self.sampler
        generator = self.generator
        n = len(sampler)  # type: ignore[arg-type]
        if isinstance(sampler, RandomSampler) and generator is not None and not sampler.replacement and n == len(sampler.data_source):
            order = torch.randperm(n, generator=generator).tolist()
            if not self.drop_last and n % self.batch_size:
                torch.randperm(n, generator=generator)
            return order
        return list(sampler)

    def _restore(self, state: dict[str, Any]) -> int:
        """Put the generator and the sampler's epoch where ``state`` says; the batches to skip."""
        generator, epoch = self.generator, state["epoch"]
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if state["epoch_done"]:  # the next epoch starts where the saved one left the generator
            if generator is not None and state["generator_after"] is not None:
                generator.set_state(state["generator_after"])
            if set_epoch is not None and epoch is not None:
                set_epoch(int(epoch) + 1)
            return 0
        if generator is not None and state["generator"] is not None:  # that epoch's order again
            generator.set_state(state["generator"])
        if set_epoch is not None and epoch is not None:
            set_epoch(int(epoch))
        return int(state["batches"])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableBatchSampler`` with Lightning's ``state_dict`` /
    ``load_state_dict``. ``trained()`` gives ``(batches, epoch_done)``: the batches of the
    current epoch trained on, and whether the epoch has ended."""

    def __init__(self, *args: Any, trained: Callable[[], tuple[int, bool]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError("ResumableLoader needs batch_sampler=ResumableBatchSampler(...)")
        self.trained = trained

    def __iter__(self) -> Any:
        # A pass begins here, but the batch sampler draws only at its first batch: a stop before
        # that batch must record where this pass will draw from, not where the previous one did.
        sampler = self.batch_sampler
        assert isinstance(sampler, ResumableBatchSampler)
        if sampler.pending is None and sampler.generator is not None:
            sampler.epoch_start_generator = sampler.generator.get_state()
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        """The position (``STATE_KEYS``) and the layout (``LAYOUT_KEYS``); see the module docstring."""
        sampler = self.batch_sampler
        assert isinstance(sampler, ResumableBatchSampler)
        if sampler.pending is not None:  # loaded, not iterated yet: still that position
            return dict(sampler.pending)
        if self.trained is None:
            raise RuntimeError("ResumableLoader.state_dict: no trained() count was given (HonesDataModule gives the fit loop's)")
        batches, epoch_done = self.trained()
        generator = sampler.generator
        return {
            **self.layout(),
            "batches": int(batches),
            "epoch_done": bool(epoch_done),
            "generator": sampler.epoch_start_generator,
            "generator_after": None if generator is None else generator.get_state(),
            "epoch": getattr(sampler.sampler, "epoch", None),
        }

    def layout(self) -> dict[str, int]:
        """What a saved position depends on: the items, the batch size and the processes sharing them."""
        sampler = self.batch_sampler
        assert isinstance(sampler, ResumableBatchSampler)
        return {
            "items": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": int(sampler.batch_size),
            "processes": int(getattr(sampler.sampler, "num_replicas", 1)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass resume the saved position; ``ValueError`` when the items, the batch size
        or the process count differ from the checkpoint's (the position would mean other batches)."""
        missing = [key for key in (*STATE_KEYS, *LAYOUT_KEYS) if key not in state]
        if missing:
            raise ValueError(f"ResumableLoader.load_state_dict: the checkpoint's loader state lacks {missing}")
        now = self.layout()
        changed = [f"{key}: {state[key]} -> {now[key]}" for key in LAYOUT_KEYS if state[key] != now[key]]
        if changed:
            raise LoaderLayoutError(
                "ResumableLoader.load_state_dict: the checkpoint's training loader had other "
                f"{', '.join(changed)}; resume with the same data and processes, or remove the checkpoint to start the fit over"
            )
        sampler = self.batch_sampler
        assert isinstance(sampler, ResumableBatchSampler)
        sampler.resume_from(state)
