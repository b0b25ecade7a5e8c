"""Where a night's rows go. Every sink implements `base.Sink`: `check` before any work (and say
which run it holds), `commit` a run atomically (fenced by the output's lease), `abort` a run's
staging, list its `committed_files`. The nightly job commits its sinks in order
(`base.commit_in_order`):

- `iceberg.IcebergSink` (optional, `--iceberg-table`): copies the run's rows into a warehouse
  table as one snapshot; committed first, so a run stopped before `_SUCCESS` is found again.
- `parquet.RunFolderSink`: the Parquet run folder, the source of truth and the unit of resume;
  the only code that knows the output folder's layout (staging, run folders, `_SUCCESS`, the
  summary and report files). Its rows are written during scoring by Ray Data write tasks
  (`RunFolderSink.datasink`, files named and listed by `files`), and published by `_SUCCESS`.

`rows` holds the output schema, `stats` the per-file statistics the commit adds up.
"""
