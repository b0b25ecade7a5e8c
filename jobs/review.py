"""Serve a review page for the committed run of a nightly output folder: the rows the night sent
to review, worst first, with a small random audit sample of its changes. Keyboard first; every
decision is appended to the reviews table (default <output>/reviews) before the page says
"saved", and the next night honours it. Listens on 127.0.0.1 unless --host says otherwise (then
--token, or $REVIEW_TOKEN, is required)."""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline.config import parse_args
from pipeline.config.review import ReviewConfig

PROG = "python -m jobs.review"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(ReviewConfig, argv, __doc__, PROG)
    # Starlette, pyarrow and the model's metadata load only once the arguments are good.
    from pipeline.review.server import serve
    from pipeline.review.state import ReviewState

    def ready(url: str, state: ReviewState) -> None:
        shown = f"{url}?token=<your token>" if cfg.token else url
        pending = sum(state.decided.current(i["product_id"]) is None for i in state.items)
        print(f"review page: {shown} (run {state.run.run_id}: {len(state.items)} items, "
              f"{pending} undecided; decisions go to {state.table.uri}; Ctrl-C stops)", flush=True)

    serve(cfg, ready)


if __name__ == "__main__":
    sys.exit(run_job(main))
