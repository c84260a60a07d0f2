"""Keep a long CPU pass's resident memory flat: give freed heap memory back to the OS.

On Linux with glibc, a pass that frees many tensors of varying size (batches padded to
their own longest sequence, several masked forwards per batch) can grow the process's
resident memory without bound even though nothing stays referenced: glibc raises its
mmap threshold after large frees, so later tensors come from the heap, whose freed pages
it keeps. Masking 50,000 retrieval items with 10 selections in one pass on toy
Qwen2.5-VL grew to 13 GB within 37 minutes that way; on 2,000 items it ends at 1.1 GB
untrimmed against 0.6 GB trimmed, in the same time (``benchmarks/heap_growth.py``).
``malloc_trim(0)`` every few batches returns those pages. A fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_``) also stops the growth but doubled the pass's time here.
Elsewhere (macOS, musl, Windows) ``HeapTrim`` does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

DEFAULT_EVERY_N_BATCHES = 10


def _glibc_malloc_trim() -> Any:
    """glibc's ``malloc_trim`` or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _glibc_malloc_trim()


def resident_mib() -> float:
    """This process's resident memory (RSS) in MiB, from ``/proc`` (Linux only)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def trim_heap() -> bool:
    """Return the heap's free pages to the OS; False where glibc's ``malloc_trim`` is missing."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class HeapTrim(Callback):
    """Calls ``trim_heap`` after every ``every_n_batches``-th batch of every loop."""

    def __init__(self, every_n_batches: int = DEFAULT_EVERY_N_BATCHES) -> None:
        if every_n_batches < 1:
            raise ValueError(f"HeapTrim: every_n_batches must be >= 1, got {every_n_batches}")
        self.every_n_batches = every_n_batches

    def _maybe_trim(self, batch_idx: int) -> None:
        if (batch_idx + 1) % self.every_n_batches == 0:
            trim_heap()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._maybe_trim(batch_idx)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._maybe_trim(batch_idx)

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._maybe_trim(batch_idx)

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._maybe_trim(batch_idx)
