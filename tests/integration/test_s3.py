"""The jobs against a real S3-compatible server (moto) on loopback.

Manifest, images and output all live in the bucket; Ray workers reach it through the AWS
environment set for the whole test session (tests/conftest.py). Credentials never reach the
outputs or the job's output streams. The same night on local storage is
tests/unit/nightly/test_recategorize.py (test_end_to_end on Ray, and the rerun that carries rows
forward and keeps the previous run readable).
"""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.sinks.parquet import committed_files
from tests.conftest import (
    BAD_ROWS,
    LOOPBACK_AWS_ENV,
    make_catalog,
    summary_json,
    upload_tree,
    write_manifest,
)

SECRET = LOOPBACK_AWS_ENV["AWS_SECRET_ACCESS_KEY"]


def local_catalog(root, sample_images):
    """20 real photos and three bad rows, all relative to the manifest's folder."""
    make_catalog(root, sample_images, good=20)
    return dict(BAD_ROWS)


def labelled_catalog(root: Path, sources: list[Path], val_from: int) -> None:
    """A training manifest over copies of `sources` (relative URIs, category from the folder);
    rows from index `val_from` on are the val split."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i, src in enumerate(sources):
        name = f"{i:02d}-{src.name}"
        shutil.copyfile(src, images / name)
        rows.append({"product_id": f"t{i:02d}", "image_uri": f"images/{name}",
                     "category": src.parent.name, "split": "val" if i >= val_from else "train"})
    write_manifest(root / "manifest.parquet", rows)


def read_all(uri: str) -> bytes:
    """Every byte under an output location, to search for leaked secrets."""
    fs, path = storage.filesystem(uri)
    chunks = []
    for f in fs.find(path):
        if fs.isdir(f):  # the local `predictions` link
            continue
        with fs.open(f, "rb") as fh:
            chunks.append(fh.read())
    return b"".join(chunks)


@pytest.mark.slow
def test_recategorize_end_to_end(ray_local, s3_bucket, tmp_path, sample_images, tiny_model,
                                 capsys):
    expected = local_catalog(tmp_path / "catalog", sample_images)
    catalog = storage.join(s3_bucket, "catalog")
    upload_tree(tmp_path / "catalog", catalog)
    output = storage.join(s3_bucket, "out")
    args = ["--manifest", storage.join(catalog, "manifest.parquet"), "--model", tiny_model,
            "--output", output, "--batch-size", "16", "--executor", "ray"]  # workers on S3

    assert run_job(recategorize_main, args) == 0
    first = summary_json(capsys.readouterr().out)
    assert first["rows"] == 23 and first["chunks"] == 1 and first["errors"] == 3
    files = committed_files(output)
    fs, _ = storage.arrow_filesystem(output)
    table = pq.ParquetDataset([storage.filesystem(f)[1] for f in files], filesystem=fs).read()
    rows = {r["product_id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 23
    assert {pid: r["error_type"] for pid, r in rows.items() if r["error_type"]} == expected
    assert all(r["status"] == "ok" for pid, r in rows.items() if pid not in expected)

    # Same arguments again: a new complete run replaces the old one; the old one stays readable
    # until the run after next. Unchanged images (ETag from the store) are carried forward;
    # the error rows are tried again.
    assert run_job(recategorize_main, args) == 0
    second = summary_json(capsys.readouterr().out)
    assert (second["rows_carried"], second["rows_rescored"]) == (20, 3)
    assert storage.read_json(storage.join(output, "_SUCCESS"))["run_id"] == second["run_id"]
    assert all(storage.exists(f) for f in files)
    assert set(storage.list_dirs(storage.join(output, "runs"))) == {first["run_id"], second["run_id"]}
    assert not storage.list_files(storage.join(output, "_staging"))

    captured = capsys.readouterr()
    assert SECRET.encode() not in read_all(output)
    assert SECRET not in captured.out + captured.err
    assert "aws" not in storage.read_bytes(storage.join(output, "config.yaml")).decode().lower()


@pytest.mark.slow
def test_train_reads_its_manifest_and_writes_its_model_in_s3(ray_local, s3_bucket, tmp_path,
                                                            sample_images):
    from pipeline.models.artifact import load_artifact
    from pipeline.training.train import run as train

    labelled_catalog(tmp_path / "train", sample_images[:8] * 2, val_from=8)
    upload_tree(tmp_path / "train", f"{s3_bucket}/train")

    summary = train(TrainConfig(manifest=f"{s3_bucket}/train/manifest.parquet",
                                output=f"{s3_bucket}/model-out", epochs=1, input_size=32,
                                batch_size=8, num_workers=1))
    assert summary["train_rows"] == 8 and summary["val_rows"] == 8
    _, meta = load_artifact(f"{s3_bucket}/model-out/model")
    assert len(meta.classes) == 8
    assert SECRET.encode() not in read_all(f"{s3_bucket}/model-out")
    assert s3fs.S3FileSystem().exists(f"{s3_bucket.removeprefix('s3://')}/model-out/config.yaml")


@pytest.mark.slow
def test_make_manifest_and_evaluate_read_and_write_s3(ray_local, s3_bucket, tmp_path, sample_images,
                                                      tiny_model):
    from jobs.evaluate import main as evaluate_main
    from jobs.make_manifest import main as make_manifest_main

    # The importer reads a local class-folder tree and writes its manifest straight to S3.
    tree = tmp_path / "tree"
    for src in sample_images[:4]:
        (tree / src.parent.name).mkdir(parents=True)
        shutil.copyfile(src, tree / src.parent.name / src.name)
    assert run_job(make_manifest_main, ["--source", str(tree),
                                        "--output", f"{s3_bucket}/m/manifest.parquet"]) == 0
    fs, path = storage.arrow_filesystem(f"{s3_bucket}/m/manifest.parquet")
    made = pq.read_table(path, filesystem=fs)
    assert made.num_rows == 4 and set(made.column("category").to_pylist()) == {
        p.parent.name for p in sample_images[:4]}

    # The evaluation report: labelled manifest, images, model and report all in the bucket.
    images = tmp_path / "labelled" / "images"
    images.mkdir(parents=True)
    rows = []
    for i, src in enumerate(sample_images[:12]):
        shutil.copyfile(src, images / src.name)
        rows.append({"product_id": f"e{i:02d}", "image_uri": f"images/{src.name}",
                     "category": src.parent.name})
    write_manifest(tmp_path / "labelled" / "manifest.parquet", rows)
    upload_tree(tmp_path / "labelled", f"{s3_bucket}/labelled")
    upload_tree(Path(tiny_model), f"{s3_bucket}/model")
    assert run_job(evaluate_main, ["--manifest", f"{s3_bucket}/labelled/manifest.parquet",
                                   "--model", f"{s3_bucket}/model",
                                   "--output", f"{s3_bucket}/report", "--batch-size", "8"]) == 0
    metrics = storage.read_json(f"{s3_bucket}/report/metrics.json")
    assert metrics["rows"] == 12 and 0.0 <= metrics["accuracy"] <= 1.0
    for name in ("report.html", "confusion_matrix.png", "reliability.png", "coverage.png"):
        assert storage.exists(f"{s3_bucket}/report/{name}")
    assert SECRET.encode() not in read_all(f"{s3_bucket}/report")


@pytest.mark.slow
def test_embed_reads_and_writes_s3(ray_local, s3_bucket, tmp_path, sample_images, tiny_model):
    from jobs.embed import main as embed_main
    from pipeline.models.artifact import load_artifact

    labelled_catalog(tmp_path / "embed", sample_images[:4] * 3, val_from=8)
    upload_tree(tmp_path / "embed", f"{s3_bucket}/embed")
    upload_tree(Path(tiny_model), f"{s3_bucket}/backbone")
    assert run_job(embed_main, ["--manifest", f"{s3_bucket}/embed/manifest.parquet",
                                "--backbone", f"{s3_bucket}/backbone",
                                "--output", f"{s3_bucket}/embed-out"]) == 0
    _, meta = load_artifact(f"{s3_bucket}/embed-out/model")
    assert sorted(meta.classes) == sorted({p.parent.name for p in sample_images[:4]})
    assert SECRET.encode() not in read_all(f"{s3_bucket}/embed-out")
