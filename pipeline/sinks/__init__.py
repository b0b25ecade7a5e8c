"""Where a night's rows go: the Parquet run folder (the source of truth, resumable) and,
optionally, a warehouse table committed from it. Each sink has the same small interface:
write, commit, committed files."""
