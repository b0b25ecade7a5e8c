import os

import pytest
import yaml

from pipeline.config import RecategorizeConfig, parse_args
from pipeline.errors import ConfigError


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
