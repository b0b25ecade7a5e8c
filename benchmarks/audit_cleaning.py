"""Accuracy of a model trained with and without the data audit's cleaning (issue 15).

Method (seeded throughout):
  1. A faulty manifest: Grocery Store train + val with the faults of benchmarks/audit_faults.py
     (exact, downscaled and cropped copies of photos under new product ids, placeholder
     pictures, and a share of labels flipped to a random other category). Copies and flips
     hit only `train` rows: `val` keeps its photos and true labels, since accuracy is
     measured on it, and no copy of a val photo lands in training.
  2. Model A: `python -m jobs.train` on the faulty manifest with a short fixed recipe
     (EfficientNet-Lite0, ImageNet start, last stages trained; the bundled model's recipe
     with fewer epochs).
  3. `python -m jobs.audit` of the faulty manifest with model A, default options: the
     realistic case, the model trained on the dirty catalog audits it.
  4. Model B: the same recipe plus `--exclude AUDIT_DIR` (the audit's flagged training rows
     left out; val rows stay).
  5. Optionally (--reference) model C: the same recipe on the manifest without faults.
Each job runs as a subprocess with the project's CLI, exactly as a user runs it. One table
prints, per model: val accuracy and macro-F1 (training_summary.json; best epoch by val
accuracy, as the trainer picks it), the rows trained on, the rows excluded per finding
(`excluded_rows`), how many of the excluded rows were truly faulty (flipped, injected
copies, placeholders) against clean rows removed, and the faults left in training.

    python benchmarks/audit_cleaning.py [--flip-rate 0.10] [--epochs 3] [--reference]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from audit_faults import build  # noqa: E402  (after the path set-up)

from pipeline.config import GROCERY_DATASET  # noqa: E402

DEFAULT_FLIP_RATE = 0.10
DEFAULT_EPOCHS = 3  # the bundled recipe has 11; three trainings must fit one sitting on a CPU
DEFAULT_OUTPUT = "outputs/audit-cleaning"
FAULT_SPLITS = {"train"}  # val keeps its true labels and photos: accuracy is measured there
FINDINGS = ("duplicates", "label_issues", "outliers")
# The bundled model's recipe (examples/model/model.json, training.config) but for --epochs.
RECIPE = ["--model-name", "efficientnet_lite0", "--weights", "imagenet", "--train-stages", "3",
          "--lr", "2e-3", "--backbone-lr-scale", "0.25", "--warmup-epochs", "0.5"]


def job(argv: list[str], log: Path) -> float:
    """Run `python -m <job> ...` from the repository root, output teed to `log`; its wall time."""
    cmd = [sys.executable, "-m", *argv]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if "epoch" in line.lower() or "error" in line.lower():  # progress, not Ray's chatter
                print("  " + line.rstrip()[:160], flush=True)
    if proc.wait() != 0:
        sys.exit(f"{argv[0]} failed (exit {proc.returncode}); see {log}")
    wall = time.perf_counter() - start
    print(f"  {wall:.0f} s", flush=True)
    return wall


def train_argv(manifest: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return ["jobs.train", "--manifest", str(manifest), "--output", str(out), *RECIPE,
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--num-cpus", str(args.num_cpus),
            "--cpus-per-worker", str(args.num_cpus)]


def fault_of(pid: str, truth: dict) -> str:
    """What an injected fault a training row is: copy, placeholder, flipped, or clean."""
    if pid in truth["placeholders"]:
        return "placeholder"
    if pid in truth["kind"]:
        return "copy"
    return "flipped" if pid in truth["flipped"] else "clean"


def breakdown(pids: set[str], truth: dict) -> dict[str, int]:
    counts = dict.fromkeys(("flipped", "copy", "placeholder", "clean"), 0)
    for pid in pids:
        counts[fault_of(pid, truth)] += 1
    return counts


def cleaning(audit: Path, train_ids: set[str], truth: dict) -> dict[str, dict[str, int]]:
    """Per finding and for all of them: the excluded training rows by what they truly are
    (the same rows `jobs.train --exclude` leaves out)."""
    from pipeline.analysis.findings import flagged_products

    flagged = {k: v & train_ids for k, v in flagged_products(str(audit)).items()}
    out = {k: breakdown(flagged[k], truth) for k in FINDINGS}
    out["all"] = breakdown(set().union(*flagged.values()), truth)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact", type=int, default=50, help="byte-identical copies")
    parser.add_argument("--resized", type=int, default=100, help="downscaled JPEG copies")
    parser.add_argument("--cropped", type=int, default=50, help="lightly cropped copies")
    parser.add_argument("--placeholders", type=int, default=20, help="non-product pictures")
    parser.add_argument("--flip-rate", type=float, default=DEFAULT_FLIP_RATE,
                        help="share of train labels flipped to another category")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs; one worker uses all")
    parser.add_argument("--seed", type=int, default=0, help="faults and training")
    parser.add_argument("--reference", action="store_true",
                        help="also train model C on the manifest without faults")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--measure-only", action="store_true",
                        help="rebuild the (seeded) faults, skip the jobs, read the outputs there")
    args = parser.parse_args()

    from pipeline.importers import grocery_store_rows, write_manifest

    root = Path(args.output).resolve()
    models = ["A", "B"] + (["C"] if args.reference else [])
    if not args.measure_only and any((root / f"train-{m}").exists() for m in models):
        sys.exit(f"{root} already holds training runs; remove it or give another --output")
    rows = grocery_store_rows(GROCERY_DATASET, ["train", "val"])
    faulty, truth = build(rows, root / "faults", args, random.Random(args.seed), FAULT_SPLITS)
    manifest, clean_manifest = root / "manifest.parquet", root / "clean.parquet"
    write_manifest(faulty, str(manifest))
    train_ids = {r["product_id"] for r in faulty if r["split"] == "train"}
    print(f"{len(rows)} photos + {len(faulty) - len(rows)} injected rows; "
          f"{len(truth['flipped'])} train labels flipped; {len(train_ids)} train rows", flush=True)

    audit = root / "audit"
    walls: dict[str, float] = {}
    if not args.measure_only:
        start = time.perf_counter()
        walls["A"] = job(train_argv(manifest, root / "train-A", args), root / "train-A.log")
        walls["audit"] = job(["jobs.audit", "--manifest", str(manifest), "--model",
                              str(root / "train-A" / "model"), "--output", str(audit),
                              "--num-cpus", str(args.num_cpus)], root / "audit.log")
        walls["B"] = job([*train_argv(manifest, root / "train-B", args), "--exclude", str(audit)],
                         root / "train-B.log")
        if args.reference:
            write_manifest(rows, str(clean_manifest))
            walls["C"] = job(train_argv(clean_manifest, root / "train-C", args),
                             root / "train-C.log")
        walls["total"] = time.perf_counter() - start

    removed = cleaning(audit, train_ids, truth)
    injected = breakdown(train_ids, truth)
    summaries = {m: json.loads((root / f"train-{m}" / "training_summary.json").read_text())
                 for m in models}
    print("\n| model | trained on | excluded: duplicates / label issues / outliers / all "
          "| excluded, truly faulty: flipped / copies / placeholders | clean rows excluded "
          "| faults trained on: flipped / copies / placeholders | val accuracy | val macro-F1 "
          "| training wall |\n|---|---|---|---|---|---|---|---|---|")
    for m in models:
        s = summaries[m]
        ex = s.get("excluded_rows") or {}
        if m == "A":
            name, left, gone = "A: faulty manifest", injected, None
        elif m == "B":
            name, gone = "B: faulty, --exclude audit", removed["all"]
            left = {k: injected[k] - gone[k] for k in injected}
        else:
            name, left, gone = "C: no faults (reference)", dict.fromkeys(injected, 0), None
        excl = (" / ".join(str(ex.get(k, 0)) for k in FINDINGS) + f" / {ex.get('rows', 0)}"
                if ex else "-")
        faulty_gone = (f"{gone['flipped']} / {gone['copy']} / {gone['placeholder']}"
                       if gone else "-")
        print(f"| {name} | {s['train_rows']} | {excl} | {faulty_gone} "
              f"| {gone['clean'] if gone else '-'} "
              f"| {left['flipped']} / {left['copy']} / {left['placeholder']} "
              f"| {s['val_accuracy']:.1%} ({s['val_rows']} rows) | {s['val_macro_f1']:.3f} "
              f"| {s['wall_time_s'] / 60:.1f} min |")
    print("\nexcluded rows per finding, by what they truly are:")
    for k in (*FINDINGS, "all"):
        print(f"  {k}: {removed[k]}")
    print(f"injected into training: {injected}")
    if walls:
        print("wall (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    ex_b = summaries["B"].get("excluded_rows") or {}
    if ex_b.get("rows") != sum(removed["all"].values()):  # the two counts read the same audit
        print(f"warning: training excluded {ex_b.get('rows')} rows, the audit flags "
              f"{sum(removed['all'].values())} training rows")


if __name__ == "__main__":
    main()
