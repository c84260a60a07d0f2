"""Which model a neuron bank was selected on, or learned scales learned on.

A bank file is (layer, neuron, score, rank) rows and names no model, so a bank of one model
fits any model of the same layer count and FFN width: the toy LLaVA and Qwen2.5-VL are both
4 × 352, and LLaVA-1.5-7B's bank fits any Llama-2-7B-shaped model. A bank that ``analyze.py``
wrote is recorded in the ``state.json`` beside it, with the model and its content digest;
:func:`check_bank_model` refuses it for another model. A bank the run did not write (edited,
or made elsewhere) carries no such record and is taken as it is. Likewise the metadata of a
``scales.safetensors`` that ``train.py`` exports records the model (``check_scales_model``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hones import io
from hones.attribution.bank import BankError


def bank_origin(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"model", "model_identity", "state"}`` of the analyze run that wrote the bank at ``path``:
    from the ``state.json`` in its folder, when the neurons or APE stage recorded this very file
    (its SHA-256 digest); None for any other bank."""
    bank = Path(path)
    state_path = bank.parent / "state.json"
    if not bank.is_file() or not state_path.is_file():
        return None
    try:
        state = io.read_json(state_path)
    except ValueError as error:
        raise BankError(f"{bank}: the run record beside it is damaged ({error})") from error
    stages = state.get("stages") if isinstance(state, dict) else None
    digest = io.file_digest(bank)
    for stage in ("neurons", "ape"):
        record = (stages or {}).get(stage) or {}
        if digest in ((record.get("info") or {}).get("bank_digests") or {}).values():
            fingerprint = record.get("fingerprint") or {}
            return {"model": fingerprint.get("model"), "model_identity": fingerprint.get("model_identity"), "state": state_path}
    return None


def check_bank_model(path: str | os.PathLike, model: str) -> None:
    """A one-line BankError when the bank at ``path`` was selected by an analyze run of another
    model than ``model`` (a hub id or a local folder)."""
    origin = bank_origin(path)
    if origin is not None and origin["model"] is not None:
        record = Origin(f"{path}: selected on", str(origin["state"]), str(origin["model"]), origin["model_identity"], "a bank")
        check_same_model(record, model)


def check_scales_model(path: str | os.PathLike, model: str) -> None:
    """A one-line BankError when a ``scales.safetensors`` that ``train.py`` exported was learned on
    another model than ``model`` (its metadata records the model and its content digest). JSON
    scales files record no model and pass."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return
    try:
        meta = io.tensors_metadata(path)
    except ValueError as error:  # damaged: named in one line (load_scales says it too)
        raise BankError(str(error)) from None
    if meta.get("model"):
        record = Origin(f"{path}: learned on", "its metadata", meta["model"], meta.get("model_identity") or None, "scales")
        check_same_model(record, model)


@dataclass(frozen=True)
class Origin:
    """Where a file says it comes from: ``what`` (the file and verb), ``where`` (the record),
    the model and its content digest, and ``noun`` (what to give instead)."""

    what: str
    where: str
    model: str
    identity: str | None
    noun: str


def check_same_model(origin: Origin, model: str) -> None:
    """A one-line BankError when ``origin`` names another model than ``model``. Content digests
    (``model_identity``) decide where both are known (a copied model folder is the same model),
    names where both are hub ids; a hub id against a local folder cannot be told apart and passes."""
    from hones.attribution.settings import model_identity

    identity = model_identity(model)
    same_name = os.path.normpath(origin.model) == os.path.normpath(model)
    if identity is not None and origin.identity is not None:
        if identity == origin.identity:
            return
        if same_name:
            raise BankError(
                f"{origin.what} {origin.model} before its files changed ({origin.where} records another content "
                "digest); recompute it, or restore the model"
            )
    elif identity is not None or origin.identity is not None or same_name:
        return
    raise BankError(f"{origin.what} {origin.model} ({origin.where}), not on {model}; give {origin.noun} of this model")
