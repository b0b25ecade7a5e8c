"""The review loop end to end on the Grocery Store data: night, review, night, retrain, promote.

Every step is one of the project's own jobs, run as a user runs it (`python -m jobs.X` in a
subprocess, from the checkout), into a scratch folder (`--root`, default a new temp folder):

1. night 1: a catalog of the calibration rows of `manifests/grocery-cal.parquet` (made with
   `jobs.make_manifest --calibration-share 0.5` when missing), a seeded `--wrong-share` of them
   with a wrong current_category (half within the true category's coarse group where it has
   another category, half across), the rest with their true one; `jobs.recategorize
   --executor local` with the bundled model (`examples/model`) into ROOT/night;
2. a scripted reviewer: every row with action == 'review' gets a decision naming its TRUE
   category, appended to ROOT/night/reviews (`pipeline.sinks.reviews.ReviewsTable`);
3. night 2: the same catalog into the same output (an incremental night): the reviewed
   products come back keep / reviewed;
4. retrain: `jobs.train --reviews ROOT/night/reviews` on `manifests/grocery-cal.parquet` with the
   bundled model's recipe (docs/training.md, "The bundled model"): the reviewed calibration photos become
   training rows of the candidate, the rest of the calibration split fits its thresholds;
5. promote: `jobs.promote` of the bundled model into an empty ROOT/models (no current model: it
   is promoted), then of the candidate, both measured on the manifest's `val` split, rows that
   neither model trained on. Both models' metrics come from ROOT/models/history.jsonl.

It prints two markdown tables (night 1 against night 2; the bundled model against the candidate
on val, with promote's verdict) and every command with its wall time. Each step's output goes
to ROOT/logs/<step>.log.

The night's catalog is the bundled model's own calibration rows, so its decision thresholds
are in-sample there: the nights measure the loop's mechanics (what review does to the next
night), not the model's decision quality (`benchmarks/decisions.py` measures that).

    python benchmarks/review_loop.py --skip-train      # nights and review: 2 min on 2 busy cores
    python benchmarks/review_loop.py --epochs 1 --max-train-rows 200 --time-budget-min 2  # smoke
    python benchmarks/review_loop.py                   # the bundled recipe, 11 epochs (~20 min)
    python benchmarks/review_loop.py --root outputs/review-loop --seed 1 --wrong-share 0.15 \\
        --epochs 11 --time-budget-min 30 --num-cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.sinks.parquet import committed_files  # noqa: E402
from pipeline.sinks.reviews import Decision, ReviewsTable  # noqa: E402

MANIFEST = REPO / "manifests" / "grocery-cal.parquet"
BUNDLED_MODEL = REPO / "examples" / "model"
CALIBRATION_SPLIT = "calibration"
HELD_OUT_SPLIT = "val"
REVIEWER = "scripted-reviewer (true category)"
REFUSED_EXIT_CODE = 9  # jobs.promote: the candidate was measured and refused
# The bundled model's training recipe (docs/training.md, "The bundled model"), less --epochs.
RECIPE = ["--model-name", "efficientnet_lite0", "--weights", "imagenet", "--train-stages", "3",
          "--lr", "2e-3", "--backbone-lr-scale", "0.25", "--warmup-epochs", "0.5"]
RECIPE_CPUS_PER_WORKER = 2


# -- running the jobs -----------------------------------------------------------------------

@dataclass
class Step:
    name: str
    command: str  # the command line, or what an in-process step did
    wall_s: float
    exit_code: int


class Runner:
    """Runs `python -m jobs.X ...` from the checkout, each step's output to ROOT/logs/<name>.log,
    and keeps the command, wall time and exit code of every step."""

    def __init__(self, root: Path, num_cpus: int | None):
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.num_cpus = num_cpus
        self.steps: list[Step] = []

    def job(self, name: str, module: str, *args: str, ok: tuple[int, ...] = (0,),
            cpus: bool = True) -> int:
        """Run one job; exit the script (with the log's tail) on an exit code not in `ok`."""
        command = [sys.executable, "-m", module, *args]
        if cpus and self.num_cpus:
            command += ["--num-cpus", str(self.num_cpus)]
        log = self.logs / f"{name}.log"
        print(f"[{name}] {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        with log.open("w") as out:
            code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
        self.steps.append(Step(name, shlex.join(command), wall, code))
        print(f"[{name}] exit {code} in {wall:.1f} s (log: {log})", flush=True)
        if code not in ok:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            sys.exit(f"step {name} failed with exit code {code}; the end of {log}:\n{tail}")
        return code

    def timed(self, name: str, what: str, seconds: float) -> None:
        """Record an in-process step (the scripted reviewer)."""
        self.steps.append(Step(name, f"(in-process) {what}", seconds, 0))


# -- 1. the catalog -------------------------------------------------------------------------

def ensure_manifest(runner: Runner) -> None:
    if not MANIFEST.exists():
        runner.job("make-manifest", "jobs.make_manifest", "--calibration-share", "0.5",
                   "--output", str(MANIFEST), cpus=False)


def absolute_uri(uri: str, manifest: Path) -> str:
    """An image URI as the catalog manifest (in another folder) must give it."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return str((manifest.parent / uri).resolve())


def build_catalog(seed: int, wrong_share: float) -> tuple[pa.Table, dict[str, str]]:
    """(catalog manifest: product_id, image_uri, current_category; the true category of each
    product). The calibration rows of MANIFEST; a seeded `wrong_share` of them get a wrong
    current category, half within the true category's coarse group (where it has another
    category), the rest across groups."""
    table = pq.read_table(MANIFEST, columns=["product_id", "image_uri", "category",
                                             "coarse_category", "split"])
    coarse = dict(zip(table["category"].to_pylist(), table["coarse_category"].to_pylist(),
                      strict=True))
    classes = sorted(coarse)
    rows = [r for r in table.to_pylist() if r["split"] == CALIBRATION_SPLIT]
    if not rows:
        sys.exit(f"{MANIFEST} has no rows with split == {CALIBRATION_SPLIT!r}; remake it with "
                 "python -m jobs.make_manifest --calibration-share 0.5")
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(len(rows))[: round(len(rows) * wrong_share)].tolist()
    within = set(wrong[: len(wrong) // 2])
    current = [r["category"] for r in rows]
    for i in wrong:
        truth = rows[i]["category"]
        same = [c for c in classes if c != truth and coarse[c] == coarse[truth]]
        other = [c for c in classes if c != truth and coarse[c] != coarse[truth]]
        current[i] = str(rng.choice(same if i in within and same else other))
    catalog = pa.table({
        "product_id": [r["product_id"] for r in rows],
        "image_uri": [absolute_uri(r["image_uri"], MANIFEST) for r in rows],
        "current_category": pa.array(current, pa.string()),
    })
    return catalog, {r["product_id"]: r["category"] for r in rows}


# -- 1 and 3. a night -----------------------------------------------------------------------

def run_night(runner: Runner, name: str, catalog: Path, output: Path, images: str) -> pa.Table:
    """One `jobs.recategorize` night of the bundled model; the committed run's rows."""
    runner.job(name, "jobs.recategorize", "--manifest", str(catalog),
               "--model", str(BUNDLED_MODEL), "--output", str(output), "--executor", "local",
               "--allowed-uri-prefixes", images)
    return pq.read_table(committed_files(str(output)))


def night_figures(rows: pa.Table, catalog: dict[str, str | None], truth: dict[str, str],
                  output: Path) -> dict[str, Any]:
    """The night's rows measured against the truth. A row is wrong when the catalog's
    (manifest's) current category is not the true one; the output's current_category is not
    used, since a reviewed row carries the decided category there."""
    f = dict.fromkeys(("rows", "wrong", "reviews", "changes", "right_changes", "caught",
                       "settled", "missed", "damage", "errors"), 0)
    for r in rows.to_pylist():
        true, current, action = truth[r["product_id"]], catalog[r["product_id"]], r["action"]
        f["rows"] += 1
        f["errors"] += r["status"] != "ok"
        f["reviews"] += action == "review"
        if action == "change":
            f["changes"] += 1
            f["right_changes"] += r["predicted_category"] == true
        if current != true:
            f["wrong"] += 1
            f["caught"] += action in ("change", "review")
            f["settled"] += r["action_reason"] == "reviewed"
            f["missed"] += action == "keep" and r["action_reason"] != "reviewed"
        else:
            f["damage"] += action == "change"
    reasons: dict[str, int] = {}
    for a, why in zip(rows["action"].to_pylist(), rows["action_reason"].to_pylist(), strict=True):
        reasons[f"{a}/{why}"] = reasons.get(f"{a}/{why}", 0) + 1
    f["actions"] = dict(sorted(reasons.items()))
    summary = json.loads((output / "summary.json").read_text())
    f["mode"] = summary.get("mode")
    f["rows_rescored"] = summary.get("rows_rescored")
    f["decisions_in_force"] = summary.get("decisions_in_force")
    return f


# -- 2. the scripted reviewer ---------------------------------------------------------------

def review(rows: pa.Table, truth: dict[str, str], reviews: Path) -> int:
    """Decide every row sent to review with its true category; how many decisions."""
    decisions = [
        Decision(product_id=r["product_id"], image_version=r["image_version"],
                 image_uri=r["image_uri"], decided_category=truth[r["product_id"]],
                 replaces_category=r["current_category"],
                 predicted_category=r["predicted_category"], model_version=r["model_version"],
                 reviewer=REVIEWER, run_id=r["run_id"])
        for r in rows.to_pylist() if r["action"] == "review"]
    if decisions:
        ReviewsTable(str(reviews)).append(decisions)
    return len(decisions)


# -- 4. retrain -----------------------------------------------------------------------------

def retrain(runner: Runner, reviews: Path, output: Path, args: argparse.Namespace) -> dict:
    """`jobs.train --reviews` with the bundled recipe; its training_summary.json."""
    cpus_per_worker = min(RECIPE_CPUS_PER_WORKER, args.num_cpus or RECIPE_CPUS_PER_WORKER)
    extra = ["--epochs", str(args.epochs), "--cpus-per-worker", str(cpus_per_worker)]
    if args.time_budget_min:
        extra += ["--time-budget-min", str(args.time_budget_min)]
    if args.max_train_rows:
        extra += ["--max-train-rows", str(args.max_train_rows)]
    runner.job("train", "jobs.train", "--manifest", str(MANIFEST), "--reviews", str(reviews),
               "--output", str(output), *RECIPE, *extra)
    return json.loads((output / "training_summary.json").read_text())


# -- 5. promote -----------------------------------------------------------------------------

def promote(runner: Runner, name: str, candidate: Path, models: Path) -> dict:
    """`jobs.promote` of `candidate` on the manifest's val split; the decision it recorded
    (the last line of MODELS/history.jsonl: both metric sets, the verdict, the reason)."""
    runner.job(name, "jobs.promote", "--candidate", str(candidate), "--models", str(models),
               "--manifest", str(MANIFEST), "--split", HELD_OUT_SPLIT,
               ok=(0, REFUSED_EXIT_CODE))
    lines = (models / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


# -- the report -----------------------------------------------------------------------------

def share(a: int | float, b: int | float) -> str:
    return f"{a / b:.1%}" if b else "n/a"


def pct(value: float | None) -> str:
    return "n/a (no change)" if value is None else f"{value:.1%}"


def nights_table(nights: dict[str, dict[str, Any]]) -> str:
    lines = ["| night | rows | wrong | review load | changes | change precision | caught "
             "(change or review) | settled by a review (keep/reviewed) | wrong kept | damage "
             "(right rows changed) |", "|" + "---|" * 10]
    for name, f in nights.items():
        lines.append(
            f"| {name} | {f['rows']} | {f['wrong']} | {share(f['reviews'], f['rows'])} "
            f"({f['reviews']}) | {f['changes']} | {share(f['right_changes'], f['changes'])} "
            f"| {share(f['caught'], f['wrong'])} ({f['caught']}) "
            f"| {share(f['settled'], f['wrong'])} ({f['settled']}) | {f['missed']} "
            f"| {f['damage']} |")
    for name, f in nights.items():
        lines.append(f"\n{name}: mode {f['mode']}, rows rescored {f['rows_rescored']}, "
                     f"decisions in force {f['decisions_in_force']}, error rows {f['errors']}, "
                     f"actions {f['actions']}")
    return "\n".join(lines)


def models_table(decision: dict) -> str:
    lines = ["| model | version | val rows | top-1 accuracy | change precision | review load "
             "| wrong caught |", "|" + "---|" * 7]
    for label, m in (("bundled (current)", decision["current"]),
                     ("candidate", decision["candidate"])):
        if m is None:
            continue
        lines.append(f"| {label} | {m['model_version']} | {m['rows']} | {m['accuracy']:.1%} "
                     f"| {pct(m['precision'])} | {m['review_load']:.1%} | {m['catch']:.1%} |")
    lines.append(f"\npromote: **{decision['decision']}**: {decision['reason']}")
    return "\n".join(lines)


def steps_table(steps: list[Step]) -> str:
    lines = ["| step | wall s | exit | command |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.wall_s:.1f} | {s.exit_code} | `{s.command}` |"
              for s in steps]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="scratch folder, new or empty (default: a new temp folder)")
    parser.add_argument("--skip-train", action="store_true", help="stop after night 2")
    parser.add_argument("--seed", type=int, default=0, help="seed of the wrong categories")
    parser.add_argument("--wrong-share", type=float, default=0.15,
                        help="share of the catalog with a wrong current category")
    parser.add_argument("--epochs", type=int, default=11, help="jobs.train --epochs")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="jobs.train --time-budget-min (training time, data loading excluded)")
    parser.add_argument("--max-train-rows", type=int, default=None,
                        help="jobs.train --max-train-rows, for smoke runs (a random subset of "
                        "the training rows: it may leave reviewed rows out)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="every job's --num-cpus (default: all); training reserves "
                        f"min({RECIPE_CPUS_PER_WORKER}, this) CPUs per worker")
    args = parser.parse_args(argv)
    if not 0 <= args.wrong_share <= 1:
        parser.error("--wrong-share must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = (args.root or Path(tempfile.mkdtemp(prefix="review-loop-"))).resolve()
    if root.exists() and any(root.iterdir()):
        sys.exit(f"--root {root} is not empty: give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    print(f"scratch folder: {root}", flush=True)
    runner = Runner(root, args.num_cpus)
    ensure_manifest(runner)

    catalog, truth = build_catalog(args.seed, args.wrong_share)
    catalog_path = root / "catalog.parquet"
    pq.write_table(catalog, catalog_path)
    current = dict(zip(catalog["product_id"].to_pylist(),
                       catalog["current_category"].to_pylist(), strict=True))
    images = os.path.commonpath(catalog["image_uri"].to_pylist())
    if os.path.isfile(images):
        images = os.path.dirname(images)
    output = root / "night"

    nights: dict[str, dict[str, Any]] = {}
    rows = run_night(runner, "night-1", catalog_path, output, images)
    nights["night 1"] = night_figures(rows, current, truth, output)
    start = time.perf_counter()
    decided = review(rows, truth, output / "reviews")
    runner.timed("review", f"ReviewsTable({output / 'reviews'}).append({decided} decisions)",
                 time.perf_counter() - start)
    rows = run_night(runner, "night-2", catalog_path, output, images)
    nights["night 2"] = night_figures(rows, current, truth, output)

    decision = training = None
    if not args.skip_train:
        training = retrain(runner, output / "reviews", root / "train", args)
        models = root / "models"
        promote(runner, "promote-bundled", BUNDLED_MODEL, models)
        decision = promote(runner, "promote-candidate", Path(training["model"]), models)

    print(f"\n## Review loop ({len(truth)} calibration photos of {MANIFEST.name}, "
          f"wrong share {args.wrong_share}, seed {args.seed}; {decided} decisions by the "
          f"scripted reviewer)\n")
    print(nights_table(nights))
    if decision is not None and training is not None:
        print(f"\n## Bundled model against the candidate on the {HELD_OUT_SPLIT} split "
              f"(jobs.promote)\n")
        print(models_table(decision))
        print(f"\ncandidate training: epochs {training['epochs_run']} of {training['epochs']} "
              f"(best {training['best_epoch']}), train rows {training['train_rows']}, "
              f"calibration rows {training['calibration_rows']}, reviews {training['reviews']}, "
              f"val accuracy at the best epoch {training['val_accuracy']:.1%}")
    print("\n## Steps\n")
    print(steps_table(runner.steps))
    print(f"\nscratch folder: {root}")


if __name__ == "__main__":
    main()
