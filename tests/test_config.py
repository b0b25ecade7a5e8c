import pytest
import yaml

from pipeline.config import RecategorizeConfig, parse_args
from pipeline.errors import ConfigError


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"top_k": 3, "batch_size": 8, "output": "from-yaml"}))
    cfg = parse_args(RecategorizeConfig, ["--config", str(path), "--top-k", "2"], "")
    assert (cfg.top_k, cfg.batch_size, cfg.output) == (2, 8, "from-yaml")


def test_defaults_and_roundtrip(tmp_path):
    cfg = parse_args(RecategorizeConfig, [], "")
    assert cfg.top_k == 5 and cfg.manifest.endswith("manifest.parquet")
    path = tmp_path / "c.yaml"
    cfg.save(str(path))
    assert parse_args(RecategorizeConfig, ["--config", str(path)], "") == cfg


def test_bad_value_names_the_flag():
    with pytest.raises(ConfigError, match=r"--review-threshold: .*less than or equal to 1"):
        parse_args(RecategorizeConfig, ["--review-threshold", "3"], "")


def test_unknown_yaml_key_lists_valid(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"unknown option 'batchsize' \(valid: .*batch_size"):
        parse_args(RecategorizeConfig, ["--config", str(path)], "")


def test_bad_choice_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse_args(RecategorizeConfig, ["--device", "tpu"], "")
