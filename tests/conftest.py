"""Shared fixtures: a small local Ray, real Grocery Store images, the bundled model."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import BUNDLED_MODEL, EXAMPLES_DIR, GROCERY_DATASET
from pipeline.importers import grocery_store_rows
from pipeline.sinks import rows

SAMPLE_DIR = EXAMPLES_DIR / "sample-catalog"


def pytest_collection_modifyitems(config, items):
    import torch

    # Slow tests first: with the suite spread over workers (pytest-xdist), a long test that
    # starts last would keep one worker busy after the others ran out of work.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():  # a job an earlier test ran in this process may have started it
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    root = Path(GROCERY_DATASET)
    if not (root / "classes.csv").exists():
        pytest.skip(f"Grocery Store dataset not found at {root}")
    return root


def photos_by_category() -> dict[str, list[Path]]:
    """The bundled sample catalog's real product photos: category -> its photos, sorted."""
    return {d.name: sorted(d.iterdir()) for d in sorted((SAMPLE_DIR / "images").iterdir())}


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """Real product photos from the bundled sample catalog, one per category first."""
    return [photos[0] for photos in photos_by_category().values()]


@pytest.fixture(scope="session")
def bundled_model() -> str:
    return BUNDLED_MODEL


TINY_ARCHITECTURE, TINY_INPUT_SIZE, TINY_SEED = "mobilenet_v3_small", 64, 0


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_images) -> str:
    """A small, fast model artifact for tests that only need *a* model to push a catalog through
    the pipeline (decode + inference about 35x the bundled model's images/s on one core); tests
    of the bundled model's own contract (accuracy, temperature, threshold, demo) keep
    `bundled_model`.

    mobilenet_v3_small at 64 px, seeded random convolutions; no gradient step: its BatchNorm
    statistics are those of the sample catalog's photos and its head is the class means of their
    embeddings (weight imprinting), so predictions and confidences vary with the image. The photos
    other than `sample_images` play the training split, `sample_images` the validation split the
    centroid open-set threshold is set on. Same classes and coarse map as the bundled model;
    written by pipeline.models.artifact.save_artifact. Built on one thread, so float sums do not depend
    on the core count: the same model_version every session on a given kind of CPU."""
    import torch

    from pipeline.images.decode import decode_image
    from pipeline.models.artifact import ModelMetadata, load_metadata, save_artifact
    from pipeline.models.registry import get_spec
    from pipeline.models.transforms import norm_tensors, to_model_input

    bundled = load_metadata(BUNDLED_MODEL)
    spec = get_spec(TINY_ARCHITECTURE)
    val = set(sample_images)
    train = [p for p in sorted((SAMPLE_DIR / "images").rglob("*")) if p.is_file() and p not in val]
    mean, std = norm_tensors(spec.mean, spec.std, "cpu")

    def split(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([decode_image(p.read_bytes(), TINY_INPUT_SIZE) for p in paths])
        labels = torch.tensor([bundled.classes.index(p.parent.name) for p in paths])
        return to_model_input(torch.from_numpy(images), mean, std), labels

    (x_train, y_train), (x_val, _) = split(train), split(sorted(val))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, centroids, open_set = _imprinted_model(x_train, y_train, x_val, len(bundled.classes))
    finally:
        torch.set_num_threads(threads)
    meta = ModelMetadata(
        architecture=TINY_ARCHITECTURE, classes=list(bundled.classes), input_size=TINY_INPUT_SIZE,
        mean=list(spec.mean), std=list(spec.std), coarse_classes=dict(bundled.coarse_classes),
        training={"kind": "test fixture", "seed": TINY_SEED, "train_rows": len(train)},
        open_set=open_set)
    uri = str(tmp_path_factory.mktemp("tiny_model") / "model")
    save_artifact(model, meta, uri, centroids)
    return uri


def _imprinted_model(x_train, y_train, x_val, num_classes: int):
    """tiny_model's network: seeded convolutions, BatchNorm statistics of x_train, a head of
    x_train's class-mean embeddings; and its centroids and open-set record (set on x_val)."""
    import torch

    from pipeline.models import openset
    from pipeline.models.registry import create_model, get_spec

    with torch.random.fork_rng(devices=[]):  # seeded without touching the session's RNG state
        torch.manual_seed(TINY_SEED)
        model = create_model(TINY_ARCHITECTURE, num_classes)
    batch_norms = {m: m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for bn in batch_norms:
        bn.momentum = None  # running statistics = the average over the pass below
    with torch.no_grad():
        model.train()(x_train)
    for bn, momentum in batch_norms.items():
        bn.momentum = momentum
    model.eval()
    head = model.get_submodule(get_spec(TINY_ARCHITECTURE).head)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].float()))
    with torch.inference_mode():
        model(x_train)
    centroids = openset.class_centroids(seen[0], y_train, num_classes)
    with torch.no_grad():
        head.weight.copy_(centroids * 20 / seen[0].norm(dim=1).mean())
        head.bias.zero_()
    seen.clear()
    with torch.inference_mode():
        logits = model(x_val)
    hook.remove()
    return model, centroids, openset.calibrate(logits, 1.0, seen[0], centroids)


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


def summary_json(stdout: str) -> dict:
    """The run summary a job prints, picked out of stdout that Ray's worker logs may share."""
    start = stdout.rindex('{\n  "run_id"')
    return json.loads(stdout[start: stdout.index("\n}", start) + 2])


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


BAD_ROWS = {"bad-corrupt": "decode_failed", "bad-text": "not_an_image",
            "bad-missing": "fetch_not_found"}


def catalog_image(folder: Path, i: int) -> str:
    """The absolute path of photo `i` of a `dated_catalog`."""
    return str(folder / "images" / f"{i:02d}.jpg")


def dated_catalog(folder: Path, sample_images: list[Path], rows: int,
                  spare: int = 0) -> list[dict]:
    """`rows` real photos copied under folder/images and listed by absolute path with their
    true category (each night's manifest lives in its own dated folder, as a scheduler writes
    them), `spare` more photos copied but not listed (to swap in later), and one row whose image
    is missing."""
    (folder / "images").mkdir(parents=True)
    listed = []
    for i, src in enumerate(sample_images[:rows + spare]):
        shutil.copyfile(src, catalog_image(folder, i))
        if i < rows:
            listed.append({"product_id": f"p{i:02d}", "image_uri": catalog_image(folder, i),
                           "current_category": src.parent.name})
    listed.append({"product_id": "p-missing", "image_uri": str(folder / "images" / "missing.jpg"),
                   "current_category": None})
    return listed


def make_catalog(root: Path, sample_images: list[Path], good: int = 24) -> tuple[Path, int]:
    """`good` real photos copied under root/images plus a corrupt JPEG, a text file named .jpg
    and a missing file, all relative to the manifest (so the folder can be uploaded as is).
    Returns (manifest, rows); the bad rows' expected error types are BAD_ROWS."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for i, src in enumerate(sample_images[:good]):
        shutil.copyfile(src, images / src.name)
        rows.append({"product_id": f"p{i:03d}", "image_uri": f"images/{src.name}",
                     "current_category": src.parent.name})
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header, then garbage")
    (images / "notes.jpg").write_text("a text file with an image name")
    rows += [{"product_id": "bad-corrupt", "image_uri": "images/corrupt.jpg",
              "current_category": "Banana"},
             {"product_id": "bad-text", "image_uri": "images/notes.jpg",
              "current_category": "Banana"},
             {"product_id": "bad-missing", "image_uri": "images/missing.jpg",
              "current_category": None}]
    return write_manifest(root / "manifest.parquet", rows), len(rows)


@pytest.fixture
def small_catalog(tmp_path, sample_images) -> tuple[Path, int, dict[str, str]]:
    """make_catalog with 24 good rows: (manifest, rows, expected error types)."""
    manifest, rows = make_catalog(tmp_path / "catalog", sample_images)
    return manifest, rows, dict(BAD_ROWS)


# --- Object storage and HTTP on loopback -------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = _free_port()
LOOPBACK_AWS_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "AKIDLOOPBACKTEST0001",
    "AWS_SECRET_ACCESS_KEY": "loopback-secret-never-logged-7f3a9c",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session", autouse=True)
def loopback_aws_env():
    """Point every AWS client of the session (Ray workers included: they inherit the environment
    of the Ray started after this) at the loopback S3 server, with throwaway credentials."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in LOOPBACK_AWS_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(key, raising=False)
        yield LOOPBACK_AWS_ENV


@pytest.fixture(scope="session")
def s3_server(loopback_aws_env):
    """moto's S3-compatible server on 127.0.0.1 (the port the environment names)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield loopback_aws_env["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback server; returns its s3:// root."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_tree(local: Path, s3_uri: str) -> None:
    """Copy a local folder to s3_uri with s3fs, as a user's sync would."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{s3_uri.removeprefix('s3://')}/{path.relative_to(local).as_posix()}")


class ImageServer:
    """A loopback HTTP server with fixed routes: bytes, a status code, a redirect, or a hang."""

    def __init__(self):
        import http.server
        import threading

        self.routes: dict[str, tuple] = {}
        self.hits: dict[str, int] = {}
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                kind, *args = server.routes.get(self.path, ("status", 404))
                if kind == "hang":
                    server.release.wait(args[0])
                    return
                if kind == "flaky" and server.hits[self.path] <= args[0]:
                    kind, args = "status", [503]
                elif kind == "flaky":
                    kind, args = "bytes", [args[1]]
                if kind == "status":
                    self.send_response(args[0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", args[0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(args[0])))
                    self.end_headers()
                    self.wfile.write(args[0])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server():
    server = ImageServer()
    yield server
    server.close()


# --- Every kind of image a vendor sends ----------------------------------------------------------

def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, then a tiny IDAT: a
    decompression bomb's header without the bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def odd_images(photo: Path, max_bytes: int) -> dict[str, tuple[bytes, str | None]]:
    """file name -> (bytes, expected error_type or None for ok), built from one real photo.
    Every format quirk that must decode, and every local-file kind of bad image."""
    src = Image.open(photo)
    src.load()
    rgb = src.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    sixteen = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    real = photo.read_bytes()
    return {
        "exif_rotated.jpg": (_save(rgb.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif), None),
        "grayscale.jpg": (_save(rgb.convert("L"), "JPEG"), None),
        "palette_transparent.png": (_save(palette, "PNG"), None),
        "rgba.png": (_save(rgb.convert("RGBA"), "PNG"), None),
        "cmyk.jpg": (_save(rgb.convert("CMYK"), "JPEG"), None),
        "sixteen_bit.png": (_save(sixteen, "PNG"), None),
        "animated.gif": (_save(frames[0], "GIF", save_all=True, append_images=frames[1:]), None),
        "animated.webp": (_save(frames[0], "WEBP", save_all=True, append_images=frames[1:]), None),
        "progressive.jpg": (_save(rgb, "JPEG", progressive=True), None),
        "huge_allowed.jpg": (_save(rgb.resize((3000, 2000)), "JPEG", quality=70), None),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 a JPEG header, then garbage", "decode_failed"),
        "notes.jpg": (b"a text file with an image name", "not_an_image"),
        "empty.jpg": (b"", "not_an_image"),
        "truncated.jpg": (real[: len(real) // 2], "truncated"),
        "truncated.png": (_save(rgb, "PNG")[:5000], "truncated"),
        "bomb.png": (_png_header_only(100_000, 100_000), "too_large"),
        "padded.jpg": (real + b"\0" * (max_bytes + 1), "too_large"),
        "icon.ico": (_save(rgb.resize((64, 64)), "ICO"), "unsupported_format"),
        "photo.heic": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "unsupported_format"),
    }


def committed_table(out: Path) -> pa.Table:
    """The rows of the run an output folder's `_SUCCESS` names, sorted by product_id."""
    marker = json.loads((Path(out) / "_SUCCESS").read_text())
    return pq.ParquetDataset([str(Path(out) / f) for f in marker["files"]]).read().sort_by(
        "product_id")


def night_table(run_id: str, categories: dict[str, str]) -> pa.Table:
    """A night's output rows in the current output schema; columns not named here are null, or
    a fixed value where the schema forbids nulls."""
    schema = rows.OUTPUT_SCHEMA
    ids = sorted(categories)
    n = len(ids)
    when = dt.datetime(2026, 12, 1, 1, 0, tzinfo=dt.UTC)
    known = {
        "product_id": ids,
        "image_uri": [f"s3://images/{p}.jpg" for p in ids],
        "status": ["ok"] * n,
        "predicted_category": [categories[p] for p in ids],
        "confidence": [0.75] * n,
        "top_k": [[{"category": categories[p], "score": 0.75}] for p in ids],
        "current_category": [categories[p] for p in ids],
        "category_changed": [False] * n,
        "needs_review": [False] * n,
        "run_id": [run_id] * n,
        "scored_run_id": [run_id] * n,
        "processed_at": [when] * n,
    }
    columns = []
    for field in schema:
        if field.name in known:
            columns.append(pa.array(known[field.name], field.type))
        elif field.nullable:
            columns.append(pa.nulls(n, field.type))
        elif pa.types.is_string(field.type):
            columns.append(pa.array([f"{field.name}-value"] * n, field.type))
        else:
            raise AssertionError(f"night_table cannot fill required column {field}")
    return pa.Table.from_arrays(columns, schema=schema)


# Six classes in three coarse categories: the smallest real training set with look-alikes.
SMALL_CLASSES = ("Banana", "Kiwi", "Granny-Smith", "Pink-Lady", "Oatly-Oat-Milk", "Arla-Standard-Milk")


def small_training_manifest(grocery_root: Path, path: Path, train_per_class: int = 8,
                            val_per_class: int = 3) -> Path:
    """A real Grocery Store training manifest with 6 classes in 3 coarse categories."""
    rows = [r for r in grocery_store_rows(str(grocery_root), ["train", "val"])
            if r["category"] in SMALL_CLASSES]
    keep, seen = [], {}
    for row in rows:
        key = (row["category"], row["split"])
        limit = train_per_class if row["split"] == "train" else val_per_class
        if seen.get(key, 0) < limit:
            seen[key] = seen.get(key, 0) + 1
            keep.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(keep), path)
    return path
