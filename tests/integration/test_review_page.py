"""The review page end to end: a real night (the nightly job on real photos with the bundled
model), the real server on 127.0.0.1, a real headless Chromium, the real reviews table."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import RecategorizeConfig
from pipeline.config.review import ReviewConfig
from pipeline.review.queue import QUEUE_COLUMNS, load_queue
from pipeline.review.server import start_in_thread
from pipeline.sinks.reviews import ReviewsTable
from tests.conftest import photos_by_category, write_manifest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
TOKEN = "a-test-token-that-is-long-enough"
# One worker builds the night and runs every test of the page on it.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("review_page")]

browser_test = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromedriver (apt-get install chromium chromium-driver; "
    ".ci/run installs them)")


# --- a real night -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def night(tmp_path_factory, bundled_model) -> Path:
    """A committed night of the bundled model over 36 real photos: right, wrong (within the
    coarse group, the look-alikes a catalog confuses) and missing current categories, so that
    it keeps, changes and reviews; plus one image outside the manifest's folder (outside the
    URI policy: an error row to review whose thumbnail the page must refuse)."""
    from pipeline.nightly.recategorize import run

    root = tmp_path_factory.mktemp("review-night")
    photos = photos_by_category()
    names = sorted(photos)
    rows = []
    for i, name in enumerate(names[:36]):
        src = photos[name][-1]
        (root / "catalog" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / "catalog" / "images" / src.name)
        current = {0: name, 1: names[(i + 1) % len(names)], 2: None}[i % 3]
        rows.append({"product_id": f"p{i:03d}", "image_uri": f"images/{src.name}",
                     "current_category": current})
    outside = root / "elsewhere" / "photo.jpg"
    outside.parent.mkdir()
    shutil.copyfile(photos[names[0]][0], outside)
    rows.append({"product_id": "p-outside", "image_uri": str(outside), "current_category": names[0]})
    manifest = write_manifest(root / "catalog" / "manifest.parquet", rows)
    out = root / "out"
    # At the default 0.95 the bundled model proposes no change on so few rows; at 0.8 it
    # changes the confident ones, which the audit sample draws from.
    run(RecategorizeConfig(manifest=str(manifest), model=bundled_model, output=str(out),
                           executor="local", max_error_rate=1.0, change_precision=0.8))
    return out


def serve(night: Path, tmp: Path, **options):
    cfg = ReviewConfig(**{"output": str(night), "port": 0, "reviews": str(tmp / "reviews"),
                          "reviewer": "tester", **options})
    return start_in_thread(cfg)


@pytest.fixture
def server(night, tmp_path, grocery_root):
    running = serve(night, tmp_path, iconic_images=str(grocery_root))
    yield running
    running.stop()


def request(url: str, body: dict | None = None, headers: dict | None = None,
            content_type: str = "application/json") -> tuple[int, bytes, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}),
                                 method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def queue(url: str, **params) -> dict:
    query = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **params}.items())
    return json.loads(request(f"{url}api/queue?{query}")[1])


# --- the browser --------------------------------------------------------------------------------

@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def open_one():
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1400,900"):
            options.add_argument(arg)
        # The system chromedriver: Selenium Manager never downloads a browser or a driver.
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        drivers.append(driver)
        return driver

    yield open_one
    for driver in drivers:
        driver.quit()


def wait(driver, script: str, timeout: float = 60):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {script}")


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, "document.body.dataset.ready === '1'")


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def decide_by_key(driver, key: str) -> str:
    """Press `key` on the shown item; wait until the server said saved and the page moved on.
    Returns the decided product id."""
    product = driver.execute_script("return document.getElementById('item').dataset.id")
    driver.execute_script("document.getElementById('status').textContent = ''")
    press(driver, key)
    wait(driver, "document.getElementById('status').textContent === 'saved'")
    wait(driver, f"document.querySelector('#queue li[data-id=\"{product}\"]').dataset.decided")
    return product


def show(driver, product: str) -> None:
    """Move with j / ArrowUp until `product` is the shown item."""
    ids = driver.execute_script("return [...document.querySelectorAll('#queue li')].map(l => l.dataset.id)")
    from selenium.webdriver.common.keys import Keys

    for _ in range(len(ids)):
        at = driver.execute_script("return document.getElementById('item').dataset.id")
        if at == product:
            return
        press(driver, "j" if ids.index(product) > ids.index(at) else Keys.ARROW_UP)
        time.sleep(0.05)
    raise AssertionError(f"could not reach {product}")


@browser_test
def test_thumbnails_load_and_three_keyboard_decisions_and_an_undo_land_in_the_table(
        server, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    items = queue(server.url)["items"]
    suggested = [i for i in items if i["top_k"] and i["current"]]
    assert len(suggested) >= 3
    driver = browser()
    open_page(driver, server.url)
    # Every queue thumbnail the policy allows has loaded as a real image; the refused one
    # shows "no image" instead of a broken icon.
    wait(driver, "[...document.images].every(i => i.complete)")
    sizes = driver.execute_script(
        "return [...document.querySelectorAll('#queue li')].map(l => "
        "[l.dataset.id, l.querySelector('img') ? l.querySelector('img').naturalWidth : 0])")
    widths = dict(sizes)
    assert all(widths[i["id"]] > 0 for i in items if i["id"] != "p-outside")
    assert widths.get("p-outside", 0) == 0

    first, second, third = suggested[:3]
    show(driver, first["id"])
    # The shown photo and the iconic image of each suggestion (from the dataset's iconic folder).
    wait(driver, "document.querySelector('#item .photo img').naturalWidth > 0")
    assert wait(driver, "[...document.querySelectorAll('#item img.iconic')].filter("
                        "i => i.naturalWidth > 0).length") == len(first["top_k"])
    assert decide_by_key(driver, "1") == first["id"]          # the top suggestion
    show(driver, second["id"])
    assert decide_by_key(driver, "k") == second["id"]         # keep the current category
    show(driver, third["id"])
    other = next(c for c in ("Satsumas", "Red-Beet", "Garlic")
                 if c not in {t["category"] for t in third["top_k"]})
    driver.execute_script("document.getElementById('status').textContent = ''")
    press(driver, "/")
    wait(driver, "!document.getElementById('search').hidden")
    press(driver, other, Keys.ENTER)
    wait(driver, "document.getElementById('status').textContent === 'saved'")
    press(driver, "u")                                        # undo the search decision
    wait(driver, "document.getElementById('status').textContent === 'undone (saved)'")
    assert driver.execute_script("return document.getElementById('item').dataset.id") == third["id"]
    assert driver.execute_script(
        f"return document.querySelector('#queue li[data-id=\"{third['id']}\"]').dataset.decided") is None

    table = ReviewsTable(str(tmp_path / "reviews"))
    rows = table.rows().to_pylist()
    assert Counter(r["kind"] for r in rows) == {"decide": 3, "undo": 1}
    decided = {r["product_id"]: r for r in rows if r["kind"] == "decide"}
    assert decided[first["id"]]["decided_category"] == first["top_k"][0]["category"]
    assert decided[second["id"]]["decided_category"] == second["current"]
    assert decided[third["id"]]["decided_category"] == other
    undo = next(r for r in rows if r["kind"] == "undo")
    assert undo["undoes"] == decided[third["id"]]["decision_id"]
    in_force = {r["product_id"]: r["decided_category"] for r in table.latest().to_pylist()}
    assert in_force == {first["id"]: first["top_k"][0]["category"], second["id"]: second["current"]}
    row = decided[first["id"]]
    assert row["reviewer"] == "tester" and row["run_id"] == server.state.run.run_id
    assert row["image_uri"] and row["image_version"] and row["model_version"]
    # The browser never saw where an image lies.
    html = driver.page_source + json.dumps(items)
    assert "images/" not in html and str(tmp_path) not in html


@browser_test
def test_two_pages_on_two_servers_deciding_at_once_lose_nothing(night, tmp_path, browser):
    """Two reviewers, each with a page on their own server, deciding the same queue at the same
    time into one reviews table: every decision is a row."""
    servers = [serve(night, tmp_path, reviewer=f"r{n}") for n in (1, 2)]
    try:
        drivers = [browser(), browser()]
        for driver, running in zip(drivers, servers, strict=True):
            open_page(driver, running.url)
        decided: dict[int, list[str]] = {0: [], 1: []}
        errors: list[BaseException] = []

        def reviewer(n: int) -> None:
            try:
                for _ in range(10):
                    if len(decided[n]) == 3:
                        return
                    if drivers[n].execute_script(
                            "return document.querySelectorAll('#item ol.suggestions li').length"):
                        decided[n].append(decide_by_key(drivers[n], "1"))
                    else:  # an unreadable image: nothing to pick, on to the next
                        press(drivers[n], "j")
                        time.sleep(0.1)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reviewer, args=(n,)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert errors == []
        # And plain concurrent POSTs to both servers: 2 x 2 threads x 10 decisions.
        item = next(i for i in queue(servers[0].url)["items"] if i["top_k"])
        answers: list[int] = []

        def poster(url: str) -> None:
            for _ in range(10):
                answers.append(request(url + "api/decisions", {"product_id": item["id"],
                                                               "category": item["top_k"][0]["category"]})[0])

        posters = [threading.Thread(target=poster, args=(s.url,)) for s in servers for _ in (0, 1)]
        for t in posters:
            t.start()
        for t in posters:
            t.join(timeout=300)
        assert answers == [200] * 40
        rows = ReviewsTable(str(tmp_path / "reviews")).rows().to_pylist()
        assert len(decided[0]) == len(decided[1]) == 3
        for n in (0, 1):
            mine = [r for r in rows if r["reviewer"] == f"r{n + 1}"]
            posted = [r for r in mine if r["product_id"] == item["id"]]
            by_key = [r["product_id"] for r in mine if r not in posted]
            assert len(posted) == 20 + decided[n].count(item["id"])
            assert sorted(by_key) == sorted(p for p in decided[n] if p != item["id"])
        assert len(rows) == 6 + 40 and len({r["decision_id"] for r in rows}) == 46
    finally:
        for running in servers:
            running.stop()


@browser_test
def test_a_bulk_accept_of_a_filter_decides_each_items_top_suggestion(server, browser, tmp_path):
    reasons = Counter(i["reason"] for i in queue(server.url)["items"] if i["predicted"])
    reason = reasons.most_common(1)[0][0]
    expected = {i["id"]: i["predicted"] for i in queue(server.url, reason=reason, pending=1)["items"]
                if i["predicted"]}
    driver = browser()
    open_page(driver, server.url)
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "f-reason")).select_by_value(reason)
    wait(driver, f"document.getElementById('bulk-count').textContent === '{len(expected)}'")
    driver.find_element("id", "bulk").click()
    driver.switch_to.alert.accept()
    wait(driver, f"document.getElementById('status').textContent === 'saved {len(expected)} decisions'")
    rows = ReviewsTable(str(tmp_path / "reviews")).rows().to_pylist()
    assert {r["product_id"]: r["decided_category"] for r in rows} == expected
    assert queue(server.url, reason=reason, pending=1)["total"] == 0


# --- refusals -----------------------------------------------------------------------------------

def test_bad_requests_are_refused_and_write_nothing(server, tmp_path):
    url = server.url
    item = next(i for i in queue(url)["items"] if i["top_k"])
    status, body, _ = request(url + "api/decisions", {"product_id": "no-such-product",
                                                      "category": item["top_k"][0]["category"]})
    assert status == 404 and b"no-such-product" in body
    status, body, _ = request(url + "api/decisions", {"product_id": item["id"], "category": "Durian"})
    assert status == 400 and b"Durian" in body
    status, _, _ = request(url + "api/decisions", {"product_id": item["id"], "category": "Kiwi"},
                           content_type="text/plain")
    assert status == 415  # a cross-site form cannot post a decision
    status, _, _ = request(url + "api/undo", {"decision_ids": ["0" * 32]})
    assert status == 404
    status, _, _ = request(url + "api/bulk", {"reason": "low_confidence", "expect": 10**6})
    assert status == 409
    # An image outside the URI policy: 403 and not one byte.
    status, body, _ = request(url + "api/thumb?id=p-outside")
    assert status == 403 and body == b""
    status, _, _ = request(url + "api/thumb?id=no-such-product")
    assert status == 404
    # DNS rebinding: a loopback server answers loopback Host headers only.
    status, _, _ = request(url + "api/meta", headers={"Host": "evil.example"})
    assert status == 400
    assert not (tmp_path / "reviews").exists()
    # What is allowed still works: a thumbnail is a real JPEG of at most 256 px.
    status, body, headers = request(url + f"api/thumb?id={item['id']}")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert max(Image.open(io.BytesIO(body)).size) <= 256


def test_a_non_local_bind_checks_the_token_on_every_request(night, tmp_path):
    # 127.0.0.2 is loopback on Linux, but not one of the local names: the page treats it as
    # reachable from other machines (the token rule) without exposing the test on the network.
    running = serve(night, tmp_path, host="127.0.0.2", token=TOKEN)
    try:
        url = running.url
        assert url.startswith("http://127.0.0.2:")
        for path in ("", "api/meta", "api/queue", "api/thumb?id=p000", "static/page.js"):
            assert request(url + path)[0] == 401
            assert request(url + path, headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})[0] == 401
        status, _, _ = request(url + "api/decisions", {"product_id": "p000", "category": "Kiwi"})
        assert status == 401 and not (tmp_path / "reviews").exists()
        assert request(url + "api/meta", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        # ?token= on the page sets an HttpOnly cookie and takes the token off the address bar.
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(url + f"?token={TOKEN}", timeout=30) as resp:
            assert resp.status == 200 and resp.url == url and b"Catalog review" in resp.read()
        with opener.open(url + "api/meta", timeout=30) as resp:
            assert json.loads(resp.read())["run_id"] == running.state.run.run_id
        assert request(url + "?token=wrong-token-xxxxxxxxxx")[0] == 401
    finally:
        running.stop()


def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.review", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env=env)


def test_bad_job_arguments_stop_with_one_line_before_anything_is_written(night, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "REVIEW_TOKEN"}
    cases = [
        (["--output", str(night), "--host", "0.0.0.0"], 2, "--token"),
        (["--output", str(night), "--host", "0.0.0.0", "--token", "short"], 2, "16 characters"),
        (["--output", str(night), "--port", "70000"], 2, "--port"),
        (["--output", str(night), "--audit-share", "2"], 2, "--audit-share"),
        (["--output", str(tmp_path / "missing")], 5, "no such folder"),
        (["--output", str(tmp_path)], 5, "no committed run"),
        (["--output", str(night), "--reviews", str(night / "_SUCCESS")], 5, "not a reviews folder"),
        (["--output", str(night), "--iconic-images", str(tmp_path)], 2, "classes.csv"),
    ]
    for args, code, words in cases:
        proc = run_job(*args, env=env)
        lines = proc.stderr.strip().splitlines()
        assert (proc.returncode, len(lines)) == (code, 1), (args, proc.stderr)
        assert lines[0].startswith("error: ") and words in lines[0], (args, lines)
    assert not (night / "reviews").exists() and list(tmp_path.iterdir()) == []


PARSE_ONLY = """
import json, sys
from jobs import review
codes = []
for argv in (["--help"], ["--no-such-option", "1"], ["--host", "0.0.0.0"]):
    try:
        codes.append(review.run_job(review.main, argv))
    except SystemExit as exc:  # --help
        codes.append(exc.code)
print(json.dumps({"codes": codes, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_help_and_bad_arguments_answer_before_anything_heavy_loads(monkeypatch):
    monkeypatch.delenv("REVIEW_TOKEN", raising=False)
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 2, 2]
    assert not {"torch", "ray", "pyarrow", "starlette", "uvicorn"} & set(result["loaded"])
    assert "--audit-share" in proc.stdout and "(default: 0.02)" in proc.stdout
    assert str(REPO) not in proc.stdout  # defaults as typed in the checkout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "--no-such-option" in errors[0] and "--token" in errors[1]


# --- the queue ----------------------------------------------------------------------------------

def test_the_queue_is_the_review_rows_worst_first_plus_a_seeded_audit_of_changes(night):
    from pipeline.sinks.parquet import committed_files

    files = committed_files(str(night))
    run = pq.read_table(files)
    actions = Counter(run.column("action").to_pylist())
    assert actions["review"] >= 4 and actions["change"] >= 2 and actions["keep"] >= 1
    q = load_queue(files, 0.5, seed=3)
    assert q.column_names == [*(c for c in QUEUE_COLUMNS if c in run.column_names), "audit"]
    rows = q.to_pylist()
    review = [r for r in rows if not r["audit"]]
    audit = [r for r in rows if r["audit"]]
    assert len(review) == actions["review"] and {r["action"] for r in review} == {"review"}
    assert len(audit) == math.ceil(0.5 * actions["change"]) and {r["action"] for r in audit} == {"change"}
    confidences = [r["confidence"] for r in review]
    unscored = [c for c in confidences if c is None]
    assert confidences[:len(unscored)] == unscored  # unreadable images first
    assert confidences[len(unscored):] == sorted(confidences[len(unscored):])
    assert {r["product_id"] for r in review if r["confidence"] is None} >= {"p-outside"}
    # Spread through the queue, not all at the end.
    assert rows[-1]["audit"] is False or len(audit) == 1
    same = load_queue(files, 0.5, seed=3).to_pylist()
    assert [r["product_id"] for r in same] == [r["product_id"] for r in rows]
    assert not any(r["audit"] for r in load_queue(files, 0.0, seed=3).to_pylist())


def test_iconic_images_come_from_the_dataset_or_the_artifact_never_invented(night, tmp_path,
                                                                             server):
    meta = json.loads(request(server.url + "api/meta")[1])
    with_iconic = [c["name"] for c in meta["classes"] if c["iconic"]]
    assert len(with_iconic) == len(meta["classes"])  # the Grocery Store dataset has them all
    status, body, _ = request(server.url + f"api/iconic?category={with_iconic[0]}")
    assert status == 200 and body[:2] == b"\xff\xd8"
    # The bundled artifact ships no iconic images: without the dataset, the page shows none.
    plain = serve(night, tmp_path / "plain")
    try:
        meta = json.loads(request(plain.url + "api/meta")[1])
        assert not any(c["iconic"] for c in meta["classes"])
        assert request(plain.url + f"api/iconic?category={with_iconic[0]}")[0] == 404
    finally:
        plain.stop()
