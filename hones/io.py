"""Atomic, pickle-free artifact I/O: JSON, JSON lines, markdown and safetensors.

Every writer goes through a temporary file in the target directory followed by
``os.replace``, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


def _default_file_mode() -> int:
    """0o666 minus the process umask: the mode ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_file_mode())  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write raw bytes (a PNG, say) to ``path`` atomically."""
    return _atomic_write_bytes(path, data)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return _atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON atomically; keys keep their insertion order."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a parse error names the file, line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


class OutputError(ValueError):
    """An output folder that cannot be created or written (one line naming it)."""


def limited_name(stem: str, limit: int | None, suffix: str = ".json") -> str:
    """``<stem><suffix>`` for a result on a whole split, ``<stem>_limit<N><suffix>`` for one on its
    first ``limit`` items: a quick limited rerun does not overwrite the whole split's file."""
    return f"{stem}{suffix}" if limit is None else f"{stem}_limit{limit}{suffix}"


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) and check that files can be written in it, before a
    long run whose results would otherwise be lost at the first write; ``OutputError`` if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except OSError as error:
        raise OutputError(f"{path}: cannot write results there ({error.strerror or error})") from None
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file's bytes (None when ``path`` is None or not a file).

    Remembered per (real path, size, modification time) within a process, so that a
    fingerprint computed at every stage reads a large annotation file once.
    """
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save

    payload = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return _atomic_write_bytes(path, _sorted_metadata(save(payload, metadata=dict(metadata) if metadata else None)))


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its ``__metadata__`` keys in sorted order.

    The safetensors library keeps metadata in a hash map, so its key order, and with it the
    file's bytes, changes from process to process; a seeded run must give identical files.
    The tensor entries and data are unchanged; the header is re-padded to 8 bytes.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" not in header:
        return blob
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU; a damaged or cut-short file is a
    one-line ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none); a damaged file is the
    one-line ``ValueError`` of ``load_tensors``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def markdown_table(header: list[str], rows: list[list[Any]], float_format: str = "{:.4f}") -> str:
    """Render a GitHub markdown table; floats are formatted with ``float_format``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
