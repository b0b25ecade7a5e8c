"""Lost workers and a killed driver: every row still comes out exactly once.

A preprocess worker and an inference actor are killed with SIGKILL mid-run (Ray retries the
task, restarts the actor and retries its batches), with decoding in separate tasks and inside
the actor; the
job's driver process is killed mid-run and the job started again with the same arguments resumes
from its finished chunks and commits the same rows a clean run commits.
"""

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline.config import RecategorizeConfig
from pipeline.nightly.recategorize import run
from tests.conftest import committed_table, summary_json, write_manifest

COMPARED = ["product_id", "image_uri", "status", "error_type", "predicted_category",
            "current_category", "category_changed", "needs_review", "model_version"]


def scores(table, column: str) -> list[float]:
    """confidence, or top_k flattened to its scores (categories compared separately), 0 for null."""
    if column == "confidence":
        return [v or 0.0 for v in table.column(column).to_pylist()]
    return [t["score"] for row in table.column(column).to_pylist() for t in (row or [])]


def categories(table) -> list[list[str] | None]:
    return [[t["category"] for t in row] if row else None for row in table.column("top_k").to_pylist()]


def repeated_catalog(root, sample_images, copies: int):
    """copies x the sample photos (relative URIs) plus one missing image."""
    images = root / "catalog" / "images"
    images.mkdir(parents=True)
    for src in sample_images:
        shutil.copyfile(src, images / src.name)
    rows = [{"product_id": f"sku-{c}-{i:03d}", "image_uri": f"images/{src.name}",
             "current_category": src.parent.name}
            for c in range(copies) for i, src in enumerate(sample_images)]
    rows.append({"product_id": "sku-missing", "image_uri": "images/missing.jpg",
                 "current_category": None})
    return write_manifest(root / "catalog" / "manifest.parquet", rows), len(rows)


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


class WorkerKiller(threading.Thread):
    """SIGKILLs, once each, a worker process running a preprocess task and then the inference
    actor, and records the process that replaced the actor. Only descendants of this test
    process (its own local Ray) are ever looked at."""

    def __init__(self, run_done: threading.Event, kill_preprocess: bool):
        super().__init__(daemon=True)
        self.run_done = run_done
        self.kill_preprocess = kill_preprocess
        self.preprocess_pid: int | None = None
        self.killed_pid: int | None = None
        self.killed_while_running = False
        self.replacement_pid: int | None = None

    @staticmethod
    def _classifier_pid() -> int | None:
        """Pid of this Ray's live inference actor, from its own GCS."""
        from ray._private.state import actors

        return next((a["Pid"] for a in actors().values()
                     if a["State"] == "ALIVE" and "ScoringActor" in a["ActorClassName"] and a["Pid"]),
                    None)

    def _kill_preprocess_worker(self) -> None:
        mine = descendants(os.getpid())
        busy = [p for p in mine if "MapBatches(Preprocessor)" in _title(p)]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            self.preprocess_pid = busy[0]

    def run(self) -> None:
        while not self.run_done.is_set():
            if self.kill_preprocess and self.preprocess_pid is None:
                self._kill_preprocess_worker()
            pid = self._classifier_pid()
            if pid is None or (self.kill_preprocess and self.preprocess_pid is None):
                time.sleep(0.1)
                continue
            if self.killed_pid is None:
                time.sleep(1.0)  # let it take batches first
                self.killed_while_running = not self.run_done.is_set()
                os.kill(pid, signal.SIGKILL)
                self.killed_pid = pid
            elif pid != self.killed_pid:
                self.replacement_pid = pid
                return
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("decode_in", ["tasks", "actor"])
def test_killed_workers_are_replaced_and_no_row_is_lost_or_doubled(
        ray_local, tmp_path, sample_images, bundled_model, decode_in):
    # Decoding in the actor is fast enough to finish 4 copies before the kill: give it more.
    manifest, n = repeated_catalog(tmp_path, sample_images, copies=4 if decode_in == "tasks" else 24)
    out = tmp_path / "out"
    done = threading.Event()
    killer = WorkerKiller(done, kill_preprocess=decode_in == "tasks")
    killer.start()
    try:
        summary = run(RecategorizeConfig(manifest=str(manifest), model=bundled_model,
                                         output=str(out), batch_size=8, preprocess_batch_size=8,
                                         decode_in=decode_in, executor="ray"))
    finally:
        done.set()
        killer.join(timeout=30)
    assert bool(killer.preprocess_pid) == (decode_in == "tasks")
    assert killer.killed_pid and killer.killed_while_running
    assert killer.replacement_pid and killer.replacement_pid != killer.killed_pid
    table = committed_table(out)
    ids = table.column("product_id").to_pylist()
    assert summary["rows"] == n == len(ids) == len(set(ids))
    assert summary["errors_by_type"] == {"fetch_not_found": 1}


def _job(manifest, model, out, *extra):
    return [sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest), "--model", model,
            "--output", str(out), "--num-cpus", "2", "--chunk-rows", "100",
            "--batch-size", "16", "--executor", "ray", *extra]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Ray's workers start their own sessions, so a process
    group would miss them), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def kill_tree(pid: int) -> list[int]:
    tree = descendants(pid)
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return tree


def wait_gone(pids: list[int], tries: int = 100) -> bool:
    """True once none of pids is running (gone or a zombie awaiting its reaper)."""
    for _ in range(tries):
        alive = []
        for p in pids:
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(p)
            except OSError:
                continue
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _done_chunks(out, chunk_rows: int = 100) -> int:
    """Chunks whose files in the run folder hold all their rows (the listing is the log)."""
    rows: dict[str, int] = {}
    for f in out.glob("runs/*/part-*.parquet"):
        chunk, _, count = f.stem.split("-")[1:4]
        rows[chunk] = rows.get(chunk, 0) + int(count)
    return sum(r == chunk_rows for r in rows.values())


@pytest.mark.slow
def test_killed_driver_resumes_and_matches_a_clean_run(ray_local, tmp_path, sample_images,
                                                       bundled_model, capsys):
    manifest, n = repeated_catalog(tmp_path, sample_images, copies=2)
    chunks = math.ceil(n / 100)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(_job(manifest, bundled_model, out), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and _done_chunks(out) < 1:
            time.sleep(0.1)
    finally:
        tree = kill_tree(proc.pid)  # the driver and the local Ray it started, nothing else
        proc.wait()
    assert wait_gone(tree), "processes of the killed job outlived it"
    finished = _done_chunks(out)
    assert proc.returncode == -signal.SIGKILL and 1 <= finished < chunks
    assert not (out / "_SUCCESS").exists()  # nothing published by the killed run

    # Started again with the same arguments (in this process's Ray: one Ray start less).
    assert run_job(recategorize_main, _job(manifest, bundled_model, out)[3:]) == 0
    summary = summary_json(capsys.readouterr().out)
    assert summary["chunks"] == chunks and summary["chunks_resumed"] >= finished

    clean_out = tmp_path / "clean"
    run(RecategorizeConfig(manifest=str(manifest), model=bundled_model, output=str(clean_out),
                           batch_size=16))  # one chunk: rows must not depend on chunking
    got, want = committed_table(out), committed_table(clean_out)
    assert got.num_rows == want.num_rows == n
    assert len(set(got.column("product_id").to_pylist())) == n
    for column in COMPARED:
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert categories(got) == categories(want)
    for column in ("confidence", "top_k"):  # float32 scores: batches differ, so does rounding
        assert scores(got, column) == pytest.approx(scores(want, column), abs=1e-4)
    assert set(got.column("run_id").to_pylist()) == {summary["run_id"]}
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
    assert len(list(out.glob("runs/*"))) == 1  # the killed attempt's rows are in this run
