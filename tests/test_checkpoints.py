"""Run checkpoints without Ray: the store's commit protocol, on a path, a file:// URI and an
S3 bucket (a real S3-compatible server, tests/buckets.py)."""
import hashlib
import json
import os

import pytest

from common import checkpoints
from common.checkpoints import CheckpointError, CheckpointStore, checkpoint_name
from common.config import PRESETS
from launch import (
    Progress,
    Roles,
    eval_record,
    new_run_store,
    write_checkpoint,
    write_output,
)
from tests.conftest import PAGE, fill, fill_inodes, leftovers


def write_parts(store: CheckpointStore, staging: str, payload: bytes) -> None:
    with store.writing(f"{staging}/learner") as folder:  # a role's folder part
        os.makedirs(folder)
        with open(os.path.join(folder, "state.index"), "wb") as f:
            f.write(payload)
    with store.writing(f"{staging}/replay-shard-0.msgpack") as path:  # a role's file part
        with open(path, "wb") as f:
            f.write(payload * 2)
    store.write_json(f"{staging}/progress.json", {"agent_steps": len(payload)})


@pytest.fixture(params=["path", "file-uri", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        for name, value in bucket.env.items():
            monkeypatch.setenv(name, value)
        return CheckpointStore(bucket.uri(f"{os.getpid()}-{tmp_path.name}"))
    return local_store(request.param, tmp_path)


@pytest.fixture(params=["path", "file-uri"])
def store_on_disk(request, tmp_path):
    """Where links exist: object stores have none."""
    return local_store(request.param, tmp_path)


def local_store(kind: str, tmp_path) -> CheckpointStore:
    root = tmp_path / "checkpoints"
    return CheckpointStore(str(root) if kind == "path" else f"file://{root}")


def put(store: CheckpointStore, relpath: str, data: bytes) -> None:
    """`data` at `relpath` in place of what was there, as damage or a forger would leave it."""
    with store.fs.open_output_stream(store.path(relpath)) as stream:
        stream.write(data)


def test_committed_checkpoints_are_complete_numbered_and_pruned(store):
    assert store.latest() is None and store.next_number() == 1
    for number in range(1, 5):
        staging = store.staging(store.next_number())
        write_parts(store, staging, b"x" * number)
        assert store.commit(number, keep=2) == checkpoint_name(number)
    assert store.latest() == checkpoint_name(4) and store.next_number() == 5
    assert store._names() == [checkpoint_name(3), checkpoint_name(4), "latest.json"]
    manifest = store.verify(checkpoint_name(4))
    sizes = {relpath: part["bytes"] for relpath, part in manifest["parts"].items()}
    assert sizes == {"learner/state.index": 4, "replay-shard-0.msgpack": 8,
                     "progress.json": len(json.dumps({"agent_steps": 4}, indent=2)) + 1}
    assert manifest["parts"]["learner/state.index"]["sha256"] == hashlib.sha256(
        b"xxxx").hexdigest()
    with store.reading(f"{checkpoint_name(4)}/replay-shard-0.msgpack") as path:
        assert open(path, "rb").read() == b"xxxx" * 2
    with store.reading(f"{checkpoint_name(4)}/learner") as folder:
        assert open(f"{folder}/state.index", "rb").read() == b"xxxx"
    assert store.read_json(f"{checkpoint_name(4)}/progress.json") == {"agent_steps": 4}


def test_a_checkpoint_cut_short_never_becomes_the_latest(store):
    write_parts(store, store.staging(1), b"a")
    store.commit(1, keep=3)
    write_parts(store, store.staging(2), b"b")  # the launcher dies before commit
    assert store.latest() == checkpoint_name(1)
    assert store.next_number() == 2  # the unfinished staging folder is written over
    write_parts(store, store.staging(2), b"c")
    store.commit(2, keep=3)
    assert store.latest() == checkpoint_name(2)
    assert not [name for name in store._names() if name.endswith(".tmp")]


def test_altered_or_foreign_checkpoints_are_refused_naming_the_file(store):
    write_parts(store, store.staging(1), b"abc")
    name = store.commit(1, keep=3)
    shard = f"{name}/replay-shard-0.msgpack"
    put(store, shard, b"abcabd")  # one byte changed, the size kept
    with pytest.raises(CheckpointError, match="replay-shard-0.msgpack: its contents differ"):
        store.verify(name)
    store.verify(name, under="learner/")  # a role checks only its own part
    put(store, shard, b"abc")  # truncated
    with pytest.raises(CheckpointError, match="replay-shard-0.msgpack: 3 bytes, the manifest "
                                              "says 6 bytes"):
        store.verify(name)
    manifest = f"{name}/manifest.json"
    put(store, manifest, json.dumps({"format": "someone-else", "parts": {}}).encode())
    with pytest.raises(CheckpointError, match="manifest.json: not a version 1 checkpoint"):
        store.verify(name)
    put(store, manifest, b"\x93\x00garbage")
    with pytest.raises(CheckpointError, match="manifest.json: not JSON"):
        store.verify(name)
    put(store, "latest.json", b'{"latest": "../../etc"}')
    with pytest.raises(CheckpointError, match="latest.json: not a checkpoint pointer"):
        store.latest()
    with pytest.raises(CheckpointError, match="does not exist"):
        with store.reading("ckpt-00000009/learner"):
            pass


def test_a_damaged_part_of_the_latest_checkpoint_falls_back_to_an_older_intact_one(store):
    """What a restarting role reads: its part of the newest checkpoint whose copy of it is
    intact, with why newer ones were passed over; the latest's reason when none is."""
    for number in (1, 2, 3):
        write_parts(store, store.staging(number), bytes([number]) * 4)
        store.commit(number, keep=3)
    with store.latest_part("learner") as latest:
        assert (latest.name, latest.passed_over) == (checkpoint_name(3), None)
    put(store, f"{checkpoint_name(3)}/learner/state.index", b"\x03\x03\x03")
    put(store, f"{checkpoint_name(2)}/learner/state.index", b"\x02\x02\x02\x00")
    with store.latest_part("learner") as latest:
        assert latest.name == checkpoint_name(1)
        assert open(f"{latest.path}/state.index", "rb").read() == b"\x01" * 4
        assert latest.passed_over == (
            f"{store.describe(checkpoint_name(3) + '/learner/state.index')}: 3 bytes, the "
            f"manifest says 4 bytes; {store.describe(checkpoint_name(2) + '/learner/state.index')}"
            f": its contents differ from what was written (sha256)")
    with store.latest_part("replay-shard-0.msgpack") as latest:  # other parts: untouched
        assert (latest.name, latest.passed_over) == (checkpoint_name(3), None)
    store.fs.delete_file(store.path(f"{checkpoint_name(1)}/learner/state.index"))
    with pytest.raises(CheckpointError, match=f"{checkpoint_name(3)}/learner/state.index: 3 "
                                              f"bytes, the manifest says 4 bytes$"):
        with store.latest_part("learner"):
            pass


def test_launcher_progress_round_trips_and_bad_progress_is_refused():
    restarts = {"actors": 2, "replay": 0, "learner": 1, "evaluator": 0}
    progress = Progress(frame_skip=4, agent_steps_before=1_000, episodes=7, restarts=restarts)
    progress.actor_steps = {0: 50, 1: 70}
    progress.returns.extend([1.0, 3.0])
    assert progress.absorb_eval(eval_record({"returns": [4.0, 6.0], "weight_version": 9}, 900))
    assert not progress.absorb_eval(eval_record({"returns": [1.0, 1.0], "weight_version": 12},
                                                1_100))
    state = json.loads(json.dumps(progress.state(elapsed_s=12.5)))
    resumed = Progress.from_state(state, frame_skip=4, where="progress.json")
    assert resumed.agent_steps == 1_120 and resumed.episodes == 7
    assert list(resumed.returns) == [1.0, 3.0] and resumed.mean_return_100 == 2.0
    assert resumed.restarts == restarts
    assert resumed.elapsed_before_s == 12.5 and resumed.sitting == 2
    # The best evaluation so far survives the resume, and the last one.
    assert resumed.evals["best"]["mean"] == 5.0 and resumed.evals["best"]["agent_steps"] == 900
    assert resumed.evals["last"]["mean"] == 1.0 and resumed.evals["last"]["weight_version"] == 12
    for bad in [{"agent_steps": -1}, {"returns": [float("nan")]}, {"returns": [0.0] * 101},
                {"restarts": {"actors": 1}}, {"elapsed_s": "soon"}, {"sitting": 1.5},
                {"evals": {"last": {"mean": "high"}}}, {"evals": {"worst": {}}}]:
        with pytest.raises(CheckpointError, match="progress.json: not the launcher progress"):
            Progress.from_state({**state, **bad}, frame_skip=4, where="progress.json")


# --- Checkpoint paths and roots ---------------------------------------------------------------

def forge_part(store: CheckpointStore, name: str, relpath: str, data: bytes) -> None:
    """Checkpoint `name`'s manifest made to list `relpath` with `data`'s size and sha256."""
    manifest = store.read_json(f"{name}/manifest.json")
    manifest["parts"][relpath] = {"bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()}
    put(store, f"{name}/manifest.json", json.dumps(manifest).encode())


@pytest.mark.parametrize("relpath", ["../outside", "../../outside", "learner/../../outside",
                                     "/etc/hostname", "", "learner/", "learner//state.index",
                                     "./progress.json", "learner\\..\\..\\outside",
                                     "learner/state.index\0", "\0"])
def test_a_manifest_part_outside_the_checkpoint_is_refused_naming_it(store, tmp_path,
                                                                     relpath):
    """Verification reads and hashes only files inside the checkpoint: a forged part name
    never makes it read another file."""
    outside = b"a file of the user's, not of the checkpoint"
    (tmp_path / "outside").write_bytes(outside)
    write_parts(store, store.staging(1), b"abc")
    name = store.commit(1, keep=3)
    forge_part(store, name, relpath, outside)
    with pytest.raises(CheckpointError) as refused:
        store.verify(name)
    assert str(refused.value) == (f"{store.describe(name + '/manifest.json')}: part "
                                  f"{relpath!r} is not a path inside the checkpoint")
    with pytest.raises(CheckpointError, match="is not a path inside the checkpoint"):
        store.verify(name, under="learner/")  # whatever part a role asks for


def test_a_part_that_links_out_of_the_checkpoint_is_refused(store_on_disk, tmp_path):
    store = store_on_disk
    outside = tmp_path / "outside"
    outside.write_bytes(b"abc")
    write_parts(store, store.staging(1), b"abc")
    name = store.commit(1, keep=3)
    part = tmp_path / "checkpoints" / name / "learner" / "state.index"
    part.unlink()
    part.symlink_to(outside)  # the same bytes, so size and sha256 hold
    with pytest.raises(CheckpointError, match=r"part 'learner/state.index' is not a path "
                                              r"inside the checkpoint$"):
        store.verify(name)
    part.unlink()
    (tmp_path / "checkpoints" / name / "learner").rmdir()
    (tmp_path / "checkpoints" / name / "learner").symlink_to(tmp_path)  # a folder, the same
    (tmp_path / "state.index").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="'learner/state.index' is not a path inside"):
        store.verify(name)


@pytest.mark.parametrize("root", ["s3:/bucket/run", "s3:bucket", "s3://", "s3:///run",
                                  "gs:/bucket", "mock://bucket/run", "hdfs://namenode/run",
                                  "abfs://container/run", "file:relative", "file:/x",
                                  "S3://bucket/run", "http://example.com/run", "c:run"])
def test_checkpoint_roots_other_than_a_path_s3_or_gs_are_refused_in_one_line(root):
    """Refused before any filesystem is made (nothing here reaches a network or a JVM)."""
    with pytest.raises(CheckpointError) as refused:
        CheckpointStore(root)
    assert str(refused.value) == (
        f"checkpoint directory {root!r}: give a local path, file:///path, s3://bucket/path or "
        f"gs://bucket/path")


@pytest.mark.parametrize("root, local", [
    ("runs/ckpt", True), ("/abs/runs", True), ("runs/a:b", True), ("./c:run", True),
    ("runs/x://y", True), ("file:///abs/runs", False), ("s3://bucket", False),
    ("s3://bucket/run/x", False), ("gs://bucket/run", False)])
def test_accepted_checkpoint_roots(root, local):
    assert checkpoints.is_local_root(root) is local


def test_new_run_store_refuses_an_unknown_scheme_in_one_line(tmp_path, capsys):
    config = PRESETS["cartpole"].replace(checkpoint_dir="mock://bucket/run")
    with pytest.raises(SystemExit) as exit:
        new_run_store(config, tmp_path / "run")
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        "launch.py: error: checkpoint directory 'mock://bucket/run': give a local path, "
        "file:///path, s3://bucket/path or gs://bucket/path\n")
    assert list(tmp_path.iterdir()) == []


# --- Full disks: a real small filesystem (conftest.small_disk) ----------------------------

@pytest.mark.parametrize("leave_pages", [0, 1])
@pytest.mark.parametrize("size", [100, 3 * PAGE, 1 << 20])  # fails at close, at write
@pytest.mark.parametrize("filesystem", ["os", "pyarrow"])
def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(
        small_disk, leave_pages, size, filesystem):
    from pyarrow import fs
    disk = small_disk(2048)
    target = disk / "summary.json"
    target.write_bytes(b"old")
    fill(disk, leave_pages * PAGE)
    data = b"n" * size
    where = fs.LocalFileSystem() if filesystem == "pyarrow" else None
    if size <= leave_pages * PAGE:
        checkpoints.write_atomically(str(target), data, where)
        assert target.read_bytes() == data
    else:
        with pytest.raises(OSError, match="No space left on device"):
            checkpoints.write_atomically(str(target), data, where)
        assert target.read_bytes() == b"old"
    assert sorted(os.listdir(disk)) == ["filler", "summary.json"]


CHECKPOINT_PAYLOAD = b"p" * (3 * PAGE // 2)  # learner 2 pages, shard 3, progress 1, manifest 1


@pytest.mark.parametrize("root", ["path", "file-uri"])
@pytest.mark.parametrize("leave_pages", range(0, 9))
def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one_and_leaves_nothing(
        small_disk, root, leave_pages):
    """Every point where a checkpoint can run out of room, as the launcher writes one: its
    parts, progress, manifest, the folder's rename and the pointer (8 pages in all, with
    the pointer's temporary). The one before stays the latest and verifies; a failed one
    leaves no temporary file, staging folder or renamed folder."""
    disk = small_disk(2048)
    store = CheckpointStore(str(disk / "ckpt") if root == "path" else f"file://{disk}/ckpt")
    write_parts(store, store.staging(1), CHECKPOINT_PAYLOAD)
    store.commit(1, keep=3)
    fill(disk, leave_pages * PAGE)
    number = store.next_number()
    try:  # what write_checkpoint does with the roles' parts
        write_parts(store, store.staging(number), CHECKPOINT_PAYLOAD)
        store.commit(number, keep=3)
    except OSError as error:
        assert "No space left on device" in str(error)
        store.discard(number)
        assert store.latest() == checkpoint_name(1)
        assert sorted(os.listdir(disk / "ckpt")) == [checkpoint_name(1), "latest.json"]
    else:
        assert leave_pages == 8
        assert store.latest() == checkpoint_name(2)
        store.verify(checkpoint_name(2))
    store.verify(checkpoint_name(1))
    assert leftovers(disk) == []


def test_write_checkpoint_without_room_for_its_staging_folder_says_so_and_goes_on(
        small_disk, capsys):
    """The launcher's side: one line, the previous checkpoint still the latest."""
    disk = small_disk(2048, inodes=64)
    store = CheckpointStore(str(disk / "ckpt"))
    write_parts(store, store.staging(1), b"abc")
    store.commit(1, keep=3)
    fill_inodes(disk)
    roles = Roles(shards=[], learner=None, actors=[], learner_gpus=0.0)  # never asked: no room
    assert write_checkpoint(roles, Progress(frame_skip=4), store, keep=3, elapsed_s=1.0) is None
    line = capsys.readouterr().err
    assert line.startswith("checkpoint 2 not written: ") and "No space left on device" in line
    assert line.count("\n") == 1 and line.endswith("\n")
    assert store.latest() == checkpoint_name(1)
    store.verify(checkpoint_name(1))
    assert leftovers(disk) == []


def test_a_run_file_the_disk_has_no_room_for_is_one_line_and_leaves_nothing(small_disk,
                                                                             capsys):
    """Final weights, best weights, summary.json: the run ends in order without them."""
    disk = small_disk(2048)
    fill(disk, 0)
    reason = write_output(disk / "summary.json", b"{}\n")
    assert reason == f"{disk / 'summary.json'} not written: No space left on device"
    assert capsys.readouterr().err == f"launch.py: {reason}\n"
    assert sorted(os.listdir(disk)) == ["filler"]


def test_the_roles_get_the_buckets_variables_unless_the_submitted_job_sets_them(monkeypatch):
    from launch import roles_env_vars
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://10.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/keys/gcs.json")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    config = PRESETS["cartpole"]
    s3 = roles_env_vars(config.replace(checkpoint_dir="s3://bucket/run"))
    assert s3["AWS_ENDPOINT_URL_S3"] == "http://10.0.0.1:9000" and s3["AWS_REGION"] == "eu-west-1"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in s3 and "TF_CPP_MIN_LOG_LEVEL" in s3
    gs = roles_env_vars(config.replace(checkpoint_dir="gs://bucket/run"))
    assert gs["GOOGLE_APPLICATION_CREDENTIALS"] == "/keys/gcs.json" and "AWS_REGION" not in gs
    assert not any(name.startswith("AWS_") for name in roles_env_vars(config))  # local disk
    # Ray refuses a variable that both the job's runtime env and ray.init's set.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://pkg.zip",
                         "env_vars": {"AWS_REGION": "eu-west-1", "TF_CPP_MIN_LOG_LEVEL": "0"}}}))
    from_job = roles_env_vars(config.replace(checkpoint_dir="s3://bucket/run"))
    assert "AWS_REGION" not in from_job and "TF_CPP_MIN_LOG_LEVEL" not in from_job
    assert from_job["AWS_ENDPOINT_URL_S3"] == "http://10.0.0.1:9000"
