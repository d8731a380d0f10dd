"""Run checkpoints without Ray: the store's commit protocol, on a path and a file:// URI."""
import hashlib
import json

import pytest

from common.checkpoints import CheckpointError, CheckpointStore, checkpoint_name
from launch import Progress, eval_record


def write_parts(store: CheckpointStore, staging: str, payload: bytes) -> None:
    with store.writing(f"{staging}/learner") as folder:  # a role's folder part
        import os
        os.makedirs(folder)
        with open(os.path.join(folder, "state.index"), "wb") as f:
            f.write(payload)
    with store.writing(f"{staging}/replay-shard-0.msgpack") as path:  # a role's file part
        with open(path, "wb") as f:
            f.write(payload * 2)
    store.write_json(f"{staging}/progress.json", {"agent_steps": len(payload)})


@pytest.fixture(params=["path", "file-uri"])
def store(request, tmp_path):
    root = tmp_path / "checkpoints"
    return CheckpointStore(str(root) if request.param == "path" else f"file://{root}")


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


def test_altered_or_foreign_checkpoints_are_refused_naming_the_file(store, tmp_path):
    write_parts(store, store.staging(1), b"abc")
    name = store.commit(1, keep=3)
    shard = tmp_path / "checkpoints" / name / "replay-shard-0.msgpack"
    shard.write_bytes(b"abcabd")  # one byte changed, the size kept
    with pytest.raises(CheckpointError, match="replay-shard-0.msgpack: its contents differ"):
        store.verify(name)
    store.verify(name, under="learner/")  # a role checks only its own part
    shard.write_bytes(b"abc")  # truncated
    with pytest.raises(CheckpointError, match="replay-shard-0.msgpack: 3 bytes, the manifest "
                                              "says 6 bytes"):
        store.verify(name)
    manifest = tmp_path / "checkpoints" / name / "manifest.json"
    manifest.write_text(json.dumps({"format": "someone-else", "parts": {}}))
    with pytest.raises(CheckpointError, match="manifest.json: not a version 1 checkpoint"):
        store.verify(name)
    manifest.write_bytes(b"\x93\x00garbage")
    with pytest.raises(CheckpointError, match="manifest.json: not JSON"):
        store.verify(name)
    (tmp_path / "checkpoints" / "latest.json").write_text('{"latest": "../../etc"}')
    with pytest.raises(CheckpointError, match="latest.json: not a checkpoint pointer"):
        store.latest()
    with pytest.raises(CheckpointError, match="does not exist"):
        with store.reading("ckpt-00000009/learner"):
            pass


def test_a_damaged_part_of_the_latest_checkpoint_falls_back_to_an_older_intact_one(store,
                                                                                   tmp_path):
    """What a restarting role reads: its part of the newest checkpoint whose copy of it is
    intact, with why newer ones were passed over; the latest's reason when none is."""
    for number in (1, 2, 3):
        write_parts(store, store.staging(number), bytes([number]) * 4)
        store.commit(number, keep=3)
    folder = tmp_path / "checkpoints"
    with store.latest_part("learner") as latest:
        assert (latest.name, latest.passed_over) == (checkpoint_name(3), None)
    (folder / checkpoint_name(3) / "learner" / "state.index").write_bytes(b"\x03\x03\x03")
    (folder / checkpoint_name(2) / "learner" / "state.index").write_bytes(b"\x02\x02\x02\x00")
    with store.latest_part("learner") as latest:
        assert latest.name == checkpoint_name(1)
        assert open(f"{latest.path}/state.index", "rb").read() == b"\x01" * 4
        assert latest.passed_over == (
            f"{store.describe(checkpoint_name(3) + '/learner/state.index')}: 3 bytes, the "
            f"manifest says 4 bytes; {store.describe(checkpoint_name(2) + '/learner/state.index')}"
            f": its contents differ from what was written (sha256)")
    with store.latest_part("replay-shard-0.msgpack") as latest:  # other parts: untouched
        assert (latest.name, latest.passed_over) == (checkpoint_name(3), None)
    (folder / checkpoint_name(1) / "learner" / "state.index").unlink()
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
