"""The cluster scenario of tests/test_cluster.py, and of benchmarks/cluster.py that times it:
from a laptop (this machine's own namespace, with a HOME and RAY_TMPDIR of its own: its
~/.ray/auth_token is the scenario's token, never the machine's), `ray up cluster-local.yaml`
over SSH onto four hosts (tests/hosts.py), a run with its checkpoints in an S3 bucket the
laptop serves on the hosts' network (tests/buckets.py), then a cut worker, a crashed worker
and a crashed head. `cluster_run` asserts every step and returns how long each took."""
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from getpass import getuser
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.checkpoints import CheckpointStore
from common.cluster_check import file_problems
from launch import LEARNER_HOST
from tests.buckets import Bucket
from tests.conftest import ROOT, free_port, wait_until
from tests.hosts import Host, Hosts

RAY = str(Path(sys.executable).with_name("ray"))  # this Python's CLI, whatever HOME says
# What every host would detect of this whole machine, held to a share of two cores: the head
# holds the learner and one replay shard; a worker left alone can hold both actors.
HEAD_CPUS, WORKER_CPUS = 2, 2
NODE_MEMORY = 2 * 10**9
OBJECT_STORE_MEMORY = 300 * 10**6
# Bounds for a loaded machine; on an idle one `ray up` takes ~20 s, the workers join ~20 s
# later, the job takes ~50 s, and the workers' Ray ends ~50 s after `ray down`.
UP_TIMEOUT = 300  # s: `ray up`, the head's setup and start
JOIN_TIMEOUT = 300  # s: the head's autoscaler sets up and starts both workers
JOB_TIMEOUT = 300  # s: the job's start (TensorFlow in every role), 20 s of training, its stop
RECOVERY_TIMEOUT = 180  # s: Ray declares a crashed host dead and restarts its actor elsewhere
DOWN_TIMEOUT = 120
WORKER_STOP_TIMEOUT = 120  # s: a worker's raylet, left running by `ray down`, ends by itself
CLI_TIMEOUT = 60
API_TIMEOUT = 30
# A host has no route out, and every package is installed already (its home is a copy of this
# machine's): pip installs the project from what is there, without an index, building it with
# the installed setuptools (`no-build-isolation = false` is pip's spelling of "no isolation").
PIP_CONF = "[global]\nno-index = true\nno-build-isolation = false\n"
LOG_TAIL_LINES = 60
CLUSTER_POLL_S = 2.0  # s between looks at the cluster's state


class Laptop:
    """The user's machine: the ray CLI with this test's HOME (its token, its key) and the filled
    cluster config."""

    def __init__(self, folder: Path, hosts: Hosts, bucket: Bucket):
        self.folder = folder
        self.home = folder / "home"
        self.home.mkdir()
        self.cluster_name = f"dqnh-{uuid.uuid4().hex[:8]}"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("RAY_")}  # the machine's own Ray settings stay out
        (folder / "tmp").mkdir()
        self.env.update(HOME=str(self.home), RAY_TMPDIR=str(folder / "tmp"),
                        TMPDIR=str(folder / "tmp"),
                        RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
        self.config = folder / "cluster-local.yaml"
        self.transcript = folder / "laptop.log"
        self.dashboard_port = free_port()
        self.dashboard: subprocess.Popen[bytes] | None = None
        self.hosts = hosts
        self.up = False  # `ray up` was run and no `ray down` since
        self.bucket = bucket

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = CLI_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ray ARGS` from the checkout's root, as the user types it; its output kept in the
        transcript."""
        started = time.monotonic()
        try:
            result = subprocess.run([RAY, *args], cwd=ROOT, env=self.env, capture_output=True,
                                    text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as expired:
            self.note(args, "timed out", str(expired.stdout or "") + str(expired.stderr or ""))
            raise AssertionError(f"`ray {shlex.join(args)}` did not finish in {timeout} s; "
                                 f"{self.tail()}") from None
        self.note(args, f"exit {result.returncode} in {time.monotonic() - started:.1f} s",
                  result.stdout + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"`ray {shlex.join(args)}` exited {result.returncode}: "
                                 f"{self.tail()}")
        return result

    def note(self, args, how: str, output: str) -> None:
        with open(self.transcript, "a") as log:
            log.write(f"$ ray {shlex.join(args)}  # {how}\n{output}\n")

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.transcript.read_text(errors="replace") if self.transcript.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def fill_in(self) -> dict:
        """cluster-local.yaml with its placeholders set as the user sets them (the hosts'
        addresses, the SSH user and key) and this test's own cluster name; then what only these
        hosts need: `ray start` held to the test's share of the machine (every host sees all
        of it) on the host's own address."""
        head, *workers = self.hosts
        text = (ROOT / "cluster-local.yaml").read_text()
        listed = text.count("SET-WORKER-")  # the file lists two; a user adds more lines
        for placeholder, value in [("SET-HEAD-HOST", head.address),
                                   *((f"SET-WORKER-{i}-HOST", worker.address)
                                     for i, worker in enumerate(workers[:listed], 1)),
                                   ("SET-SSH-USER", self.hosts.user),
                                   ("SET-SSH-KEY", str(self.hosts.key))]:
            assert placeholder in text, placeholder
            text = text.replace(placeholder, value)
        config = yaml.safe_load(text)
        config["provider"]["worker_ips"] += [worker.address for worker in workers[listed:]]
        config["cluster_name"] = self.cluster_name
        config["file_mounts"]["~/ray-apex-dqn"] = str(ROOT)  # "." from wherever it is saved
        for key, cpus in [("head_start_ray_commands", HEAD_CPUS),
                          ("worker_start_ray_commands", WORKER_CPUS)]:
            config[key] = [command + (
                f" --num-cpus={cpus} --memory={NODE_MEMORY} "
                f"--object-store-memory={OBJECT_STORE_MEMORY} --node-ip-address=$(hostname -i)"
                if "ray start" in command else "") for command in config[key]]
        self.config.write_text(yaml.safe_dump(config))
        return config

    def open_dashboard(self) -> None:
        """`ray dashboard`: the head's dashboard (and job API) on a port of this machine's
        loopback, over SSH."""
        log = open(self.folder / "dashboard.log", "ab")
        self.dashboard = subprocess.Popen(
            [RAY, "dashboard", "--no-config-cache", "-p", str(self.dashboard_port),
             str(self.config)], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.state("nodes") is not None, "the dashboard through the tunnel",
                   60, every=CLUSTER_POLL_S)

    def close_dashboard(self) -> None:
        if self.dashboard is not None and self.dashboard.poll() is None:
            os.killpg(self.dashboard.pid, 15)
            try:
                self.dashboard.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.dashboard.pid, 9)
                self.dashboard.wait(timeout=10)

    def api(self, path: str, **params: str) -> Any:
        """GET from the head's dashboard API through the tunnel, with the token (what `ray
        list` and `ray job` send; asked directly, the polls cost no CLI start each)."""
        token = (self.home / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(
            f"{self.address}{path}?{urllib.parse.urlencode(params)}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=API_TIMEOUT) as response:
            return json.load(response)

    def state(self, kind: str, **equal: str) -> list[dict] | None:
        """Ray's state API's `kind` (nodes, actors) in detail, those whose fields equal
        `equal`; None while it does not answer."""
        filters = {"filter_keys": ",".join(equal), "filter_predicates": ",".join("=" * len(equal)),
                   "filter_values": ",".join(equal.values())} if equal else {}
        try:
            answer = self.api(f"/api/v0/{kind}", detail="1", limit="1000", **filters)
        except OSError:
            return None
        return answer["data"]["result"]["result"]

    def submit(self, *flags: str) -> str:
        """`ray job submit` of `launch.py FLAGS` through the tunnel, the bucket's variables in
        its runtime environment; its submission id."""
        job = f"dqnh-job-{uuid.uuid4().hex[:8]}"
        self.ray("job", "submit", "--address", self.address, "--submission-id", job,
                 "--working-dir", ".", "--runtime-env-json",
                 json.dumps({"env_vars": self.bucket.env}), "--no-wait", "--",
                 "python", "launch.py", *flags)
        return job

    def job_logs(self, job: str) -> str:
        return self.api(f"/api/jobs/{job}/logs")["logs"]

    def wait_for_logs(self, job: str, condition, what: str) -> None:
        """Until `condition(logs)` holds; fails early, with the logs, once the job ended."""
        def holds() -> bool:
            logs = self.job_logs(job)
            if condition(logs):
                return True
            status = job_record(self, job)["status"]
            assert status in ("PENDING", "RUNNING"), f"job {status} before {what}:\n{logs}"
            return False
        wait_until(holds, what, JOB_TIMEOUT, every=CLUSTER_POLL_S)

    def forget(self) -> None:
        """What `ray up` left on this machine outside the test's folder: its SSH control
        sockets, in a folder named as Ray's command runner names it (the masters exit on their
        own once their hosts are gone)."""
        user = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getuser().encode()).hexdigest()[:10]}"
        shutil.rmtree(user / hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10],
                      ignore_errors=True)
        with contextlib.suppress(OSError):
            user.rmdir()  # when no other cluster's sockets are in it


@contextlib.contextmanager
def laptop_and_hosts(folder: Path) -> Iterator[Laptop]:
    """A head and three workers, an S3 bucket the laptop serves on their network ("the
    cloud's"), and the laptop that brings Ray up on them, holding the bucket's keys in its
    environment; `ray down`, the bucket and the hosts torn down at the end, also on failure."""
    with Hosts(4) as hosts, Bucket(hosts.bridge_address, log=folder / "bucket.log") as bucket:
        laptop = Laptop(folder, hosts, bucket)
        before = {name: os.environ.get(name) for name in bucket.env}
        os.environ.update(bucket.env)
        try:
            yield laptop
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            laptop.close_dashboard()
            if laptop.up:
                laptop.ray("down", "-y", str(laptop.config), timeout=DOWN_TIMEOUT, check=False)
            laptop.forget()


def ray_processes(hosts: Hosts, host: Host) -> str:
    return hosts.inside(host, "pgrep -l 'raylet|gcs_server'", check=False).stdout


def alive_nodes(laptop: Laptop) -> list[dict]:
    nodes = laptop.state("nodes") or []
    return [node for node in nodes if node["state"] == "ALIVE"]


def host_logs(hosts: Hosts, host: Host) -> str:
    """The tails of a host's Ray logs (and what Ray's autoscaler said), for a failure."""
    if host.init_pid is None:
        return f"{host.name}: down"
    tail = f"tail -n {LOG_TAIL_LINES // 2}"
    command = ("cd /tmp/ray/session_latest/logs 2>/dev/null || exit 0; "
               "[ -f monitor.log ] && echo '== monitor.log (its nodes and updaters)' && "
               "grep -E 'NodeUpdater|StandardAutoscaler|Launch|Pending|uninitialized|failed' "
               f"monitor.log | {tail}; "
               "for f in monitor.out monitor.err raylet.err gcs_server.err dashboard.err "
               f"job-driver-*.log; do [ -f $f ] && echo \"== $f\" && {tail} $f; done")
    result = hosts.inside(host, command, check=False)
    return f"----- {host.name} ({host.address})\n{result.stdout}{result.stderr}"


def print_diagnostics(laptop: Laptop, hosts: Hosts) -> None:
    print("----- the laptop's ray commands (tail)\n" + laptop.tail(), file=sys.stderr)
    for host in hosts:
        print(host_logs(hosts, host), file=sys.stderr)


def cluster_run(laptop: Laptop) -> dict[str, float]:
    hosts = laptop.hosts
    head, *workers = hosts
    timings: dict[str, float] = {}
    started = time.monotonic()

    # The user's steps: a token of their own, the placeholders set, the offline check.
    laptop.ray("get-auth-token", "--generate")
    token = (laptop.home / ".ray" / "auth_token").read_text().strip()
    assert token and token != machine_token()
    laptop.fill_in()
    assert file_problems(laptop.config) == []
    for host in hosts:
        hosts.inside(host, f"mkdir -p ~/.config/pip && printf %s {shlex.quote(PIP_CONF)} "
                           f"> ~/.config/pip/pip.conf")
    nodes = bring_up(laptop)
    timings["ray_up_and_workers_joined_s"] = time.monotonic() - started
    by_ip = {node["node_ip"]: node for node in nodes}
    assert set(by_ip) == {host.address for host in hosts}, nodes
    assert by_ip[head.address]["is_head_node"]
    assert by_ip[head.address]["resources_total"].get(LEARNER_HOST) == 1
    for worker in workers:
        assert LEARNER_HOST not in by_ip[worker.address]["resources_total"]
        assert by_ip[worker.address]["resources_total"]["CPU"] == WORKER_CPUS

    # Every node's Ray runs with token authentication, and holds this test's token, private.
    for host in hosts:
        raylet = hosts.inside(host, "tr '\\0' '\\n' < /proc/$(pgrep -o raylet)/environ").stdout
        assert "RAY_AUTH_MODE=token" in raylet.splitlines(), host.name
        mode, held = hosts.inside(host, "stat -c %a ~/.ray/auth_token; cat ~/.ray/auth_token"
                                  ).stdout.split()
        assert (mode, held) == ("600", token), host.name
    # Without the token nothing gets in over the network: not a driver joining the GCS from
    # another host, not a request to the job API.
    refused = hosts.inside(workers[0], f"cd ~/ray-apex-dqn && RAY_AUTH_TOKEN=not-{token} "
                                       f"python launch.py --address {head.address}:6379",
                           timeout=CLI_TIMEOUT, check=False)
    assert refused.returncode == 2 and "it refused this machine's auth token" in \
        refused.stderr, refused.stdout + refused.stderr
    for path in ("/api/jobs/", "/api/v0/nodes"):  # submitting, and reading the state
        with pytest.raises(urllib.error.HTTPError) as unauthorized:
            urllib.request.urlopen(f"{laptop.address}{path}", timeout=API_TIMEOUT)
        assert unauthorized.value.code in (401, 403), (path, unauthorized.value)

    # A run with its checkpoints in the bucket; the bucket's endpoint and keys go with the job.
    root = laptop.bucket.uri(laptop.cluster_name)
    job = laptop.submit("--preset", "cartpole", "--address", "auto", "--num-actors", "2",
                        "--envs-per-actor", "2", "--replay-shards", "1", "--eval-every-s", "0",
                        "--report-every-s", "2", "--checkpoint-every-s", "10",
                        "--max-seconds", "600", "--logdir", "/tmp/dqn-run",
                        "--checkpoint-dir", root)
    submitted = time.monotonic()
    laptop.wait_for_logs(job, lambda logs: progress_lines(logs, actors=2) >= 1,
                         "the first progress line")
    timings["submit_to_first_progress_s"] = time.monotonic() - submitted
    laptop.wait_for_logs(job, lambda logs: progress_lines(logs, actors=2) >= 2
                         and f"checkpoint {root}/ckpt-" in logs, "a checkpoint in the bucket")
    timings["submit_to_checkpoint_s"] = time.monotonic() - submitted
    record = job_record(laptop, job)
    assert record["status"] == "RUNNING", record
    header = next(line for line in laptop.job_logs(job).splitlines()
                  if line.startswith("cartpole: CartPole-v1"))
    assert "| 2 actors x 2 envs |" in header, header

    # Where each role runs: Ray's record of the job's actors.
    where = role_hosts(laptop, record["job_id"])
    assert where.get("dqn-learner") == head.address, where
    assert where.get("dqn-replay-0") == head.address, where
    assert {where.get("dqn-actor-0"), where.get("dqn-actor-1")} <= {
        worker.address for worker in workers}, where

    # A worker's cable is pulled past Ray's node timeout: its actor comes back on another
    # worker. Plugged in again, the host's Ray (declared dead) ends with the stale actor: no
    # actor plays twice, and the restart counts once.
    cut = next(worker for worker in workers if worker.address == where["dqn-actor-0"])
    lines_before = progress_lines(laptop.job_logs(job), actors=2)
    stale_raylet = raylet_pid(hosts, cut)
    assert stale_raylet
    hosts.cut(cut)
    cut_at = time.monotonic()
    wait_until(lambda: (actor_host(laptop, record["job_id"], "dqn-actor-0") or cut.address)
               != cut.address and node_state(laptop, cut) == "DEAD",
               "the cut worker declared dead and dqn-actor-0 back elsewhere", RECOVERY_TIMEOUT,
               every=CLUSTER_POLL_S)
    laptop.wait_for_logs(job, lambda logs: progress_lines(logs, actors=2) > lines_before + 2,
                         "progress with both actors after the cut")
    timings["worker_cut_to_both_actors_playing_s"] = time.monotonic() - cut_at
    hosts.mend(cut)
    # (The head's autoscaler may start Ray on it again, as a new node: that one is welcome.)
    wait_until(lambda: raylet_pid(hosts, cut) != stale_raylet, "the mended worker's stale Ray "
               "ending", WORKER_STOP_TIMEOUT, every=CLUSTER_POLL_S)
    # Its stale actor's process ends once it notices its raylet is gone.
    wait_until(lambda: actor_processes(hosts) == 2, "two actor processes in all",
               WORKER_STOP_TIMEOUT, every=CLUSTER_POLL_S)
    assert laptop.job_logs(job).count("actor 0's process died; Ray restarted it") == 1

    # A worker host crashes: its actors come back on the workers left, the run goes on.
    where = role_hosts(laptop, record["job_id"])
    lost = next(worker for worker in workers if worker.address == where["dqn-actor-1"])
    left = next(worker for worker in workers if worker not in (cut, lost))
    lines_before = progress_lines(laptop.job_logs(job), actors=2)
    hosts.kill(lost)
    killed = time.monotonic()
    wait_until(lambda: {actor_host(laptop, record["job_id"], f"dqn-actor-{i}") for i in (0, 1)}
               <= {left.address, cut.address}, "every actor back on a worker left",
               RECOVERY_TIMEOUT, every=CLUSTER_POLL_S)
    laptop.wait_for_logs(job, lambda logs: progress_lines(logs, actors=2) > lines_before + 2,
                         "progress with both actors after the worker's loss")
    timings["worker_lost_to_both_actors_playing_s"] = time.monotonic() - killed
    logs = laptop.job_logs(job)
    last_checkpoint = logs.rfind(f"checkpoint {root}/ckpt-")
    laptop.wait_for_logs(job, lambda logs: logs.rfind(f"checkpoint {root}/ckpt-") >
                         last_checkpoint, "a checkpoint after the worker's loss")

    written = [float(seconds) for seconds in re.findall(
        rf"checkpoint {re.escape(root)}/ckpt-\d+ \(([\d.]+) s\)", laptop.job_logs(job))]
    timings["checkpoint_to_bucket_s_median"] = statistics.median(written)

    # The head crashes, and its disk with it: the run directory and Ray's state are gone, the
    # bucket is all that is left. The user brings the head up again and resumes from the bucket.
    logs = laptop.job_logs(job)  # the last the laptop sees of the run
    hosts.kill(head)
    head_lost = time.monotonic()
    laptop.close_dashboard()
    store = CheckpointStore(root)
    latest = store.latest()
    assert latest is not None
    saved_steps = store.read_json(f"{latest}/progress.json")["agent_steps"]
    # The learner's weight version when the checkpoint was taken is at least the one of the
    # progress line before the launcher said it was written (or of the last line seen, when
    # it was written after that).
    said = logs.find(f"checkpoint {root}/{latest} ")
    _, saved_version = progress(logs[:said] if said >= 0 else logs)[-1]
    assert saved_steps > 0 and saved_version > 0
    timings["head_loss_agent_steps_lost"] = max(0, progress(logs)[-1][0] - saved_steps)
    hosts.restart(head)
    hosts.inside(head, f"mkdir -p ~/.config/pip && printf %s {shlex.quote(PIP_CONF)} "
                       f"> ~/.config/pip/pip.conf")
    # The new head's autoscaler sets up every worker that answers SSH: the mended one too.
    bring_up(laptop, expect=[head, cut, left])
    timings["head_lost_to_cluster_up_s"] = time.monotonic() - head_lost
    again = laptop.submit("--resume", root, "--address", "auto", "--logdir", "/tmp/dqn-run-2",
                          "--max-seconds", "20", "--report-every-s", "2")
    logs = laptop.ray("job", "logs", "--address", laptop.address, "--follow", again,
                      timeout=JOB_TIMEOUT).stdout
    timings["head_lost_to_resumed_run_done_s"] = time.monotonic() - head_lost
    assert job_record(laptop, again)["status"] == "SUCCEEDED", logs
    assert f"resumed from {latest} at {saved_steps:,} agent steps" in logs, logs
    summary = json.loads(next(line for line in reversed(logs.splitlines())
                              if line.startswith("{")))
    assert summary["status"] == "ok" and summary["sitting"] == 2, summary
    assert summary["agent_steps"] > saved_steps, summary
    # Weights and the exploration schedule carry on too: no fresh learner (v0), no random
    # phase again.
    first = next(line for line in logs.splitlines() if "| steps " in line)
    assert progress(first)[0][1] >= saved_version and "| eps " in first, (saved_version, first)
    assert summary["weight_version"] > saved_version, summary

    laptop.close_dashboard()
    laptop.ray("down", "-y", str(laptop.config), timeout=DOWN_TIMEOUT)
    laptop.up = False
    down = time.monotonic()
    # `ray down` stops Ray on the head only (the local provider merely forgets the workers);
    # a worker's raylet ends once it has lost the head's GCS.
    wait_until(lambda: not any(ray_processes(hosts, host) for host in hosts if host.up),
               "Ray's processes on every host ending after `ray down`", WORKER_STOP_TIMEOUT,
               every=CLUSTER_POLL_S)
    timings["workers_stopped_after_down_s"] = time.monotonic() - down
    timings["total_s"] = time.monotonic() - started
    return {key: round(value, 1) for key, value in timings.items()}


def bring_up(laptop: Laptop, expect: list[Host] | None = None) -> list[dict]:
    """`ray up`, the dashboard's tunnel, and the nodes once every host of `expect` (all) has
    joined; the dashboard serves on the head's loopback only."""
    hosts = laptop.hosts
    head = hosts[0]
    laptop.up = True
    laptop.ray("up", "-y", "--no-config-cache", "--disable-usage-stats", str(laptop.config),
               timeout=UP_TIMEOUT)
    listening = hosts.inside(head, "ss -Hltn 'sport = :8265'").stdout.split()
    assert "127.0.0.1:8265" in listening and f"{head.address}:8265" not in listening, listening
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((head.address, 8265), timeout=5).close()
    laptop.open_dashboard()
    addresses = {host.address for host in (expect or hosts)}
    wait_until(lambda: {node["node_ip"] for node in alive_nodes(laptop)} == addresses,
               "the workers joining", JOIN_TIMEOUT, every=CLUSTER_POLL_S)
    return alive_nodes(laptop)


PROGRESS = re.compile(r"\| steps\s+([\d,]+) \|.*\| weights v(\d+) ")


def progress(logs: str) -> list[tuple[int, int]]:
    """(agent steps, weight version) of each progress line."""
    return [(int(steps.replace(",", "")), int(version))
            for steps, version in PROGRESS.findall(logs)]


def progress_lines(logs: str, actors: int) -> int:
    return sum("| steps " in line and f"| actors {actors}/{actors} |" in line
               for line in logs.splitlines())


def actor_host(laptop: Laptop, job_id: str, name: str) -> str | None:
    return role_hosts(laptop, job_id).get(name)


def node_state(laptop: Laptop, host: Host) -> str | None:
    """What the GCS says of `host`'s node (ALIVE, DEAD), its newest record."""
    records = [node for node in laptop.state("nodes") or [] if node["node_ip"] == host.address]
    return records[-1]["state"] if records else None


def actor_processes(hosts: Hosts) -> int:
    """Live processes of Ray actors of class ActorService on every host that is up (a dead one
    left unreaped, as `[ray::ActorServi] <defunct>`, does not count)."""
    command = "ps -eo stat=,args= | awk '$1 !~ /^Z/ && $2 ~ /^ray::ActorService/' | wc -l"
    counts = [hosts.inside(host, command, check=False).stdout.strip()
              for host in hosts if host.up]
    return sum(int(count) for count in counts if count.isdigit())


def raylet_pid(hosts: Hosts, host: Host) -> str:
    return hosts.inside(host, "pgrep -o raylet", check=False).stdout.strip()


def role_hosts(laptop: Laptop, job_id: str) -> dict[str, str | None]:
    """The address of the host each of the job's live named actors runs on."""
    node_ip = {node["node_id"]: node["node_ip"] for node in laptop.state("nodes") or []}
    return {actor["name"]: node_ip.get(actor["node_id"])
            for actor in laptop.state("actors", job_id=job_id) or []
            if actor.get("name") and actor["state"] == "ALIVE"}


def machine_token() -> str | None:
    """This machine's own token, which the test leaves alone."""
    path = Path.home() / ".ray" / "auth_token"
    return path.read_text().strip() if path.exists() else None


def job_record(laptop: Laptop, submission_id: str) -> dict:
    """Ray's record of the submitted job (its status, its job_id)."""
    return laptop.api(f"/api/jobs/{submission_id}")
