"""cluster.yaml against Ray's own cluster-launcher schema."""

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import REPO_ROOT


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_ray(cluster_config):
    validate_config(prepare_config(copy.deepcopy(cluster_config)))
    types = cluster_config["available_node_types"]
    assert types[cluster_config["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_worker", "gpu_worker"} <= set(types)


def test_schema_rejects_a_misspelled_field(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["max_workerz"] = 1
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))
