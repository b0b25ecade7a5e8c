"""The audit's HTML page (`pipeline.analysis.audit`): counts, then pictures of each finding."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analysis.audit_checks import Embedded
from pipeline.analysis.report import thumbnail_jpeg
from pipeline.pages import esc, html_table, img_tag

REPORT_CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;
margin:8px 0 24px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.counts td:nth-child(2){text-align:right}
img{display:block;border:1px solid #bbb}
.pair{display:flex;gap:8px}.muted{color:#777}code{font-size:90%}"""


def _thumb(uri: str, fetch: Callable[[str], bytes], thumbs: dict[str, str]) -> str:
    """An <img> of one product image, made once per URI (or a note when it cannot be read)."""
    if uri not in thumbs:
        jpeg = thumbnail_jpeg(uri, fetch)
        thumbs[uri] = (img_tag(jpeg, uri, "image/jpeg") if jpeg
                       else '<span class="muted">(no thumbnail)</span>')
    return thumbs[uri]


def image_uris(data: Embedded, products: set[str]) -> dict[str, str]:
    """product_id -> image URI of the products shown (not a lookup of every row)."""
    shown = pc.is_in(data.product_id, value_set=pa.array(sorted(products), pa.string()))
    return dict(zip(data.product_id.filter(shown).to_pylist(),
                    data.image_uri.filter(shown).to_pylist(), strict=True))


def report_page(summary: dict, data: Embedded, fetch: Callable[[str], bytes], duplicates: pa.Table,
                labels: pa.Table, outliers: pa.Table, items: int) -> str:
    """The audit as one self-contained HTML page: counts, then pictures of each finding."""
    e = esc
    thumbs: dict[str, str] = {}
    counts = [["rows in the manifest", summary["rows"]], ["readable", summary["ok"]],
              ["unreadable (errors.parquet)", summary["errors"]],
              ["exact duplicates", summary["duplicates"]["exact"]],
              ["near duplicates", summary["duplicates"]["near"]],
              ["suspected labels", summary["label_issues"]["flagged"]],
              ["labels not judged", summary["label_issues"]["not_judged"]],
              ["outliers", summary["outliers"]["flagged"]]]
    parts = [f"<h1>Data audit</h1><p>Manifest <code>{e(summary['manifest'])}</code>, model "
             f"<code>{e(summary['model'])}</code> (version {e(summary['model_version'])}), "
             f"labels from <code>{e(summary['label_column'] or 'none')}</code>.</p>",
             html_table(["finding", "rows"], [[e(a), e(b)] for a, b in counts], "counts")]
    dup = duplicates.sort_by([("similarity", "ascending")]).slice(0, items).to_pylist()
    flagged = labels.filter(labels["flagged"]).sort_by([("score", "descending")])
    suspects = flagged.slice(0, items).to_pylist()
    top = outliers.sort_by([("score", "descending")]).slice(0, items).to_pylist()
    uri = image_uris(data, {d["product_id"] for d in dup} | {d["duplicate_of"] for d in dup}
                     | {r["product_id"] for r in suspects + top})
    parts.append(f"<h2>Duplicates ({duplicates.num_rows})</h2><p>Each product beside its group's "
                 "representative; least similar first, where a mistake is likeliest. A product "
                 "linked through another member of the group can be less similar to the "
                 "representative than the confirmation threshold.</p>")
    parts.append(html_table(["product", "duplicate of", "kind", "similarity"], [[
        f"{_thumb(uri[d['product_id']], fetch, thumbs)}<code>{e(d['product_id'])}</code>",
        f"{_thumb(uri[d['duplicate_of']], fetch, thumbs)}<code>{e(d['duplicate_of'])}</code>",
        e(d["kind"]), f"{d['similarity']:.3f}"] for d in dup]))
    parts.append(f"<h2>Suspected labels ({flagged.num_rows})</h2><p>Most suspicious first: the "
                 "given category, and the one the other products' pictures suggest.</p>")
    parts.append(html_table(["product", "given", "suggested", "score"], [[
        f"{_thumb(uri[r['product_id']], fetch, thumbs)}<code>{e(r['product_id'])}</code>",
        e(r["given_category"]), e(r["suggested_category"]), f"{r['score']:.3f}"]
        for r in suspects]))
    parts.append(f"<h2>Outliers ({summary['outliers']['flagged']} flagged)</h2><p>The least "
                 "typical images first (mean cosine distance to their nearest distinct images); "
                 "flagged ones may be placeholders, logos or other non-product pictures.</p>")
    parts.append(html_table(["product", "score", "flagged"], [[
        f"{_thumb(uri[r['product_id']], fetch, thumbs)}<code>{e(r['product_id'])}</code>",
        f"{r['score']:.3f}", "yes" if r["flagged"] else "no"] for r in top]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Data audit</title>"
            f"<style>{REPORT_CSS}</style></head><body>{''.join(parts)}</body></html>")
