"""The project's exceptions.

Job-level problems (bad config, bad manifest, bad model, unwritable output) raise a
`PipelineError` subclass before anything is written; the job entry points turn them into a
message and a non-zero exit code. Per-image problems never raise out of a stage: they become
error rows whose `error_type` is one of `ROW_ERROR_TYPES`.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the jobs report to the user as a message (not a traceback)."""

    exit_code = 1


class ConfigError(PipelineError):
    """A job argument or config file is invalid."""

    exit_code = 2


class ManifestError(PipelineError):
    """The catalog manifest cannot be read or violates its schema."""

    exit_code = 3


class ModelError(PipelineError):
    """A model name, weights file or model artifact is unknown, missing or corrupt."""

    exit_code = 4


class OutputError(PipelineError):
    """The output location cannot be written, or holds a run we must not overwrite."""

    exit_code = 5


class OutputBusyError(PipelineError):
    """Another run holds the output's lease (one writer per output), or took it over from this
    run while it stalled; this run commits nothing."""

    exit_code = 8


class PromotionRefusedError(PipelineError):
    """`jobs.promote` measured the candidate model worse than the current one on the held-out
    rows: the `current` pointer stays where it was (the decision is in the history file)."""

    exit_code = 9


class TrainingError(PipelineError):
    """Training could not produce a model (no usable rows, failed workers)."""

    exit_code = 6


class ErrorBudgetError(PipelineError):
    """Too many of the night's scored rows are errors (`--max-error-rate`), or its first rows all
    failed the same way: nothing is published and the previous run stays current."""

    exit_code = 7


class FailFastError(ErrorBudgetError):
    """Raised inside an inference actor when its first rows are all errors of one type, so the
    job stops before scoring the rest; the driver reports it as an ErrorBudgetError."""


# Per-row error types that appear in the output's `error_type` column.
ROW_ERROR_TYPES = (
    "fetch_not_found",
    "fetch_failed",
    "fetch_timeout",
    "not_an_image",
    "truncated",
    "too_large",
    "unsupported_format",
    "decode_failed",
)


class ImageError(Exception):
    """One image could not be fetched or decoded; carried into the output as an error row."""

    def __init__(self, error_type: str, message: str):
        if error_type not in ROW_ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}; valid: {', '.join(ROW_ERROR_TYPES)}")
        super().__init__(message)
        self.error_type = error_type
        self.message = message
