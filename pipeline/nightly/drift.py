"""What changed since the previous night: the drift section of the summary and its page.

It compares this night's stats (`pipeline.sinks.stats`, folded from the write tasks) with the
previous night's, taken from its summary, so no output is ever read back to be counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.pages import STYLE, esc, fmt_value, html_table, img_tag, png_bytes, pyplot
from pipeline.sinks.stats import CONFIDENCE_SUM_SCALE

TOP_MOVERS = 10  # categories listed by share change: what a reviewer can look at in one glance
MAX_LISTED_CATEGORIES = 50  # appeared/disappeared lists are capped; their totals are not
DIGITS = 6  # rounding of shares and distances in the section: readable, far below any real shift


# ---- drift --------------------------------------------------------------------------------

def _ratio(num: float, den: float) -> float | None:
    return round(num / den, DIGITS) if den else None


def _pair(previous: float | None, current: float | None) -> dict[str, float | None]:
    change = None if previous is None or current is None else round(current - previous, DIGITS)
    return {"previous": previous, "current": current, "change": change}


def _rates(stats: dict[str, Any]) -> dict[str, float | None]:
    """error and needs_review per row; category_changed per ok row (only those are compared)."""
    return {"error": _ratio(stats["errors"], stats["rows"]),
            "needs_review": _ratio(stats["needs_review"], stats["rows"]),
            # None for a night before decisions existed: no comparison, rather than a false 0
            "change": (_ratio(stats["actions"].get("change", 0), stats["rows"])
                       if stats.get("actions") else None),
            "category_changed": _ratio(stats["category_changed"], stats["ok"])}


def mean_confidence(stats: dict[str, Any]) -> float | None:
    """Mean confidence of the ok rows, exact from the integer sum; None without any."""
    n = sum(stats["confidence_histogram"])
    return round(stats["confidence_sum_micro"] / CONFIDENCE_SUM_SCALE / n, DIGITS) if n else None


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence, base 2, of two distributions over the same categories.

    JSD = KL(P||M)/2 + KL(Q||M)/2 with M = (P+Q)/2. In base 2 it lies in [0, 1]: 0 for identical
    shares, 1 when no category is shared. Unlike KL it is symmetric and finite when a category
    exists only one night, which is the normal case for appeared/disappeared categories."""
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0  # 0 * log 0 = 0; m > 0 wherever x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return min(max((kl(p) + kl(q)) / 2, 0.0), 1.0)  # clamp rounding just outside [0, 1]


def _category_rows(names: list[str], counts: dict[str, int], total: int) -> list[dict[str, Any]]:
    return [{"category": c, "count": counts[c], "share": _ratio(counts[c], total)} for c in names]


def _categories(previous: dict[str, int] | None, current: dict[str, int]) -> dict[str, Any]:
    """Category distribution shift: top movers, appeared/disappeared, JS divergence."""
    cur_total = sum(current.values())
    by_count = sorted(current, key=lambda c: (-current[c], c))
    out: dict[str, Any] = {
        "current_categories": len(current),
        "previous_categories": None if previous is None else len(previous),
        "top_current": _category_rows(by_count[:TOP_MOVERS], current, cur_total),
        "js_divergence": None, "top_movers": [], "appeared": [], "appeared_total": None,
        "disappeared": [], "disappeared_total": None,
    }
    if previous is None:
        return out
    prev_total = sum(previous.values())
    names = sorted(set(previous) | set(current))
    prev = np.array([previous.get(c, 0) for c in names], dtype=np.float64)
    cur = np.array([current.get(c, 0) for c in names], dtype=np.float64)
    if prev_total and cur_total:  # a night without a single prediction has no distribution
        out["js_divergence"] = round(js_divergence(prev, cur), DIGITS)
    prev_share = prev / prev_total if prev_total else np.zeros_like(prev)
    cur_share = cur / cur_total if cur_total else np.zeros_like(cur)
    change = cur_share - prev_share
    order = sorted((i for i in range(len(names)) if change[i] != 0),
                   key=lambda i: (-abs(change[i]), names[i]))
    out["top_movers"] = [{
        "category": names[i],
        "previous_count": int(prev[i]), "current_count": int(cur[i]),
        "previous_share": round(float(prev_share[i]), DIGITS),
        "current_share": round(float(cur_share[i]), DIGITS),
        "share_change": round(float(change[i]), DIGITS),
    } for i in order[:TOP_MOVERS]]
    appeared = sorted(set(current) - set(previous), key=lambda c: (-current[c], c))
    gone = sorted(set(previous) - set(current), key=lambda c: (-previous[c], c))
    out.update(appeared=_category_rows(appeared[:MAX_LISTED_CATEGORIES], current, cur_total),
               appeared_total=len(appeared),
               disappeared=_category_rows(gone[:MAX_LISTED_CATEGORIES], previous, prev_total),
               disappeared_total=len(gone))
    return out


def _normalized(histogram: list[int]) -> np.ndarray | None:
    total = sum(histogram)
    return np.asarray(histogram, dtype=np.float64) / total if total else None


def _rounded(shares: np.ndarray | None) -> list[float] | None:
    return None if shares is None else [round(float(x), DIGITS) for x in shares]


def _confidence(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """Both confidence histograms as shares, and two distances between them: total variation
    (share of rows that sit in a different bin, 0..1) and Wasserstein-1 over the bins (how far
    confidence moved on average, in confidence units: 0.1 = a tenth of the scale)."""
    bins = len(current["confidence_histogram"])
    cur = _normalized(current["confidence_histogram"])
    prev = None if previous is None else _normalized(previous["confidence_histogram"])
    if prev is not None and len(prev) != bins:
        raise ValueError(f"confidence histograms of {len(prev)} and {bins} bins are not comparable")
    tv = wasserstein = None
    if prev is not None and cur is not None:
        tv = round(float(np.abs(cur - prev).sum() / 2), DIGITS)
        wasserstein = round(float(np.abs(np.cumsum(cur - prev)).sum() / bins), DIGITS)
    return {
        "bin_edges": [round(x, DIGITS) for x in np.linspace(0.0, 1.0, bins + 1).tolist()],
        "previous_histogram": _rounded(prev), "current_histogram": _rounded(cur),
        "total_variation": tv, "wasserstein": wasserstein,
        "mean": _pair(None if previous is None else mean_confidence(previous), mean_confidence(current)),
    }


def drift(previous: dict[str, Any] | None, current: dict[str, Any], new_products: int | None = None,
          removed_products: int | None = None) -> dict[str, Any]:
    """The JSON-serializable 'what changed since last night' section, from two nights' stats.

    `new_products` / `removed_products` come from the caller's plan (None when unknown). With
    no previous night the section says so and still gives this night's figures; every
    comparison (previous values, changes, distances, movers) is then None or empty."""
    rates_now = _rates(current)
    rates_before = None if previous is None else _rates(previous)
    return {
        "has_previous": previous is not None,
        "note": None if previous is not None else "no previous night to compare with",
        "rows": _pair(None if previous is None else previous["rows"], current["rows"]),
        "products": {"new": new_products, "removed": removed_products},
        "rates": {key: _pair(None if rates_before is None else rates_before[key], value)
                  for key, value in rates_now.items()},
        "categories": _categories(None if previous is None else previous["categories"],
                                  current["categories"]),
        "confidence": _confidence(previous, current),
    }


# ---- HTML ---------------------------------------------------------------------------------

PREVIOUS_COLOR, CURRENT_COLOR = "#9aa5b1", "#4c72b0"  # last night muted, tonight emphasised
RATE_LABELS = {"error": "error rate (per row)", "needs_review": "needs review (per row)",
               "change": "proposed change (per row)",
               "category_changed": "category changed (per scored row)"}


def movers_png(movers: list[dict[str, Any]]) -> bytes:
    """Horizontal bars: each top mover's share last night and tonight, biggest move on top."""
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(movers) + 1.4))
    y = np.arange(len(movers))[::-1]
    height = 0.4
    ax.barh(y + height / 2, [m["previous_share"] for m in movers], height, color=PREVIOUS_COLOR,
            label="previous night")
    ax.barh(y - height / 2, [m["current_share"] for m in movers], height, color=CURRENT_COLOR,
            label="this night")
    ax.set_yticks(y, [m["category"] for m in movers])
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_xlabel("share of scored products")
    ax.set_title("Top movers (share of predictions)")
    ax.legend(loc="lower right")
    return png_bytes(fig)


def confidence_png(confidence: dict[str, Any]) -> bytes:
    """The two confidence histograms (shares per bin) overlaid."""
    plt = pyplot()
    from matplotlib.ticker import PercentFormatter

    edges = confidence["bin_edges"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color, label in (("previous_histogram", PREVIOUS_COLOR, "previous night"),
                              ("current_histogram", CURRENT_COLOR, "this night")):
        if confidence[key] is not None:
            ax.stairs(confidence[key], edges, color=color, fill=True, alpha=0.45, label=label)
            ax.stairs(confidence[key], edges, color=color)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_ylabel("share of scored products")
    ax.set_title("Confidence")
    if ax.get_legend_handles_labels()[0]:  # a night of error rows only has no histogram
        ax.legend(loc="best")
    return png_bytes(fig)


def _share(value: float | None) -> str:
    """Two decimals of a percent: with thousands of categories most shares are below 1%."""
    return "n/a" if value is None else f"{value:.2%}"


def _signed_share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.2f} pp"


def _headline_html(section: dict[str, Any]) -> str:
    cats, conf, products = section["categories"], section["confidence"], section["products"]
    rows = [("rows", f"{fmt_value(section['rows']['current'])} "
                     f"(previous {fmt_value(section['rows']['previous'])})"),
            ("category divergence (Jensen-Shannon, 0 = same shares, 1 = no category shared)",
             fmt_value(cats["js_divergence"])),
            ("confidence shift (total variation, 0..1)", fmt_value(conf["total_variation"])),
            ("confidence shift (Wasserstein, in confidence units)", fmt_value(conf["wasserstein"])),
            ("mean confidence", f"{fmt_value(conf['mean']['current'])} "
                                f"(previous {fmt_value(conf['mean']['previous'])})"),
            ("new / removed products", f"{fmt_value(products['new'])} / {fmt_value(products['removed'])}"),
            ("categories appeared / disappeared",
             f"{fmt_value(cats['appeared_total'])} / {fmt_value(cats['disappeared_total'])}")]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _rates_html(section: dict[str, Any]) -> str:
    rows = [[esc(RATE_LABELS.get(key, key)), _share(r["previous"]), _share(r["current"]),
             _signed_share(r["change"])] for key, r in section["rates"].items()]
    products = section["products"]
    rows += [[f"{key} products", "", fmt_value(products[key]), ""] for key in ("new", "removed")]
    return html_table(["", "previous night", "this night", "change"], rows, "rates")


def _movers_html(cats: dict[str, Any]) -> str:
    movers = cats["top_movers"]
    if not movers:
        return "<p>No category changed its share.</p>"
    rows = [[esc(m["category"]), str(m["previous_count"]), _share(m["previous_share"]),
             str(m["current_count"]), _share(m["current_share"]), _signed_share(m["share_change"])]
            for m in movers]
    return (img_tag(movers_png(movers), "top movers: previous vs current share")
            + html_table(["category", "previous rows", "previous share", "rows", "share", "change"],
                     rows, "movers"))


def _listed(title: str, items: list[dict[str, Any]], total: int | None) -> str:
    if not total:
        return f"<p><b>{esc(title)}</b>: none</p>"
    names = ", ".join(f"{esc(i['category'])} ({i['count']})" for i in items)
    more = f" and {total - len(items)} more" if total > len(items) else ""
    return f"<p><b>{esc(title)}</b> ({total}): {names}{more}</p>"


def render_drift_html(section: dict[str, Any]) -> str:
    """One self-contained HTML page (plots embedded as base64 PNG) of a `drift` section."""
    cats, conf = section["categories"], section["confidence"]
    if section["has_previous"]:
        categories = (_movers_html(cats)
                      + _listed("Categories that appeared", cats["appeared"], cats["appeared_total"])
                      + _listed("Categories that disappeared", cats["disappeared"],
                                cats["disappeared_total"]))
    else:
        top = [[esc(c["category"]), str(c["count"]), _share(c["share"])] for c in cats["top_current"]]
        categories = ("<p>Most frequent categories this night:</p>"
                      + html_table(["category", "rows", "share"], top, "top"))
    note = f'<p class="note">{esc(section["note"])}</p>' if section.get("note") else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>What changed since last night</title>
<style>{STYLE}</style></head>
<body><h1>What changed since last night</h1>{note}
{_headline_html(section)}
<h2>Rates</h2>{_rates_html(section)}
<h2>Category shares</h2>{categories}
<h2>Confidence</h2>{img_tag(confidence_png(conf), "confidence histograms, previous vs current")}
</body></html>
"""

