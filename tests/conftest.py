"""Shared fixtures: a small local Ray, real Grocery Store images, the bundled model."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import BUNDLED_MODEL, EXAMPLES_DIR, GROCERY_DATASET

SAMPLE_DIR = EXAMPLES_DIR / "sample-catalog"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    root = Path(GROCERY_DATASET)
    if not (root / "classes.csv").exists():
        pytest.skip(f"Grocery Store dataset not found at {root}")
    return root


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """Real product photos from the bundled sample catalog, one per category first."""
    by_class = sorted((SAMPLE_DIR / "images").iterdir())
    return [sorted(d.iterdir())[0] for d in by_class]


@pytest.fixture(scope="session")
def bundled_model() -> str:
    return BUNDLED_MODEL


def jpeg_bytes(path: Path) -> bytes:
    return path.read_bytes()


def reencode(path: Path, fmt: str = "JPEG", mode: str | None = None, size: int | None = None,
             **save_kwargs) -> bytes:
    im = Image.open(path)
    im.load()
    if size:
        im = im.resize((size, round(size * im.height / im.width)))
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def small_catalog(tmp_path, sample_images) -> tuple[Path, int, dict[str, str]]:
    """A catalog of 24 real images copied next to the manifest (relative URIs), plus a corrupt
    JPEG, a text file named .jpg and a missing file. Returns (manifest, rows, expected error types)."""
    images = tmp_path / "catalog" / "images"
    images.mkdir(parents=True)
    rows = []
    for i, src in enumerate(sample_images[:24]):
        shutil.copyfile(src, images / src.name)
        rows.append({"product_id": f"p{i:03d}", "image_uri": f"images/{src.name}",
                     "current_category": src.parent.name})
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then garbage")
    (images / "notes.jpg").write_text("a text file with an image name")
    rows.append({"product_id": "bad-corrupt", "image_uri": "images/corrupt.jpg",
                 "current_category": "Banana"})
    rows.append({"product_id": "bad-text", "image_uri": "images/notes.jpg",
                 "current_category": "Banana"})
    rows.append({"product_id": "bad-missing", "image_uri": str(images / "missing.jpg"),
                 "current_category": None})
    manifest = write_manifest(tmp_path / "catalog" / "manifest.parquet", rows)
    expected = {"bad-corrupt": "decode_failed", "bad-text": "not_an_image",
                "bad-missing": "fetch_not_found"}
    return manifest, len(rows), expected
