import pyarrow as pa
import pytest

from pipeline.catalog import validate_manifest
from pipeline.errors import ManifestError
from tests.conftest import write_manifest

GOOD = [{"product_id": "a", "image_uri": "x.jpg"}, {"product_id": "b", "image_uri": "y.jpg"}]


def test_valid_file_and_folder(tmp_path):
    m = validate_manifest(str(write_manifest(tmp_path / "m.parquet", GOOD)))
    assert m.num_rows == 2 and m.base_uri == str(tmp_path)
    write_manifest(tmp_path / "folder" / "part-0.parquet", GOOD[:1])
    write_manifest(tmp_path / "folder" / "part-1.parquet", GOOD[1:])
    m = validate_manifest(str(tmp_path / "folder"))
    assert m.num_rows == 2 and m.base_uri == str(tmp_path / "folder")


def test_missing_column_names_file_and_column(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"product_id": "a"}])
    with pytest.raises(ManifestError, match=r"m\.parquet.*image_uri"):
        validate_manifest(str(path))


def test_wrong_type(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"product_id": 1, "image_uri": "x.jpg"}])
    with pytest.raises(ManifestError, match=r"'product_id' must be string, found int64"):
        validate_manifest(str(path))


def test_empty(tmp_path):
    schema = pa.schema([("product_id", pa.string()), ("image_uri", pa.string())])
    path = write_manifest(tmp_path / "m.parquet", [], schema=schema)
    with pytest.raises(ManifestError, match="empty"):
        validate_manifest(str(path))


def test_duplicates_are_listed(tmp_path):
    rows = [*GOOD, {"product_id": "a", "image_uri": "z.jpg"}, {"product_id": "b", "image_uri": "w"}]
    path = write_manifest(tmp_path / "m.parquet", rows)
    with pytest.raises(ManifestError, match=r"duplicate values: 'a', 'b'"):
        validate_manifest(str(path))


def test_null_product_id(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [*GOOD, {"product_id": None, "image_uri": "q"}])
    with pytest.raises(ManifestError, match="null"):
        validate_manifest(str(path))


def test_not_found_and_not_parquet(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        validate_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_text("hello")
    with pytest.raises(ManifestError, match="not readable Parquet"):
        validate_manifest(str(tmp_path / "bad.parquet"))


def test_training_manifest_checks(tmp_path):
    with pytest.raises(ManifestError, match="category"):
        validate_manifest(str(write_manifest(tmp_path / "a.parquet", GOOD)), training=True)
    rows = [{**r, "category": "c", "split": s} for r, s in zip(GOOD, ["train", "holdout"], strict=True)]
    with pytest.raises(ManifestError, match=r"'split' has invalid value\(s\) 'holdout'"):
        validate_manifest(str(write_manifest(tmp_path / "b.parquet", rows)), training=True)


def test_duplicates_across_files_in_a_large_folder(tmp_path):
    ids = [f"sku-{i}" for i in range(200_000)]
    first = [{"product_id": i, "image_uri": "x.jpg"} for i in ids[:120_000]]
    second = [{"product_id": i, "image_uri": "x.jpg"} for i in ids[120_000:]]
    second += [{"product_id": "sku-7", "image_uri": "y.jpg"},
               {"product_id": "sku-199999", "image_uri": "z.jpg"}]
    write_manifest(tmp_path / "big" / "a.parquet", first)
    write_manifest(tmp_path / "big" / "b.parquet", second)
    with pytest.raises(ManifestError, match=r"duplicate values: 'sku-199999', 'sku-7'$"):
        validate_manifest(str(tmp_path / "big"))


def test_image_version_of_a_type_the_plan_cannot_compare_is_refused_before_work(tmp_path):
    rows = [{"product_id": "a", "image_uri": "a.jpg", "image_version": [1, 2]}]
    schema = pa.schema([("product_id", pa.string()), ("image_uri", pa.string()),
                        ("image_version", pa.list_(pa.int64()))])
    path = write_manifest(tmp_path / "m.parquet", rows, schema)
    with pytest.raises(ManifestError, match="'image_version' must be a string, integer") as caught:
        validate_manifest(str(path))
    assert caught.value.exit_code == 3 and "found list<" in str(caught.value)
    for t, value in ((pa.int64(), 7), (pa.timestamp("us"), None), (pa.string(), "etag-1")):
        ok = pa.schema([schema.field(0), schema.field(1), pa.field("image_version", t)])
        good = write_manifest(tmp_path / f"{t}.parquet", [{**rows[0], "image_version": value}], ok)
        assert validate_manifest(str(good)).has("image_version")


def test_validation_and_chunk_planning_read_one_file_set(tmp_path):
    """Hidden and '_' names are skipped everywhere; files without a suffix (Hive, Trino) count
    everywhere."""
    from pipeline.nightly.chunks import plan_chunks

    folder = tmp_path / "manifest"
    rows = lambda prefix, n: [{"product_id": f"{prefix}{i}", "image_uri": f"{i}.jpg"}  # noqa: E731
                              for i in range(n)]
    write_manifest(folder / "a.parquet", rows("a", 3))
    write_manifest(folder / "20261203_000000_00001_x", rows("h", 4))       # Trino, no suffix
    write_manifest(folder / "day=1" / "part-0", rows("d", 2))              # Hive partition
    write_manifest(folder / ".a.parquet", rows("a", 3))                    # a hidden copy
    write_manifest(folder / "_tmp" / "b.parquet", rows("t", 5))            # a writer's scratch
    (folder / "_SUCCESS").write_text("")
    manifest = validate_manifest(str(folder))
    assert manifest.num_rows == 9
    assert sum(c.rows for c in plan_chunks(str(folder), 100)) == 9
