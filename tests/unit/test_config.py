import os
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.config import (
    DEFAULT_GROCERY_DATASET,
    GROCERY_STORE_ENV,
    REPO_ROOT,
    BenchmarkConfig,
    EmbedConfig,
    EvaluateConfig,
    MakeManifestConfig,
    RecategorizeConfig,
    TrainBenchmarkConfig,
    TrainConfig,
    build_parser,
    display_path,
    parse_args,
)
from pipeline.errors import ConfigError

JOB_CONFIGS = (RecategorizeConfig, TrainConfig, EvaluateConfig, EmbedConfig, BenchmarkConfig,
               TrainBenchmarkConfig, MakeManifestConfig)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"top_k": 3, "batch_size": 8, "output": "from-yaml"}))
    cfg = parse_args(RecategorizeConfig, ["--config", str(path), "--top-k", "2"], "")
    assert (cfg.top_k, cfg.batch_size, cfg.output) == (2, 8, os.path.abspath("from-yaml"))


def test_defaults_and_roundtrip(tmp_path):
    cfg = parse_args(RecategorizeConfig, [], "")
    assert cfg.top_k == 5 and cfg.manifest.endswith("manifest.parquet")
    path = tmp_path / "c.yaml"
    cfg.save(str(path))
    assert parse_args(RecategorizeConfig, ["--config", str(path)], "") == cfg


@pytest.mark.parametrize("argv, message", [
    (["--review-threshold", "3"], "--review-threshold 3.0 is out of range: give a number from 0.0 to 1.0"),
    (["--top-k", "0"], "--top-k 0 is out of range: give a whole number from 1 to 100"),
    (["--top-k", "x"], "--top-k 'x' is not a whole number: give a whole number"),
    (["--device", "tpu"], "--device 'tpu' is not a choice: give one of auto, cpu, cuda"),
    (["--batchsize", "3"], "unknown option --batchsize: did you mean --batch-size?"),
    (["--overwrite", "yes"], "--overwrite takes no value ('yes'): give --overwrite or --no-overwrite"),
    (["--top-k"], "--top-k is missing its value: give --top-k VALUE"),
    (["--min-actors", "3", "--max-actors", "2"], "--min-actors 3 is above --max-actors 2"),
])
def test_a_bad_option_is_named_with_its_problem_and_fix(argv, message):
    with pytest.raises(ConfigError) as caught:
        parse_args(RecategorizeConfig, argv, "", "python -m jobs.recategorize")
    assert str(caught.value).startswith(message)
    assert "RecategorizeConfig" not in str(caught.value) and "invalid" not in str(caught.value)


def test_a_bad_yaml_key_is_named_with_its_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batchsize: 3\ntop_k: 0\n")
    with pytest.raises(ConfigError) as caught:
        parse_args(RecategorizeConfig, ["--config", str(path)], "")
    message = str(caught.value)
    assert f"unknown option 'batchsize' in {path}: did you mean 'batch_size'?" in message
    assert f"--top-k 0 (key 'top_k' in {path}) is out of range" in message
    # a flag that overrides the file is not blamed on the file
    with pytest.raises(ConfigError, match=r"^--top-k 0 is out of range"):
        parse_args(RecategorizeConfig, ["--config", str(path), "--top-k", "0"], "")


def test_help_states_each_default_once_as_typed(monkeypatch, tmp_path):
    """No "Default: all. (default: None)"; paths into the checkout are relative (or
    <checkout>/... from elsewhere), never absolute."""
    monkeypatch.chdir(REPO_ROOT)
    for cls in JOB_CONFIGS:
        for action in build_parser(cls, "")._actions:
            if action.dest in cls.model_fields:
                stated = len(re.findall(r"\bDefault\b|\(default: ", action.help))
                assert stated == 1, (cls.__name__, action.dest, action.help)
    text = " ".join(build_parser(RecategorizeConfig, "").format_help().split())
    assert "(default: examples/model)" in text and str(REPO_ROOT) not in text
    assert "(default: off)" in text and "(default: None)" not in text
    monkeypatch.chdir(tmp_path)
    text = " ".join(build_parser(RecategorizeConfig, "").format_help().split())
    assert "(default: <checkout>/examples/model)" in text
    assert display_path(DEFAULT_GROCERY_DATASET) == "<checkout>/../shared/datasets/grocery-store"


def test_every_job_takes_the_same_device_default():
    devices = {cls.__name__: (cls.model_fields["device"].default, cls.model_fields["device"].annotation)
               for cls in JOB_CONFIGS if "device" in cls.model_fields}
    assert set(devices) == {"RecategorizeConfig", "TrainConfig", "EvaluateConfig", "EmbedConfig",
                            "BenchmarkConfig", "TrainBenchmarkConfig"}
    assert len(set(devices.values())) == 1 and next(iter(devices.values()))[0] == "auto"


def test_a_training_config_written_with_use_gpu_still_loads():
    assert TrainConfig(use_gpu=True).device == "cuda" and TrainConfig(use_gpu=False).device == "cpu"


def test_local_paths_are_absolute_after_parsing(tmp_path, monkeypatch):
    """A job must not depend on its current folder after start-up: Ray can delete the folder a
    job submitted with --working-dir starts in (tests/test_multinode.py)."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(RecategorizeConfig, ["--manifest", "m/manifest.parquet", "--output",
                                          "s3://bucket/out", "--allowed-uri-prefixes",
                                          "images,s3://vendor/,/mnt/x"], "")
    assert cfg.manifest == str(tmp_path / "m" / "manifest.parquet")
    assert cfg.output == "s3://bucket/out"
    assert cfg.allowed_uri_prefixes == f"{tmp_path / 'images'},s3://vendor/,/mnt/x"
    assert cfg.model == os.path.abspath(cfg.model) and cfg.output.startswith("s3://")
    assert parse_args(RecategorizeConfig, [], "").output == str(tmp_path / "outputs" / "recategorize")


GROCERY_DEFAULTS = """
from pipeline.config import ExportConfig, MakeManifestConfig, TrainConfig
print(MakeManifestConfig().source, TrainConfig().dataset_root, ExportConfig().calibration_source)
"""


def test_the_grocery_store_folder_comes_from_the_environment(tmp_path):
    """The dataset's folder is this machine's business: GROCERY_STORE_DIR sets every option that
    defaults to it (a relative value from the folder the job starts in), and --help names the
    variable, not a path."""
    (tmp_path / "grocery").mkdir()
    env = {**os.environ, GROCERY_STORE_ENV: "grocery",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", GROCERY_DEFAULTS], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(tmp_path / "grocery")] * 3
    text = " ".join(build_parser(MakeManifestConfig, "").format_help().split())
    assert f"${GROCERY_STORE_ENV} when set, else <checkout>/../shared/datasets/grocery-store" in text
