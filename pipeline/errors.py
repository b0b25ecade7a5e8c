"""The project's exceptions.

Job-level problems (bad config, bad manifest, bad model, unwritable output) raise a
`PipelineError` subclass before anything is written; the job entry points turn them into a
message and a non-zero exit code. Per-image problems never raise out of a stage: they become
error rows whose `error_type` is one of `ROW_ERROR_TYPES`.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code a job returns, defined once: the error classes below take theirs from
    here, every job's --help lists them (`EXIT_MEANINGS`), and a test checks the table in
    docs/reference.md against them."""

    SUCCESS = 0
    OTHER = 1
    CONFIG = 2
    MANIFEST = 3
    MODEL = 4
    OUTPUT = 5
    TRAINING = 6
    ERROR_BUDGET = 7
    OUTPUT_BUSY = 8
    PROMOTION_REFUSED = 9


EXIT_MEANINGS = {
    ExitCode.SUCCESS: "success",
    ExitCode.OTHER: "anything else, including storage that still fails after its retries (run "
                    "the same command again)",
    ExitCode.CONFIG: "bad option or config file",
    ExitCode.MANIFEST: "bad manifest",
    ExitCode.MODEL: "bad model",
    ExitCode.OUTPUT: "output not writable, or a warehouse table that cannot take the rows",
    ExitCode.TRAINING: "training failed",
    ExitCode.ERROR_BUDGET: "error budget exceeded, nothing published",
    ExitCode.OUTPUT_BUSY: "another run is writing the same output",
    ExitCode.PROMOTION_REFUSED: "jobs.promote: the candidate is not at least as good as the "
                                "current model",
}


class PipelineError(Exception):
    """Base of every error the jobs report to the user as a message (not a traceback)."""

    exit_code = ExitCode.OTHER


class ConfigError(PipelineError):
    """A job argument or config file is invalid."""

    exit_code = ExitCode.CONFIG


class ManifestError(PipelineError):
    """The catalog manifest cannot be read or violates its schema."""

    exit_code = ExitCode.MANIFEST


class ModelError(PipelineError):
    """A model name, weights file or model artifact is unknown, missing or corrupt."""

    exit_code = ExitCode.MODEL


class OutputError(PipelineError):
    """The output location cannot be written, or holds a run we must not overwrite."""

    exit_code = ExitCode.OUTPUT


class OutputBusyError(PipelineError):
    """Another run holds the output's lease (one writer per output), or took it over from this
    run while it stalled; this run commits nothing."""

    exit_code = ExitCode.OUTPUT_BUSY


class PromotionRefusedError(PipelineError):
    """`jobs.promote` measured the candidate model worse than the current one on the held-out
    rows: the `current` pointer stays where it was (the decision is in the history file)."""

    exit_code = ExitCode.PROMOTION_REFUSED


class TrainingError(PipelineError):
    """Training could not produce a model (no usable rows, failed workers)."""

    exit_code = ExitCode.TRAINING


class ErrorBudgetError(PipelineError):
    """Too many of the night's scored rows are errors (`--max-error-rate`), or its first rows all
    failed the same way: nothing is published and the previous run stays current."""

    exit_code = ExitCode.ERROR_BUDGET


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
