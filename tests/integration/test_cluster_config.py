"""Deployment files and placement settings: cluster.yaml against Ray's own cluster-launcher schema,
the KubeRay RayJob manifest against the RayJob v1 fields KubeRay documents, and the Ray Data
arguments the placement settings turn into."""

import copy
import re
import shlex

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import REPO_ROOT, RecategorizeConfig, parse_args, validate
from pipeline.errors import ConfigError, PipelineError
from pipeline.inference.actor import actor_device
from pipeline.inference.cluster import NODE_ENV, job_error
from pipeline.inference.engine import (
    DECODE_RESOURCE_PER_TASK,
    Placement,
    actor_pool_bounds,
    decode_placement,
    inference_placement,
)

PROJECT_VERSION = re.search(r'^version = "(.+)"', (REPO_ROOT / "pyproject.toml").read_text(),
                            re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((REPO_ROOT / "deploy" / "rayjob.yaml").read_text())


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


def test_cluster_yaml_pools(cluster_config):
    types = cluster_config["available_node_types"]
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and "GPU" not in cpu["resources"]
    assert cpu["resources"]["decode"] > 0 and "decode" not in gpu["resources"]  # decode pinned to CPU pool
    assert cpu["min_workers"] == gpu["min_workers"] == 0  # both pools scale to zero between runs
    assert cluster_config["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]
    assert 0 < cluster_config["idle_timeout_minutes"] <= 30
    assert gpu["node_config"]["InstanceType"].startswith(("g6.", "g5.")) and "xlarge" in gpu[
        "node_config"]["InstanceType"]
    for node_type in types.values():
        assert node_type["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100


def test_cluster_yaml_installs_the_pinned_release_and_keeps_auth_on(cluster_config):
    setup = "\n".join(cluster_config["setup_commands"])
    assert re.search(rf'"catalog-recategorizer @ git\+https://\S+@v{re.escape(PROJECT_VERSION)}"', setup)
    # Every node gets the token from the secret before Ray starts on it ...
    assert re.search(r"secretsmanager get-secret-value .*> ~/\.ray/auth_token", setup.replace("\n", " "))
    # ... and every `ray start` runs with token auth and the node environment of a local run.
    starts = [c for c in cluster_config["head_start_ray_commands"] + cluster_config[
        "worker_start_ray_commands"] if "ray start" in c]
    env = " ".join(f"{k}={v}" for k, v in NODE_ENV.items())
    assert len(starts) == 2 and all(c.startswith(f"RAY_AUTH_MODE=token {env} ray start")
                                    for c in starts)
    assert "disabled" not in yaml.safe_dump(cluster_config)
    assert all("--object-store-memory" in c for c in starts)


# RayJob v1 (KubeRay ray.io/v1) fields, as KubeRay's API reference documents them.
RAYJOB_SPEC_FIELDS = {
    "entrypoint", "runtimeEnvYAML", "jobId", "metadata", "submissionMode", "backoffLimit",
    "activeDeadlineSeconds", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
    "rayClusterSpec", "clusterSelector", "submitterPodTemplate", "submitterConfig",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "suspend", "managedBy",
    "deletionStrategy",
}
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "authOptions",
    "gcsFaultToleranceOptions", "upgradeStrategy",
}
AUTOSCALER_FIELDS = {"upscalingMode", "idleTimeoutSeconds", "resources", "image",
                     "imagePullPolicy", "env", "envFrom", "securityContext", "volumeMounts", "version"}
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress",
                     "resources", "labels", "suspend"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                       "idleTimeoutSeconds", "rayStartParams", "template", "scaleStrategy",
                       "suspend", "resources", "labels"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RUNTIME_ENV_FIELDS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "container",
                      "image_uri", "excludes", "config", "nsight", "py_executable"}


def _containers(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"],
            "submitter": rayjob["spec"]["submitterPodTemplate"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return {name: c for name, pod in pods.items() for c in pod["spec"]["containers"]}


def test_rayjob_has_only_documented_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["backoffLimit"] == 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and set(runtime_env) <= RUNTIME_ENV_FIELDS
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())

    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert cluster["rayVersion"] == "2.60.0"
    assert set(cluster["autoscalerOptions"]) <= AUTOSCALER_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    groups = cluster["workerGroupSpecs"]
    for group in [cluster["headGroupSpec"], *groups]:
        # KubeRay's rayStartParams is map[string]string: a bare number fails its CRD validation.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for group in groups:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_pools_and_token(rayjob):
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    containers = _containers(rayjob)
    gpu_limits = containers["gpu-inference"]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in containers["cpu-decode"]["resources"]["limits"]
    decode = yaml.safe_load(groups["cpu-decode"]["rayStartParams"]["resources"].strip('"').replace(
        '\\"', '"'))
    assert decode["decode"] > 0
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # Every Ray container and the submitter read the token from the same secret.
    env_of = {name: {e["name"]: e for e in c["env"]} for name, c in containers.items()}
    secrets = set()
    for name, env in env_of.items():
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        if name != "submitter":  # every Ray node gets the environment a local run's Ray gets
            assert {k: env[k]["value"] for k in NODE_ENV if k in env} == NODE_ENV, name
        secrets.add(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert len(secrets) == 1 and {"head", "submitter", "cpu-decode", "gpu-inference"} <= set(env_of)
    assert "disabled" not in yaml.safe_dump(rayjob)


def test_rayjob_entrypoint_is_a_valid_job_command(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.recategorize"]
    cfg = parse_args(RecategorizeConfig, argv[3:], "")
    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert cfg.device == "cuda" and cfg.decode_resource == "decode"
    assert cfg.num_actors <= groups["gpu-inference"]["maxReplicas"]
    # GPU workers start at zero: the job must ask the autoscaler for them before it checks.
    assert groups["gpu-inference"]["minReplicas"] > 0 or cfg.gpu_wait_s > 0


def test_placement_arguments():
    cfg = RecategorizeConfig(min_actors=1, max_actors=4, decode_cpus_per_actor=3,
                             decode_resource="decode", cpus_per_actor=2)
    gpu_place = Placement.from_config(cfg, "cuda")
    assert gpu_place.decode_in == "tasks"  # auto: separate decode tasks feed the GPUs
    decode = decode_placement(gpu_place, memory=123)
    assert decode["num_cpus"] == 1 and decode["memory"] == 123
    assert decode["resources"] == {"decode": DECODE_RESOURCE_PER_TASK}
    assert decode["compute"].size == 12  # 3 decode cores for each of up to 4 actors
    gpu = inference_placement(gpu_place)
    assert (gpu["compute"].min_size, gpu["compute"].max_size) == (1, 4)
    assert gpu["num_gpus"] == 1 and gpu["num_cpus"] == 2
    cpu_place = Placement.from_config(cfg, "cpu")
    assert cpu_place.decode_in == "actor"  # auto: CPU actors decode their own batches
    assert inference_placement(cpu_place)["num_gpus"] == 0

    fixed = RecategorizeConfig(num_actors=3)  # the default: a fixed pool
    assert actor_pool_bounds(Placement.from_config(fixed, "cuda")) == (3, 3)
    pool = inference_placement(Placement.from_config(fixed, "cuda"))["compute"]
    assert pool.min_size == pool.max_size == 3
    assert set(decode_placement(Placement.from_config(fixed, "cuda"), memory=1)) == {
        "num_cpus", "memory"}
    # CPU inference: decoders share cores with the model actor's threads, unless told otherwise.
    assert decode_placement(Placement.from_config(fixed, "cpu"), memory=1)["num_cpus"] == 0.5
    pinned = RecategorizeConfig(decode_task_cpus=2)
    assert decode_placement(Placement.from_config(pinned, "cpu"), memory=1)["num_cpus"] == 2


def test_every_image_job_takes_the_same_placement_and_uri_options():
    """The scoring engine's settings come from any job's config: a job without a knob gets the
    engine's default, and every job that reads images has the URI policy options."""
    from pipeline.config import EmbedConfig, EvaluateConfig, TrainConfig

    for cls in (EvaluateConfig, EmbedConfig):
        place = Placement.from_config(cls(num_actors=2, batch_size=8), "cpu")
        assert (place.num_actors, place.batch_size) == (2, 8)
        assert place.max_worker_retries == Placement.max_worker_retries
    for cls in (EvaluateConfig, EmbedConfig, TrainConfig):
        assert cls(allowed_uri_prefixes="/mnt/images").allowed_uri_prefixes == "/mnt/images"


@pytest.mark.parametrize("values, message", [
    ({"min_actors": 2}, "must be set together"),
    ({"min_actors": 3, "max_actors": 2}, "--min-actors 3 is above --max-actors 2"),
    ({"decode_cpus_per_actor": 0}, "--decode-cpus-per-actor"),
    ({"gpu_wait_s": -1}, "--gpu-wait-s"),
])
def test_bad_placement_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(RecategorizeConfig, values)


def test_actor_without_cuda_fails_or_falls_back(ray_local):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"CUDA is not available there.*--allow-cpu-fallback"):
        actor_device("cuda", allow_cpu_fallback=False)
    assert actor_device("cuda", allow_cpu_fallback=True) == "cpu"
    assert actor_device("cpu", allow_cpu_fallback=False) == "cpu"


def test_job_error_is_recovered_from_a_dead_actors_traceback(ray_local):
    import ray.exceptions

    text = ('Traceback (most recent call last):\n  File "x.py", line 1, in __init__\n'
            "pipeline.errors.ConfigError: --device cuda: no CUDA on node abc\n")
    died = ray.exceptions.RayActorError(actor_id=None, error_msg=text, actor_init_failed=True)
    assert job_error(RuntimeError("unrelated")) is None
    wrapped = RuntimeError("dataset execution failed")
    wrapped.__cause__ = died
    found = job_error(wrapped)
    assert isinstance(found, ConfigError) and str(found) == "--device cuda: no CUDA on node abc"
    assert isinstance(found, PipelineError) and found.exit_code == 2
