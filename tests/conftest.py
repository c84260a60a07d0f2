"""Shared fixtures: tiny LLaVA and Qwen2.5-VL adapters (built once per session, offline)
and a small PIL image factory."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from hones.models import VLMAdapter, build_tiny_llava, build_tiny_qwen2_5_vl, wrap_model

ARCHS = ("llava", "qwen2_5_vl")

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
# threads' spin-waits made the suite ~10x slower. OMP_NUM_THREADS, when set, wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a whole test module, restored after; a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` (it also wins over OMP_NUM_THREADS)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    """For tests that send themselves SIGTERM: the process's SIGTERM handler is put back after."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def tiny_llava() -> VLMAdapter:
    """A ~1M-parameter LLaVA-architecture adapter (random weights, seed 0)."""
    model, processor = build_tiny_llava(seed=0)
    return wrap_model(model, processor, name="tiny-llava")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl() -> VLMAdapter:
    """A ~1M-parameter Qwen2.5-VL-architecture adapter (random weights, seed 0)."""
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    return wrap_model(model, processor, name="tiny-qwen2_5_vl")


@pytest.fixture(params=ARCHS)
def adapter(request: pytest.FixtureRequest) -> VLMAdapter:
    """Each tiny architecture in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def make_image() -> Callable[..., Image.Image]:
    """make_image(seed, size=(width, height)) -> a random RGB PIL image with a coloured box."""

    def make(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
        rng = np.random.default_rng(seed)
        width, height = size
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        top, left = rng.integers(0, max(1, height // 2)), rng.integers(0, max(1, width // 2))
        pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, size=3)
        return Image.fromarray(pixels)

    return make
