"""The benchmark runs end to end at a tiny N (CI proves it works; timings are not asserted)."""

import pytest

from pipeline.benchmark import run_benchmark
from pipeline.config import BenchmarkConfig
from pipeline.errors import ConfigError


@pytest.mark.slow
def test_benchmark_prints_every_stage(ray_local, tmp_path):
    table = run_benchmark(BenchmarkConfig(rows=24, upload_sizes="original,400",
                                          output=str(tmp_path), batch_size=8))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "stage" not in line]
    stages = {line.split(" | ")[1] for line in rows}
    assert {"ceiling (model only)", "decode + preprocess, 1 process",
            "baseline (Ray Data docs recipe)", "ours (manifest -> committed Parquet)"} <= stages
    assert sum(line.startswith("| 400 px") for line in rows) == 4
    assert all(int(line.split(" | ")[2]) > 0 for line in rows)


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="valid: ceiling, decode"):
        run_benchmark(BenchmarkConfig(stages="ours,warp", output=str(tmp_path)))
