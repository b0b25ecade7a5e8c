"""Scoring the night's rows: one streaming pass of the scoring engine into the run folder.

`score_chunks` runs the pass on Ray Data, `score_local` the same pass in this process; both
read the plan's chunks (`pipeline.nightly.chunks`) and write through the run folder sink's
datasink, so resume and commit do not know which executor ran.
"""

from __future__ import annotations

import gc

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import RecategorizeConfig
from pipeline.errors import FailFastError
from pipeline.inference import engine, fail_fast, threads
from pipeline.nightly.chunks import Chunk, ChunkReader, chunk_items
from pipeline.sinks.parquet import RunFolderSink
from pipeline.sinks.rows import KNOWN_ERROR_COLUMN

# Write tasks gather at least this many rows (fewer, larger files), and at most a chunk's worth,
# so a chunk's rows land on storage soon after they are scored.
WRITE_BLOCK_ROWS = 32_768
# Reading a chunk and writing files is I/O: a small CPU request keeps them from holding a slot
# that decoding or the model needs.
IO_TASK_CPUS = 0.1


def source_columns(uri: str, chunks: list[Chunk]) -> list[str]:
    """The columns the night reads from its source (the manifest or the rows to re-score)."""
    fs, _ = storage.arrow_filesystem(uri)
    with fs.open_input_file(chunks[0].path) as f:
        names = pq.read_schema(f).names
    return ["product_id", "image_uri"] + [c for c in ("current_category", "image_version",
                                                      KNOWN_ERROR_COLUMN) if c in names]


def nightly_predictor(cfg: RecategorizeConfig, place: engine.Placement, run_id: str,
                      rows: int, scorers: int | None = None,
                      reviewed: str | None = None) -> engine.Predictor:
    """The InferenceActor every scorer (an actor of the pool, or this process) builds, with
    its typed settings; `rows` to score in all, over `scorers` (default: the largest actor
    pool) for the fail-fast watch; `reviewed` the night's snapshot of people's decisions."""
    from pipeline.inference.actor import InferenceActor, NightlyScoring

    scorers = scorers or engine.actor_pool_bounds(place)[1]
    watch = fail_fast.fail_fast_rows(rows, scorers) if cfg.max_error_rate < 1 else 0
    return engine.Predictor(InferenceActor, NightlyScoring.from_config(
        cfg, storage.normalize(cfg.model), run_id, watch, reviewed))


def score_chunks(cfg: RecategorizeConfig, source: str, chunks: list[Chunk],
                 images: engine.ImageSettings, place: engine.Placement, run_id: str,
                 sink: RunFolderSink, reviewed: str | None = None) -> tuple[list[dict], str]:
    """One streaming pass: chunks -> rows -> the scoring engine -> the run folder. Returns what
    the write tasks wrote (file, chunk, rows, stats) and Ray Data's stats of the pass.
    `reviewed`: the night's snapshot of the decisions in force (None: none)."""
    import ray.data

    from pipeline.inference.cluster import surface_job_errors

    engine.ignore_remote_args_warning()
    ds = ray.data.from_items(chunk_items(chunks), override_num_blocks=len(chunks))
    ds = ds.map_batches(ChunkReader(source, source_columns(source, chunks)), batch_size=1,
                        batch_format="pyarrow", num_cpus=IO_TASK_CPUS,
                        **engine.retry_args(place, actor=False))
    ds = engine.scored(ds, images, place, nightly_predictor(
        cfg, place, run_id, sum(c.rows for c in chunks), reviewed=reviewed))
    datasink = sink.datasink(run_id, min(WRITE_BLOCK_ROWS, cfg.rows_per_file, cfg.chunk_rows))
    stopped: FailFastError | None = None
    try:
        with surface_job_errors():  # e.g. an inference actor on a GPU node without CUDA
            ds.write_datasink(datasink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    except FailFastError as exc:
        stopped = FailFastError(*exc.args)
    if stopped is not None:
        # Ray Data frees an aborted pass's actors by reference counting, and the Ray error's
        # traceback holds them in reference cycles: a driver that runs again (a test, a
        # notebook) would wait for their CPUs. Raised unchained, after collecting the cycles.
        del ds
        gc.collect()
        raise stopped
    return datasink.written, ds.stats()


def score_local(cfg: RecategorizeConfig, source: str, chunks: list[Chunk],
                images: engine.ImageSettings, place: engine.Placement, run_id: str,
                sink: RunFolderSink, reviewed: str | None = None) -> list[dict]:
    """The same pass in this process, chunk by chunk into the same run folder files (so resume
    and commit do not know which executor ran). Returns what was written."""
    score = engine.in_process_scorer(images, place, nightly_predictor(
        cfg, place, run_id, sum(c.rows for c in chunks), scorers=1, reviewed=reviewed))
    reader = ChunkReader(source, source_columns(source, chunks))
    datasink = sink.datasink(run_id, cfg.rows_per_file)
    written: list[dict] = []
    for chunk in chunks:
        written += datasink.write(score(reader.read(chunk)), None)
    return written


def thread_split(written: list[dict]) -> dict:
    """The summary's `thread_split`: what the scorers reported of how they split their cores
    between the model and decoding (`inference.threads`), from this attempt's writes."""
    return threads.summarize([r for w in written for r in w.get("scorer_reports", [])])
