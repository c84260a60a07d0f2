"""Which model a neuron bank was selected on.

A bank file is (layer, neuron, score, rank) rows and names no model, so a bank of one model
fits any model of the same layer count and FFN width: the toy LLaVA and Qwen2.5-VL are both
4 × 352, and LLaVA-1.5-7B's bank fits any Llama-2-7B-shaped model. A bank that ``analyze.py``
wrote is recorded in the ``state.json`` beside it, with the model and its content digest;
:func:`check_bank_model` refuses it for another model. A bank the run did not write (edited,
or made elsewhere) carries no such record and is taken as it is.
"""

from __future__ import annotations

import os
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


def check_bank_model(path: str | os.PathLike, model: str, identity: str | None) -> None:
    """A one-line BankError when the bank at ``path`` was selected by an analyze run of another
    model than ``model`` (``identity``: its ``model_identity``, None for a hub id). Content digests
    decide where both are known (a copied model folder is the same model), names where both are
    hub ids; a hub id against a local folder cannot be told apart and passes."""
    origin = bank_origin(path)
    if origin is None or origin["model"] is None:
        return
    recorded, recorded_identity = str(origin["model"]), origin["model_identity"]
    same_name = os.path.normpath(recorded) == os.path.normpath(model)
    if identity is not None and recorded_identity is not None:
        if identity == recorded_identity:
            return
        if same_name:
            raise BankError(
                f"{path}: selected on {recorded} before its files changed ({origin['state']} records another content digest); "
                "recompute the bank with analyze.py, or restore the model"
            )
    elif identity is not None or recorded_identity is not None or same_name:
        return
    raise BankError(f"{path}: selected on {recorded} ({origin['state']}), not on {model}; give a bank of this model")
