"""Benchmark of decisions: what a catalog team gets from the nightly job's `action` column.

Builds catalogs from the bundled sample's photos (the Grocery Store val split, never trained on)
with a seeded share of wrong current categories (half within the true category's coarse group,
the look-alikes catalogs confuse, half across) and a share with none, runs the nightly job on
each (`python -m jobs.recategorize`, its defaults), and prints, pooled over the seeds:

- change precision: proposed changes that name the true category;
- caught: wrong current categories sent to change or review;
- fixed: wrong current categories changed to the true category;
- review load: rows sent to a person, of all rows;
- damage: right current categories that a change would overwrite.

    python benchmarks/decisions.py --calibration-manifest manifests/grocery-cal.parquet
    python benchmarks/decisions.py --models examples/model,outputs/other/model --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample-catalog"
WRONG_SHARE, MISSING_SHARE = 0.05, 0.03


def sample_rows(calibration_manifest: str | None = None) -> list[dict]:
    """The sample catalog's photos with their true category (the folder they lie in), less
    the photos of `calibration_manifest`'s calibration split (the model's thresholds were
    fitted on those)."""
    table = pq.read_table(SAMPLE / "manifest.parquet")
    held: set[tuple[str, str]] = set()
    if calibration_manifest:
        for r in pq.read_table(calibration_manifest, columns=["image_uri", "category", "split"]).to_pylist():
            if r["split"] == "calibration":
                held.add((r["category"], Path(r["image_uri"]).name))
    rows = [{"product_id": r["product_id"], "image_uri": str(SAMPLE / r["image_uri"]),
             "truth": Path(r["image_uri"]).parent.name} for r in table.to_pylist()]
    return [r for r in rows if (r["truth"], Path(r["image_uri"]).name) not in held]


def build_catalog(rows: list[dict], classes: list[str], coarse: dict[str, str], seed: int,
                  wrong_share: float = WRONG_SHARE, missing_share: float = MISSING_SHARE) -> pa.Table:
    """A manifest whose current_category is the truth, except a seeded `wrong_share` (half
    within the coarse group where the group has another category, half across) and a
    `missing_share` with none."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    order = rng.permutation(n)
    wrong = order[: round(n * wrong_share)]
    missing = set(order[len(wrong): len(wrong) + round(n * missing_share)].tolist())
    within = set(wrong[: len(wrong) // 2].tolist())
    current: list[str | None] = [r["truth"] for r in rows]
    for i in wrong.tolist():
        truth = rows[i]["truth"]
        same = [c for c in classes if c != truth and coarse.get(c) == coarse.get(truth)]
        other = [c for c in classes if c != truth and coarse.get(c) != coarse.get(truth)]
        pool = same if i in within and same else other
        current[i] = str(rng.choice(pool))
    for i in missing:
        current[i] = None
    return pa.table({"product_id": [r["product_id"] for r in rows],
                     "image_uri": [r["image_uri"] for r in rows],
                     "current_category": pa.array(current, pa.string()),
                     "true_category": [r["truth"] for r in rows]})


def run_night(manifest: Path, model: str, output: Path, change_precision: float) -> pa.Table:
    subprocess.run([sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest),
                    "--model", model, "--output", str(output), "--full",
                    "--change-precision", str(change_precision),
                    "--allowed-uri-prefixes", str(SAMPLE / "images")],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return pq.read_table(output / "predictions")


def previous_rule(row: dict, open_set_threshold: float | None) -> str:
    """What the output said before decisions: every `category_changed` row outside review
    (confidence below 0.5, an unfamiliar product or an error) was a change."""
    if row["status"] != "ok" or row["confidence"] < 0.5 or (
            open_set_threshold is not None and row["unfamiliarity"] > open_set_threshold):
        return "review"
    return "keep" if row["predicted_category"] == row["current_category"] else "change"


def score(out: pa.Table, catalog: pa.Table, rule=None) -> dict[str, int]:
    """Counts of one night against the catalog's truth; `rule(row)` replaces the `action`
    column when given."""
    truth = dict(zip(catalog["product_id"].to_pylist(), catalog["true_category"].to_pylist(),
                     strict=True))
    counts = dict.fromkeys(("rows", "wrong", "missing", "changes", "right_changes", "caught",
                            "fixed", "reviews", "damage", "assigned", "right_assigned"), 0)
    for r in out.to_pylist():
        true, current = truth[r["product_id"]], r["current_category"]
        action = rule(r) if rule else r["action"]
        counts["rows"] += 1
        counts["reviews"] += action == "review"
        if action == "change":
            counts["changes"] += 1
            counts["right_changes"] += r["predicted_category"] == true
        if current is None:
            counts["missing"] += 1
            counts["assigned"] += action == "change"
            counts["right_assigned"] += action == "change" and r["predicted_category"] == true
        elif current != true:
            counts["wrong"] += 1
            counts["caught"] += action in ("change", "review")
            counts["fixed"] += action == "change" and r["predicted_category"] == true
        else:
            counts["damage"] += action == "change"
    return counts


def _share(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="examples/model")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--output", default="outputs/bench-decisions")
    parser.add_argument("--change-precision", type=float, default=0.95,
                        help="the nightly job's --change-precision (its default: 0.95)")
    parser.add_argument("--calibration-manifest", default=None,
                        help="leave out the photos of this manifest's calibration split")
    args = parser.parse_args()
    rows = sample_rows(args.calibration_manifest)
    print(f"{len(rows)} photos of the sample catalog (the Grocery Store val split) per night")
    out_root = (ROOT / args.output).resolve()
    table = ["| model | nights | rows | wrong | no category | changes | change precision | caught "
             "(change or review) | fixed | review load | damage (right rows changed) | "
             "assigned right |", "|" + "---|" * 12]
    seeds = [int(s) for s in args.seeds.split(",")]
    for model in args.models.split(","):
        meta = json.loads((ROOT / model / "model.json").read_text())
        threshold = meta.get("open_set", {}).get("threshold")
        totals: dict[str, dict[str, int]] = {"decisions": {}, "previous rule": {}}
        for seed in seeds:
            catalog = build_catalog(rows, meta["classes"], meta.get("coarse_classes", {}), seed)
            folder = out_root / f"{Path(model).parent.name}-{meta['model_version']}" / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            manifest = folder / "catalog.parquet"
            pq.write_table(catalog, manifest)
            night = run_night(manifest, model, folder / "night", args.change_precision)
            for name, rule in (("decisions", None),
                               ("previous rule", functools.partial(previous_rule,
                                                                   open_set_threshold=threshold))):
                counts = score(night, catalog, rule)
                totals[name] = {k: totals[name].get(k, 0) + v for k, v in counts.items()}
        for name, t in totals.items():
            label = (f"{model} ({meta['model_version']}), "
                     + (f"decisions at {args.change_precision:g}" if name == "decisions" else name))
            table.append(_row(label, len(seeds), t))
    print("\n".join(table))


def _row(label: str, nights: int, t: dict[str, int]) -> str:
    return (f"| {label} | {nights} | {t['rows']} | {t['wrong']} "
            f"| {t['missing']} | {t['changes']} | {_share(t['right_changes'], t['changes'])} "
            f"| {_share(t['caught'], t['wrong'])} | {_share(t['fixed'], t['wrong'])} "
            f"| {_share(t['reviews'], t['rows'])} | {t['damage']} "
            f"| {t['right_assigned']}/{t['assigned']} of {t['missing']} |")


if __name__ == "__main__":
    main()
