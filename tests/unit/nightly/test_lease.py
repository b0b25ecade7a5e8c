"""One writer per output: the lease on local disk and on a real S3 server (moto on loopback),
and two nightly jobs started at once into one output.

The S3 tests depend on the server honouring `If-None-Match: *` and `If-Match` on PUT and
DELETE, as S3 does; moto 5 does (its server checks the condition, then writes).
"""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline import storage
from pipeline.errors import OutputBusyError, OutputError
from pipeline.nightly.lease import LEASE_FILE, OutputLease, lease_store
from tests.conftest import make_catalog, summary_json

TAKERS = 4
# How long a test waits for the heartbeat thread to renew (a liveness bound, not a speed goal).
HEARTBEAT_WAIT_S = 30.0
JOB_TIMEOUT_S = 300


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output location: a local folder or a folder in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "out")


def lease_record(output: str) -> dict | None:
    """The lease file's content, read in one request (a renewal may replace it at any time)."""
    found = lease_store(output).read()
    return json.loads(found[0]) if found else None


def race(output: str, names: list[str]) -> tuple[list[str], list[str]]:
    """Acquire from one thread per name, all released at once: (winners, refusal messages)."""
    leases = [OutputLease(output, name) for name in names]
    start = threading.Barrier(len(leases))
    won, refused = [], []

    def take(lease: OutputLease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease.record.run_id)
        except OutputBusyError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_second_writer_is_refused_with_the_holder_named(output):
    holder = OutputLease(output, "night-a").acquire()
    with pytest.raises(OutputBusyError) as refused:
        OutputLease(output, "night-b").acquire()
    message = str(refused.value)
    assert refused.value.exit_code == 8
    record = lease_record(output)
    for part in ("night-a", record["host"], f"pid {os.getpid()}", record["acquired_at"],
                 record["expires_at"], storage.join(output, LEASE_FILE), "remove the lease"):
        assert part in message
    assert record["token"] == holder.record.token  # the refused run changed nothing

    holder.release()
    assert lease_record(output) is None
    OutputLease(output, "night-b").acquire()
    assert lease_record(output)["run_id"] == "night-b"


def test_exactly_one_of_simultaneous_writers_gets_the_lease(output):
    won, refused = race(output, [f"night-{i}" for i in range(TAKERS)])
    assert len(won) == 1 and len(refused) == TAKERS - 1
    assert lease_record(output)["run_id"] == won[0]
    assert all(won[0] in message for message in refused)


def test_expired_lease_is_taken_over_by_exactly_one_taker(output):
    crashed = OutputLease(output, "crashed", ttl_s=0).acquire()  # expired at once: no heartbeat
    won, refused = race(output, ["taker-1", "taker-2"])
    assert len(won) == 1 and len(refused) == 1 and won[0] in refused[0]
    record = lease_record(output)
    assert record["run_id"] == won[0]

    # The stalled holder learns it lost the lease, and releasing does not remove the taker's.
    with pytest.raises(OutputBusyError, match=f"taken over by run {won[0]}"):
        crashed.renew()
    crashed.release()
    assert lease_record(output)["run_id"] == won[0]


def test_a_lease_whose_process_is_gone_from_this_host_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "out")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists, as a killed night's
    killed = OutputLease(output, "killed")
    killed.record = dataclasses.replace(killed.record, pid=gone.pid)
    killed.acquire()
    OutputLease(output, "restarted").acquire()  # long before the killed run's lease expires
    assert lease_record(output)["run_id"] == "restarted"

    with pytest.raises(OutputBusyError, match="restarted"):  # a live holder still refuses
        OutputLease(output, "third").acquire()


def test_renewal_keeps_the_lease_and_records_the_run_id(output):
    lease = OutputLease(output, None).acquire()
    first = lease_record(output)
    with pytest.raises(OutputBusyError, match="run id not yet chosen"):
        OutputLease(output, "other").acquire()
    lease.renew("20261201T000000Z-abcdef")
    renewed = lease_record(output)
    assert renewed["run_id"] == "20261201T000000Z-abcdef"
    assert renewed["token"] == first["token"] and renewed["writes"] == first["writes"] + 1
    assert renewed["expires_at"] >= first["expires_at"]


def test_hold_renews_in_the_background_and_releases_on_failure(output):
    with pytest.raises(RuntimeError, match="the run failed"), \
            OutputLease(output, "night", heartbeat_s=0.05).hold():
        deadline = time.monotonic() + HEARTBEAT_WAIT_S
        while lease_record(output)["writes"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease_record(output)["writes"] >= 3  # renewed by the heartbeat thread
        raise RuntimeError("the run failed")
    assert lease_record(output) is None


def test_removed_lease_stops_the_holder(output):
    lease = OutputLease(output, "night").acquire()
    storage.remove(storage.join(output, LEASE_FILE))  # an operator judged the run dead
    with pytest.raises(OutputBusyError, match="was removed while it ran"):
        lease.renew()
    lease.release()  # nothing of ours left: a no-op


def test_a_foreign_lease_file_is_named(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / LEASE_FILE).write_text("locked by hand")
    with pytest.raises(OutputError, match="not a lease this job wrote"):
        OutputLease(str(output), "night").acquire()


def test_the_job_stops_before_writing_when_the_output_is_held(output, tmp_path, sample_images,
                                                              tiny_model, capsys):
    """In this process: refused at the lease, so Ray never starts and nothing is written."""
    manifest, _ = make_catalog(tmp_path / "catalog", sample_images, good=2)
    with OutputLease(output, "night-a").hold():
        code = run_job(recategorize_main, ["--manifest", str(manifest), "--model", tiny_model,
                                           "--output", output])
        err = capsys.readouterr().err
        assert code == 8 and "run night-a" in err and "remove the lease file" in err
        assert lease_record(output)["run_id"] == "night-a"
    assert not storage.list_files(output)  # no staging, no run folder, no lease left


@pytest.mark.slow
def test_two_nightly_runs_at_once_give_one_commit_and_one_refusal(tmp_path, sample_images,
                                                                 tiny_model):
    manifest, rows = make_catalog(tmp_path / "catalog", sample_images, good=20)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    def start(run_id: str) -> subprocess.Popen:
        with open(tmp_path / f"{run_id}.out", "w") as stdout, \
                open(tmp_path / f"{run_id}.err", "w") as stderr:
            return subprocess.Popen(
                [sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest),
                 "--model", tiny_model, "--output", str(out), "--batch-size", "16",
                 # On Ray, as a nightly catalog runs: the winner holds the lease through Ray's
                 # start-up, so the other run meets it whichever imports faster.
                 "--executor", "ray", "--run-id", run_id], env=env, stdout=stdout,
                stderr=stderr)

    procs = {run_id: start(run_id) for run_id in ("night-a", "night-b")}
    results = {}
    for run_id, proc in procs.items():
        code = proc.wait(timeout=JOB_TIMEOUT_S)
        results[run_id] = (code, (tmp_path / f"{run_id}.out").read_text(),
                           (tmp_path / f"{run_id}.err").read_text())

    codes = {run_id: code for run_id, (code, _, _) in results.items()}
    assert sorted(codes.values()) == [0, 8], {k: r[2][-2000:] for k, r in results.items()}
    winner = next(k for k, c in codes.items() if c == 0)
    loser = next(k for k, c in codes.items() if c == 8)
    assert summary_json(results[winner][1])["rows"] == rows
    assert storage.read_json(str(out / "_SUCCESS"))["run_id"] == winner
    assert sorted(p.name for p in (out / "runs").iterdir()) == [winner]
    refusal = results[loser][2].strip().splitlines()[-1]
    assert refusal.startswith("error: output") and f"run {winner}" in refusal
    assert str(out / LEASE_FILE) in refusal
    assert not (out / LEASE_FILE).exists()  # released by the winner at its end
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())


def test_a_run_that_stalled_past_its_lease_publishes_nothing(tmp_path, sample_images, tiny_model):
    """Night A holds the output, stalls past its lease, and night B takes it over and commits.
    When A reaches its commit point, the fence (the lease's conditional renewal) stops it:
    exit 8, and `_SUCCESS` still names B."""
    from pipeline.config import RecategorizeConfig
    from pipeline.nightly.recategorize import run
    from pipeline.sinks.parquet import RunFolderSink

    manifest, _ = make_catalog(tmp_path / "catalog", sample_images, good=4)
    out = str(tmp_path / "out")
    stalled = OutputLease(out, "night-a", ttl_s=0.2, heartbeat_s=0.1)
    stalled.acquire()  # no heartbeat: the holder is stuck somewhere before its commit
    time.sleep(0.5)
    night_b = run(RecategorizeConfig(manifest=str(manifest), model=tiny_model, output=out,
                                     run_id="night-b", executor="local"))
    assert storage.read_json(f"{out}/_SUCCESS")["run_id"] == "night-b"
    marker = {"run_id": "night-a", "rows": 1, "files": []}
    with pytest.raises(OutputBusyError, match=r"taken over|removed") as caught:
        RunFolderSink(out).publish(marker, "key-a", fence=stalled.renew)
    assert caught.value.exit_code == 8
    assert storage.read_json(f"{out}/_SUCCESS")["run_id"] == night_b["run_id"] == "night-b"
    assert os.readlink(f"{out}/predictions") == "runs/night-b"
