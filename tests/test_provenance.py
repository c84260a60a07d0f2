"""A bank analyze.py selected on one model is refused for another (same shapes accept it silently otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hones import io
from hones.attribution.bank import BankEntry, BankError, write_bank
from hones.attribution.provenance import bank_origin, check_bank_model
from hones.attribution.settings import model_identity


def model_folder(root: Path, name: str, content: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(content)
    return folder


def analyze_run(root: Path, model: str, identity: str | None) -> Path:
    """``root/vqa/bank_hones.json`` with the state.json an analyze run writes beside it."""
    bank = write_bank(root / "vqa" / "bank_hones.json", [BankEntry(0, 3, 1.0, 0), BankEntry(1, 2, 0.5, 1)])
    state = {"stages": {"neurons": {"fingerprint": {"model": model, "model_identity": identity},
                                    "info": {"bank_digests": {"hones": io.file_digest(bank)}}}}}  # fmt: skip
    io.write_json(root / "vqa" / "state.json", state)
    return bank


def test_a_bank_of_another_model_is_refused(tmp_path: Path) -> None:
    llava = model_folder(tmp_path, "toy-llava", '{"model_type": "llava"}')
    qwen = model_folder(tmp_path, "toy-qwen", '{"model_type": "qwen2_5_vl"}')
    bank = analyze_run(tmp_path / "runs", str(llava), model_identity(str(llava)))
    assert bank_origin(bank)["model"] == str(llava)
    check_bank_model(bank, str(llava))
    copy = model_folder(tmp_path, "copy", '{"model_type": "llava"}')  # same files elsewhere: the same model
    check_bank_model(bank, str(copy))
    with pytest.raises(BankError, match=rf"selected on {llava} \(.*state.json\), not on {qwen}; give a bank of this model"):
        check_bank_model(bank, str(qwen))
    (llava / "config.json").write_text('{"model_type": "llava", "retrained": 1}')
    with pytest.raises(BankError, match="before its files changed"):
        check_bank_model(bank, str(llava))


def test_hub_ids_compare_by_name_and_unrecorded_banks_pass(tmp_path: Path) -> None:
    bank = analyze_run(tmp_path / "runs", "llava-hf/llava-1.5-7b-hf", None)
    check_bank_model(bank, "llava-hf/llava-1.5-7b-hf")
    with pytest.raises(BankError, match="not on Qwen/Qwen2.5-VL-7B-Instruct"):
        check_bank_model(bank, "Qwen/Qwen2.5-VL-7B-Instruct")
    local = model_folder(tmp_path, "snapshot", "{}")
    check_bank_model(bank, str(local))  # a hub id against a folder: cannot tell
    bank.write_text(json.dumps([{"layer": 0, "neuron": 1, "score": 1.0, "rank": 0}]))  # edited: not the run's bank
    assert bank_origin(bank) is None
    check_bank_model(bank, "Qwen/Qwen2.5-VL-7B-Instruct")


def test_steering_module_refuses_a_bank_of_another_model(tmp_path: Path) -> None:
    from hones.steering.module import SteeringModule

    llava = model_folder(tmp_path, "toy-llava", '{"model_type": "llava"}')
    qwen = model_folder(tmp_path, "toy-qwen", '{"model_type": "qwen2_5_vl"}')
    bank = analyze_run(tmp_path / "runs", str(llava), model_identity(str(llava)))
    SteeringModule(model=str(llava), task="vqa", bank=str(bank))
    with pytest.raises(BankError, match="not on"):
        SteeringModule(model=str(qwen), task="vqa", bank=str(bank))


def test_scales_learned_on_another_model_are_refused(tmp_path: Path) -> None:
    from hones.attribution.provenance import check_scales_model
    from hones.steering.module import SteeringModule
    from hones.steering.scales import export_scales, scaler_from_rows

    llava = model_folder(tmp_path, "toy-llava", '{"model_type": "llava"}')
    qwen = model_folder(tmp_path, "toy-qwen", '{"model_type": "qwen2_5_vl"}')
    scaler = scaler_from_rows([{"layer": 0, "neuron": 1, "scale": 0.5}])
    module = SteeringModule(model=str(llava), task="vqa", scales=str(tmp_path / "unused.json"), steer=False)
    files = export_scales(scaler, tmp_path / "fit", metadata=module.scale_metadata())
    check_scales_model(files["safetensors"], str(llava))
    with pytest.raises(BankError, match=rf"scales.safetensors: learned on {llava} \(its metadata\), not on {qwen}; give scales of this model"):
        check_scales_model(files["safetensors"], str(qwen))
    with pytest.raises(BankError, match="learned on"):
        SteeringModule(model=str(qwen), task="vqa", scales=str(files["safetensors"]))
    check_scales_model(files["json"], str(qwen))  # JSON records no model
