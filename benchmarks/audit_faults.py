"""Precision and recall of the data audit on Grocery Store train + val with injected faults.

Faults injected into a copy of the manifest (seeded):
  exact       byte-identical copies of random photos under new product ids
  resized     the photo downscaled (60-90% of its width) and re-encoded as JPEG (quality 60-90)
  cropped     2-6% trimmed from each side, re-encoded (quality 85)
  flipped     a share of the original rows given a random other category
  placeholder blank, single-colour, gradient and "no image" text pictures (not product photos)
Each copy keeps its source's category. The audit (`pipeline.analysis.audit.run`, default options) runs
with each model named by --models, then one table per model prints each finding's precision and
recall. A duplicate row counts as right when it and its `duplicate_of` are the same photo; a
pair of two original photos found as duplicates counts against precision (it may be a real
duplicate in the dataset: the report shows them).

    python benchmarks/audit_faults.py [--models bundled,imagenet] [--flip-rate 0.05]

`bundled` is the bundled model (trained on the Grocery train split's clean labels, so its
embeddings know the true categories: the optimistic case); `imagenet` is EfficientNet-Lite0 with
ImageNet weights only (its embeddings have never seen these labels).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.findings import DUPLICATES_FILE, LABEL_ISSUES_FILE, OUTLIERS_FILE
from pipeline.config import BUNDLED_MODEL, GROCERY_DATASET, AuditConfig

RESIZE_SCALES = (0.6, 0.9)
RESIZE_QUALITY = (60, 90)
CROP_SHARE = (0.02, 0.06)
CROP_QUALITY = 85
PLACEHOLDER_PX = 348


def placeholders(count: int, rng: random.Random) -> list[bytes]:
    """Non-product pictures a catalog gets: blank frames, flat colours, gradients, 'no image'."""
    out = []
    for i in range(count):
        kind = i % 4
        colour = tuple(rng.randrange(256) for _ in range(3))
        im = Image.new("RGB", (PLACEHOLDER_PX, PLACEHOLDER_PX),
                       (255, 255, 255) if kind == 0 else colour)
        if kind == 2:
            ramp = np.linspace(0, 255, PLACEHOLDER_PX, dtype=np.uint8)
            im = Image.fromarray(np.stack([np.tile(ramp, (PLACEHOLDER_PX, 1))] * 3, -1))
        if kind == 3:
            draw = ImageDraw.Draw(im)
            draw.rectangle((40, 40, 308, 308), outline=(90, 90, 90), width=6)
            draw.text((120, 165), f"NO IMAGE {i}", fill=(60, 60, 60))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def variant(path: str, kind: str, rng: random.Random) -> bytes:
    im = Image.open(path).convert("RGB")
    if kind == "resized":
        scale = rng.uniform(*RESIZE_SCALES)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        quality = rng.randrange(*RESIZE_QUALITY)
    else:
        dx, dy = (round(s * rng.uniform(*CROP_SHARE)) for s in im.size)
        im = im.crop((dx, dy, im.width - dx, im.height - dy))
        quality = CROP_QUALITY
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build(rows: list[dict], folder: Path, args, rng: random.Random,
          fault_splits: set[str] | None = None) -> tuple[list[dict], dict]:
    """The faulty manifest's rows and the truth: photo of each row, flipped rows, placeholders.

    `fault_splits` limits the copied photos and the flipped labels to rows of those splits (a
    benchmark that measures accuracy on `val` keeps that split's labels and photos as they are,
    and no copy of a val photo lands in training); None draws from every row."""
    folder.mkdir(parents=True, exist_ok=True)
    categories = sorted({r["category"] for r in rows})
    photo = {r["product_id"]: r["product_id"] for r in rows}  # product -> the photo it shows
    kind_of: dict[str, str] = {}
    out = [dict(r) for r in rows]
    pool = rows if fault_splits is None else [r for r in rows if r["split"] in fault_splits]
    sources = rng.sample(pool, args.exact + args.resized + args.cropped)
    for n, (src, kind) in enumerate(zip(sources, ["exact"] * args.exact + ["resized"] * args.resized
                                        + ["cropped"] * args.cropped, strict=True)):
        pid = f"fault/{kind}-{n:04d}"
        data = (Path(src["image_uri"]).read_bytes() if kind == "exact"
                else variant(src["image_uri"], kind, rng))
        (folder / f"{kind}-{n:04d}.jpg").write_bytes(data)
        out.append({**src, "product_id": pid, "image_uri": str(folder / f"{kind}-{n:04d}.jpg")})
        photo[pid], kind_of[pid] = src["product_id"], kind
    flipped = set()
    originals = out[:len(rows)]
    if fault_splits is not None:
        originals = [r for r in originals if r["split"] in fault_splits]
    for r in rng.sample(originals, round(args.flip_rate * len(originals))):
        r["category"] = rng.choice([c for c in categories if c != r["category"]])
        flipped.add(r["product_id"])
    holders = set()
    for n, data in enumerate(placeholders(args.placeholders, rng)):
        pid = f"fault/placeholder-{n:03d}"
        (folder / f"placeholder-{n:03d}.jpg").write_bytes(data)
        out.append({"product_id": pid, "image_uri": str(folder / f"placeholder-{n:03d}.jpg"),
                    "category": rng.choice(categories), "coarse_category": None, "split": "train"})
        photo[pid] = pid
        holders.add(pid)
    return out, {"photo": photo, "kind": kind_of, "flipped": flipped, "placeholders": holders}


def imagenet_artifact(folder: Path) -> str:
    """EfficientNet-Lite0 with its offline ImageNet weights as one of our artifacts (the audit
    uses only its penultimate layer; the head is the ImageNet head's shape, never trained here)."""
    from pipeline.models.artifact import ModelMetadata, save_artifact
    from pipeline.models.registry import create_model, describe_weights, get_spec

    spec = get_spec("efficientnet_lite0")
    model = create_model("efficientnet_lite0", 2, "imagenet")
    meta = ModelMetadata(architecture="efficientnet_lite0", classes=["a", "b"],
                         input_size=spec.input_size, mean=list(spec.mean), std=list(spec.std),
                         provenance={"start": describe_weights("efficientnet_lite0", "imagenet")})
    uri = str(folder / "imagenet-lite0")
    save_artifact(model, meta, uri)
    return uri


def pr(found: set, truth: set) -> tuple[float, float, int, int]:
    hits = len(found & truth)
    return (hits / len(found) if found else float("nan"), hits / len(truth) if truth else float("nan"),
            len(found), len(truth))


def measure(out: Path, truth: dict) -> list[tuple[str, float, float, int, int]]:
    """(finding, precision, recall, found, injected) rows. An injected copy counts as found when
    it lands in its source photo's group. Precision counts every other pair the audit reports
    (pairs of two original photos) as wrong: a lower bound, as the dataset holds real
    duplicates of its own."""
    dups = pq.read_table(out / DUPLICATES_FILE).to_pylist()
    labels = pq.read_table(out / LABEL_ISSUES_FILE).to_pylist()
    outliers = pq.read_table(out / OUTLIERS_FILE).to_pylist()
    root = {d["product_id"]: d["duplicate_of"] for d in dups}
    found = set(root)
    linked = {pid for pid in truth["kind"]
              if root.get(pid, pid) == root.get(truth["photo"][pid], truth["photo"][pid])}
    by_kind = defaultdict(set)
    for pid, kind in truth["kind"].items():
        by_kind[kind].add(pid)
    injected = set(truth["kind"])
    rows = [("duplicates, all", len(linked & found) / max(len(found), 1),
             len(linked & found) / len(injected), len(found), len(injected))]
    for kind in ("exact", "resized", "cropped"):
        if by_kind[kind]:
            hit = linked & found & by_kind[kind]
            rows.append((f"  {kind} (recall only)", float("nan"), len(hit) / len(by_kind[kind]),
                         len(hit), len(by_kind[kind])))
    rows.append(("  other rows found (original photos, placeholders)", float("nan"), float("nan"),
                 len(found - injected), 0))
    flagged = {r["product_id"] for r in labels if r["flagged"]}
    rows.append(("flipped labels (flagged)", *pr(flagged, truth["flipped"])))
    k = len(truth["flipped"])
    top = {r["product_id"] for r in sorted(labels, key=lambda r: -(r["score"] or 0))[:k]}
    rows.append(("flipped labels (top scores, as many as flipped)", *pr(top, truth["flipped"])))
    out_flagged = {r["product_id"] for r in outliers if r["flagged"]}
    rows.append(("placeholders (outliers)", *pr(out_flagged, truth["placeholders"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bundled,imagenet")
    parser.add_argument("--exact", type=int, default=50)
    parser.add_argument("--resized", type=int, default=100)
    parser.add_argument("--cropped", type=int, default=50)
    parser.add_argument("--flip-rate", type=float, default=0.05)
    parser.add_argument("--placeholders", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/audit-benchmark")
    parser.add_argument("--measure-only", action="store_true",
                        help="rebuild the (seeded) faults, skip the audits, measure the outputs there")
    args = parser.parse_args()

    from pipeline.analysis.audit import run
    from pipeline.importers import grocery_store_rows, write_manifest

    rng = random.Random(args.seed)
    root = Path(args.output).resolve()
    rows = grocery_store_rows(GROCERY_DATASET, ["train", "val"])
    faulty, truth = build(rows, root / "faults", args, rng)
    manifest = str(root / "manifest.parquet")
    write_manifest(faulty, manifest)
    print(f"{len(rows)} photos + {len(faulty) - len(rows)} injected rows; "
          f"{len(truth['flipped'])} labels flipped", flush=True)
    for name in args.models.split(","):
        model = BUNDLED_MODEL if name == "bundled" or args.measure_only else imagenet_artifact(root)
        out = root / f"out-{name}"
        if args.measure_only:  # the tables again from the outputs already there
            print(f"\nmodel {name} (measured from {out})")
            print("| finding | precision | recall | found | injected |\n|---|---|---|---|---|")
            for label, p, r, nf, nt in measure(out, truth):
                print(f"| {label} | {'-' if p != p else f'{p:.1%}'} | {'-' if r != r else f'{r:.1%}'} "
                      f"| {nf} | {nt or '-'} |")
            continue
        start = time.perf_counter()
        summary = run(AuditConfig(manifest=manifest, model=model, output=str(out),
                                  allowed_uri_prefixes=f"{GROCERY_DATASET},{root}"))
        wall = time.perf_counter() - start
        print(f"\nmodel {name}: {summary['rows']} rows, {wall:.0f} s ({summary['executor']})")
        print("| finding | precision | recall | found | injected |\n|---|---|---|---|---|")
        for label, p, r, nf, nt in measure(out, truth):
            print(f"| {label} | {'-' if p != p else f'{p:.1%}'} | {'-' if r != r else f'{r:.1%}'} "
                  f"| {nf} | {nt or '-'} |")
        print(json.dumps({k: summary[k] for k in ("duplicates", "label_issues", "outliers")}))


if __name__ == "__main__":
    main()
