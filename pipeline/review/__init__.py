"""The review page (`jobs.review`): people decide the rows a night sent to review.

`queue` reads the committed run's rows to review (and an audit sample of its changes) with
predicate pushdown; `server` is the Starlette app that shows them, sends thumbnails read through
the job's URI policy and appends each decision to the reviews table (`pipeline.sinks.reviews`),
which the next night honours. `page.html`, `page.js` and `page.css` are the page itself.
"""
