"""The data audit on real Grocery Store photos with injected faults: an exact copy and a resized
JPEG re-encode are duplicates, distinct products are not, flipped labels are flagged, a blank
placeholder is an outlier, an unreadable image is an error row; the same on S3 through Ray."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.analysis.audit import run
from pipeline.analysis.audit_search import (
    IVF_PROBES,
    IVF_ROWS_PER_LIST,
    PHASH_BITS,
    near_pairs,
    neighbour_distances,
    phash_bits,
    phash_codes,
    phash_value,
)
from pipeline.analysis.findings import (
    DUPLICATES_FILE,
    ERRORS_FILE,
    LABEL_ISSUES_FILE,
    OUTLIERS_FILE,
    REPORT_FILE,
    flagged_products,
)
from pipeline.config import AuditConfig, TrainConfig
from pipeline.images.decode import decode_image
from pipeline.training.data import load_data
from tests.conftest import photos_by_category, reencode, upload_tree, write_manifest

# One worker of a parallel run (--dist loadgroup) takes the module, so its module fixtures
# (`audited`) are built once.
pytestmark = pytest.mark.xdist_group("audit")

PHOTOS_PER_CATEGORY = 6
CATEGORIES = 7
RESIZED_PX = 200  # the re-encoded copy's width (the photos are 348 px)
REENCODE_QUALITY = 70
# Given category -> the wrong one written instead, for one photo each: visually distinct
# categories, so a confident model disagrees.
FLIPS = {"Banana": "Cantaloupe", "Cantaloupe": "Garant-Ecological-Medium-Fat-Milk",
         "Granny-Smith": "Banana"}
PLACEHOLDER_GREY = 235
PHOTO_PX = 348  # the Grocery Store photos' size
MODEL_INPUT_PX = 224  # the bundled model's input size, at which the audit hashes pixels


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def build_audit_catalog(root: Path) -> dict:
    """A training manifest of real photos (the categories with the most photos in the sample),
    relative URIs, plus the injected faults. Returns what was injected."""
    images = root / "images"
    images.mkdir(parents=True)
    by_category = photos_by_category()
    chosen = sorted(by_category, key=lambda c: (-len(by_category[c]), c))[:CATEGORIES]
    rows, truth = [], {}
    for category in chosen:
        for k, src in enumerate(by_category[category][:PHOTOS_PER_CATEGORY]):
            pid = f"{category}-{k}"
            shutil.copyfile(src, images / f"{pid}.jpg")
            given = FLIPS[category] if k == 0 and category in FLIPS else category
            rows.append({"product_id": pid, "image_uri": f"images/{pid}.jpg", "category": given,
                         "split": "train"})
            truth[pid] = category
    original, resized = f"{chosen[0]}-1", f"{chosen[1]}-2"
    (images / "copy.jpg").write_bytes((images / f"{original}.jpg").read_bytes())
    (images / "resized.jpg").write_bytes(reencode(images / f"{resized}.jpg", size=RESIZED_PX,
                                                  quality=REENCODE_QUALITY))
    (images / "blank.jpg").write_bytes(_jpeg(Image.new("RGB", (PHOTO_PX, PHOTO_PX), (PLACEHOLDER_GREY,) * 3)))
    rows += [
        {"product_id": "copy", "image_uri": "images/copy.jpg", "category": chosen[0], "split": "train"},
        {"product_id": "resized", "image_uri": "images/resized.jpg", "category": chosen[1],
         "split": "train"},
        {"product_id": "blank", "image_uri": "images/blank.jpg", "category": chosen[2],
         "split": "train"},
        {"product_id": "missing", "image_uri": "images/missing.jpg", "category": chosen[2],
         "split": "val"},
    ]
    manifest = write_manifest(root / "manifest.parquet", rows)
    flipped = {f"{c}-0" for c in FLIPS if c in chosen}
    assert len(flipped) == len(FLIPS), "the flipped categories must be among the chosen ones"
    return {"manifest": manifest, "rows": len(rows), "truth": truth, "flipped": flipped,
            "duplicates": {("copy", original), ("resized", resized)}}


@pytest.fixture(scope="module")
def audited(tmp_path_factory, bundled_model):
    """One audit of the catalog with the bundled model (in-process executor), outputs read back."""
    root = tmp_path_factory.mktemp("audit")
    built = build_audit_catalog(root / "catalog")
    out = root / "out"
    summary = run(AuditConfig(manifest=str(built["manifest"]), model=bundled_model, output=str(out)))
    tables = {name: pq.read_table(out / name).to_pylist()
              for name in (DUPLICATES_FILE, LABEL_ISSUES_FILE, OUTLIERS_FILE, ERRORS_FILE)}
    return {**built, "summary": summary, "out": out, **tables}


def _pairs(duplicates: list[dict]) -> set[tuple[str, str]]:
    return {tuple(sorted((d["product_id"], d["duplicate_of"]))) for d in duplicates}


def test_exact_copy_and_resized_reencode_are_found_as_duplicates(audited):
    assert {tuple(sorted(p)) for p in audited["duplicates"]} <= _pairs(audited[DUPLICATES_FILE])
    rows = {d["product_id"]: d for d in audited[DUPLICATES_FILE]}
    copy, resized = rows["copy"], rows["resized"]  # representatives: the first in manifest order
    assert copy["kind"] == "exact" and copy["similarity"] == 1.0
    assert resized["kind"] == "near" and AuditConfig().near_min_cosine <= resized["similarity"] < 1
    assert audited["summary"]["duplicates"]["exact"] == 1


def test_distinct_products_are_not_duplicates(audited):
    """No photo is paired with a photo of another product, not even the pair of products whose
    perceptual hashes are closest. (Two photos of one product's shelf taken a moment apart may
    be paired: the sample holds such shots, and the report shows them.)"""
    truth = audited["truth"] | {"copy": None, "resized": None}
    injected = {tuple(sorted(p)) for p in audited["duplicates"]}
    found = _pairs(audited[DUPLICATES_FILE]) - injected
    assert {(a, b) for a, b in found if truth[a] != truth[b]} == set()
    ids = sorted(audited["truth"])
    hashes = phash_bits(np.array([phash_value(decode_image(
        (audited["manifest"].parent / "images" / f"{pid}.jpg").read_bytes(), MODEL_INPUT_PX))
        for pid in ids],
        dtype=np.uint64))
    distance = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)
    other = np.array([[truth[a] != truth[b] for b in ids] for a in ids])
    i, j = np.unravel_index(np.where(other, distance, PHASH_BITS + 1).argmin(), distance.shape)
    assert tuple(sorted((ids[i], ids[j]))) not in _pairs(audited[DUPLICATES_FILE])


def test_flipped_labels_are_flagged_with_the_true_category_suggested(audited):
    issues = {r["product_id"]: r for r in audited[LABEL_ISSUES_FILE]}
    for pid in audited["flipped"]:
        assert issues[pid]["flagged"], issues[pid]
        assert issues[pid]["suggested_category"] == audited["truth"][pid]
    flagged = {pid for pid, r in issues.items() if r["flagged"]}
    clean = [r["score"] for pid, r in issues.items() if pid not in audited["flipped"]
             and pid in audited["truth"]]
    # every flipped label is more suspicious than every clean photo, and few clean ones are flagged
    assert min(issues[p]["score"] for p in audited["flipped"]) > np.median(clean)
    assert len(flagged - audited["flipped"]) <= len(audited["flipped"])


def test_blank_placeholder_is_the_top_outlier(audited):
    outliers = sorted(audited[OUTLIERS_FILE], key=lambda r: -r["score"])
    assert outliers[0]["product_id"] == "blank" and outliers[0]["flagged"]
    assert sum(r["flagged"] for r in outliers) <= 3


def test_every_row_is_scored_or_an_error_row_with_its_reason(audited):
    errors = audited[ERRORS_FILE]
    assert [(e["product_id"], e["error_type"]) for e in errors] == [("missing", "fetch_not_found")]
    scored = [r["product_id"] for r in audited[OUTLIERS_FILE]]
    assert len(scored) == len(set(scored)) == audited["rows"] - 1
    assert audited["summary"]["rows"] == audited["rows"]
    assert audited["summary"]["errors_by_type"] == {"fetch_not_found": 1}


def test_report_shows_counts_and_thumbnails_of_each_finding(audited):
    page = (audited["out"] / REPORT_FILE).read_text()
    flagged = audited["summary"]["label_issues"]["flagged"]
    duplicates = len(audited[DUPLICATES_FILE])
    assert f"Suspected labels ({flagged})" in page and f"Duplicates ({duplicates})" in page
    # duplicate pairs side by side, suspected labels, top outliers (one thumbnail per image)
    shown = {d["product_id"] for d in audited[DUPLICATES_FILE]} | {
        d["duplicate_of"] for d in audited[DUPLICATES_FILE]} | {
        r["product_id"] for r in audited[LABEL_ISSUES_FILE] if r["flagged"]} | {"blank"}
    assert page.count("data:image/jpeg;base64,") >= len(shown)
    for pid in ("copy", "resized", "blank", *audited["flipped"]):
        assert f"<code>{pid}</code>" in page


def test_train_exclude_leaves_out_flagged_training_rows(audited):
    """jobs.train --exclude AUDIT_DIR: the flagged rows are gone from training, val stays."""
    cfg = TrainConfig(manifest=str(audited["manifest"]), output=str(audited["out"] / "t"))
    full = load_data(cfg)
    cleaned = load_data(cfg.model_copy(update={"exclude": str(audited["out"])}))
    flagged = set().union(*flagged_products(str(audited["out"])).values())

    def training_side(data) -> set[str]:  # the rows trained on and those held out to calibrate
        return set(data.train["product_id"].to_pylist()) | set(
            data.calibration["product_id"].to_pylist())

    kept = training_side(cleaned)
    assert {"copy", "resized", "blank", *audited["flipped"]} <= flagged
    assert not kept & flagged
    assert kept == training_side(full) - flagged
    assert cleaned.val["product_id"].to_pylist() == full.val["product_id"].to_pylist()
    assert cleaned.excluded["rows"] == len(training_side(full)) - len(kept)


def test_findings_are_those_the_audit_made_with_every_embedding_in_memory(audited):
    """Issue 26: the embeddings now stream to a float16 store on disk and the searches and the
    label check read it by block; on these photos the findings are what the in-memory float32
    audit found (its output, recorded before the change)."""
    assert sorted((d["product_id"], d["duplicate_of"], d["kind"])
                  for d in audited[DUPLICATES_FILE]) == [
        ("Cantaloupe-4", "Cantaloupe-0", "near"), ("copy", "Banana-1", "exact"),
        ("resized", "Cantaloupe-2", "near")]
    assert sorted(r["product_id"] for r in audited[LABEL_ISSUES_FILE] if r["flagged"]) == [
        "Banana-0", "Cantaloupe-0", "Cantaloupe-4", "Granny-Smith-0"]
    assert [r["product_id"] for r in audited[OUTLIERS_FILE] if r["flagged"]] == ["blank"]


def test_perceptual_hash_is_close_for_a_reencode_and_far_for_another_photo():
    photos = photos_by_category()["Banana"]
    a, b = (decode_image(p.read_bytes(), MODEL_INPUT_PX) for p in photos[:2])
    again = decode_image(reencode(photos[0], size=RESIZED_PX, quality=REENCODE_QUALITY),
                         MODEL_INPUT_PX)
    bits = phash_bits(np.array([phash_value(x) for x in (a, again, b)], dtype=np.uint64))
    assert (bits[0] != bits[1]).sum() <= AuditConfig().phash_max_distance
    assert (bits[0] != bits[2]).sum() > AuditConfig().phash_max_distance


def test_hash_radius_search_finds_a_pair_at_the_limit_and_not_one_bit_beyond():
    """Copies of a real photo's hash with exactly --phash-max-distance bits flipped, and one bit
    more: the range search (faiss keeps distances below its radius) finds only the first."""
    limit = AuditConfig().phash_max_distance
    photo = decode_image(photos_by_category()["Banana"][0].read_bytes(), MODEL_INPUT_PX)
    bits = phash_bits(np.array([phash_value(photo)], dtype=np.uint64))[0]
    at_limit, beyond = bits.copy(), bits.copy()
    at_limit[:limit] ^= True
    beyond[-(limit + 1):] ^= True  # other bits: far from `at_limit` too
    rows = [bits, at_limit, beyond]
    values = np.frombuffer(np.packbits(np.array(rows), axis=1).tobytes(), dtype=">u8")
    codes = phash_codes(values.astype(np.uint64))
    features = np.ones((3, 4), dtype=np.float32) / 2  # identical embeddings: cosine 1
    pairs = near_pairs(codes, features, np.arange(3), limit, AuditConfig().near_min_cosine)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]


def test_outlier_distances_of_a_small_catalog_match_the_exact_search():
    """Below IVF_PROBES x IVF_ROWS_PER_LIST rows every list is scanned: each row's mean
    distance to its k nearest others is the exact one, up to the 8-bit codes."""
    rng = np.random.default_rng(0)
    n, k = IVF_PROBES * IVF_ROWS_PER_LIST - 1, AuditConfig().outlier_neighbours
    centres = rng.standard_normal((20, 64))
    feats = (centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, 64))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    distance = 1 - feats @ feats.T
    np.fill_diagonal(distance, np.inf)
    exact = np.sort(distance, axis=1)[:, :k].mean(1)
    np.testing.assert_allclose(neighbour_distances(feats, k), exact, atol=0.01)


def _audit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.audit", *args], capture_output=True,
                          text=True, timeout=300)


def test_bad_arguments_stop_the_job_before_it_writes(tmp_path, bundled_model):
    built = build_audit_catalog(tmp_path / "catalog")
    out = tmp_path / "out"
    proc = _audit_cli("--manifest", str(built["manifest"]), "--output", str(out),
                      "--label-column", "nope")
    assert proc.returncode == 2 and "--label-column 'nope'" in proc.stderr and "category" in proc.stderr
    proc = _audit_cli("--manifest", str(tmp_path / "none.parquet"), "--output", str(out))
    assert proc.returncode == 3 and "none.parquet" in proc.stderr
    proc = _audit_cli("--manifest", str(built["manifest"]), "--model", str(tmp_path / "nomodel"),
                      "--output", str(out))
    assert proc.returncode == 4 and "nomodel" in proc.stderr
    assert not out.exists()


def test_train_exclude_needs_a_finished_audit(tmp_path):
    from pipeline.errors import ConfigError

    built = build_audit_catalog(tmp_path / "catalog")
    with pytest.raises(ConfigError, match=r"--exclude .*duplicates\.parquet"):
        load_data(TrainConfig(manifest=str(built["manifest"]), exclude=str(tmp_path)))


@pytest.mark.slow
def test_audit_of_a_manifest_in_s3_on_ray_finds_the_same(audited, s3_bucket, tmp_path, bundled_model):
    """The manifest, its images and the model in S3 (moto on loopback), the output too; the
    scoring engine on a local Ray. Same findings as the in-process run."""
    upload_tree(audited["manifest"].parent, f"{s3_bucket}/catalog")
    upload_tree(Path(bundled_model), f"{s3_bucket}/model")
    output = f"{s3_bucket}/audit"
    proc = _audit_cli("--manifest", f"{s3_bucket}/catalog/manifest.parquet", "--model",
                      f"{s3_bucket}/model", "--output", output, "--executor", "ray",
                      "--num-cpus", "2", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert summary["executor"] == "ray" and summary["rows"] == audited["rows"]
    import s3fs

    fs = s3fs.S3FileSystem()
    read = {name: pq.read_table(f"{output.removeprefix('s3://')}/{name}", filesystem=fs).to_pylist()
            for name in (DUPLICATES_FILE, LABEL_ISSUES_FILE, OUTLIERS_FILE, ERRORS_FILE)}
    assert _pairs(read[DUPLICATES_FILE]) == _pairs(audited[DUPLICATES_FILE])
    assert [(e["product_id"], e["error_type"]) for e in read[ERRORS_FILE]] == [
        (e["product_id"], e["error_type"]) for e in audited[ERRORS_FILE]]
    flagged = {r["product_id"] for r in read[LABEL_ISSUES_FILE] if r["flagged"]}
    assert audited["flipped"] <= flagged
    top = max(read[OUTLIERS_FILE], key=lambda r: r["score"])
    assert top["product_id"] == "blank" and top["flagged"]
    assert fs.exists(f"{output.removeprefix('s3://')}/{REPORT_FILE}")
