"""Every exit code in the table (`pipeline.errors.ExitCode`), triggered through the command line
of every job that can return it: `python -m jobs.<job> ARGS` as a user types it.

The cases run through `runpy.run_module(..., run_name="__main__")`, which is what `python -m`
does, all in one subprocess: a new interpreter per case would spend the suite's minutes on
importing torch and Ray again. None of the cases starts Ray. Each case asserts its code, that
stderr has one `error:` line (an indented hint may follow) with no traceback and no library URL,
and that its output holds nothing a reader would take for a result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.errors import ExitCode
from pipeline.nightly.lease import LEASE_FILE, OutputLease
from tests.conftest import write_manifest

BUNDLED_MODEL = str(REPO_ROOT / "examples" / "model")
SAMPLE = REPO_ROOT / "examples" / "sample-catalog"
RUNNER = """
import contextlib, io, json, runpy, sys
results = []
for job, argv in json.loads(sys.argv[1]):
    sys.argv = [job, *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module(job, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def inputs(root: Path) -> dict[str, str]:
    """The bad (and good) things the cases point at, built once."""
    root.mkdir(parents=True, exist_ok=True)
    photo = sorted((SAMPLE / "images").rglob("*.jpg"))[0]
    missing = write_manifest(root / "missing-images.parquet", [
        {"product_id": f"p{i}", "image_uri": str(root / f"gone-{i}.jpg"), "category": "Kiwi"}
        for i in range(4)])
    train_only = write_manifest(root / "train-only.parquet", [
        {"product_id": f"t{i}", "image_uri": str(photo), "category": c, "split": "train"}
        for i, c in enumerate(["Kiwi", "Banana"])])
    duplicate = write_manifest(root / "duplicate-ids.parquet", [
        {"product_id": "a", "image_uri": str(photo)}, {"product_id": "a", "image_uri": str(photo)}])
    sample = pq.read_table(SAMPLE / "manifest.parquet").slice(0, 24).to_pylist()
    labelled = write_manifest(root / "labelled.parquet", [
        {"product_id": r["product_id"], "image_uri": str(SAMPLE / r["image_uri"]),
         "category": r["current_category"], "split": ("train", "val")[i % 2]}
        for i, r in enumerate(sample)])
    (root / "a-file").write_text("not a folder")
    (root / "not-a-model").mkdir(exist_ok=True)
    return {"root": str(root), "missing_images": str(missing), "train_only": str(train_only),
            "duplicate": str(duplicate), "file": str(root / "a-file"),
            "not_model": str(root / "not-a-model"), "sample": str(labelled),
            "busy": str(root / "busy-output")}


def out(paths: dict[str, str], name: str) -> str:
    return str(Path(paths["root"]) / "out" / name)


# (job, code, argv from the inputs): every job x every code it can return.
CASES: list[tuple[str, ExitCode, object]] = [
    ("recategorize", ExitCode.CONFIG, lambda p: ["--top-k", "0", "--output", out(p, "r2")]),
    ("recategorize", ExitCode.MANIFEST, lambda p: ["--manifest", p["duplicate"], "--output",
                                                   out(p, "r3")]),
    ("recategorize", ExitCode.MODEL, lambda p: ["--model", p["not_model"], "--output",
                                                out(p, "r4")]),
    ("recategorize", ExitCode.OUTPUT, lambda p: ["--output", p["file"] + "/night"]),
    ("recategorize", ExitCode.ERROR_BUDGET, lambda p: ["--manifest", p["missing_images"],
                                                       "--output", out(p, "r7")]),
    ("recategorize", ExitCode.OUTPUT_BUSY, lambda p: ["--output", p["busy"]]),
    ("train", ExitCode.CONFIG, lambda p: ["--epochs", "0", "--output", out(p, "t2")]),
    ("train", ExitCode.MANIFEST, lambda p: ["--manifest", p["duplicate"], "--output",
                                            out(p, "t3")]),
    ("train", ExitCode.MODEL, lambda p: ["--manifest", p["sample"], "--weights",
                                         p["not_model"], "--output", out(p, "t4")]),
    ("train", ExitCode.OUTPUT, lambda p: ["--manifest", p["sample"], "--output",
                                          p["file"] + "/train"]),
    ("train", ExitCode.TRAINING, lambda p: ["--manifest", p["train_only"], "--output",
                                            out(p, "t6")]),
    ("evaluate", ExitCode.CONFIG, lambda p: ["--top-k", "0", "--output", out(p, "e2")]),
    ("evaluate", ExitCode.MANIFEST, lambda p: ["--manifest", p["duplicate"], "--output",
                                               out(p, "e3")]),
    ("evaluate", ExitCode.MODEL, lambda p: ["--manifest", p["sample"], "--model", p["not_model"],
                                            "--output", out(p, "e4")]),
    ("evaluate", ExitCode.OUTPUT, lambda p: ["--manifest", p["sample"], "--output",
                                             p["file"] + "/eval"]),
    ("calibrate", ExitCode.CONFIG, lambda p: ["--target-precision", "2", "--output",
                                              out(p, "c2")]),
    ("calibrate", ExitCode.MANIFEST, lambda p: ["--manifest", p["duplicate"], "--model",
                                                BUNDLED_MODEL, "--output", out(p, "c3")]),
    ("calibrate", ExitCode.MODEL, lambda p: ["--manifest", p["sample"], "--model",
                                             p["not_model"], "--output", out(p, "c4")]),
    ("calibrate", ExitCode.OUTPUT, lambda p: ["--manifest", p["sample"], "--model", BUNDLED_MODEL,
                                              "--output", p["file"] + "/cal"]),
    ("export", ExitCode.CONFIG, lambda p: ["--format", "tflite", "--output", out(p, "x2")]),
    ("export", ExitCode.MODEL, lambda p: ["--model", p["not_model"], "--output", out(p, "x4")]),
    ("export", ExitCode.OUTPUT, lambda p: ["--output", p["file"] + "/export"]),
    ("embed", ExitCode.CONFIG, lambda p: ["--knn-k", "0", "--output", out(p, "m2")]),
    ("embed", ExitCode.MANIFEST, lambda p: ["--manifest", p["duplicate"], "--output",
                                            out(p, "m3")]),
    ("embed", ExitCode.OUTPUT, lambda p: ["--manifest", p["sample"], "--output",
                                          p["file"] + "/embed"]),
    ("audit", ExitCode.CONFIG, lambda p: ["--near-min-cosine", "2", "--output", out(p, "a2")]),
    ("audit", ExitCode.MANIFEST, lambda p: ["--manifest", p["duplicate"], "--output",
                                            out(p, "a3")]),
    ("audit", ExitCode.MODEL, lambda p: ["--manifest", p["sample"], "--model", p["not_model"],
                                         "--output", out(p, "a4")]),
    ("audit", ExitCode.OUTPUT, lambda p: ["--manifest", p["sample"], "--output",
                                          p["file"] + "/audit"]),
    ("promote", ExitCode.CONFIG, lambda p: ["--split", "", "--models", out(p, "p2")]),
    ("promote", ExitCode.MODEL, lambda p: ["--candidate", p["not_model"], "--models",
                                           out(p, "p4"), "--manifest", p["sample"]]),
    ("make_manifest", ExitCode.CONFIG, lambda p: ["--holdout-categories", "-1"]),
    ("make_manifest", ExitCode.MANIFEST, lambda p: ["--source", p["not_model"], "--output",
                                                    out(p, "mm3.parquet")]),
    ("make_manifest", ExitCode.OUTPUT, lambda p: ["--source", str(SAMPLE / "images"),
                                                  "--output", p["file"] + "/m.parquet"]),
    ("review", ExitCode.CONFIG, lambda p: ["--port", "-1"]),
    ("review", ExitCode.OUTPUT, lambda p: ["--output", out(p, "no-night")]),
    ("benchmark", ExitCode.CONFIG, lambda p: ["--num-cpus", "0"]),
    ("train_benchmark", ExitCode.CONFIG, lambda p: ["--steps", "0"]),
]


def case_id(case: tuple) -> str:
    return f"{case[0]}-{int(case[1])}-{case[1].name.lower()}"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """Every case's code and stderr, run one job at a time as `python -m` runs it."""
    paths = inputs(tmp_path_factory.mktemp("exit-codes"))
    found: dict[str, dict] = {}
    lease = OutputLease(paths["busy"]).acquire()  # another run holds this output
    try:
        argvs = [[f"jobs.{job}", argv(paths)] for job, _, argv in CASES]
        env = {**os.environ, "CATALOG_LOG_FORMAT": "text"}
        proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)],
                              capture_output=True, text=True, timeout=600, cwd=paths["root"],
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for case, result in zip(CASES, json.loads(proc.stdout.splitlines()[-1]), strict=True):
            found[case_id(case)] = result
        found["written"] = {"files": sorted(str(f.relative_to(paths["root"])) for f in
                                            Path(paths["root"]).glob("*/**/*") if f.is_file()
                                            and f.name != LEASE_FILE)}
    finally:
        lease.release()
    return found


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_exit_code_through_the_command_line(results, case):
    _, code, _ = case
    result = results[case_id(case)]
    lines = result["stderr"].rstrip("\n").splitlines()
    assert result["code"] == int(code), result["stderr"]
    # the night's phase lines may come first; the error is the last line, or its hint follows
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, result["stderr"]
    assert all(line.startswith(" ") for line in lines[errors[0] + 1:]), result["stderr"]
    assert "Traceback" not in result["stderr"] and "https://" not in result["stderr"]


@pytest.mark.slow
def test_a_refused_night_keeps_its_rows_and_nothing_else_is_written(results):
    """Of all the failed runs, only the night the error budget refused kept anything: its
    scored rows and its error report under runs/<run id>/, unpublished (docs/guarantees.md)."""
    files = results["written"]["files"]
    assert files and all(f.startswith("out/r7/runs/") for f in files), files
    names = {Path(f).name for f in files}
    assert {"_errors.json", "_summary.json"} <= names and "_SUCCESS" not in names
    assert not any("_staging" in f for f in files)


# Codes whose case needs more than a bad argument, triggered through the same entry point
# (`run_job(main, argv)`, what `python -m` calls) by the named test.
ELSEWHERE = {
    ExitCode.PROMOTION_REFUSED: "tests/integration/test_promote.py::"
                                "test_worse_candidate_is_refused_and_the_pointer_stays",
    ExitCode.OTHER: "tests/integration/test_faulty_store.py::"
                    "test_recategorize_through_a_faulty_store_commits_every_row_once",
}


def test_every_code_but_success_has_a_case():
    """The table and the cases cannot drift: a new code needs a case here or in ELSEWHERE."""
    covered = {code for _, code, _ in CASES} | set(ELSEWHERE)
    assert covered == set(ExitCode) - {ExitCode.SUCCESS}
    for where in ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in (REPO_ROOT / path).read_text()


@pytest.mark.slow
def test_debug_adds_the_traceback_after_the_one_line(tmp_path):
    paths = inputs(tmp_path)
    argv = ["--manifest", paths["duplicate"], "--output", str(tmp_path / "o"), "--debug"]
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", *argv], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == int(ExitCode.MANIFEST)
    first, *rest = proc.stderr.splitlines()
    assert first.startswith("error: manifest") and rest[0] == "Traceback (most recent call last):"
    assert "ManifestError" in rest[-1]
