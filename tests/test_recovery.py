"""Durable runs through the real `launch.py` on real Ray (CartPole, to stay fast): roles
killed with SIGKILL come back, SIGTERM stops with a checkpoint, and --resume carries on."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from common.config import PRESETS, epsilon_at
from common.process import cluster_workers
from tests.conftest import ROOT, evaluate, tensorboard_scalars
from tests.test_snapshot import damage_a_byte, forged_snapshot, rewrite_part, set_value

PROGRESS_LINE = re.compile(r"steps\s+([\d,]+) \|.*\| (?:eps ([\d.]+)|random [\d,/]+) \|.*"
                           r"\| weights v(\d+) lag \d+ \| actors (\d+)/(\d+)")


class Launch:
    """`launch.py` running in the background, its output collected in a file."""

    def __init__(self, ray_address, tmp_path, *flags, env: dict[str, str] | None = None):
        self.out_path = tmp_path / f"launch-{time.monotonic_ns()}.out"
        self.out = open(self.out_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "launch.py", "--address", ray_address, *map(str, flags)],
            cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})

    def text(self) -> str:
        return self.out_path.read_text()

    def progress(self) -> list[tuple[int, float, int, int]]:
        """(agent steps, epsilon, weight version, live actors) of each progress line."""
        return [(int(m[1].replace(",", "")), float(m[2] or 1.0), int(m[3]), int(m[4]))
                for m in PROGRESS_LINE.finditer(self.text())]

    def weights_at_least(self, version: int) -> bool:
        return any(v >= version for _, _, v, _ in self.progress())

    def wait_for(self, condition, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.process.poll() is None, f"launch.py exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout_s} s:\n" \
                                                f"{self.text()[-3000:]}"
            time.sleep(0.5)

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 120.0) -> str:
        self.process.send_signal(sig)
        self.process.wait(timeout=timeout_s)
        self.out.close()
        text = self.text()
        assert self.process.returncode == 0, text[-3000:]
        return text


@pytest.fixture
def launches():
    """Starts `Launch`es; any still running when the test ends (it failed) is killed, so it
    cannot load the machine under the tests after it."""
    started: list[Launch] = []
    yield lambda *args, **kwargs: started.append(Launch(*args, **kwargs)) or started[-1]
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def role_pids(role: str, gcs_address: str) -> list[int]:
    """Processes of Ray actors of class `role` (Ray titles them `ray::<Class>...`) in the Ray
    cluster at `gcs_address` only."""
    pids = []
    for process in cluster_workers(gcs_address):
        try:
            if " ".join(process.cmdline()).startswith(f"ray::{role}"):
                pids.append(process.pid)
        except psutil.Error:  # gone
            continue
    return pids


def kill_one(role: str, gcs_address: str) -> int:
    pid = role_pids(role, gcs_address)[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_killed_roles_come_back_from_a_bucket_and_the_run_resumes_from_it_alone(
        ray_address, tmp_path, launches, s3_bucket):
    """Checkpoints in an S3 bucket (a real S3-compatible server) whose endpoint and keys only
    launch.py's environment holds, not Ray's: the restarted learner and shard restore from
    it. Then the run directory is lost, as a head node's disk is, and `--resume s3://...`
    carries the run on from the bucket alone into a new run directory."""
    root = s3_bucket.uri(f"recovery-{tmp_path.name}")
    run = launches(ray_address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                   "--logdir", tmp_path / "run", "--report-every-s", 1,
                   "--checkpoint-every-s", 5, "--max-seconds", 400, "--checkpoint-dir", root,
                   env=s3_bucket.env)
    run.wait_for(lambda: "checkpoint" in run.text() and run.weights_at_least(2), "checkpoint")
    for role in ("ActorService", "ReplayService", "LearnerService"):
        killed = kill_one(role, ray_address)
        run.wait_for(lambda: role_pids(role, ray_address)
                     and killed not in role_pids(role, ray_address), f"new {role}")
        lines = len(run.progress())
        version = run.progress()[-1][2]
        # Serving again: all actors answer and the learner publishes newer weights.
        run.wait_for(lambda: len(run.progress()) > lines + 2 and run.progress()[-1][3] == 2
                     and run.progress()[-1][2] != version, f"training after {role} restart",
                     timeout_s=180)
    text = run.stop(signal.SIGINT)
    assert "starts empty" not in text and "passed over" not in text, text[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok", text[-3000:]
    assert summary["restarts"]["actors"] >= 1
    assert summary["restarts"]["replay"] == 1 and summary["restarts"]["learner"] == 1
    assert f"checkpoint {root}/ckpt-" in text

    shutil.rmtree(tmp_path / "run")
    again = launches(ray_address, tmp_path, "--resume", root, "--logdir", tmp_path / "new",
                     "--max-seconds", 10, "--report-every-s", 1, env=s3_bucket.env)
    again.wait_for(lambda: again.process.poll() is not None, "end", timeout_s=180)
    assert again.process.returncode == 0, again.text()[-3000:]
    assert f"at {summary['agent_steps']:,} agent steps" in again.text(), again.text()[-3000:]
    resumed = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert resumed["status"] == "ok" and resumed["sitting"] == 2, resumed
    assert resumed["agent_steps"] > summary["agent_steps"]
    assert resumed["weight_version"] > summary["weight_version"]
    saved = json.loads((tmp_path / "new" / "config.json").read_text())["config"]
    assert saved["checkpoint_dir"] == root and saved["preset"] == "cartpole"


def tree(folder) -> dict:
    """Every file under `folder` with its contents' size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_sigterm_stops_with_a_checkpoint_and_resume_carries_on(ray_address, tmp_path,
                                                               launches):
    run_dir = tmp_path / "run"
    first = launches(ray_address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                     "--logdir", run_dir, "--report-every-s", 1, "--max-seconds", 300)
    first.wait_for(lambda: first.weights_at_least(400), "weights v400")
    text = first.stop(signal.SIGTERM)
    assert "SIGTERM: stopping the roles" in text
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "ok" and stopped["sitting"] == 1
    assert (run_dir / "q_network.weights.h5").exists()
    assert json.loads((run_dir / "config.json").read_text())["config"]["preset"] == "cartpole"
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["latest"]
    saved = json.loads((run_dir / "checkpoints" / latest / "progress.json").read_text())
    assert saved["agent_steps"] == stopped["agent_steps"]
    q_before = [q for _, q in tensorboard_scalars(run_dir, "q_mean") if np.isfinite(q)]

    second = launches(ray_address, tmp_path, "--resume", run_dir, "--max-seconds", 20,
                      "--report-every-s", 1)
    second.wait_for(lambda: second.process.poll() is not None, "end", timeout_s=180)
    assert second.process.returncode == 0, second.text()[-3000:]
    assert f"resumed from {latest} at {stopped['agent_steps']:,} agent steps" in second.text()
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "ok" and resumed["sitting"] == 2
    assert resumed["agent_steps"] > stopped["agent_steps"]
    assert resumed["updates"] > stopped["updates"]
    assert resumed["weight_version"] > stopped["weight_version"]
    # The exploration schedule goes on from the saved step count, not from epsilon 1.
    steps, epsilon, version, _ = second.progress()[0]
    assert steps >= stopped["agent_steps"] and version >= stopped["weight_version"]
    assert epsilon == round(epsilon_at(PRESETS["cartpole"], steps), 3) < 1.0
    # The restored networks go on valuing states as they did before the stop: the mean
    # Q(s, a) of sampled batches moves slowly (unlike CartPole's loss, which jumps tenfold
    # from one report to the next), and a fresh network's is near 0 while a trained one's has
    # grown to several units. That the state is restored exactly is the learner unit test's,
    # test_a_restored_learner_continues_exactly_where_the_saved_one_was.
    q_after = [q for step, q in tensorboard_scalars(run_dir, "q_mean")
               if step > stopped["agent_steps"] and np.isfinite(q)][:2]
    assert len(q_before) >= 2 and len(q_after) >= 1
    assert np.mean(q_before[-2:]) > 2.0, q_before  # (measured: ~12 at v400)
    assert 0.5 < np.mean(q_after) / np.mean(q_before[-2:]) < 2.0, (q_before[-2:], q_after)

    # A damaged latest checkpoint is refused with one line naming the file before Ray starts
    # (a cut file fails the manifest's size, a changed byte its sha256), and nothing in the run
    # directory changes: --resume does not fall back to an older checkpoint as a restart does.
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["latest"]
    data = next((run_dir / "checkpoints" / latest / "learner").glob("state.data-*"))
    original = data.read_bytes()
    for damaged, needle in [(original[:-8], f"{data.name}: {len(original) - 8} bytes, the "
                                            f"manifest says {len(original)} bytes"),
                            (original[:100] + bytes([original[100] ^ 0xFF]) + original[101:],
                             f"{data.name}: its contents differ from what was written")]:
        data.write_bytes(damaged)
        before = tree(run_dir)
        refused = subprocess.run(
            [sys.executable, "launch.py", "--resume", str(run_dir), "--address", ray_address],
            cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert refused.returncode == 2, refused.stderr[-3000:]
        errors = [line for line in refused.stderr.splitlines()
                  if line.startswith("launch.py: error: ")]
        assert len(errors) == 1 and needle in errors[0], refused.stderr[-3000:]
        assert tree(run_dir) == before
    # A snapshot whose checksums hold but whose contents the shard refuses (a writer's bug,
    # as an insert racing the snapshot once was): the run carries on, that shard empty.
    data.write_bytes(original)
    snapshot = run_dir / "checkpoints" / latest / "replay-shard-0.msgpack"
    forged = forged_snapshot(tmp_path, set_value("action", 99), snapshot)
    rewrite_part(run_dir / "checkpoints" / latest, snapshot.name, open(forged, "rb").read())
    third = launches(ray_address, tmp_path, "--resume", run_dir, "--max-seconds", 5)
    third.wait_for(lambda: third.process.poll() is not None, "end", timeout_s=180)
    assert third.process.returncode == 0, third.text()[-3000:]
    assert (f"replay shard 0 starts empty, no snapshot it could read: {snapshot}: invalid "
            f"snapshot content: 'action' outside [0, 2)") in third.text(), third.text()[-3000:]


def test_a_lost_worker_node_costs_only_its_actors_time(tmp_path, launches):
    """A learner-host node and two worker nodes (`ray.cluster_utils.Cluster`, all on this
    machine); the node under an actor is removed mid-run: its actors come back on the other
    node and training goes on."""
    from ray.cluster_utils import Cluster

    from launch import LEARNER_HOST
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 2, "resources": {LEARNER_HOST: 1}, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        run = launches(cluster.address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                       "--logdir", tmp_path / "run", "--report-every-s", 1,
                       "--max-seconds", 300)
        run.wait_for(lambda: run.weights_at_least(2), "weights v2", timeout_s=180)
        raylets = {node.all_processes["raylet"][0].process.pid: node for node in workers}
        hosts = {psutil.Process(pid).ppid()
                 for pid in role_pids("ActorService", cluster.address)}
        lost = next(raylets[pid] for pid in hosts if pid in raylets)
        cluster.remove_node(lost)
        lines = len(run.progress())
        version = run.progress()[-1][2]
        run.wait_for(lambda: len(run.progress()) > lines + 2 and run.progress()[-1][3] == 2
                     and run.progress()[-1][2] > version + 2, "training after the node loss",
                     timeout_s=180)
        text = run.stop(signal.SIGINT)
    finally:
        cluster.shutdown()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok", text[-3000:]
    assert summary["restarts"]["actors"] >= 1


def test_a_learner_that_stays_away_fails_the_run_with_what_it_has(ray_address, tmp_path,
                                                                  launches):
    """The learner process frozen (SIGSTOP: alive, so never restarted, and silent): past
    --role-timeout-s the run stops the rest within bounded waits, keeps its last checkpoint,
    writes a summary with status "failed" and the reason, and exits 1."""
    run = launches(ray_address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                   "--logdir", tmp_path / "run", "--report-every-s", 1, "--role-timeout-s", 5,
                   "--checkpoint-every-s", 3, "--max-seconds", 300)
    run.wait_for(lambda: "checkpoint" in run.text() and run.weights_at_least(2), "checkpoint")
    frozen = role_pids("LearnerService", ray_address)[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        run.process.wait(timeout=150)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert run.process.returncode == 1, run.text()[-3000:]
    assert "launch.py: the run cannot go on: the learner has not answered for 5 s" in run.text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["reason"] == "the learner has not answered for 5 s"
    assert summary["agent_steps"] > 0 and "weights" not in summary  # the learner never answered
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["latest"]


def test_restarts_pass_over_damaged_checkpoints_and_the_run_acts_on_what_is_left(
        ray_address, tmp_path, launches):
    """Parts of checkpoints damaged just after a commit, then the role killed. The shard with no
    intact snapshot comes back empty and says why (a lost replay refills); the learner comes
    back from the checkpoint before its damaged latest one, saying so; a learner with no intact
    state cannot come back, and the run fails at once with the reason, not after
    --role-timeout-s of silence."""
    checkpoints = tmp_path / "run" / "checkpoints"
    run = launches(ray_address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                   "--logdir", tmp_path / "run", "--report-every-s", 1,
                   "--checkpoint-every-s", 20, "--max-seconds", 300)
    learner_part = "learner/state.data-00000-of-00001"

    def damage_after_a_commit_then_kill(role, part, every_checkpoint=False):
        """(the checkpoint before the damaged latest one, the line naming the damage)."""
        # Right after a commit: the next checkpoint is 20 s away, the restart reads this one.
        committed = run.text().count("\ncheckpoint ")
        run.wait_for(lambda: run.text().count("\ncheckpoint ") > committed, "a checkpoint",
                     timeout_s=60)
        latest = json.loads((checkpoints / "latest.json").read_text())["latest"]
        older = sorted(folder.name for folder in checkpoints.glob("ckpt-*")
                       if folder.name < latest)
        for name in [*older, latest] if every_checkpoint else [latest]:
            damage_a_byte(checkpoints / name / part)
        kill_one(role, ray_address)
        return older[-1] if older else None, (f"{checkpoints / latest / part}: its contents "
                                              f"differ from what was written")

    def training_goes_on():
        version = run.progress()[-1][2]
        run.wait_for(lambda: run.progress()[-1][2] > version + 20, "training on")

    _, why = damage_after_a_commit_then_kill("ReplayService", "replay-shard-0.msgpack",
                                             every_checkpoint=True)
    run.wait_for(lambda: "replay shard 0's process died; Ray restarted it empty, no snapshot it "
                         f"could read: {why}" in run.text(), "the shard's line")
    training_goes_on()
    before, why = damage_after_a_commit_then_kill("LearnerService", learner_part)
    run.wait_for(lambda: f"the learner's process died; Ray restarted it from {before}, "
                         f"passing over newer ones: {why}" in run.text(), "the learner's line")
    training_goes_on()
    _, why = damage_after_a_commit_then_kill("LearnerService", learner_part,
                                             every_checkpoint=True)
    run.process.wait(timeout=90)
    assert run.process.returncode == 1, run.text()[-3000:]
    reason = (f"the learner's process died and could not start again: "
              f"common.checkpoints.CheckpointError: {why} (sha256)")
    assert f"launch.py: the run cannot go on: {reason}" in run.text(), run.text()[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == reason
    assert summary["restarts"] == {"actors": 0, "replay": 1, "learner": 1, "evaluator": 0}
    played = evaluate(tmp_path / "run", "--episodes", 1)  # nothing left to play: one line
    assert played.returncode == 2 and played.stderr.strip().splitlines() == [
        f"evaluate.py: error: {why} (sha256)"], played.stderr[-3000:]


def test_a_learner_whose_loss_turns_nan_stops_the_run_keeping_only_good_state(ray_address,
                                                                            tmp_path, launches):
    """An absurd learning rate: the loss leaves the finite range within the first updates.
    The learner stops there with one line; those weights are never published, checkpointed or
    written; any checkpoint the run has holds finite weights (the restore checks)."""
    from common.checkpoints import CheckpointStore
    from common.envs import describe_env
    from learner.learner import DQNLearner
    run = launches(ray_address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                   "--logdir", tmp_path / "run", "--report-every-s", 1,
                   "--learning-rate", 1e30, "--checkpoint-every-s", 1, "--max-seconds", 120)
    run.process.wait(timeout=150)
    assert run.process.returncode == 1, run.text()[-3000:]
    reason = re.search(r"launch.py: the run cannot go on: the learner failed: diverged: (the loss "
                       r"became (nan|inf|-inf)|the weights became non-finite) at update \d+; "
                       r"these weights are neither published nor saved", run.text())
    assert reason, run.text()[-3000:]
    assert "DivergedError: no checkpoint of a diverged learner" in run.text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"].startswith("the learner failed")
    assert "weights" not in summary and not (tmp_path / "run" / "q_network.weights.h5").exists()
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.endswith(".tmp")]  # a refused checkpoint leaves nothing staged
    if store.latest() is not None:  # one taken before the first update: finite, restorable
        config = PRESETS["cartpole"]
        learner = DQNLearner(config, describe_env(config.env))
        with store.latest_part("learner") as latest:
            learner.restore(os.path.join(latest.path, "state"), ("weight_version",))


def test_a_second_signal_while_stopping_aborts(ray_address, tmp_path, launches):
    """The stop is held up (the learner frozen with SIGSTOP, so its stop call waits); a second
    SIGTERM then aborts at once: exit 130, no summary."""
    run = launches(ray_address, tmp_path, "--preset", "cartpole", "--num-actors", 2,
                   "--logdir", tmp_path / "run", "--report-every-s", 1, "--max-seconds", 300)
    run.wait_for(lambda: run.weights_at_least(2), "weights v2")
    frozen = role_pids("LearnerService", ray_address)[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        run.process.send_signal(signal.SIGTERM)
        run.wait_for(lambda: "SIGTERM: stopping the roles" in run.text(), "the stop")
        time.sleep(1.0)
        run.process.send_signal(signal.SIGTERM)
        run.process.wait(timeout=30)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert run.process.returncode == 130, run.text()[-3000:]
    assert "launch.py: interrupted; no summary written" in run.text()
    assert not (tmp_path / "run" / "summary.json").exists()
