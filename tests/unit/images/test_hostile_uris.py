"""Hostile `image_uri` values: a seeded fuzz of 1,000 through the shared fetch path (every job
that reads images scores through the engine's preprocessor; thumbnails and export calibration
through `ImageSettings.fetch` and `fetch_bytes`) and through a whole nightly job. Every one
becomes a typed error row, nothing raises, and a canary server on 127.0.0.2, outside the
policy's networks, is never asked for anything.

No generated URI names a host by a DNS name: hosts are IP literals (loopback, private,
encoded), broken literals or absent, so the fuzz sends nothing past loopback."""

import http.server
import random
import threading

import numpy as np
import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline.errors import ROW_ERROR_TYPES, ImageError
from pipeline.images.security import UriPolicy
from pipeline.inference.engine import ImageSettings
from pipeline.inference.export_images import calibration_images
from tests.conftest import summary_json, write_manifest

COUNT = 1000
CANARY_HOST = "127.0.0.2"


@pytest.fixture
def canary():
    """An HTTP server on 127.0.0.2 that counts every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    try:
        server = http.server.ThreadingHTTPServer((CANARY_HOST, 0), Handler)
    except OSError:
        pytest.skip(f"cannot bind {CANARY_HOST} on this machine")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hits
    server.shutdown()


def hostile_uris(port: int, seed: int = 0, count: int = COUNT) -> list[str]:
    """Seeded hostile values: random bytes, NUL, broken IPv6, overlong, percent-encoding,
    unicode, mixed and odd schemes, and encoded spellings of the canary's address."""
    rng = random.Random(seed)
    canary = [f"http://{CANARY_HOST}:{port}/a.jpg", f"http://2130706434:{port}/a.jpg",
              f"http://0x7f.0.0.2:{port}/a.jpg", f"http://127.2:{port}/a.jpg",
              f"http://[::ffff:{CANARY_HOST}]:{port}/a.jpg", f"https://{CANARY_HOST}:{port}/a.jpg",
              f"HTTP://{CANARY_HOST}:{port}/%2e%2e/a.jpg", f"http://user:pw@{CANARY_HOST}:{port}/"]
    fixed = ["", " ", "\x00", "a\x00b.jpg", "/etc/passwd", "../../../etc/passwd", "file:///etc/passwd",
             "http://[::1/x.jpg", "https://[", "http://[:::::]/", "https://[fe80::1%eth0]/x.jpg",
             "s3:/", "s3://", "gs:///x", "ftp://10.0.0.1/x.jpg", "data:image/png;base64,AAAA",
             "javascript:alert(1)", "\\\\server\\share\\a.jpg", "images/%00.jpg", "%2e%2e/%2e%2e/x",
             "\u202egpj.exe", "\uff48\uff54\uff54\uff50://127.0.0.2/", "images/" + "a" * 5000 + ".jpg",
             "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x.jpg",
             "http://[::]/x.jpg", "file://" + "/a" * 3000, "http://0/x.jpg", "http:///x.jpg"]
    alphabet = [chr(c) for c in range(0, 0x250)] + ["/", ":", "%", "[", "]", "@", "?", "#", "\\"]
    schemes = ["", "file://", "s3://", "gs://", "http://", "https://", "HtTp://", "ftp://", "x-y:"]
    out = canary + fixed
    while len(out) < count:
        kind = rng.randrange(4)
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        if kind == 0:  # a scheme and noise; http(s) only before an IP literal or nothing
            scheme = rng.choice(schemes)
            host = rng.choice(["[::1", "127.0.0.2", "10.1.2.3", "[", "", "0x7f000002"]) \
                if scheme.lower().startswith("http") else ""
            out.append(f"{scheme}{host}/{noise}")
        elif kind == 1:  # bytes that are not text
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
                       .decode("latin-1"))
        elif kind == 2:  # percent-encoding of anything
            out.append("images/" + "".join(f"%{rng.randrange(256):02X}" for _ in range(8)))
        else:  # a canary spelling with noise appended
            out.append(rng.choice(canary) + noise)
    return out[:count]


def test_a_thousand_hostile_uris_through_the_fetch_path(canary, tmp_path):
    port, hits = canary
    uris = hostile_uris(port)
    policy = UriPolicy.from_options("file,http,https,s3,gs", "", "127.0.0.1/32", str(tmp_path))
    settings = ImageSettings(32, str(tmp_path), policy, max_bytes=1_000_000, fetch_timeout_s=0.5,
                             fetch_retries=0)
    batch = {"product_id": np.array([f"p{i}" for i in range(len(uris))], dtype=object),
             "image_uri": np.array(uris, dtype=object)}
    out = settings.preprocessor(threads=4)(batch)  # what every image-reading job runs
    assert len(out["status"]) == COUNT and set(out["status"]) == {"error"}
    assert set(out["error_type"]) <= set(ROW_ERROR_TYPES)
    assert all(out["error_message"])
    for uri in uris[:200]:  # thumbnails: the same path, one at a time
        with pytest.raises(ImageError):
            settings.fetch(uri)
    assert hits == []


def test_export_calibration_reads_hostile_rows_as_refusals(canary, tmp_path):
    port, hits = canary
    rows = [{"product_id": f"p{i}", "image_uri": u, "category": "x"}
            for i, u in enumerate(hostile_uris(port, seed=1, count=200))]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    with pytest.raises(Exception, match="no readable training images") as caught:
        calibration_images(str(manifest), 32, 200, seed=0)
    assert caught.type.__name__ == "ConfigError" and hits == []


@pytest.mark.slow
def test_a_night_of_hostile_uris_is_all_error_rows_and_no_traceback(canary, tmp_path, tiny_model,
                                                                   capsys):
    port, hits = canary
    uris = hostile_uris(port, seed=2)
    rows = [{"product_id": f"p{i:04d}", "image_uri": u} for i, u in enumerate(uris)]
    manifest = write_manifest(tmp_path / "catalog" / "manifest.parquet", rows)
    code = run_job(recategorize_main, [
        "--manifest", str(manifest), "--model", tiny_model, "--output", str(tmp_path / "out"),
        "--allowed-uri-schemes", "file,http,https,s3,gs", "--allowed-networks", "127.0.0.1/32",
        "--fetch-retries", "0", "--fetch-timeout-s", "0.5", "--max-error-rate", "1",
        "--executor", "local"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "Traceback" not in captured.err
    summary = summary_json(captured.out)
    assert summary["rows"] == summary["errors"] == COUNT
    assert summary["actions"] == {"review": COUNT} and summary["action_reasons"] == {"error": COUNT}
    assert hits == []
