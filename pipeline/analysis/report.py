"""The evaluation report's page: thumbnails and one self-contained HTML file (the plots it embeds
are drawn by `pipeline.analysis.plots`).

Everything here renders numbers that `pipeline.analysis.evaluate` already computed; nothing is measured
here. The page is written for a catalog team: which categories fail, what they are mistaken for
(with pictures of the mistakes), and what can be auto-accepted. Images and plots are embedded as
base64 so the page can be mailed or attached to a ticket as one file.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ImageError
from pipeline.pages import STYLE, esc, fmt_value, html_table, img_tag, percent

THUMBNAIL_PX = 96  # longest side of an example-mistake thumbnail: recognisable, keeps the page small
THUMBNAIL_JPEG_QUALITY = 80
CELL_SHADE_ALPHA = 0.85  # strongest background of a confusion cell (share 1.0 of its row)


# ---- pure views of the metrics ------------------------------------------------------------

def split_label(split: str | None) -> str:
    """How the page names the evaluated rows: a split, or the whole manifest."""
    return f"{split} split" if split else "all rows"


def split_per_class(per_class: list[dict]) -> tuple[list[dict], list[dict]]:
    """Categories present in the rows (support > 0), worst F1 first; and categories only ever
    predicted (support 0), most false positives first. A support-0 category has F1 0 by
    definition, so mixing it into the first list would push it above the real failures."""
    present = sorted((r for r in per_class if r["support"] > 0), key=lambda r: (r["f1"], r["category"]))
    absent = sorted((r for r in per_class if r["support"] == 0),
                    key=lambda r: (-r.get("false_positives", 0), r["category"]))
    return present, absent


@dataclass
class CoarseGroup:
    """The confusion among the fine categories of one coarse category.

    `matrix[i, j]` counts rows given as `given[i]` and predicted as `predicted[j]` (both fine
    categories of this group); `other[i]` counts rows of `given[i]` predicted outside the group
    and `top_other[i]` names the most frequent of those (None when there is none). `correct`
    counts the rows predicted as their given category."""

    coarse: str
    given: list[str]
    predicted: list[str]
    matrix: np.ndarray
    other: np.ndarray
    top_other: list[tuple[str, int] | None]
    correct: int

    @property
    def rows(self) -> int:
        return int(self.matrix.sum() + self.other.sum())

    @property
    def errors(self) -> int:
        return self.rows - self.correct


def coarse_groups(matrix: np.ndarray, classes: list[str],
                  coarse_classes: dict[str, str]) -> tuple[list[CoarseGroup], list[tuple[str, int]]]:
    """Per coarse category with rows: its small confusion matrix. Returns the groups with mistakes
    (most mistakes first) and (name, rows) of the error-free ones. Rows are the group's fine
    categories present in the rows; columns add those only predicted (for a row of the group).
    Classes without a coarse category are skipped."""
    support = matrix.sum(1)
    with_errors: list[CoarseGroup] = []
    clean: list[tuple[str, int]] = []
    for coarse in sorted(set(coarse_classes.values())):
        members = [i for i, c in enumerate(classes) if coarse_classes.get(c) == coarse]
        given = [i for i in members if support[i]]
        if not given:
            continue
        predicted = [i for i in members if support[i] or matrix[given, i].any()]
        sub = matrix[np.ix_(given, predicted)]
        group = CoarseGroup(coarse, [classes[i] for i in given], [classes[i] for i in predicted], sub,
                            matrix[given].sum(1) - sub.sum(1),
                            [_top_outside(matrix[i], members, classes) for i in given],
                            int(sum(matrix[i, i] for i in given)))
        if group.errors:
            with_errors.append(group)
        else:
            clean.append((coarse, group.rows))
    with_errors.sort(key=lambda g: (-g.errors, g.coarse))
    return with_errors, clean


def _top_outside(row: np.ndarray, inside: list[int], classes: list[str]) -> tuple[str, int] | None:
    """The most frequent prediction outside the group for one true class, with its count."""
    outside = row.copy()
    outside[inside] = 0
    j = int(np.argmax(outside))
    return (classes[j], int(outside[j])) if outside[j] else None


# ---- images -------------------------------------------------------------------------------

def thumbnail_jpeg(uri: str, fetch: Callable[[str], bytes], size: int = THUMBNAIL_PX) -> bytes | None:
    """A small JPEG of one product image, read with `fetch` (the job's guarded fetch path,
    engine.ImageSettings.fetch), or None when it cannot be read or is refused (a missing
    thumbnail must not cost the whole report)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(fetch(uri))) as im:
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    except (ImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return buf.getvalue()


def pair_thumbnails(pairs: list[dict], fetch: Callable[[str], bytes]) -> dict[str, bytes]:
    """Thumbnails of the example mistakes of the confused pairs, by image_uri."""
    uris = {e["image_uri"] for p in pairs for e in p["examples"] if e.get("image_uri")}
    thumbs = {uri: thumbnail_jpeg(uri, fetch) for uri in sorted(uris)}
    return {uri: jpeg for uri, jpeg in thumbs.items() if jpeg is not None}


# ---- HTML ---------------------------------------------------------------------------------

def header_html(metrics: dict, model: dict, manifest: str) -> str:
    """Title and one subtitle line: what was evaluated, by which model, on how many rows."""
    subtitle = (f"{esc(split_label(metrics.get('split')))} of <code>{esc(manifest)}</code> &middot; "
                f"model {esc(model['architecture'])} <code>{esc(model['version'])}</code> &middot; "
                f"{metrics['rows']} rows")
    return f'<h1>Model evaluation</h1><p class="subtitle">{subtitle}</p>'


def summary_html(metrics: dict, model: dict, manifest: str) -> str:
    accept = metrics["auto_accept"]
    unknown = ", ".join(f"{c} ({n})" for c, n in sorted(metrics["unknown_categories"].items()))
    summary = [("evaluated rows", split_label(metrics.get("split"))), ("manifest", manifest),
               ("model", f"{model['architecture']} {model['version']}"),
               ("temperature", model["temperature"]), ("rows", metrics["rows"]),
               ("scored rows", metrics["scored_rows"]), ("error rows", metrics["error_rows"]),
               ("rows with categories the model does not know", metrics["unknown_category_rows"]),
               ("those categories", unknown or "none"),
               ("accuracy", metrics["accuracy"]), ("top-5 accuracy", metrics["top5_accuracy"]),
               ("coarse accuracy", metrics.get("coarse_accuracy")), ("macro-F1", metrics["macro_f1"]),
               ("expected calibration error", metrics["ece"]),
               (f"threshold for {accept['target_accuracy']:.0%} auto-accept accuracy", accept["threshold"]),
               ("share of the catalog auto-accepted at that threshold", accept["catalog_share"])]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{fmt_value(v)}</td></tr>" for k, v in summary)
    return f'<table class="summary">{rows}</table>'


def per_class_html(per_class: list[dict]) -> str:
    """Real categories worst F1 first; predicted-only categories in their own small table."""
    present, absent = split_per_class(per_class)
    main = html_table(["category", "precision", "recall", "F1", "support"],
                  [[esc(r["category"]), f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                    str(r["support"])] for r in present], "per-class")
    out = f"<h2>Per category (worst F1 first)</h2>{main}"
    if absent:
        out += ("<h3>Predicted but absent from these rows</h3><p>The model gave these categories to "
                "products of other categories; none of the evaluated rows belongs to them.</p>"
                + html_table(["category", "false positives"],
                         [[esc(r["category"]), str(r.get("false_positives", "n/a"))] for r in absent],
                         "absent"))
    return out


def _breakable(path_like: str) -> str:
    """Escaped text that may wrap after each '/' (product ids are often long paths)."""
    return "/<wbr>".join(esc(part) for part in str(path_like).split("/"))


def _example_html(example: dict, pair: dict, thumbs: dict[str, bytes]) -> str:
    jpeg = thumbs.get(example.get("image_uri"))
    picture = img_tag(jpeg, f"product {example['product_id']}", "image/jpeg") if jpeg else \
        '<div class="noimg">image unavailable</div>'
    caption = (f"<b>{_breakable(example['product_id'])}</b><br>given: {esc(pair['true_category'])}<br>"
               f"predicted: {esc(pair['predicted_category'])}<br>"
               f"confidence {fmt_value(example['confidence'])}")
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def confused_pairs_html(pairs: list[dict], thumbs: dict[str, bytes]) -> str:
    """The most frequent (true -> predicted) mistakes, each with pictures of its most confident
    mistakes: those are where a wrong given category or a look-alike product shows first."""
    if not pairs:
        return "<h2>Most-confused category pairs</h2><p>No mistakes among the scored rows.</p>"
    rows = [[f'{esc(p["true_category"])}<br>&rarr; {esc(p["predicted_category"])}', str(p["count"]),
             percent(p["share_of_true"]),
             '<div class="examples">' + "".join(_example_html(e, p, thumbs) for e in p["examples"])
             + "</div>"] for p in pairs]
    return ("<h2>Most-confused category pairs</h2><p>Given category &rarr; predicted category, most "
            "frequent first; share = of the given category's scored rows. Examples: the most "
            "confident mistakes.</p>"
            + html_table(["given (true) &rarr; predicted", "rows", "share", "examples"], rows, "pairs"))


def _cell(count: int, row_total: int, diagonal: bool) -> str:
    """A confusion cell shaded by its share of the row: green on the diagonal, red elsewhere."""
    if not count:
        return '<td class="n"></td>'
    share = count / max(row_total, 1)
    rgb = "46,160,67" if diagonal else "214,39,40"
    return (f'<td class="n" style="background:rgba({rgb},{CELL_SHADE_ALPHA * share:.2f})" '
            f'title="{share:.0%} of the row">{count}</td>')


def coarse_group_html(group: CoarseGroup) -> str:
    """One coarse category: rows = given fine category, columns = predicted fine category of
    the same group, then 'other' (predicted outside the group) and its most frequent target."""
    head = "".join(f'<th class="v"><span>{esc(c)}</span></th>' for c in group.predicted)
    body = ""
    for i, name in enumerate(group.given):
        total = int(group.matrix[i].sum() + group.other[i])
        cells = "".join(_cell(int(group.matrix[i, j]), total, name == column)
                        for j, column in enumerate(group.predicted))
        body += (f'<tr><th>{esc(name)}</th><td class="n">{total}</td>{cells}'
                 f"{_cell(int(group.other[i]), total, False)}<td>{_top_other(group.top_other[i])}</td></tr>")
    return (f"<h3>{esc(group.coarse)} &mdash; {group.errors} of {group.rows} rows wrong</h3>"
            f'<table class="cm"><tr><th>given \\ predicted</th><th>rows</th>{head}<th>other</th>'
            f"<th>most frequent other</th></tr>{body}</table>")


def _top_other(top: tuple[str, int] | None) -> str:
    return esc(f"{top[0]} ({top[1]})") if top else ""


def single_class_groups_html(groups: list[CoarseGroup]) -> str:
    """Coarse categories with one fine category: every mistake leaves the group, so a matrix
    would be a single cell; one table row each says the same."""
    rows = [[esc(g.given[0]), str(g.rows), str(g.errors), _top_other(g.top_other[0])] for g in groups]
    return ("<h3>Coarse categories with one fine category</h3>"
            + html_table(["category", "rows", "wrong", "most frequent wrong prediction"], rows, "single"))


def coarse_html(groups: list[CoarseGroup], clean: list[tuple[str, int]]) -> str:
    """Small confusion matrices for coarse categories with several fine categories and
    mistakes, one table for single-category ones, one line for those without mistakes."""
    if not groups and not clean:
        return ("<h2>Confusion within coarse categories</h2><p>The model has no coarse categories."
                "</p>")
    several = [g for g in groups if len(g.predicted) > 1]
    single = [g for g in groups if len(g.predicted) == 1]
    clean_line = ", ".join(f"{esc(name)} ({rows})" for name, rows in clean) or "none"
    return ("<h2>Confusion within coarse categories</h2><p>For each coarse category with mistakes: "
            "its fine categories (rows: given, columns: predicted), 'other' for predictions "
            "outside the coarse category. Cells are counts, shaded by share of the row.</p>"
            + "".join(coarse_group_html(g) for g in several)
            + (single_class_groups_html(single) if single else "")
            + f"<p><b>Coarse categories without mistakes</b> (rows): {clean_line}</p>")


OPEN_SET_FIELDS = [  # key, label, formatter
    ("score", "unfamiliarity score", fmt_value),
    ("auroc", "AUROC, familiar vs unfamiliar products", fmt_value),
    ("baseline", "baseline score", fmt_value),
    ("baseline_auroc", "baseline AUROC", fmt_value),
    ("known_rows", "familiar rows (categories the model knows)", fmt_value),
    ("unknown_rows", "unfamiliar rows (categories it does not)", fmt_value),
    ("threshold", "flagging threshold", fmt_value),
    ("flagged_unknown_share", "unfamiliar products flagged", percent),
    ("flagged_known_share", "familiar products flagged (false alarms)", percent),
]


def open_set_html(open_set) -> str:
    """Whether the model can tell products of categories it never learned; every value may be
    missing or None (the measurement is optional and made elsewhere)."""
    title = "<h2>Unfamiliar products (open-set)</h2>"
    if not isinstance(open_set, dict) or not open_set:
        return title + '<p class="note">Not measured in this run.</p>'
    known = {k for k, _, _ in OPEN_SET_FIELDS}
    rows = [(label, fmt(open_set.get(key))) for key, label, fmt in OPEN_SET_FIELDS if key in open_set]
    rows += [(key, fmt_value(value)) for key, value in sorted(open_set.items()) if key not in known]
    body = "".join(f"<tr><th>{esc(label)}</th><td>{value}</td></tr>" for label, value in rows)
    return (title + "<p>AUROC: chance that an unfamiliar product scores as more unfamiliar than a "
            "familiar one (0.5 = chance, 1.0 = perfect).</p>" + f'<table class="summary">{body}</table>')


def decisions_html(section: dict | None) -> str:
    """What the nightly job's keep / change / review rule does on these rows made into a catalog
    with simulated wrong categories, at each target change precision."""
    title = "<h2>Decisions: keep, change, review</h2>"
    if not section:
        return title + '<p class="note">Not measured in this run.</p>'
    fitted = section.get("fitted_on") or {}
    note = (f"Thresholds fitted on split {esc(fitted.get('split'))} ({fmt_value(fitted.get('rows'))} rows, "
            f"backend {esc(fitted.get('backend'))})." if fitted else
            "This model has no fitted thresholds: the job's conservative defaults are measured.")
    if section.get("warning"):
        note += f' <b>{esc(section["warning"])}</b>'
    rows = [[percent(r["target_precision"]), percent(r["precision"]), percent(r["catch"]),
             percent(r["fixed"]), percent(r["review_load"]), percent(r["change_rate"])]
            for r in section["curve"]]
    return (title + f"<p>These rows as a catalog: each once with its true category and once with "
            f"each wrong one ({percent(section['catalog_error_rate'])} of the weight, half within its "
            f"coarse group). {note}</p>"
            + html_table(["target precision", "change precision", "wrong categories caught",
                      "fixed by a change", "review load", "change rate"], rows))


def robustness_html(robust: dict | None) -> str:
    """Accuracy on clean images against each corruption (a row) by severity (a column), and
    under each attack by epsilon; nothing when not measured (jobs.evaluate --corruptions)."""
    if not robust:
        return ""
    rows = robust["conditions"]
    severities = sorted({r["severity"] for r in rows if r["kind"] == "corruption"})
    by_name: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["kind"] == "corruption":
            by_name.setdefault(r["name"], {})[r["severity"]] = r["accuracy"]
    corrupt = html_table(["corruption", *(f"severity {s}" for s in severities)],
                     [[esc(name), *(percent(levels.get(s)) for s in severities)]
                      for name, levels in by_name.items()])
    attacks = [r for r in rows if r["kind"] == "attack"]
    attack = (html_table(["attack", "epsilon (pixel levels of 255)", "accuracy"],
                     [[esc(r["name"].upper()), f"{r['epsilon']:g}", percent(r["accuracy"])]
                      for r in attacks]) if attacks
              else f'<p class="note">{esc(robust.get("attack_skipped", "No attack measured."))}</p>')
    return (f"<h2>Robustness</h2><p>Clean accuracy {percent(robust['clean_accuracy'])} on "
            f"{robust['rows']} rows; mean under the corruptions "
            f"{percent(robust['mean_corruption_accuracy'])} (ImageNet-C recipes, severity 1 mild to "
            f"5 severe).</p>{corrupt}{attack}")


def report_html(metrics: dict, model: dict, manifest: str, pngs: dict[str, bytes],
                groups: tuple[list[CoarseGroup], list[tuple[str, int]]],
                thumbs: dict[str, bytes]) -> str:
    """One self-contained HTML page (plots and thumbnails embedded)."""
    pairs = metrics.get("confused_pairs", [])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Model evaluation: {esc(split_label(metrics.get("split")))}</title>
<style>{STYLE}</style></head>
<body>{header_html(metrics, model, manifest)}
{summary_html(metrics, model, manifest)}
<h2>Accuracy vs coverage, calibration</h2>
<p>Predictions with confidence at or above the threshold are accepted without review.</p>
<div class="plots">{img_tag(pngs["coverage"], "accuracy-coverage curve")}
{img_tag(pngs["reliability"], "reliability diagram")}</div>
{confused_pairs_html(pairs, thumbs)}
{coarse_html(*groups)}
{per_class_html(metrics["per_class"])}
{decisions_html(metrics.get("decisions"))}
{open_set_html(metrics.get("open_set"))}
{robustness_html(metrics.get("robustness"))}
<p class="note">Full confusion matrix: confusion_matrix.csv next to this page.</p>
</body></html>
"""
