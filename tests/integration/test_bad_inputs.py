"""Every kind of bad image becomes an error row of its type; every quirky good one decodes.

Local files, a loopback HTTP server and a generated catalog of 2,000 rows run through the real
job on a real local Ray.
"""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline.errors import ImageError
from pipeline.images import fetch
from pipeline.images.decode import decode_image, open_reduced
from pipeline.images.fetch import fetch_bytes
from pipeline.images.preprocess import Preprocessor
from pipeline.images.security import UriPolicy
from tests.conftest import _png_header_only, _save, odd_images, summary_json, write_manifest

MAX_BYTES = 3_000_000
LOOPBACK = UriPolicy(schemes=("file", "http"), allowed_networks=("127.0.0.0/8",))


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF_S", 0.01)


def test_every_local_kind_gets_its_type(tmp_path, sample_images):
    kinds = odd_images(sample_images[5], MAX_BYTES)
    for name, (data, _) in kinds.items():
        (tmp_path / name).write_bytes(data)
    names = [*kinds, "missing.jpg"]
    batch = {"product_id": np.array(names, dtype=object), "image_uri": np.array(names, dtype=object)}
    out = Preprocessor(96, str(tmp_path), max_bytes=MAX_BYTES)(batch)
    got = dict(zip(names, out["error_type"], strict=True))
    expected = {name: kind for name, (_, kind) in kinds.items()} | {"missing.jpg": "fetch_not_found"}
    assert got == expected
    assert all(m for m, e in zip(out["error_message"], out["error_type"], strict=True) if e)
    ok = out["status"] == "ok"
    # Every good quirk decoded to a real picture, not a blank.
    assert ok.sum() == 10 and out["image"][ok].reshape(10, -1).std(axis=1).min() > 5


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_use_the_first_frame(sample_images, fmt):
    first = Image.open(sample_images[6]).convert("RGB")
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    out = decode_image(_save(first, fmt, save_all=True, append_images=[second]), 64)
    assert _distance(out, decode_image(_save(first, "PNG"), 64)) < \
        _distance(out, decode_image(_save(second, "PNG"), 64))


def test_progressive_jpeg_matches_baseline(sample_images):
    im = Image.open(sample_images[7]).convert("RGB")
    progressive = decode_image(_save(im, "JPEG", quality=95, progressive=True), 96)
    baseline = decode_image(_save(im, "JPEG", quality=95), 96)
    assert _distance(progressive, baseline) < 2


def test_palette_transparency_is_composited_on_white():
    im = Image.new("P", (40, 40), 1)
    im.putpalette([0, 0, 0] + [200, 30, 30] * 255)
    for x in range(20):
        for y in range(40):
            im.putpixel((x, y), 0)  # left half: index 0, declared transparent
    out = decode_image(_save(im, "PNG", transparency=0), 40)
    assert (out[:, :18] == 255).all() and (out[:, 22:] == (200, 30, 30)).all()


def test_huge_allowed_jpeg_is_reduced_while_decoding(sample_images):
    big = _save(Image.open(sample_images[8]).convert("RGB").resize((4800, 3600)), "JPEG", quality=80)
    im = open_reduced(big, 160, max_pixels=100_000_000)
    # The decoder was asked for 1/8 scale: 600 x 450, still covering 160 px.
    assert im.size == (600, 450)
    assert decode_image(big, 160).shape == (160, 160, 3)


def test_pixel_limit_is_checked_before_decoding():
    """A header declaring 10 gigapixels is refused from the header: decoding it would need 30 GB."""
    with pytest.raises(ImageError) as info:
        decode_image(_png_header_only(100_000, 100_000), 160)
    assert info.value.error_type == "too_large"
    with pytest.raises(ImageError) as info:
        decode_image(_png_header_only(2000, 2000), 160, max_pixels=1_000_000)
    assert info.value.error_type == "too_large" and "2000x2000" in info.value.message


def test_http_kinds(image_server, sample_images, fast_backoff):
    data = sample_images[0].read_bytes()
    image_server.routes.update({
        "/ok.jpg": ("bytes", data), "/flaky.jpg": ("flaky", 2, data), "/down.jpg": ("status", 503),
        "/forbidden.jpg": ("status", 403), "/slow.jpg": ("hang", 30), "/big.jpg": ("bytes", data)})

    def kind(path, **kwargs):
        try:
            fetch_bytes(image_server.url(path), kwargs.pop("max_bytes", MAX_BYTES), policy=LOOPBACK,
                        **kwargs)
        except ImageError as exc:
            return exc.error_type
        return "ok"

    assert kind("/ok.jpg") == "ok"
    assert kind("/flaky.jpg", retries=3) == "ok" and image_server.hits["/flaky.jpg"] == 3
    assert kind("/down.jpg", retries=2) == "fetch_failed" and image_server.hits["/down.jpg"] == 3
    assert kind("/forbidden.jpg", retries=2) == "fetch_failed" and image_server.hits["/forbidden.jpg"] == 1
    assert kind("/gone.jpg", retries=2) == "fetch_not_found" and image_server.hits["/gone.jpg"] == 1
    assert kind("/slow.jpg", retries=1, timeout=0.3) == "fetch_timeout"
    assert image_server.hits["/slow.jpg"] == 2
    assert kind("/big.jpg", max_bytes=1000) == "too_large"


def build_catalog(root, sample_images, image_server, rows: int = 2000):
    """A catalog of `rows` products: the sample photos referenced many times, every odd format
    once, every bad kind at least once. Returns (manifest path, {product_id: expected error})."""
    images = root / "catalog" / "images"
    images.mkdir(parents=True)
    for src in sample_images:
        shutil.copyfile(src, images / src.name)
    kinds = odd_images(sample_images[10], MAX_BYTES)
    for name, (data, _) in kinds.items():
        (images / name).write_bytes(data)
    (root / "outside.jpg").write_bytes(sample_images[0].read_bytes())
    data = sample_images[11].read_bytes()
    image_server.routes.update({"/ok.jpg": ("bytes", data), "/flaky.jpg": ("flaky", 1, data),
                                "/down.jpg": ("status", 503), "/slow.jpg": ("hang", 60)})
    special = [(f"images/{name}", kind) for name, (_, kind) in kinds.items()] + [
        ("images/missing.jpg", "fetch_not_found"),
        ("../outside.jpg", "fetch_failed"),           # outside the manifest's folder
        ("ftp://images.vendor.test/a.jpg", "fetch_failed"),  # scheme not allowed
        ("images/nul\x00byte.jpg", "fetch_failed"),          # not a path: one row, not the night
        ("http://[::1/broken-ipv6.jpg", "fetch_failed"),     # not a URL either
        (image_server.url("/ok.jpg"), None),
        (image_server.url("/flaky.jpg"), None),
        (image_server.url("/gone.jpg"), "fetch_not_found"),
        (image_server.url("/down.jpg"), "fetch_failed"),
        (image_server.url("/slow.jpg"), "fetch_timeout"),
    ]
    table, expected = [], {}
    for i in range(rows):
        pid = f"sku-{i:05d}"
        if i % 50 == 3 and special:
            uri, kind = special.pop()
            if kind:
                expected[pid] = kind
        else:
            src = sample_images[i % len(sample_images)]
            uri = f"images/{src.name}"
        table.append({"product_id": pid, "image_uri": uri, "current_category": "Banana"})
    assert not special, "catalog too small for every kind"
    return write_manifest(root / "catalog" / "manifest.parquet", table), expected


@pytest.mark.slow
def test_generated_catalog_every_row_once_with_its_reason(ray_local, tmp_path, sample_images,
                                                          image_server, tiny_model, capsys):
    manifest, expected = build_catalog(tmp_path, sample_images, image_server)
    out = tmp_path / "out"
    code = run_job(recategorize_main, [
        "--manifest", str(manifest), "--model", tiny_model, "--output", str(out),
        "--max-image-bytes", str(MAX_BYTES), "--allowed-uri-schemes", "file,http",
        "--allowed-networks", "127.0.0.0/8", "--fetch-timeout-s", "0.5", "--fetch-retries", "1",
        "--batch-size", "64"])
    assert code == 0
    summary = summary_json(capsys.readouterr().out)
    table = pq.read_table(out / "predictions")
    ids = table.column("product_id").to_pylist()
    assert len(ids) == len(set(ids)) == 2000 == summary["rows"]
    got = {r["product_id"]: r for r in table.to_pylist()}
    assert {pid: got[pid]["error_type"] for pid in expected} == expected
    assert all(got[pid]["error_message"] and got[pid]["status"] == "error" for pid in expected)
    good = [r for pid, r in got.items() if pid not in expected]
    assert all(r["status"] == "ok" and r["predicted_category"] for r in good)
    assert summary["errors"] == len(expected) and summary["chunks"] == 1
    assert set(expected.values()) == {
        "fetch_not_found", "fetch_failed", "fetch_timeout", "not_an_image", "truncated",
        "too_large", "unsupported_format", "decode_failed"}
