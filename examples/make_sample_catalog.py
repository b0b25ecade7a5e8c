"""Rebuild examples/sample-catalog from the Grocery Store dataset's val split (kept for the record;
the output is committed). Every val image becomes a product; `current_category` is the dataset's
label, except a seeded 6% that are set to another category, as a drifted catalog would be.

    python examples/make_sample_catalog.py ../shared/datasets/grocery-store
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.importers import grocery_store_rows

WRONG_SHARE = 0.06


def main(source: str, target: str = "examples/sample-catalog") -> None:
    rows = grocery_store_rows(source, ["val"])
    out = Path(target)
    shutil.rmtree(out / "images", ignore_errors=True)
    rng = np.random.default_rng(7)
    categories = sorted({r["category"] for r in rows})
    wrong = set(rng.choice(len(rows), round(len(rows) * WRONG_SHARE), replace=False).tolist())
    records = []
    for i, row in enumerate(rows):
        rel = Path("images") / row["category"] / Path(row["image_uri"]).name
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row["image_uri"], out / rel)
        current = row["category"]
        if i in wrong:
            current = str(rng.choice([c for c in categories if c != row["category"]]))
        records.append({"product_id": f"sku-{i:05d}", "image_uri": rel.as_posix(),
                        "current_category": current})
    schema = pa.schema([("product_id", pa.string()), ("image_uri", pa.string()),
                        ("current_category", pa.string())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out / "manifest.parquet")
    shutil.copyfile(Path(source) / "LICENSE", out / "LICENSE")
    print(f"{len(records)} products, {len(wrong)} with a wrong current_category")


if __name__ == "__main__":
    main(*sys.argv[1:])
