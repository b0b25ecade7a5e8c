"""What the review page's server holds: the run's queue, the model's classes, the decisions
this server knows, thumbnails, and the reviews table it appends to. Built once, before the
server listens (`pipeline.review.server`)."""

from __future__ import annotations

import csv
import getpass
import io
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import storage
from pipeline.config.review import ReviewConfig
from pipeline.errors import ConfigError, ImageError
from pipeline.images.security import UriPolicy
from pipeline.inference.engine import ImageSettings
from pipeline.models.artifact import load_metadata
from pipeline.review.queue import AUDIT_REASON, committed_run, load_queue
from pipeline.sinks.reviews import REVIEWS_DIR, Decision, ReviewsTable

# Formats a thumbnail is made from: the photo formats the scoring decoder takes (Pillow's other
# plugins are not for untrusted bytes).
THUMBNAIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
THUMBNAIL_QUALITY = 82
THUMBNAIL_CACHE = 2048  # thumbnails kept in memory (about 15 kB each): paging back costs nothing
ICONIC_FOLDER = "iconic"  # an artifact's own iconic images: iconic/<class>.<jpg|png|webp>
ICONIC_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
GROCERY_CLASSES_CSV = "classes.csv"
GROCERY_CLASS_COLUMN, GROCERY_ICONIC_COLUMN = "Class Name (str)", "Iconic Image Path (str)"


class Refused(Exception):
    """A request the API turns down: its status code and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def thumbnail_jpeg(data: bytes, size: int, max_pixels: int) -> bytes:
    """A JPEG of at most size x size from image bytes: EXIF orientation applied, alpha on white,
    the pixel limit checked on the header before any pixel is decoded. Raises ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides
            im = Image.open(io.BytesIO(data), formats=THUMBNAIL_FORMATS)
            if im.width * im.height > max_pixels:
                raise ImageError("too_large", f"{im.width}x{im.height} pixels is over the limit")
            if im.format == "JPEG":
                im.draft("RGB", (size, size))  # decode at a reduced scale: a 4000 px photo is cheap
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
            return buf.getvalue()
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "not an image Pillow may open") from exc
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("decode_failed", f"{type(exc).__name__}: {exc}") from exc


def iconic_images(model_uri: str, classes: list[str], dataset: str | None
                  ) -> tuple[dict[str, str], str | None]:
    """(class -> URI of its iconic image, the folder they lie in) for the model's classes:
    from --iconic-images (a Grocery Store-style dataset: classes.csv names each class's iconic
    image) when given, else from the artifact's own iconic/ folder; none when neither has them.
    A class without an image of its own name gets none: nothing is guessed."""
    wanted = set(classes)
    if dataset:
        if storage.has_scheme(dataset):
            raise ConfigError(f"--iconic-images {dataset}: give a local folder")
        listing = Path(dataset) / GROCERY_CLASSES_CSV
        if not listing.is_file():
            raise ConfigError(f"--iconic-images {dataset}: no {GROCERY_CLASSES_CSV} there; give "
                              "the Grocery Store dataset's folder")
        found = {}
        with listing.open(newline="") as f:
            for row in csv.DictReader(f):
                name, path = row.get(GROCERY_CLASS_COLUMN), row.get(GROCERY_ICONIC_COLUMN)
                if name in wanted and path and (Path(dataset) / path.lstrip("/")).is_file():
                    found[name] = str(Path(dataset) / path.lstrip("/"))
        return found, str(Path(dataset).resolve())
    folder = storage.join(model_uri, ICONIC_FOLDER)
    if not storage.exists(folder):
        return {}, None
    found = {}
    for uri in storage.list_files(folder):
        stem, suffix = os.path.splitext(uri.replace(os.sep, "/").rsplit("/", 1)[-1])
        if stem in wanted and suffix.lower() in ICONIC_SUFFIXES:
            found[stem] = uri
    return found, folder


@dataclass
class Decided:
    """The decisions in force per product for the image the queue shows, newest last."""

    by_product: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rows: list[dict[str, Any]]) -> None:
        with self.lock:
            for row in rows:
                self.by_product.setdefault(row["product_id"], []).append(
                    {"decision_id": row["decision_id"], "category": row["decided_category"],
                     "reviewer": row["reviewer"]})

    def remove(self, decision_ids: set[str]) -> None:
        with self.lock:
            for product, held in list(self.by_product.items()):
                self.by_product[product] = [d for d in held if d["decision_id"] not in decision_ids]

    def current(self, product_id: str) -> dict[str, Any] | None:
        held = self.by_product.get(product_id)
        return held[-1] if held else None


class ReviewState:
    """What every request reads: the run, the queue, the model's classes, the image settings,
    the reviews table. Built once, before the server listens, so a bad argument or an unreadable
    run stops the job with one line."""

    def __init__(self, cfg: ReviewConfig):
        self.cfg = cfg
        self.run = committed_run(cfg.output)
        model_uri = cfg.model or self.run.model
        if not model_uri:
            raise ConfigError("--model: the committed run does not say which model scored it; "
                              "give --model MODEL_FOLDER")
        self.meta = load_metadata(model_uri)
        self.classes = list(self.meta.classes)
        self.known = set(self.classes)
        self.groups = dict(self.meta.coarse_classes)
        self.table = ReviewsTable(cfg.reviews or storage.join(cfg.output, REVIEWS_DIR))
        self.table.check()
        self.reviewer = cfg.reviewer or getpass.getuser()
        queue = load_queue(self.run.files, cfg.audit_share, cfg.seed)
        self.items: list[dict[str, Any]] = queue.to_pylist()
        self.index = {item["product_id"]: i for i, item in enumerate(self.items)}
        self.images = ImageSettings.from_config(cfg, self.meta.input_size, self.run.base_uri)
        self.iconic, iconic_root = iconic_images(model_uri, self.classes, cfg.iconic_images)
        self.iconic_images = (ImageSettings(
            self.meta.input_size, iconic_root, UriPolicy.from_options(
                "file,s3,gs,https", iconic_root, "", None), cfg.max_image_bytes,
            cfg.max_image_pixels, cfg.fetch_timeout_s, cfg.fetch_retries)
            if iconic_root else None)
        self.decided = Decided()
        # Decisions this server wrote, by id: an undo of one of them needs no table read.
        self.written: dict[str, dict[str, Any]] = {}
        self.decided.add(self._in_force())
        self._thumbs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def _in_force(self) -> list[dict[str, Any]]:
        """The table's decisions in force for the queue's products and images."""
        latest = self.table.latest().to_pylist()
        return [row for row in latest if row["product_id"] in self.index and
                row["image_version"] == self.items[self.index[row["product_id"]]]["image_version"]]

    # -- the queue --------------------------------------------------------------------------

    def reason(self, item: dict[str, Any]) -> str:
        return AUDIT_REASON if item["audit"] else item["action_reason"]

    def view(self, item: dict[str, Any]) -> dict[str, Any]:
        """One queue item as the page gets it: no image URI, no path."""
        top = [{"category": t["category"], "score": round(float(t["score"]), 4),
                "group": self.groups.get(t["category"]), "iconic": t["category"] in self.iconic}
               for t in (item.get("top_k") or [])]
        confidence = item.get("confidence")
        return {
            "id": item["product_id"], "current": item["current_category"],
            "current_group": self.groups.get(item["current_category"] or ""),
            "predicted": item["predicted_category"],
            "confidence": None if confidence is None else round(float(confidence), 4),
            "p_current": None if item.get("p_current") is None else round(float(item["p_current"]), 4),
            "reason": self.reason(item), "audit": item["audit"], "error": item.get("error_type"),
            "top_k": top, "decided": self.decided.current(item["product_id"]),
        }

    def matches(self, filters: dict[str, str | None]) -> Callable[[dict[str, Any]], bool]:
        """The queue filter: reason, category (current or predicted) and coarse group."""
        reason, category, group = filters.get("reason"), filters.get("category"), filters.get("group")
        pending = filters.get("pending") in ("1", "true", True)

        def keep(item: dict[str, Any]) -> bool:
            pair = (item["current_category"], item["predicted_category"])
            return ((not reason or self.reason(item) == reason)
                    and (not category or category in pair)
                    and (not group or group in {self.groups.get(c or "") for c in pair})
                    and (not pending or self.decided.current(item["product_id"]) is None))
        return keep

    def acceptable(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        """What a bulk accept of `filters` decides: its undecided items whose top-1 is a class."""
        keep = self.matches({**{k: filters.get(k) for k in ("reason", "category", "group")},
                             "pending": True})
        return [i for i in self.items if keep(i) and i["predicted_category"] in self.known]

    def item(self, product_id: Any) -> dict[str, Any]:
        if not isinstance(product_id, str) or product_id not in self.index:
            raise Refused(404, f"product {product_id!r} is not in run {self.run.run_id}'s review "
                          "queue")
        return self.items[self.index[product_id]]

    # -- decisions --------------------------------------------------------------------------

    def decision(self, item: dict[str, Any], category: Any) -> Decision:
        if not isinstance(category, str) or category not in self.known:
            raise Refused(400, f"unknown category {category!r}: pick one of the model's "
                          f"{len(self.classes)} classes")
        return Decision(product_id=item["product_id"], image_version=item["image_version"],
                        image_uri=item["image_uri"], decided_category=category,
                        replaces_category=item["current_category"],
                        predicted_category=item["predicted_category"],
                        model_version=item["model_version"], reviewer=self.reviewer,
                        run_id=self.run.run_id)

    def append(self, decisions: list[Decision]) -> list[dict[str, Any]]:
        """Written (and on disk) before it returns: the page says "saved" only then."""
        rows = self.table.append(decisions)
        self.decided.add(rows)
        with self.decided.lock:
            self.written.update({row["decision_id"]: row for row in rows})
        return rows

    def undo(self, decision_ids: list[str]) -> list[dict[str, Any]]:
        rows = []
        for decision_id in decision_ids:
            try:
                rows.append(self.table.undo(decision_id, self.reviewer, self.run.run_id,
                                            self.written.get(decision_id)))
            except KeyError as exc:
                raise Refused(404, f"no decision {decision_id!r} in the reviews table") from exc
        self.decided.remove(set(decision_ids))
        return rows

    # -- images -----------------------------------------------------------------------------

    def _cached(self, key: tuple[str, str], make: Callable[[], bytes]) -> bytes:
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        jpeg = make()
        with self._thumbs_lock:
            self._thumbs[key] = jpeg
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.popitem(last=False)
        return jpeg

    def _jpeg(self, images: ImageSettings, uri: str) -> bytes:
        # The policy first, on its own: a refused location is a 403 with no bytes, not a
        # missing image.
        try:
            images.policy.check_uri(storage.resolve(uri, images.base_uri))
        except ImageError as exc:
            raise Refused(403, "image outside the URI policy") from exc
        try:
            return thumbnail_jpeg(images.fetch(uri), self.cfg.thumbnail_px, self.cfg.max_image_pixels)
        except ImageError as exc:
            raise Refused(404, f"image unreadable ({exc.error_type})") from exc

    def thumbnail(self, product_id: Any) -> bytes:
        item = self.item(product_id)
        if not item["image_uri"]:
            raise Refused(404, "the product has no image")
        return self._cached(("p", item["product_id"]),
                            lambda: self._jpeg(self.images, item["image_uri"]))

    def iconic_thumbnail(self, category: Any) -> bytes:
        if not isinstance(category, str) or category not in self.iconic or not self.iconic_images:
            raise Refused(404, f"no iconic image of {category!r}")
        return self._cached(("c", category),
                            lambda: self._jpeg(self.iconic_images, self.iconic[category]))


