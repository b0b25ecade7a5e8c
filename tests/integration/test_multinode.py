"""A real two-node Ray cluster on this machine, with token authentication on.

`ray start --head` (a CPU node that advertises the custom resource `decode`, with the dashboard
and job server) and `ray start --address` (a node declaring one GPU it does not have). Jobs go
in through the real Jobs API with `ray job submit`, as a scheduler would send them; placement is
read back from Ray's state API. Both nodes share this machine's file system, so a tmp path is
"shared storage" for outputs and training checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import REPO_ROOT
from pipeline.importers import make_manifest
from tests.conftest import committed_table

# One worker of a parallel run (pytest-xdist --dist loadgroup) takes the whole module: its
# two-node cluster is a module fixture, built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multinode")]

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 90
START_ATTEMPTS = 3
STOP_TIMEOUT_S = 5
JOB_TIMEOUT_S = 240


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now (held open together so none repeats)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalCluster:
    temp_dir: str
    dashboard: str
    env: dict[str, str]
    token: str
    nodes: list[subprocess.Popen] = field(default_factory=list)  # our `ray start --block`s
    head_node: str = ""
    gpu_node: str = ""

    def api(self, path: str, authorized: bool = True) -> tuple[int, dict | str]:
        headers = {"Authorization": f"Bearer {self.token}"} if authorized else {}
        request = urllib.request.Request(self.dashboard + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read().decode()
                return response.status, json.loads(body) if body.startswith(("{", "[")) else body
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def alive_nodes(self) -> list[dict]:
        try:
            status, body = self.api("/api/v0/nodes?detail=1")
        except OSError:
            return []
        if status != 200:
            return []
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def submit(self, submission_id: str, entrypoint: list[str],
               options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """`ray job submit`, waiting for the end and streaming the job's logs, as a cron job does;
        run from the checkout's root, as the docs' commands are."""
        return subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
             *options, "--", *entrypoint],
            env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    def job(self, submission_id: str) -> dict:
        status, body = self.api(f"/api/jobs/{submission_id}")
        assert status == 200, body
        return body

    def placements(self, kind: str, job_id: str) -> list[dict]:
        """Ray's own record of where each task or actor of one job ran."""
        status, body = self.api(f"/api/v0/{kind}?detail=1&limit=10000")
        assert status == 200, body
        return [r for r in body["data"]["result"]["result"] if r.get("job_id") == job_id]


def _processes_under(temp_dir: str, port: str = "") -> list[int]:
    """Pids of every process whose command line names a temp dir of ours (raylet, workers, agents)
    and, when given, one node's port."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        # The raylet takes its node manager port as --node_manager_port=N, workers and agents
        # as --node-manager-port=N.
        if temp_dir in cmdline and (not port or any(
                f"--node{sep}manager{sep}port={port}" in cmdline for sep in "_-")):
            pids.append(int(entry.name))
    return pids


def _kill(procs: list[subprocess.Popen], temp_dir: str, port: str = "") -> None:
    """Stop the `ray start --block` processes we started: SIGTERM (each shuts its node down),
    then SIGKILL to their process groups and to anything still running from our temp dir (of
    one node only, when `port` names it)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pid in _processes_under(temp_dir, port):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _node_args(head: bool, gcs_port: int) -> list[str]:
    """Every port a node listens on, chosen free on loopback (other Rays share this machine)."""
    agent, agent_grpc, metrics, rt_env, node_mgr, obj_mgr, dash, client = free_ports(8)
    args = ["--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr)]
    if head:
        return ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dash), "--ray-client-server-port", str(client), *args]
    return ["--address", f"127.0.0.1:{gcs_port}", *args]


def _start_node(cluster: LocalCluster, name: str, args: list[str], nodes: int, root: Path) -> list[dict]:
    """`ray start --block` for one node; wait until the cluster has `nodes` alive nodes. A node
    that misses Ray's fixed 30 s registration window on a loaded machine is started again.

    Both nodes use one temp dir, as `ray start --address` does by default on one machine (it
    takes the head's): their runtime-env agents then share one `runtime_resources` folder, the
    case where a job's `--working-dir` is unpacked twice into the same place."""
    temp_dir = cluster.temp_dir
    # A failed start's leftovers are found by a port only this node's processes name.
    marker = args[args.index("--node-manager-port") + 1]
    for attempt in range(1, START_ATTEMPTS + 1):
        log = root / f"{name}-{attempt}.log"
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--temp-dir", temp_dir, "--disable-usage-stats",
             "--object-store-memory", str(300 * 1024**2), *args],
            env=cluster.env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            alive = cluster.alive_nodes()
            if len(alive) == nodes:
                cluster.nodes.append(proc)
                return alive
            time.sleep(1)
        _kill([proc], temp_dir, marker)
    pytest.fail(f"ray start ({name}) failed {START_ATTEMPTS} times:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    home = root / "home"
    home.mkdir()
    # Ray puts Unix sockets under the temp dir; keep the path short.
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"}}
    # A private HOME: the token goes to HOME/.ray/auth_token, never the real ~/.ray.
    env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(":"))
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    head_args = _node_args(head=True, gcs_port=free_ports(1)[0])
    gcs = int(head_args[head_args.index("--port") + 1])
    dashboard = head_args[head_args.index("--dashboard-port") + 1]
    cluster = LocalCluster(temp_dir, f"http://127.0.0.1:{dashboard}", env, token)
    try:
        # The CPU node: runs the job driver and decoding (it alone advertises `decode`).
        (head,) = _start_node(cluster, "head", [
            *head_args, "--num-cpus", "2", "--num-gpus", "0",
            "--resources", json.dumps({"decode": 100})], 1, root)
        cluster.head_node = head["node_id"]
        # The GPU node: a declared GPU and one CPU, which its inference actor takes.
        nodes = _start_node(cluster, "gpu", [
            *_node_args(head=False, gcs_port=gcs), "--num-cpus", "1", "--num-gpus", "1"], 2, root)
        (cluster.gpu_node,) = (n["node_id"] for n in nodes if n["node_id"] != cluster.head_node)
        yield cluster
    finally:
        _kill(list(reversed(cluster.nodes)), temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_cluster_requires_the_token(ray_cluster):
    status, _ = ray_cluster.api("/api/jobs/", authorized=False)
    assert status == 401
    anonymous = {**ray_cluster.env, "RAY_AUTH_MODE": "disabled", "HOME": tempfile.gettempdir()}
    refused = subprocess.run([RAY, "job", "list", "--address", ray_cluster.dashboard],
                             env=anonymous, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
    nodes = {n["node_id"]: n["resources_total"] for n in ray_cluster.alive_nodes()}
    assert nodes[ray_cluster.gpu_node].get("GPU") == 1 and "GPU" not in nodes[ray_cluster.head_node]


def _recategorize(manifest: Path, model: str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest),
            "--model", model, "--output", str(output),
            "--batch-size", "8", "--preprocess-batch-size", "4", "--decode-resource", "decode",
            *extra]


def test_gpu_node_without_cuda_fails_the_job_early(ray_cluster, small_catalog, tiny_model, tmp_path):
    manifest, _, _ = small_catalog
    out = tmp_path / "out"
    done = ray_cluster.submit("recategorize-no-fallback", _recategorize(manifest, tiny_model, out))

    assert done.returncode == 1, done.stdout[-3000:]  # `ray job submit` exits 1 on FAILED
    info = ray_cluster.job("recategorize-no-fallback")
    assert info["status"] == "FAILED" and "exit code 2" in info["message"]
    assert info["driver_exit_code"] == 2
    logs = done.stdout + done.stderr
    assert f"Ray placed an inference actor on node {ray_cluster.gpu_node}" in logs
    assert "CUDA is not available" in logs and "--allow-cpu-fallback" in logs
    assert not (out / "_SUCCESS").exists() and not (out / "predictions").exists()


def test_recategorize_job_with_working_dir_decodes_on_cpu_node_infers_on_gpu_node_and_commits(
        ray_cluster, small_catalog, tiny_model, tmp_path):
    """`ray job submit --working-dir .`, as docs/cluster.md says for code not yet released: decode
    runs on the CPU node (the `decode` resource), inference on the GPU node, and the night
    commits. The GPU node's agent unpacks the package again into the folder the driver runs in
    (shared here, as on any one machine), so the driver's current directory is gone by the
    commit. (One job for both: a second submission, without --working-dir, would run the same
    placement again; jobs submitted without it are test_gpu_node_without_cuda_fails_the_job_early
    and test_training_spreads_workers_over_both_nodes.)"""
    manifest, rows_in, expected_errors = small_catalog
    out = tmp_path / "out"
    done = ray_cluster.submit("recategorize-nightly",
                              _recategorize(manifest, tiny_model, out, "--allow-cpu-fallback"),
                              options=("--working-dir", "."))

    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    info = ray_cluster.job("recategorize-nightly")
    assert info["status"] == "SUCCEEDED", info["message"]
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    table = committed_table(out)
    assert sorted(table.column("product_id").to_pylist()) == sorted(
        pq.read_table(manifest).column("product_id").to_pylist())
    assert pq.read_table(out / "predictions").num_rows == table.num_rows == rows_in
    errors = {r["product_id"]: r["error_type"] for r in table.to_pylist() if r["status"] == "error"}
    assert errors == expected_errors
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == rows_in and summary["device"] == "cuda"
    assert not list(out.glob("_staging/*"))  # the run's staging is removed at publish
    assert f"inference actor on node {ray_cluster.gpu_node}" in done.stdout + done.stderr

    job_id = info["job_id"]
    decode_nodes = {t["node_id"] for t in ray_cluster.placements("tasks", job_id)
                    if "Preprocessor" in t["name"] and t["state"] == "FINISHED"}
    assert decode_nodes == {ray_cluster.head_node}
    inference = [a for a in ray_cluster.placements("actors", job_id)
                 if "ScoringActor" in (a.get("repr_name") or a.get("name") or "")]
    assert inference and {a["node_id"] for a in inference} == {ray_cluster.gpu_node}

    # The case --working-dir is here for happened: an agent removed the unpacked package to
    # unpack it again.
    package = info["runtime_env"]["working_dir"].removeprefix("gcs://").removesuffix(".zip")
    agent_logs = "".join(p.read_text(errors="replace") for p in
                         Path(ray_cluster.temp_dir).glob("session_*/logs/runtime_env*.log"))
    assert f"Removing {Path(ray_cluster.temp_dir).resolve()}" in agent_logs and package in agent_logs


def _small_training_manifest(grocery_root: Path, folder: Path) -> Path:
    """The Grocery Store manifest, cut to 64 training and 32 validation rows for a tiny epoch."""
    full = folder / "grocery.parquet"
    make_manifest(str(grocery_root), str(full), splits=("train", "val"))
    table = pq.read_table(full)
    split = table.column("split")
    train = table.filter(pc.equal(split, "train")).take(list(range(0, 2560, 40)))
    val = table.filter(pc.equal(split, "val")).take(list(range(0, 288, 9)))
    small = folder / "train-small.parquet"
    pq.write_table(pa.concat_tables([train, val]), small)
    return small


def test_training_spreads_workers_over_both_nodes(ray_cluster, grocery_root, tmp_path):
    manifest = _small_training_manifest(grocery_root, tmp_path)
    shared = tmp_path / "shared-storage"  # one file system for both nodes of this machine
    done = ray_cluster.submit("train-smoke", [
        sys.executable, "-m", "jobs.train", "--manifest", str(manifest),
        "--output", str(shared / "train"), "--num-workers", "2", "--placement-strategy",
        "STRICT_SPREAD", "--epochs", "1", "--max-train-rows", "64", "--input-size", "64",
        "--batch-size", "16", "--calibration-fraction", "0",  # every row of the cap trains
        # The "GPU" node advertises a GPU without CUDA: --device auto would ask Ray Train for a
        # GPU per worker, and two workers cannot have the cluster's one.
        "--device", "cpu"])

    assert done.returncode == 0, done.stdout[-3000:]
    info = ray_cluster.job("train-smoke")
    assert info["status"] == "SUCCEEDED", info["message"]
    summary = json.loads((shared / "train" / "training_summary.json").read_text())
    assert summary["num_workers"] == 2 and summary["train_rows"] == 64 and summary["epochs"] == 1
    assert (shared / "train" / "model" / "model.safetensors").exists()
    assert json.loads((shared / "train" / "model" / "model.json").read_text())["input_size"] == 64
    checkpoints = list((shared / "train" / "checkpoints").rglob("model.safetensors"))
    assert checkpoints, "no checkpoint in shared storage"
    workers = [a for a in ray_cluster.placements("actors", info["job_id"])
               if a["class_name"] == "RayTrainWorker"]
    assert {a["node_id"] for a in workers} == {ray_cluster.head_node, ray_cluster.gpu_node}
