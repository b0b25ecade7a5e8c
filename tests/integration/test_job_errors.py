"""Job-level problems stop the job before it writes anything, with a message naming the problem
and the exit code docs/reference.md lists. Real files, no Ray (every check runs before Ray starts)."""

import shutil

import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from tests.conftest import write_manifest


@pytest.fixture
def manifest(tmp_path, sample_images):
    images = tmp_path / "catalog" / "images"
    images.mkdir(parents=True)
    shutil.copyfile(sample_images[0], images / "a.jpg")
    return write_manifest(tmp_path / "catalog" / "manifest.parquet",
                          [{"product_id": "p1", "image_uri": "images/a.jpg"}])


def job(capsys, *args) -> tuple[int, str]:
    code = run_job(recategorize_main, [str(a) for a in args])
    return code, capsys.readouterr().err


def test_unreadable_manifest(tmp_path, capsys, bundled_model):
    bad = tmp_path / "manifest.parquet"
    bad.write_bytes(b"PAR1 but not really parquet")
    code, err = job(capsys, "--manifest", bad, "--model", bundled_model, "--output", tmp_path / "o")
    assert code == 3 and "manifest.parquet" in err and "not readable Parquet" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["flip", "missing", "json"])
def test_missing_or_corrupt_model(tmp_path, capsys, manifest, bundled_model, damage):
    model = tmp_path / "model"
    shutil.copytree(bundled_model, model)
    weights = model / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        weights.unlink()
    else:
        (model / "model.json").write_text("{ not json")
    code, err = job(capsys, "--manifest", manifest, "--model", model, "--output", tmp_path / "o")
    assert code == 4 and str(model) in err
    assert {"flip": "corrupt", "missing": "model.safetensors", "json": "not valid JSON"}[damage] in err
    assert not (tmp_path / "o").exists()


def test_output_not_writable(tmp_path, capsys, manifest, bundled_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("the output folder would have to live inside this file")
    code, err = job(capsys, "--manifest", manifest, "--model", bundled_model,
                    "--output", blocker / "out")
    assert code == 5 and "not writable" in err and "a-file" in err


def test_output_with_a_broken_marker(tmp_path, capsys, manifest, bundled_model):
    out = tmp_path / "o"
    out.mkdir()
    (out / "_SUCCESS").write_text("{ half a JSON")
    code, err = job(capsys, "--manifest", manifest, "--model", bundled_model, "--output", out)
    assert code == 5 and "unreadable _SUCCESS" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS"]


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--run-id", "../../escape", "--run-id"),
    ("--allowed-networks", "10.0.0.0/33", "--allowed-networks"),
    ("--allowed-uri-schemes", "https,gopher", "gopher"),
])
def test_unsafe_or_invalid_security_options(tmp_path, capsys, manifest, bundled_model, flag,
                                            value, named):
    code, err = job(capsys, "--manifest", manifest, "--model", bundled_model,
                    "--output", tmp_path / "o", flag, value)
    assert code == 2 and named in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("table, catalog, message", [
    ("predictions", "type=sql,uri=sqlite:///{tmp}/c.db,warehouse=file://{tmp}/w",
     "NAMESPACE.TABLE"),
    ("retail.predictions", "type=sql,uri", "KEY=VALUE"),
    ("retail.predictions", None, "must be set together"),
])
def test_bad_warehouse_table_options(tmp_path, capsys, manifest, tiny_model, table, catalog,
                                     message):
    args = ["--manifest", manifest, "--model", tiny_model, "--output", tmp_path / "o",
            "--iceberg-table", table]
    if catalog:
        args += ["--iceberg-catalog", catalog.format(tmp=tmp_path)]
    code, err = job(capsys, *args)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
