"""The benchmark runs end to end at a tiny N (CI proves it works; timings are not asserted)."""

import pytest

from pipeline.analysis.benchmark import run_benchmark
from pipeline.config import BenchmarkConfig, TrainBenchmarkConfig, validate
from pipeline.errors import ConfigError
from pipeline.training.train_benchmark import run_train_benchmark


@pytest.mark.slow
def test_benchmark_prints_every_stage(ray_local, tmp_path, tiny_model):
    # The stages and the table are what is checked, not the bundled model: tiny_model and the
    # fewest rows the config allows keep the decode and inference of every stage cheap.
    table = run_benchmark(BenchmarkConfig(rows=10, upload_sizes="original,400", model=tiny_model,
                                          output=str(tmp_path), batch_size=8))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "stage" not in line]
    stages = {line.split(" | ")[1] for line in rows}
    assert {"ceiling (model only)", "decode + preprocess, 1 process",
            "baseline (Ray Data docs recipe)", "ours (manifest -> committed Parquet)"} <= stages
    assert sum(line.startswith("| 400 px") for line in rows) == 4
    assert all(int(line.split(" | ")[2]) > 0 for line in rows)


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="valid: ceiling, ceiling_tta, decode"):
        run_benchmark(BenchmarkConfig(stages="ours,warp", output=str(tmp_path)))


def test_tta_ceiling_is_its_own_row(tmp_path):
    table = run_benchmark(BenchmarkConfig(stages="ceiling,ceiling_tta", output=str(tmp_path),
                                          batch_size=8, upload_sizes="original"))
    stages = [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| -")]
    assert stages == ["ceiling (model only)", "ceiling, --tta flip (model only)"]


def test_training_speed_table_has_a_cell_per_policy_and_size():
    table = run_train_benchmark("mobilenet_v3_small", ["full", "0"], [64, 96], batch_size=4, steps=1)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "px" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| everything", "| last 0 stages + head"]
    assert all(float(v) > 0 for r in rows for v in r.strip("| ").split(" | ")[1:])


def test_training_speed_options_are_checked():
    with pytest.raises(ConfigError, match="neither 'full' nor a stage count"):
        validate(TrainBenchmarkConfig, {"policies": "full,most"})
