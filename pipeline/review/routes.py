"""The review page's routes: each request handler, over one `ReviewState`.

The browser gets product ids, categories and scores, never an image URI or a path; a refusal is
one JSON line with its status (a refused image is an empty 403).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.review.state import Refused, ReviewState

PAGE_DIR = Path(__file__).resolve().parent
STATIC_FILES = {"page.js": "text/javascript", "page.css": "text/css"}
# The page's headers: its own scripts and images only, never framed, no token in a Referer.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; object-src 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def refused(exc: Refused) -> Response:
    if exc.status == 403:
        return Response(status_code=403)  # nothing about the image, not a byte of it
    return JSONResponse({"error": str(exc)}, exc.status)


async def jpeg_response(thumbnail: Callable[[Any], bytes], key: Any) -> Response:
    """A thumbnail made off the event loop, or the refusal (with no bytes) of one outside the
    URI policy or unknown."""
    try:
        jpeg = await run_in_threadpool(thumbnail, key)
    except Refused as exc:
        return refused(exc)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def json_body(request: Request) -> dict[str, Any]:
    # Only JSON: a cross-site form post (text/plain, urlencoded) cannot reach a decision.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise Refused(415, "send the body as application/json")
    try:
        body = await request.json()
    except ValueError as exc:
        raise Refused(400, "the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    return body


class Routes:
    """The handlers, one method per route."""

    def __init__(self, state: ReviewState):
        self.state = state

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE_DIR / "page.html", media_type="text/html", headers=PAGE_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return Response("not found\n", 404, media_type="text/plain")
        return FileResponse(PAGE_DIR / name, media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    async def meta(self, request: Request) -> Response:
        reasons: dict[str, int] = {}
        for item in self.state.items:
            reasons[self.state.reason(item)] = reasons.get(self.state.reason(item), 0) + 1
        pending = sum(self.state.decided.current(i["product_id"]) is None for i in self.state.items)
        return JSONResponse({
            "run_id": self.state.run.run_id, "model_version": self.state.meta.model_version,
            "reviewer": self.state.reviewer, "total": len(self.state.items), "pending": pending,
            "page_size": self.state.cfg.page_size, "reasons": reasons,
            "classes": [{"name": c, "group": self.state.groups.get(c), "iconic": c in self.state.iconic}
                        for c in self.state.classes],
            "groups": sorted(set(self.state.groups.values())),
        })

    async def queue(self, request: Request) -> Response:
        q = request.query_params
        try:
            offset = max(0, int(q.get("offset", 0)))
            limit = min(max(1, int(q.get("limit", self.state.cfg.page_size))), 1000)
        except ValueError:
            return JSONResponse({"error": "offset and limit are whole numbers"}, 400)
        keep = self.state.matches(dict(q))
        chosen = [item for item in self.state.items if keep(item)]
        return JSONResponse({"total": len(chosen), "offset": offset,
                             "acceptable": len(self.state.acceptable(dict(q))),
                             "items": [self.state.view(i) for i in chosen[offset:offset + limit]]})

    async def thumb(self, request: Request) -> Response:
        return await jpeg_response(self.state.thumbnail, request.query_params.get("id"))

    async def iconic(self, request: Request) -> Response:
        return await jpeg_response(self.state.iconic_thumbnail, request.query_params.get("category"))

    async def decide(self, request: Request) -> Response:
        try:
            body = await json_body(request)
            decision = self.state.decision(self.state.item(body.get("product_id")), body.get("category"))
            rows = await run_in_threadpool(self.state.append, [decision])
        except Refused as exc:
            return refused(exc)
        return JSONResponse({"saved": True, "decision_ids": [r["decision_id"] for r in rows],
                             "product_id": decision.product_id,
                             "category": decision.decided_category})

    async def bulk(self, request: Request) -> Response:
        try:
            body = await json_body(request)
            chosen = self.state.acceptable(body)
            # The page says how many it showed: a queue that moved since (another page decided
            # some) is not bulk-accepted blind.
            if body.get("expect") != len(chosen):
                raise Refused(409, f"the filtered set now has {len(chosen)} items with a "
                              f"suggestion, not {body.get('expect')}: reload and look again")
            decisions = [self.state.decision(i, i["predicted_category"]) for i in chosen]
            rows = await run_in_threadpool(self.state.append, decisions) if decisions else []
        except Refused as exc:
            return refused(exc)
        return JSONResponse({"saved": True, "decision_ids": [r["decision_id"] for r in rows],
                             "product_ids": [r["product_id"] for r in rows]})

    async def undo(self, request: Request) -> Response:
        try:
            body = await json_body(request)
            ids = body.get("decision_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise Refused(400, "decision_ids must be a non-empty list of decision ids")
            rows = await run_in_threadpool(self.state.undo, ids)
        except Refused as exc:
            return refused(exc)
        return JSONResponse({"saved": True, "undone": [r["undoes"] for r in rows],
                             "product_ids": sorted({r["product_id"] for r in rows})})

    def table(self) -> list[Route]:
        return [
            Route("/", self.page), Route("/static/{name}", self.static),
            Route("/api/meta", self.meta), Route("/api/queue", self.queue),
            Route("/api/thumb", self.thumb), Route("/api/iconic", self.iconic),
            Route("/api/decisions", self.decide, methods=["POST"]),
            Route("/api/bulk", self.bulk, methods=["POST"]),
            Route("/api/undo", self.undo, methods=["POST"]),
        ]
