"""The review page's settings (`jobs.review`): which committed run, where decisions go, who may
reach the page, and the image-access options its thumbnails are read with."""

from __future__ import annotations

import os
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline.config.options import ImageAccessOptions

TOKEN_ENV = "REVIEW_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Enough for a tile on a laptop screen at 2x, small enough to send 50 at once in a second.
DEFAULT_THUMBNAIL_PX = 256


class ReviewConfig(ImageAccessOptions):
    """Settings of `jobs.review`: a page for people to decide the rows a night sent to review."""

    # Not a JobConfig: the page starts no Ray, so --ray-address and --num-cpus would mean nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    output: str = Field(
        "outputs/recategorize",
        description="The nightly job's output folder (local path or URI): the page shows its "
        "committed run.",
    )
    reviews: str | None = Field(
        None,
        description="Reviews table the decisions are appended to (folder, local path or URI). "
        "Default: <output>/reviews, where the next night reads them.",
    )
    model: str | None = Field(
        None,
        description="Model artifact whose classes the search offers and whose coarse groups the "
        "filters use. Default: the model the committed run was scored with (its config.yaml).",
    )
    iconic_images: str | None = Field(
        None,
        description="Folder of a Grocery Store-style dataset (classes.csv naming each class's "
        "iconic image) whose iconic image of each suggested category the page shows. Default: "
        "the model artifact's own iconic/ folder when it ships one, else no iconic images.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Any address other than 127.0.0.1, localhost or ::1 "
        f"needs --token (or ${TOKEN_ENV}).",
    )
    port: int = Field(8765, ge=0, le=65535, description="Port to listen on (0: any free port).")
    token: str | None = Field(
        None,
        description=f"Shared secret every request must carry (Authorization: Bearer TOKEN, or "
        f"?token=TOKEN once on the page, which sets a cookie). Default: ${TOKEN_ENV}; required "
        "on a non-local --host.",
    )
    reviewer: str | None = Field(
        None, description="Name recorded with each decision. Default: this machine's user name.")
    audit_share: float = Field(
        0.02, ge=0.0, le=1.0,
        description="Share of the night's 'change' rows added to the queue as a random audit "
        "sample (rounded up; 0: none), so people also check what the model changed on its own.",
    )
    seed: int = Field(0, ge=0, description="Seed of the audit sample (same seed, same sample).")
    page_size: int = Field(50, ge=1, le=1000, description="Queue items the page loads at a time.")
    thumbnail_px: int = Field(
        DEFAULT_THUMBNAIL_PX, ge=32, le=1024, description="Longest side of a thumbnail, in pixels.")

    @field_validator("reviews", "model", "iconic_images", mode="before")
    @classmethod
    def _absolute(cls, value: Any) -> Any:
        """Local paths made absolute when parsed, as the shared path options are."""
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            return os.path.abspath(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _token_from_environment(cls, values: Any) -> Any:
        if isinstance(values, dict) and not values.get("token") and os.environ.get(TOKEN_ENV):
            values = {**values, "token": os.environ[TOKEN_ENV]}
        return values

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ReviewConfig:
        # Anyone who reaches the port could record decisions the next night applies.
        if not self.is_local and not self.token:
            raise ValueError(f"--host {self.host} is reachable from other machines: give --token "
                             f"TOKEN (or set ${TOKEN_ENV}), or bind --host 127.0.0.1")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("--token is too short to guess-proof: give at least 16 characters "
                             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
        return self

    @property
    def is_local(self) -> bool:
        """Whether the page listens on loopback only."""
        return self.host in LOCAL_HOSTS
