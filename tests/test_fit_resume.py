"""A steering fit stopped mid-epoch resumes to the scales of an uninterrupted fit.

``hones.data.resumable`` (the training loader's position) + ``hones.steering.resume``
(``FitCheckpoint``) + the lazily sized schedule of ``SteeringModule``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import RandomSampler

from hones.attribution.bank import BankEntry, write_bank
from hones.data.datamodule import HonesDataModule
from hones.data.resumable import LoaderLayoutError, ResumableBatchSampler, ResumableLoader
from hones.data.toyworld import ToyWorldConfig, generate_world
from hones.models import build_tiny_llava, wrap_model
from hones.steering.module import SteeringModule, cosine_decay_factor, lazy_cosine_decay
from hones.steering.resume import FitCheckpoint


# -- the loader alone -------------------------------------------------------------------------
def _loader(n: int = 10, seed: int = 0, trained: Any = None, workers: int = 0) -> ResumableLoader:
    """``n`` items in batches of 3 (4 batches for n = 10 or 12), built as HonesDataModule builds it."""
    shuffle = ResumableBatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(seed)), 3, False)
    return ResumableLoader(
        range(n), batch_sampler=shuffle, generator=torch.Generator().manual_seed(seed), trained=trained,
        num_workers=workers, persistent_workers=workers > 0,
    )  # fmt: skip


def _epochs(loader: ResumableLoader, epochs: int, limit: int = 4) -> list[list[int]]:
    """The first ``limit`` batches of each of ``epochs`` passes (Lightning's limit_train_batches)."""
    out = []
    for _ in range(epochs):
        iterator = iter(loader)
        out += [next(iterator).tolist() for _ in range(limit)]
    return out


@pytest.mark.parametrize("n", [10, 12])  # a last batch of 1, a full last batch
@pytest.mark.parametrize("limit", [4, 2])  # batches taken per epoch (Lightning's limit_train_batches)
def test_loader_order_is_dataloader_shuffle_order(n: int, limit: int) -> None:
    """The order of DataLoader(shuffle=True, generator=g, num_workers=0) taken as Lightning takes
    it (no batch past the epoch's limit), for any num_workers; the documented exception is a
    limit that cuts an epoch with a partial last batch."""
    plain = torch.utils.data.DataLoader(range(n), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0))
    reference = _epochs(plain, 3, limit)  # type: ignore[arg-type]
    orders = [_epochs(_loader(n, workers=workers), 3, limit) for workers in (0, 1)]
    assert orders[0] == orders[1]
    assert (orders[0] == reference) is not (limit < 4 and n % 3 != 0)


@pytest.mark.parametrize("n", [10, 12])  # a last batch of 1, a full last batch
@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("ahead", [0, 1])  # batches fetched past the trained ones (Lightning: 0 for a sized loader)
@pytest.mark.parametrize("epoch, trained, limit", [(0, 0, 4), (0, 2, 4), (1, 1, 4), (0, 4, 4), (1, 4, 4), (1, 2, 2), (0, 1, 2)])
def test_loader_resumes_at_the_saved_batch(n: int, workers: int, ahead: int, epoch: int, trained: int, limit: int) -> None:
    """Saved after ``trained`` batches of epoch ``epoch``, with ``limit`` batches per epoch
    (``limit_train_batches``; trained == limit: at the epoch's end)."""
    reference = _epochs(_loader(n, workers=workers), 3, limit)
    first = _loader(n, trained=lambda: (trained, trained >= limit), workers=workers)
    _epochs(first, epoch, limit)
    iterator = iter(first)
    for _ in range(min(trained + ahead, limit)):  # never past the epoch's limit
        next(iterator)
    state = first.state_dict()
    second = _loader(n, seed=99, workers=workers)  # the order comes from the state, not from the configured seed
    second.load_state_dict(state)
    assert second.state_dict() == state  # loaded, not iterated yet
    resumed = []
    if trained < limit:  # the rest of the saved epoch, then one more
        rest = iter(second)
        resumed = [next(rest).tolist() for _ in range(limit - trained)]
    resumed += _epochs(second, 1, limit)
    done = epoch * limit + trained
    assert resumed == reference[done : done + len(resumed)] and len(resumed) == 2 * limit - trained


def test_loader_refuses_another_layout() -> None:
    state = _loader(trained=lambda: (1, False)).state_dict()
    assert (state["items"], state["batch_size"], state["processes"]) == (10, 3, 1)
    with pytest.raises(LoaderLayoutError, match=r"other items: 10 -> 12; resume with the same data and processes, or remove the checkpoint"):
        _loader(12).load_state_dict(state)


def test_loader_state_errors() -> None:
    with pytest.raises(RuntimeError, match="no trained\\(\\) count"):
        _loader().state_dict()
    with pytest.raises(ValueError, match="lacks \\['epoch'\\]"):
        _loader().load_state_dict(
            {"batches": 1, "epoch_done": False, "generator": None, "generator_after": None, "items": 10, "batch_size": 3, "processes": 1}
        )
    with pytest.raises(TypeError, match="ResumableBatchSampler"):
        ResumableLoader(range(4), batch_size=2)


def test_lazy_cosine_reads_the_length_once() -> None:
    calls: list[int] = []
    factor = lazy_cosine_decay(lambda: calls.append(1) or 10, 0.1)
    assert factor(0) == 1.0 and not calls
    assert [factor(s) for s in (5, 10)] == [cosine_decay_factor(5, 10), cosine_decay_factor(10, 10)]
    assert calls == [1]
    with pytest.raises(ValueError, match="needs a length"):
        lazy_cosine_decay(lambda: float("inf"))(1)


# -- a steering fit, stopped and resumed ------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fit_resume")
    generate_world(root / "world", ToyWorldConfig(n_train=4, n_discovery=4, n_dev=10, n_test=4, n_ood=4))
    model, processor = build_tiny_llava(seed=0)
    entries = [BankEntry(layer, neuron, 1.0, 0) for layer in range(4) for neuron in range(0, 64, 8)]
    bank = write_bank(root / "bank.json", [BankEntry(e.layer, e.neuron, e.score, k) for k, e in enumerate(entries)])
    return {"root": root, "adapter": wrap_model(model, processor), "bank": bank}


class StopAt(L.Callback):
    """After training batch ``batch`` of epoch ``epoch`` (0-based): SIGTERM to this process
    (``crash`` False), or an error (``crash`` True: no save on the way out)."""

    def __init__(self, epoch: int, batch: int, crash: bool = False) -> None:
        self.epoch, self.batch, self.crash = epoch, batch, crash

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            if self.crash:
                raise RuntimeError("stopped by the test")
            os.kill(os.getpid(), signal.SIGTERM)


class Seen(L.Callback):
    """The uids of every trained batch, in order."""

    def __init__(self) -> None:
        self.uids: list[list[str]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.uids.append([item.uid for item in batch["items"]])


def _fit(
    world: dict[str, Any], out: Path, callbacks: list[L.Callback], ckpt_path: str | None = None, **trainer: Any
) -> SteeringModule:
    root = world["root"] / "world"
    data = HonesDataModule(
        dataset="coco_unified", task="vqa", annotation_file=str(root / "coco/unified.json"),
        image_root=str(root / "coco/images"), split="dev", split_file=str(root / "splits/dev.json"),
        training=True, batch_size=2, seed=3,
    )  # fmt: skip
    module = SteeringModule(
        model="tiny", task="vqa", bank=str(world["bank"]), lr=0.05, output_dir=str(out), adapter_factory=lambda: world["adapter"]
    )
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, max_epochs=2,
        accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=callbacks,
    )  # fmt: skip
    L.Trainer(**{**options, **trainer}).fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "stops, every_n_steps, keep",
    [
        ([(0, 1, False)], 0, True),  # after the first optimiser step of epoch 1
        ([(1, 2, False)], 0, True),  # inside an accumulation window of epoch 2: the state after its first step
        ([(1, 2, False)], 0, False),  # the same without the kept step state: resumes from epoch 1's end
        ([(1, 3, False)], 0, True),  # epoch 2, after its second step
        ([(1, 3, False)], 0, False),  # the same without the kept step state: saved at the SIGTERM
        ([(0, 4, False)], 0, True),  # after epoch 1's last batch
        ([(0, 1, False), (0, 2, False), (1, 1, False)], 0, True),  # stopped three times, once inside a window
        ([(1, 2, True)], 1, True),  # an error in a window: the periodic save one batch before
        ([(1, 2, True)], 0, True),  # an error in a window, no periodic save: the kept step state
        ([(0, 3, False)], 4, True),  # limit_train_batches 4: after epoch 1's last batch
        ([(1, 1, False)], 4, True),  # limit_train_batches 4: epoch 2, after its first step
    ],
)
def test_stopped_fit_resumes_to_the_same_scales(
    world: dict[str, Any], tmp_path: Path, sigterm_restored: None, stops: list[tuple[int, int, bool]], every_n_steps: int, keep: bool
) -> None:
    """10 dev items, batch 2, accumulation 2, 2 epochs: 5 batches and 3 optimiser steps per
    epoch (every_n_steps 4: limit_train_batches 4, 2 steps, no periodic save). The batches
    trained before each stop (up to its checkpoint) and after the last resume are the
    uninterrupted fit's, and so are the scales."""
    limit = {"limit_train_batches": 4} if every_n_steps == 4 else {}
    per_epoch = 4 if limit else 5
    full_seen = Seen()
    full = _fit(world, tmp_path / "full", [full_seen], **limit)
    ckpt = FitCheckpoint(tmp_path / "ckpt", every_n_steps=every_n_steps)
    trained: list[list[str]] = []
    resume_from: str | None = None
    for epoch, batch, crash in stops:
        seen = Seen()
        with pytest.raises(RuntimeError if crash else SystemExit):  # Lightning exits on SIGTERM
            _fit(world, tmp_path / "stopped", [FitCheckpoint(ckpt.dirpath, every_n_steps, keep_step_state=keep),
                 StopAt(epoch, batch, crash), seen], ckpt_path=resume_from, **limit)  # fmt: skip
        assert ckpt.path.is_file() and not list(ckpt.dirpath.glob(".*partial"))
        saved = torch.load(ckpt.path, weights_only=True)
        assert set(saved["state_dict"]) <= {"scaler.s"} | {f"scaler.index_{l}" for l in range(4)}  # no VLM weight
        position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"]
        done_before = per_epoch * saved["epoch"] + position - len(trained)  # this run's share of the saved batches
        trained += seen.uids[:done_before]
        resume_from = str(ckpt.path)
    if len(stops) == 1:
        (stop,) = stops
        expected = {(0, 1): (0, 2), (1, 2): (1, 2) if keep else (0, 5), (1, 3): (1, 4), (0, 4): (0, 5), (0, 3): (0, 4), (1, 1): (1, 2)}
        assert (saved["epoch"], position) == expected[stop[:2]]
    resumed_seen = Seen()
    resumed = _fit(world, tmp_path / "resumed", [FitCheckpoint(ckpt.dirpath, every_n_steps), resumed_seen],
                   ckpt_path=resume_from, **limit)  # fmt: skip
    assert trained + resumed_seen.uids == full_seen.uids
    assert torch.equal(resumed.scaler.s, full.scaler.s)
    assert not torch.equal(full.scaler.s, torch.zeros_like(full.scaler.s))


class StopInValidation(L.Callback):
    """SIGTERM to this process after a validation batch (the sanity check's too)."""

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "sanity check"])
def test_a_new_fit_removes_an_earlier_checkpoint(world: dict[str, Any], tmp_path: Path, sigterm_restored: None, when: str) -> None:
    """A fit not resumed from the folder's last.ckpt removes it once it has started (the sanity
    check, else the training), so a stop before its own first save leaves nothing to resume by
    mistake; the warning says so."""
    ckpt = FitCheckpoint(tmp_path / "ckpt", every_n_steps=0)
    ckpt.dirpath.mkdir()
    ckpt.path.write_bytes(b"an earlier fit's checkpoint")
    if when == "training":  # after batch 1 of an accumulation window of 2
        stop, options = StopAt(0, 0), {}
    else:
        stop, options = StopInValidation(), {"num_sanity_val_steps": 1, "limit_val_batches": 1}
    # pytest.warns outside pytest.raises: an exception leaving pytest.warns skips its check
    with pytest.warns(UserWarning, match="saved no checkpoint yet, so a rerun starts over"), pytest.raises(SystemExit):
        _fit(world, tmp_path / "out", [ckpt, stop], **options)
    assert not ckpt.path.exists()


@pytest.mark.slow
def test_sigterm_during_validation_in_fit_warns(world: dict[str, Any], tmp_path: Path, sigterm_restored: None) -> None:
    """The epoch-end validation is not saved: the warning names what a resume does instead."""
    ckpt = FitCheckpoint(tmp_path / "ckpt", every_n_steps=0)
    with pytest.warns(UserWarning, match="during validation in epoch 0; a resume continues the training after this validation"), pytest.raises(SystemExit):
        _fit(world, tmp_path / "out", [ckpt, StopInValidation()], limit_val_batches=2)
    assert torch.load(ckpt.path, weights_only=True)["epoch"] == 0  # the save after epoch 1's last batch


def test_a_fit_tag_from_before_the_digests_resumes(tmp_path: Path) -> None:
    """A checkpoint tagged without data digests, or with null ones (a toy world the fit generated),
    resumes; a recorded digest that differs is refused, naming the file."""
    import json
    from types import SimpleNamespace

    from hones.steering.resume import TAG_KEY, ResumeSettingsError

    now = {"data": {"seed": 0}, "data_files": {"annotation_file": "a1", "split_file": "s1"}}
    callback, trainer = FitCheckpoint(tmp_path, 10, tag=now), SimpleNamespace(ckpt_path="last.ckpt")
    callback.on_load_checkpoint(trainer, None, {TAG_KEY: json.dumps({"data": {"seed": 0}})})
    callback.on_load_checkpoint(trainer, None, {TAG_KEY: json.dumps({**now, "data_files": {"annotation_file": None, "split_file": None}})})
    with pytest.raises(ResumeSettingsError, match=r"split_file: 's0' -> 's1'"):
        callback.on_load_checkpoint(trainer, None, {TAG_KEY: json.dumps({**now, "data_files": {"annotation_file": "a1", "split_file": "s0"}})})
