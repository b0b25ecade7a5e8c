"""One artifact, several backends: the nightly job's choice of the form of a model that runs,
on the bundled artifact and its real int8 export, its override, and its fallback to torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline.config.tolerances import TOLERANCES
from pipeline.errors import ConfigError
from pipeline.models.artifact import load_metadata
from pipeline.models.backends import EXPORTS_DIR, choose_backend, export_uri
from tests.conftest import summary_json, write_manifest

INT8 = "onnx-int8"


@pytest.fixture
def model_copy(tmp_path, bundled_model) -> Path:
    """A copy of the bundled artifact, its exports included, to damage."""
    return Path(shutil.copytree(bundled_model, tmp_path / "model"))


def edit_export(model: Path, **export_fields) -> None:
    """Change fields of the int8 export's `export` record (none of them is hashed)."""
    path = model / EXPORTS_DIR / INT8 / "model.json"
    meta = json.loads(path.read_text())
    meta["export"].update(export_fields)
    path.write_text(json.dumps(meta))


def test_cpu_runs_the_int8_export_and_cuda_the_torch_weights(bundled_model):
    chosen = choose_backend(bundled_model, "auto", "cpu")
    assert (chosen.backend, chosen.uri) == (INT8, export_uri(bundled_model, INT8))
    assert "parity tolerance" in chosen.reason and not chosen.warning
    export = load_metadata(chosen.uri)
    assert export.export["source_model_version"] == load_metadata(bundled_model).model_version
    assert export.decisions["fitted_on"]["backend"] == INT8  # thresholds for its own scores
    assert export.export["parity"]["held_out"] is True
    on_gpu = choose_backend(bundled_model, "auto", "cuda")
    assert (on_gpu.backend, on_gpu.uri) == ("torch", bundled_model)
    with_torch_option = choose_backend(bundled_model, "auto", "cpu", ["--compile"])
    assert with_torch_option.backend == "torch" and "--compile" in with_torch_option.reason


def test_backend_option_overrides_the_choice(bundled_model):
    assert choose_backend(bundled_model, "torch", "cpu").uri == bundled_model
    assert choose_backend(bundled_model, INT8, "cuda").uri == export_uri(bundled_model, INT8)
    with pytest.raises(ConfigError, match=r"no onnx-fp16 export.*jobs\.export --model"):
        choose_backend(bundled_model, "onnx-fp16", "cpu")
    export = export_uri(bundled_model, INT8)
    assert choose_backend(export, "auto", "cpu").uri == export  # an export runs as it is
    with pytest.raises(ConfigError, match="is a onnx-int8 export"):
        choose_backend(export, "torch", "cpu")
    with pytest.raises(ConfigError, match="valid choices: auto, torch, onnx, onnx-int8"):
        choose_backend(bundled_model, "tensorrt", "cpu")


@pytest.mark.parametrize("damage", ["out_of_tolerance", "missing_parity", "other_weights"])
def test_unusable_int8_export_falls_back_to_torch_with_a_warning(model_copy, damage):
    if damage == "out_of_tolerance":
        edit_export(model_copy, parity={"images": 296, "top1_agreement": 0.5,
                                        "max_logit_error": 1.0})
    elif damage == "missing_parity":
        edit_export(model_copy, parity={})
    else:
        edit_export(model_copy, source_model_version="0123456789abcdef")
    chosen = choose_backend(str(model_copy), "auto", "cpu")
    assert (chosen.backend, chosen.uri) == ("torch", str(model_copy))
    why = {"out_of_tolerance": f"top-1 agreement 0.5000 < min_top1_agreement "
                               f"{TOLERANCES[INT8].min_top1_agreement}",
           "missing_parity": "records no parity check",
           "other_weights": "was made from model 0123456789abcdef"}[damage]
    assert why in chosen.warning and "jobs.export" in chosen.warning
    with pytest.raises(ConfigError, match="cannot run it"):  # asked for by name: refused
        choose_backend(str(model_copy), INT8, "cpu")


def test_no_export_runs_torch_without_a_warning(model_copy):
    shutil.rmtree(model_copy / EXPORTS_DIR)
    chosen = choose_backend(str(model_copy), "auto", "cpu")
    assert chosen.backend == "torch" and "no onnx-int8 export" in chosen.reason
    assert not chosen.warning


def night(capsys, tmp_path, sample_images, *args) -> tuple[int, str, str]:
    images = tmp_path / "catalog"
    images.mkdir(exist_ok=True)
    rows = []
    for i, photo in enumerate(sample_images[:6]):
        shutil.copyfile(photo, images / f"{i}.jpg")
        rows.append({"product_id": f"p{i}", "image_uri": f"{i}.jpg",
                     "current_category": photo.parent.name})
    manifest = write_manifest(images / "manifest.parquet", rows)
    code = run_job(recategorize_main, ["--manifest", str(manifest), "--executor", "local",
                                       *[str(a) for a in args]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_summary_says_which_backend_ran_and_why(capsys, tmp_path, sample_images,
                                                    model_copy):
    code, out, err = night(capsys, tmp_path, sample_images, "--model", model_copy,
                           "--output", tmp_path / "int8", "--device", "cpu")
    assert code == 0, err
    summary = summary_json(out)
    assert summary["backend"]["name"] == INT8 and "parity" in summary["backend"]["reason"]
    assert summary["model_version"] == load_metadata(str(model_copy / EXPORTS_DIR / INT8)).model_version
    written = json.loads((tmp_path / "int8" / "summary.json").read_text())
    assert written["backend"] == summary["backend"]

    edit_export(model_copy, parity={})
    code, out, err = night(capsys, tmp_path, sample_images, "--model", model_copy,
                           "--output", tmp_path / "torch", "--device", "cpu")
    assert code == 0, err
    summary = summary_json(out)
    assert summary["backend"]["name"] == "torch"
    assert summary["model_version"] == load_metadata(str(model_copy)).model_version
    assert err.count("warning: ") == 1 and "records no parity check" in err
    assert summary["backend"]["warning"] in err


@pytest.mark.parametrize("backend, message", [
    ("tensorrt", "--backend 'tensorrt' is not a choice: give one of auto, torch, onnx, "
                 "onnx-int8, onnx-fp16"),
    ("onnx-fp16", "--backend onnx-fp16: model {version} cannot run it"),
])
def test_a_bad_backend_stops_the_night_before_it_writes(capsys, tmp_path, sample_images,
                                                        bundled_model, backend, message):
    code, _, err = night(capsys, tmp_path, sample_images, "--model", bundled_model,
                         "--output", tmp_path / "out", "--backend", backend)
    message = message.format(version=load_metadata(bundled_model).model_version)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()
