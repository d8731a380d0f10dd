"""Train a distributed DQN: `python launch.py [--preset seed|cartpole|apex] [--flags]`, or carry
a run on: `python launch.py --resume RUNDIR`.

Reads top to bottom: parse the config -> start or join Ray -> place the replay service, the
learner and the actors (restored from the latest checkpoint when resuming) -> report progress
and checkpoint until a limit, Ctrl-C, SIGTERM or SIGHUP -> stop the roles in order -> write a
final checkpoint, the weights and summary.json. Every role that dies is restarted by Ray; the
learner and the shards come back from the latest checkpoint. `--help` lists every knob.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from actors.records import ActorReport
from common import checkpoints
from common.checkpoints import CheckpointError, CheckpointStore, store_environment, write_atomically
from common.config import (
    BEST_WEIGHTS,
    FINAL_WEIGHTS,
    RUN_CONFIG,
    SEED_LIMIT,
    Config,
    config_to_json,
    epsilon_at,
    parse_args,
)
from common.env_info import EnvInfo
from common.envs import EnvError, describe_env
from common.process import PROCESS_ENV, native_output_hidden
from learner.records import LearnerStats
from replay_server.records import ReplayServiceStats

LEARNER_HOST = "dqn_learner_host"  # custom resource of the node that hosts learner and replay
POLL_WAIT_S = 5.0  # longest a progress round waits for the roles' reports
STOP_WAIT_S = 60.0  # longest the stop waits for each stage (actors, learner, shards)
FAILED_STOP_WAIT_S = 15.0  # the same when the run failed: a role is already not answering
CHECKPOINT_WAIT_S = 600.0  # longest the roles may take to write their checkpoint parts
RATE_WINDOW_S = 30.0  # the progress line's rates are over about this many seconds
SITTING_SEED_STRIDE = 1_000_003  # each resumed sitting's actors play from other seeds


def fail(message: str) -> NoReturn:
    print(f"launch.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- Ray -------------------------------------------------------------------------------------

def check_address_answers(address: str) -> None:
    """Ray waits minutes on an address nobody answers; a TCP probe fails in seconds."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        fail(f"--address {address!r} is not 'auto' or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        fail(f"no Ray cluster answers at --address {address}: {error}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def secure_ray_environment(config: Config) -> None:
    """Token authentication on for every process this run starts or talks to, unless the
    user said --insecure; an inherited RAY_AUTH_MODE=disabled is refused, not obeyed."""
    if config.insecure:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        return
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        fail(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} would run Ray without token "
             f"authentication; unset it, or pass --insecure to accept that")
    os.environ["RAY_AUTH_MODE"] = "token"
    if config.address is None and config.dashboard_host not in LOOPBACK:
        print(f"warning: --dashboard-host {config.dashboard_host} lets the network reach the "
              f"Ray dashboard, which runs code on this machine for anyone with the token; "
              f"keep it on 127.0.0.1 and use an SSH tunnel", file=sys.stderr, flush=True)


def keep_token_private() -> None:
    """Ray writes the token it generates with the default umask (readable by every local
    user); it is a password to the cluster."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


def keep_local_ray_on_loopback() -> None:
    """A local Ray's ports (GCS, raylet, workers, metrics export) on 127.0.0.1 alone. Ray 2.60
    has no switch for that: it binds them to the machine's address, and does so to loopback
    only where it assumes a laptop (macOS, Windows), which this variable makes it assume.
    It is read when Ray is imported, so it is set before; the workers inherit it."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


# Ray's Unix sockets live at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
# and a socket path holds 107 bytes at most: the temp dir gets what the longest session leaves.
RAY_TEMP_DIR_MAX_BYTES = 107 - len(
    "/session_2026-12-07_19-14-45_596986_4194304/sockets/plasma_store")


def private_ray_temp_dir(system_temp: Path | None = None) -> Path:
    """Ray's temp dir for a local run: <system temp>/ray-<uid>/ray. Ray makes its temp, session
    and socket folders world-writable (0777, no sticky bit), its own `ray` folder included, so
    they go inside a folder only this user can enter: ray-<uid>, created 0700, and refused when
    it is a symlink, another user's, or open to others (anything could be planted in it)."""
    if system_temp is None:
        from ray._common.utils import get_default_system_temp_dir  # RAY_TMPDIR, TMPDIR or /tmp
        system_temp = Path(get_default_system_temp_dir())
    private = system_temp / f"ray-{os.getuid()}"
    temp_dir = private / "ray"
    if len(os.fsencode(temp_dir)) > RAY_TEMP_DIR_MAX_BYTES:
        fail(f"{temp_dir} is too long a path for Ray's sockets in it ({RAY_TEMP_DIR_MAX_BYTES} "
             f"bytes at most): set RAY_TMPDIR to a shorter folder, e.g. /tmp")
    try:
        private.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as error:
        fail(f"cannot create {private} for the local Ray: {error.strerror or error}")
    info = private.lstat()
    where = f"{private} (the folder of your local runs' Ray)"
    if not stat.S_ISDIR(info.st_mode):  # lstat: a symlink is not a folder
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a folder"
        fail(f"{where} is {kind}: remove it")
    if info.st_uid != os.getuid():
        fail(f"{where} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}): remove it")
    if info.st_mode & 0o077:
        fail(f"{where} is open to other users (mode {stat.S_IMODE(info.st_mode):o}; anything "
             f"could have been planted in it): remove it")
    return temp_dir


def roles_env_vars(config: Config) -> dict[str, str]:
    """The variables every role runs with: the process settings, and the bucket's endpoint
    and credentials as this process has them (the roles write and read checkpoints on
    whichever node they run). Those a submitted job's runtime env sets already reach the
    roles through it, and Ray refuses a key set twice."""
    wanted = {**store_environment(config.checkpoint_dir, dict(os.environ)), **PROCESS_ENV}
    try:  # what `ray job submit --runtime-env-json` gave the job, as Ray hands it over
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        from_job = set((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        from_job = set()
    return {name: value for name, value in wanted.items() if name not in from_job}


def connect_ray(config: Config, num_actors_hint: int) -> str | None:
    """Start or join Ray. Returns the dashboard URL when this process started Ray (and so
    stops it), else None."""
    if config.address is None:
        keep_local_ray_on_loopback()
    import ray
    if ray.is_initialized():
        return None
    # Workers' output (TensorFlow's start-up lines and the like) reaches the terminal only with
    # --verbose; their failures reach it through the reports and errors the launcher prints.
    kwargs: dict[str, Any] = dict(
        logging_level=logging.INFO if config.verbose else logging.ERROR,
        log_to_driver=config.verbose, runtime_env={"env_vars": roles_env_vars(config)})
    if config.address is None:
        cpus = os.cpu_count() or 1
        # Logical CPUs: every role gets a slot even where actors outnumber cores.
        kwargs.update(num_cpus=max(cpus, num_actors_hint + 1 + config.replay_shards),
                      resources={LEARNER_HOST: 1}, dashboard_host=config.dashboard_host,
                      _temp_dir=str(private_ray_temp_dir()))
    else:
        check_address_answers(config.address)
        kwargs.update(address=config.address)
    # Joining, Ray's core logs each refused connection attempt natively; the one line below
    # says it. (Not around a local start: the processes it spawns would inherit the hiding.)
    failure = None
    with native_output_hidden(not config.verbose and config.address is not None) as held:
        try:
            context = ray.init(**kwargs)
        except Exception as error:
            failure = str(error).splitlines()[0]
            if "InvalidAuthToken" in held():
                failure = ("it refused this machine's auth token (RAY_AUTH_TOKEN, "
                           "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): use the cluster's, "
                           "from `ray get-auth-token` on its head node")
    if config.address is None:
        keep_token_private()
    if failure is not None:
        where = f"join the Ray cluster at --address {config.address}" if config.address \
            else "start a local Ray"
        fail(f"could not {where}: {failure}")
    return (context.dashboard_url or "disabled") if config.address is None else None


def default_num_actors(cpus: int, replay_shards: int) -> int:
    """One actor per CPU the learner and the replay shards leave, and at least 2: on a few
    cores two actors overlap one's emulator time with the other's forward pass."""
    return max(2, cpus - 1 - replay_shards)


def machine_layout(config: Config, cpus: int, local: bool) -> Config:
    """`config` with the actor count and threads it leaves open chosen for `cpus` CPUs: one
    actor per CPU the learner and the shards leave (at least 2), and on a local machine its
    CPUs shared among the actors' TF and emulator threads, each actor pinned to its share (on
    a cluster, where actors fill the workers' CPUs, one thread each, not pinned)."""
    num_actors = config.num_actors or default_num_actors(cpus, config.replay_shards)
    threads = config.actor_threads or (max(1, cpus // num_actors) if local else 1)
    pin = local if config.pin_actor_cpus is None else config.pin_actor_cpus
    return config.replace(num_actors=num_actors, actor_threads=threads, pin_actor_cpus=pin)


def actor_count(config: Config) -> int:
    """The actors of a config that `machine_layout` laid out (it always sets them)."""
    if config.num_actors is None:
        raise ValueError("the config's actors are not laid out yet (see machine_layout)")
    return config.num_actors


# A Ray actor handle: its methods' `.remote` calls are untyped to mypy.
Handle = Any


@dataclass
class Roles:
    shards: list[Handle]
    learner: Handle
    actors: list[Handle]
    learner_gpus: float
    evaluator: Handle | None = None

    @property
    def all(self) -> list[Handle]:
        return [*self.actors, self.learner, *self.shards,
                *([self.evaluator] if self.evaluator else [])]


def learner_gpus(config: Config) -> float:
    """The learner's GPUs: as asked, else one when the cluster has a GPU."""
    import ray
    if config.learner_gpus is not None:
        return config.learner_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def missing_room(config: Config, num_actors: int, replay_bytes: int = 0) -> str | None:
    """What the cluster lacks now to hold every role, or None when they all fit: CPUs for
    the learner, the shards and the actors (one each), a node with the learner's GPUs, and
    memory for the `replay_bytes` of all shards on the learner's node (0: not checked)."""
    import ray
    cpus_needed = 1 + config.replay_shards + num_actors
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = learner_gpus(config)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    if gpus > most_gpus:
        return (f"the learner asks for {gpus:g} GPU(s) and the largest node has "
                f"{most_gpus:g} (--learner-gpus 0 trains on the CPU)")
    # The shards go where the learner goes (place_roles), on any node where none is marked.
    hosts = [node for node in nodes if node.get(LEARNER_HOST, 0) >= 1] or nodes
    memory = max((node.get("memory", 0) for node in hosts), default=0)
    if replay_bytes > memory:
        return (f"the replay needs ~{replay_bytes / 2**30:.1f} GiB (--replay-capacity "
                f"{config.replay_capacity:,} x {config.replay_shards:,} shard(s)) and the "
                f"learner's node has {memory / 2**30:.1f} GiB for its processes")
    if cpus_needed > cpus:
        return (f"the run needs {cpus_needed:g} CPUs (learner 1, replay shards "
                f"{config.replay_shards}, actors {num_actors}) and the cluster has {cpus:g} "
                f"(--num-actors {max(int(cpus) - 1 - config.replay_shards, 0)} fits)")
    return None


# A local Ray is told it has a CPU for every role (connect_ray) even where roles outnumber
# cores. Up to this many a CPU they share it usefully (actors wait on replay and the learner
# much of the time); beyond, they only time-share, each a process of ~0.5 GiB, and Ray would
# be given CPUs by the thousand: a typo, not a plan.
ROLES_PER_LOCAL_CPU = 8
# What an env takes in its actor: ALE's emulator and buffers (~1.7 MiB measured), a vector
# env's state and observations.
ATARI_ENV_BYTES = 2 << 20
VECTOR_ENV_BYTES = 64 << 10
# Float32 copies of the network the learner's process holds: online and target networks,
# Adam's two moments, the gradients; and the published copy in the object store.
LEARNER_NETWORK_COPIES = 6


def network_parameters(config: Config, env_info: EnvInfo) -> int:
    """The weights of `common.networks.build_q_network`'s network, counted without building
    it (a network too large for memory is refused before anything builds it)."""
    hidden: tuple[int, ...]
    if len(env_info.obs_shape) == 3:  # Nature CNN
        channels, height, width = env_info.obs_shape
        count = 0
        for c_in, c_out, kernel, stride in [(channels, 32, 8, 4), (32, 64, 4, 2), (64, 64, 3, 1)]:
            count += (c_in * kernel * kernel + 1) * c_out
            height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
        features, hidden = 64 * height * width, (512,)
    else:
        count, features, hidden = 0, math.prod(env_info.obs_shape), config.mlp_hidden_units
    for outputs in ([1, env_info.num_actions] if config.dueling else [env_info.num_actions]):
        width = features
        for units in (*hidden, outputs):
            count += (width + 1) * units
            width = units
    return count


def check_fits_this_machine(config: Config, env_info: EnvInfo, cpus: int,
                            memory_bytes: int) -> None:
    """A local run's roles are processes of this machine: no more than its Ray can be given
    CPUs for, and their replay, networks and envs within its memory."""
    num_actors = actor_count(machine_layout(config, cpus, local=True))
    roles = 1 + config.replay_shards + num_actors
    most = ROLES_PER_LOCAL_CPU * cpus
    if roles > most:
        fits = most - 1 - config.replay_shards
        fail(f"the run needs {roles:,} processes (learner 1, replay shards "
             f"{config.replay_shards:,}, actors {num_actors:,}) and this machine's {cpus} CPUs "
             f"take at most {most:,} ({ROLES_PER_LOCAL_CPU} a CPU"
             + (f"; --num-actors {fits} fits)" if fits > 0 else ")"))
    evaluating = config.eval_every_s > 0
    env_bytes = ATARI_ENV_BYTES if len(env_info.obs_shape) == 3 else VECTOR_ENV_BYTES
    weights = network_parameters(config, env_info)
    copies = LEARNER_NETWORK_COPIES + num_actors + evaluating
    needs = {
        f"replay (--replay-capacity {config.replay_capacity:,} x {config.replay_shards:,} "
        f"shard(s))": replay_bytes(config, env_info),
        f"networks ({weights:,} weights x {copies:,} copies)": 4 * weights * copies,
        f"envs ({num_actors:,} actors x --envs-per-actor {config.envs_per_actor:,}"
        + (f" + --eval-episodes {config.eval_episodes:,})" if evaluating else ")"):
            env_bytes * (num_actors * config.envs_per_actor
                         + evaluating * config.eval_episodes)}
    if sum(needs.values()) > 0.8 * memory_bytes:
        parts = ", ".join(f"{what} {size / 2**30:.1f} GiB" for what, size in needs.items())
        fail(f"the run needs ~{sum(needs.values()) / 2**30:.1f} GiB and this machine has "
             f"{memory_bytes / 2**30:.1f} GiB: {parts}")


def replay_bytes(config: Config, env_info: EnvInfo) -> int:
    """What all of the run's shards hold when full."""
    from replay_server.buffer import ReplaySpec
    return config.replay_shards * ReplaySpec.of_run(config, env_info).nbytes


def check_messages_fit(config: Config, env_info: EnvInfo) -> None:
    """The largest messages the roles may exchange fit the wire's budget: an actor's insert
    (what a shard accepts at most) and a learner call's batch (each stack's frames sent once:
    at most two stacks of distinct frames an item); else no insert or sample could ever pass."""
    import numpy as np

    from common import wire
    from replay_server.buffer import ReplaySpec
    frame_bytes = math.prod(env_info.frame_shape) * np.dtype(env_info.obs_dtype).itemsize
    items = config.batch_size * config.learner_batches_per_call
    for what, size, fix in [
            ("an actor's insert", ReplaySpec.of_run(config, env_info).insert_schema().max_bytes,
             "lower --chunk-transitions or --envs-per-actor"),
            ("a learner call's batch", items * 2 * env_info.stack * frame_bytes,
             "lower --batch-size or --learner-batches-per-call")]:
        if size > wire.MAX_MESSAGE_BYTES:
            fail(f"{what} may take {size / 2**30:.1f} GiB, more than the "
                 f"{wire.MAX_MESSAGE_BYTES / 2**30:g} GiB a message may: {fix}")


def wait_for_room(config: Config, num_actors: int, timeout_s: float,
                  replay_bytes: int = 0) -> None:
    """Give an autoscaling cluster `timeout_s` to grow until every role fits; else end with
    the one line saying what is missing (instead of roles pending forever)."""
    deadline = time.monotonic() + timeout_s
    while (missing := missing_room(config, num_actors, replay_bytes)) is not None:
        if time.monotonic() >= deadline:
            waited = f" within --placement-timeout-s {timeout_s:g}" if timeout_s else ""
            fail(f"cannot place the run{waited}: {missing}")
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def place_roles(config: Config, env_info: EnvInfo, num_actors: int,
                checkpoint_root: str | None = None) -> Roles:
    """Every role restarts whenever its process dies; the learner and the shards then (and at
    a resume) start from the latest checkpoint under `checkpoint_root`."""
    import ray
    with native_output_hidden(not config.verbose):  # the roles' modules import TensorFlow
        from actors.evaluator_service import EvaluatorService
        from actors.service import ActorService
        from learner.service import LearnerService
        from replay_server.service import ReplayService

    resources = ray.cluster_resources()
    gpus = learner_gpus(config)
    # Learner and replay shards share the node marked as the learner host when there is one.
    on_host = resources.get(LEARNER_HOST, 0) >= 1
    shard_host = {LEARNER_HOST: 0.5 / config.replay_shards} if on_host else {}
    # Names show on the dashboard's Actors page and prefix the roles' log lines; roles find
    # each other by them.
    shard_names = [f"dqn-replay-{i}" for i in range(config.replay_shards)]
    # (The ignores: mypy types a class under @ray.remote as the class itself, without the
    # `options` of the ActorClass that Ray makes of it.)
    shards = [ReplayService.options(  # type: ignore[attr-defined]
        name=name, num_cpus=1, resources=shard_host, max_restarts=-1,
    ).remote(config, env_info, i, checkpoint_root) for i, name in enumerate(shard_names)]
    learner = LearnerService.options(  # type: ignore[attr-defined]
        name="dqn-learner", num_cpus=1, num_gpus=gpus,
        resources={LEARNER_HOST: 0.5} if on_host else {}, max_concurrency=4, max_restarts=-1,
    ).remote(config, env_info, shard_names, checkpoint_root)
    actors = [ActorService.options(  # type: ignore[attr-defined]
        name=f"dqn-actor-{i}", num_cpus=1, max_concurrency=3, max_restarts=-1,
    ).remote(config, env_info, i, num_actors, shard_names[i % len(shards)], "dqn-learner")
        for i in range(num_actors)]
    # Evaluations are short bursts between long pauses: no CPU slot of its own.
    evaluator = (EvaluatorService.options(  # type: ignore[attr-defined]
        name="dqn-evaluator", num_cpus=0, max_restarts=-1,
    ).remote(config, env_info, "dqn-learner") if config.eval_every_s > 0 else None)
    return Roles(shards, learner, actors, gpus, evaluator)


def wait_until_serving(roles: Roles, timeout_s: float = 600.0
                       ) -> tuple[LearnerStats, list[ReplayServiceStats]]:
    """The learner's and the shards' first stats, once their constructors (and restores) are
    done; a constructor's error ends the launch with its one line."""
    import ray
    try:
        learner, *shards = ray.get([roles.learner.stats.remote(),
                                    *[shard.stats.remote() for shard in roles.shards]],
                                   timeout=timeout_s)
        return learner, shards
    except ray.exceptions.GetTimeoutError:
        fail(f"the learner and the replay shards did not start within {timeout_s:.0f} s")
    except ray.exceptions.RayError as error:
        fail(first_error_line(error))


def first_error_line(error: Exception) -> str:
    """The line that names the problem in a Ray error's text (its last `...Error: ` line)."""
    lines = [line.strip() for line in str(error).splitlines()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return named[-1] if named else next((line for line in lines if line), repr(error))


def stop_roles(roles: Roles) -> None:
    """Stop in data-flow order and end the roles' processes (freeing the shards' names), for
    callers that place roles more than once in one Ray session."""
    import ray
    stop_in_order(roles, STOP_WAIT_S)
    for handle in roles.all:
        ray.kill(handle, no_restart=True)
    time.sleep(1.0)  # let the processes exit before the next placement


def wait_all(refs: list, timeout_s: float) -> list:
    """Each ref's value, or None where it did not answer within one shared `timeout_s` or
    its actor died: no role is waited on after another, and a dead one never hangs us."""
    import ray
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    values = []
    for ref in refs:
        try:
            values.append(ray.get(ref) if ref in ready else None)
        except ray.exceptions.RayActorError:
            values.append(None)
    return values


# --- Progress --------------------------------------------------------------------------------

class RunFailed(Exception):
    """The run cannot go on; the message is the one-line reason."""


ROLE_KINDS = ("actors", "replay", "learner", "evaluator")


@dataclass
class Progress:
    """Totals the launcher keeps from the roles' reports, and carries across restarts and
    resumes (`state()` goes into every checkpoint)."""
    frame_skip: int
    actor_steps: dict = field(default_factory=dict)  # actor index -> steps of its current life
    agent_steps_before: int = 0  # steps of actor lives that ended, and of earlier sittings
    returns: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    episodes: int = 0
    learner: LearnerStats | None = None  # its latest stats
    learner_answered: float | None = None  # when it last answered (time.monotonic)
    replay: ReplayTotals | None = None  # all shards' latest stats, summed
    replay_answered: float | None = None  # when all shards last answered (time.monotonic)
    restarts: dict = field(default_factory=lambda: dict.fromkeys(ROLE_KINDS, 0))
    lives: dict = field(default_factory=dict)  # (kind, index) -> the life token it last reported
    actor_versions: dict = field(default_factory=dict)  # live actor index -> its weights' version
    # Actor index -> (precision, rates it timed) of its latest report, for the summary.
    actor_compute: dict = field(default_factory=dict)
    elapsed_before_s: float = 0.0  # wall-clock of earlier sittings
    sitting: int = 1
    new_returns: list = field(default_factory=list)  # episodes since the last progress line
    evals: dict = field(default_factory=dict)  # "last" and "best" evaluation (EvalRecord)
    agent_steps_at_start: int = 0  # this sitting's start, for its rates
    updates_at_start: int = 0

    @property
    def agent_steps(self) -> int:
        return self.agent_steps_before + sum(self.actor_steps.values())

    @property
    def live_actors(self) -> int:
        """Actors that answered the latest round of reports."""
        return len(self.actor_versions)

    @property
    def policy_lag(self) -> int:
        """Weight versions the oldest live actor is behind the learner."""
        if not self.actor_versions or self.learner is None:
            return 0
        return max(self.learner.weight_version - min(self.actor_versions.values()), 0)

    def latest(self) -> tuple[LearnerStats, ReplayTotals]:
        """The learner's and the replay's latest figures: a run takes their first before its
        first round (`wait_until_serving`)."""
        if self.learner is None or self.replay is None:
            raise RuntimeError("the learner and the replay shards have not reported yet")
        return self.learner, self.replay

    @property
    def mean_return_100(self) -> float | None:
        return sum(self.returns) / len(self.returns) if self.returns else None

    def new_life(self, kind: str, index: int, life: str) -> bool:
        """Whether `life` is a restarted process of the role (its first report is not)."""
        last = self.lives.get((kind, index))
        self.lives[(kind, index)] = life
        if last is None or last == life:
            return False
        self.restarts[kind] += 1
        return True

    def absorb_actor(self, index: int, report: ActorReport) -> bool:
        """Takes an actor's report in; whether it came from a restarted process."""
        restarted = self.new_life("actors", index, report.life)
        if restarted:  # it counts from zero again
            self.agent_steps_before += self.actor_steps.get(index, 0)
        self.actor_steps[index] = report.agent_steps
        self.actor_compute[index] = (report.precision, report.precision_rates)
        for ret, _length in report.episodes:
            self.returns.append(ret)
            self.new_returns.append(ret)
            self.episodes += 1
        return restarted

    def actors_compute(self) -> dict:
        """What the actors' forward passes compute in (distinct precisions, sorted), and
        the rates the lowest-numbered actor timed (--actor-precision auto)."""
        if not self.actor_compute:
            return {"actor_precision": None, "actor_forward_obs_per_s": None}
        precisions = sorted({precision for precision, _ in self.actor_compute.values()})
        return {"actor_precision": ", ".join(precisions),
                "actor_forward_obs_per_s": self.actor_compute[min(self.actor_compute)][1]}

    def absorb_eval(self, record: dict) -> bool:
        """Takes an evaluation in; whether it is the best so far (a tie goes to the newer)."""
        self.evals["last"] = record
        best = record["mean"] >= self.evals.get("best", {"mean": -math.inf})["mean"]
        if best:
            self.evals["best"] = record
        return best

    def state(self, elapsed_s: float) -> dict:
        return {"agent_steps": self.agent_steps, "episodes": self.episodes,
                "returns": list(self.returns), "restarts": self.restarts,
                "elapsed_s": round(self.elapsed_before_s + elapsed_s, 3),
                "sitting": self.sitting, "evals": self.evals}

    @classmethod
    def from_state(cls, state: dict, frame_skip: int, where: str) -> "Progress":
        """The progress a checkpoint saved, for the next sitting; CheckpointError if any
        value is not what `state()` writes."""
        counts = [state.get(name) for name in ("agent_steps", "episodes", "sitting")]
        returns, restarts = state.get("returns"), state.get("restarts")
        if not (all(type(n) is int and n >= 0 for n in counts)
                and isinstance(returns, list) and len(returns) <= 100
                and all(type(r) in (int, float) and math.isfinite(r) for r in returns)
                and isinstance(restarts, dict) and set(restarts) == set(ROLE_KINDS)
                and all(type(n) is int and n >= 0 for n in restarts.values())
                and type(state.get("elapsed_s")) in (int, float) and state["elapsed_s"] >= 0
                and valid_evals(state.get("evals", {}))):
            raise CheckpointError(f"{where}: not the launcher progress of this project")
        return cls(frame_skip=frame_skip, agent_steps_before=state["agent_steps"],
                   returns=collections.deque(returns, maxlen=100), episodes=state["episodes"],
                   restarts=dict(restarts), elapsed_before_s=float(state["elapsed_s"]),
                   sitting=state["sitting"] + 1, evals=state.get("evals", {}))


def eval_record(result: dict, agent_steps: int) -> dict:
    """One evaluation as the launcher keeps it: at the agent steps when it was asked for."""
    returns = result["returns"]
    return {"mean": sum(returns) / len(returns), "std": statistics.pstdev(returns),
            "agent_steps": agent_steps, "weight_version": result["weight_version"],
            "episodes": len(returns), "returns": returns}


def valid_evals(evals) -> bool:
    def valid(record) -> bool:
        return (isinstance(record, dict)
                and all(type(record.get(name)) in (int, float) and math.isfinite(record[name])
                        for name in ("mean", "std", "agent_steps", "weight_version"))
                and isinstance(record.get("returns"), list))
    return isinstance(evals, dict) and set(evals) <= {"last", "best"} and all(
        valid(record) for record in evals.values())


@dataclass(frozen=True)
class ReplayTotals:
    """What the launcher shows of the replay shards, all together."""
    size: int
    samples_per_insert: float

    @classmethod
    def of(cls, shard_stats: list[ReplayServiceStats]) -> "ReplayTotals":
        inserted = sum(stats.total_inserted for stats in shard_stats)
        sampled = sum(stats.total_sampled for stats in shard_stats)
        return cls(sum(stats.size for stats in shard_stats),
                   sampled / inserted if inserted else 0.0)


def poll(roles: Roles, progress: Progress, wait_s: float = POLL_WAIT_S,
         silence_s: float = Config.role_timeout_s) -> None:
    """One round of reports from every role, all asked at once and waited on together for at
    most `wait_s`: a role that is restarting or stalled is left out of this round. RunFailed
    when the learner or a shard has not answered for `silence_s`."""
    import ray
    reports = wait_all([actor.report.remote() for actor in roles.actors], wait_s)
    progress.actor_versions.clear()
    for index, report in enumerate(reports):
        if report is None:
            continue
        if progress.absorb_actor(index, report):
            print(f"actor {index}'s process died; Ray restarted it", file=sys.stderr,
                  flush=True)
        progress.actor_versions[index] = report.weight_version
        if report.error:  # its loop died with the process alive: restart the process
            print(f"actor {index} failed; restarting it:\n{report.error}", file=sys.stderr)
            ray.kill(roles.actors[index], no_restart=False)
    learner_ref, *shard_refs = [roles.learner.stats.remote(),
                                *[shard.stats.remote() for shard in roles.shards]]
    learner, *shards = wait_all([learner_ref, *shard_refs], wait_s)
    now = time.monotonic()
    if learner is not None:
        if progress.new_life("learner", 0, learner.life):
            print(f"the learner's process died; Ray restarted it "
                  f"{origin(learner, 'from scratch (no checkpoint yet)')}",
                  file=sys.stderr, flush=True)
        progress.learner, progress.learner_answered = learner, now
        if learner.error:
            error = learner.error.strip()
            raise RunFailed(f"the learner failed:{chr(10) if chr(10) in error else ' '}{error}")
    elif why := start_failure(learner_ref):
        raise RunFailed(f"the learner's process died and could not start again: {why}")
    elif progress.learner_answered is not None and now - progress.learner_answered > silence_s:
        raise RunFailed(f"the learner has not answered for {silence_s:g} s")
    for index, (stats, ref) in enumerate(zip(shards, shard_refs)):
        if stats is not None and progress.new_life("replay", index, stats.life):
            print(f"replay shard {index}'s process died; Ray restarted it "
                  f"{origin(stats, 'empty (no checkpoint yet)')}", file=sys.stderr, flush=True)
        elif stats is None and (why := start_failure(ref)):
            raise RunFailed(f"replay shard {index}'s process died and could not start "
                            f"again: {why}")
    answered = [stats for stats in shards if stats is not None]
    if len(answered) == len(shards):
        progress.replay, progress.replay_answered = ReplayTotals.of(answered), now
    elif progress.replay_answered is not None and now - progress.replay_answered > silence_s:
        raise RunFailed(f"a replay shard has not answered for {silence_s:g} s")


def start_failure(ref) -> str | None:
    """Why the actor `ref` was sent to cannot come back (its constructor raised, so Ray will
    not restart it); None when it answered, is still on its way, or died otherwise."""
    import ray
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError as error:
        return first_error_line(error) if error.actor_init_failed else None
    except ray.exceptions.GetTimeoutError:
        return None
    return None


def origin(stats: LearnerStats | ReplayServiceStats, without_checkpoint: str) -> str:
    """What a (re)started learner or shard began from, as the launcher's lines say it."""
    if stats.restored_from and stats.passed_over:
        return f"from {stats.restored_from}, passing over newer ones: {stats.passed_over}"
    if stats.restored_from:
        return f"from {stats.restored_from}"
    if stats.passed_over:  # only a shard gets here: a learner without its state fails
        return f"empty, no snapshot it could read: {stats.passed_over}"
    return without_checkpoint


class Evaluations:
    """Asks the evaluator for an evaluation every `eval_every_s` (one at a time, never
    waited on) and takes each result in, at the agent steps when it was asked for. The
    weights of the best one so far are kept as `best_path`: DQN's latest weights are now and
    then a far worse policy than the ones just before them."""

    def __init__(self, roles: Roles, config: Config, best_path: Path):
        self.evaluator, self.every_s = roles.evaluator, config.eval_every_s
        self.best_path = best_path
        self.pending, self.asked_at_steps = None, 0
        self.next_due = time.monotonic() + self.every_s

    def poll(self, progress: Progress) -> dict | None:
        """The record of an evaluation that finished since the last call, if one did."""
        import ray
        if self.evaluator is None:
            return None
        record = None
        if self.pending is not None and ray.wait([self.pending], timeout=0)[0]:
            try:
                result = ray.get(self.pending)
                progress.new_life("evaluator", 0, result["life"])
                record = eval_record(result, self.asked_at_steps)
                if progress.absorb_eval(record):
                    write_output(self.best_path, result["weights_h5"])
            except ray.exceptions.RayError as error:  # restarting: ask again next time
                print(f"evaluation failed: {first_error_line(error)}", file=sys.stderr,
                      flush=True)
            self.pending = None
        if self.pending is None and time.monotonic() >= self.next_due:
            self.pending = self.evaluator.evaluate.remote()
            self.asked_at_steps = progress.agent_steps
            self.next_due = time.monotonic() + self.every_s
        return record


class ProgressLog:
    """A progress line on stdout and the same figures as TensorBoard scalars. Rates are taken
    over the last RATE_WINDOW_S seconds, so chunked inserts and batched updates do not make
    them jump from one line to the next."""

    def __init__(self, logdir: Path, config: Config, progress: Progress, started: float):
        with native_output_hidden(not config.verbose):  # TensorFlow's start-up lines
            import tensorflow as tf
            self.writer = tf.summary.create_file_writer(str(logdir))  # (and CUDA's)
        self.tf = tf
        self.config = config
        self.started = started
        self.window: collections.deque = collections.deque()
        self._sample(progress)

    def _sample(self, progress: Progress) -> None:
        now, (learner, _) = time.monotonic(), progress.latest()
        if self.window and learner.updates < self.window[-1][2]:
            self.window.clear()  # a learner restored from a checkpoint counts from there
        self.window.append((now, progress.agent_steps, learner.updates, learner.starved_s))
        while len(self.window) > 2 and now - self.window[1][0] >= RATE_WINDOW_S:
            self.window.popleft()

    def rates(self) -> dict:
        (t0, steps0, updates0, starved0), (t1, steps1, updates1, starved1) = \
            self.window[0], self.window[-1]
        dt = max(t1 - t0, 1e-9)
        return {"agent_steps_per_s": (steps1 - steps0) / dt,
                "updates_per_s": (updates1 - updates0) / dt,
                # The share of the window the learner sat without a batch, once it had begun.
                "learner_starved_fraction": min(max(starved1 - starved0, 0.0) / dt, 1.0)}

    def write(self, progress: Progress, evaluation: dict | None = None) -> dict:
        """The figures of this round as a progress line and TensorBoard scalars, with the
        episodes finished since the last call and `evaluation` if one finished."""
        self._sample(progress)
        steps, (learner, replay) = progress.agent_steps, progress.latest()
        figures = {**self.rates(),
                   "replay_size": replay.size, "episodes": progress.episodes,
                   "weight_version": learner.weight_version,
                   "target_syncs": learner.target_syncs, "loss": learner.loss,
                   "q_mean": learner.q_mean, "samples_per_insert": replay.samples_per_insert,
                   "live_actors": progress.live_actors, "policy_lag": progress.policy_lag}
        figures["env_frames_per_s"] = figures["agent_steps_per_s"] * progress.frame_skip
        if progress.mean_return_100 is not None:
            figures["mean_return_100"] = progress.mean_return_100
        ladder = self.config.epsilon_ladder_base is not None  # fixed per env: no one epsilon
        if not ladder:
            figures["epsilon"] = epsilon_at(self.config, steps)
        with self.writer.as_default(step=steps):
            for name, value in figures.items():
                self.tf.summary.scalar(name, value)
            if evaluation is not None:
                self._write_evaluation(evaluation)
        self.write_episodes(progress)
        print(self.line(progress, figures, ladder), flush=True)
        return figures

    def write_episodes(self, progress: Progress) -> None:
        """Each episode finished since the last call, as `episode/return`."""
        with self.writer.as_default(step=progress.agent_steps):
            for ret in progress.new_returns:
                self.tf.summary.scalar("episode/return", ret)
        progress.new_returns.clear()
        self.writer.flush()

    def _write_evaluation(self, record: dict) -> None:
        step = record["agent_steps"]  # the steps when the weights were taken
        self.tf.summary.scalar("eval/return_mean", record["mean"], step=step)
        self.tf.summary.scalar("eval/return_std", record["std"], step=step)
        self.tf.summary.histogram("eval/returns", record["returns"], step=step)

    def write_hparams(self, config: Config, env_info: EnvInfo) -> None:
        """The run's config on TensorBoard's HParams tab (with the metrics to compare by)."""
        from tensorboard.plugins.hparams import api as hparams
        values = {name: value if isinstance(value, (bool, int, float, str)) else str(value)
                  for name, value in config_to_json(config)["config"].items()
                  if value is not None}
        values["num_actions"] = env_info.num_actions
        with self.writer.as_default():
            hparams.hparams(values)
        self.writer.flush()

    def line(self, progress: Progress, figures: dict, ladder: bool) -> str:
        steps, mean = progress.agent_steps, progress.mean_return_100
        elapsed = time.monotonic() - self.started
        if ladder:
            phase = "eps ladder"
        elif steps < self.config.random_agent_steps:
            phase = f"random {steps:,}/{self.config.random_agent_steps:,}"
        else:
            phase = f"eps {figures['epsilon']:.3f}"
        left = time_left(self.config, progress, elapsed, figures["agent_steps_per_s"])
        return (f"{clock(elapsed)} | steps {steps:>11,} | "
                f"{figures['agent_steps_per_s']:6,.0f} steps/s "
                f"{figures['env_frames_per_s']:7,.0f} frames/s | "
                f"{figures['updates_per_s']:6.1f} upd/s | {phase} | "
                f"replay {figures['replay_size']:>9,} | episodes {progress.episodes:>7,} | "
                f"return100 {'   n/a' if mean is None else f'{mean:6.1f}'} | "
                f"weights v{figures['weight_version']} lag {figures['policy_lag']} | "
                f"actors {progress.live_actors}/{self.config.num_actors}"
                + (f" | eval {last['mean']:.1f}±{last['std']:.1f}"
                   if (last := progress.evals.get("last")) else "")
                + ("" if left is None else f" | left {clock(left)}"))


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def time_left(config: Config, progress: Progress, sitting_s: float,
              agent_steps_per_s: float) -> float | None:
    """Seconds until the nearer of the time and agent-step limits, when one is set."""
    left = []
    if config.max_seconds is not None:
        left.append(config.max_seconds - sitting_s)
    if config.total_agent_steps is not None and agent_steps_per_s > 0:
        left.append((config.total_agent_steps - progress.agent_steps) / agent_steps_per_s)
    return min(left) if left else None


# --- Checkpoints -----------------------------------------------------------------------------

def checkpoint_root(config: Config, logdir: Path) -> str:
    return config.checkpoint_dir or str(logdir / "checkpoints")


def write_checkpoint(roles: Roles, progress: Progress, store: CheckpointStore, keep: int,
                     elapsed_s: float, timeout_s: float = CHECKPOINT_WAIT_S) -> str | None:
    """Every role's part into a new checkpoint, then committed; None (with a line saying
    why) when a role did not deliver: the previous checkpoint stays the latest."""
    import ray
    started = time.monotonic()
    number = 0  # none yet: listing the checkpoints can fail too
    refs: list = []
    try:
        number = store.next_number()
        staging = store.staging(number)
        refs = [roles.learner.checkpoint.remote(store.root, staging),
                *[shard.checkpoint.remote(store.root, staging) for shard in roles.shards]]
        ray.get(refs, timeout=timeout_s)
        store.write_json(f"{staging}/{checkpoints.PROGRESS}", progress.state(elapsed_s))
        name = store.commit(number, keep)
    except (ray.exceptions.RayError, OSError, CheckpointError) as error:
        # The other roles may still be writing into the staged folder: let them finish first.
        left_s = max(0.0, started + timeout_s - time.monotonic())
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=left_s)
        if number:
            store.discard(number)
        which = f"checkpoint {number}" if number else "checkpoint"
        print(f"{which} not written: {first_error_line(error)}", file=sys.stderr, flush=True)
        return None
    print(f"checkpoint {store.describe(name)} ({time.monotonic() - started:.1f} s)", flush=True)
    return name


def load_resume_point(config: Config, run_dir: Path,
                      frame_skip: int) -> tuple[CheckpointStore, Progress]:
    """The checkpoint the run in `run_dir` carries on from, checked before anything starts."""
    try:
        store = CheckpointStore(checkpoint_root(config, run_dir))
        name = store.latest()
        if name is None:
            fail(f"{store.describe('')} holds no checkpoint to resume from")
        store.verify(name)
        where = f"{name}/{checkpoints.PROGRESS}"
        return store, Progress.from_state(store.read_json(where), frame_skip,
                                          store.describe(where))
    except CheckpointError as error:
        fail(str(error))


def check_new_logdir(logdir: Path) -> None:
    if (logdir / RUN_CONFIG).exists():
        fail(f"{logdir} already holds a run: `--resume {logdir}` carries it on, or choose "
             f"another --logdir")


def new_run_store(config: Config, logdir: Path) -> CheckpointStore:
    """The checkpoint store of a new run, which must hold no run yet."""
    check_new_logdir(logdir)
    try:
        store = CheckpointStore(checkpoint_root(config, logdir))
        if store.latest() is not None:
            fail(f"{store.describe('')} already holds checkpoints of another run")
    except CheckpointError as error:
        fail(str(error))
    return store


def write_run_config(record: dict, logdir: Path, store: CheckpointStore | None) -> None:
    """config.json into the run directory, and into `store` (a bucket) too, so that the run
    can be resumed from the bucket alone once the run directory's disk is gone."""
    data = (json.dumps(record, indent=2) + "\n").encode()
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        write_atomically(logdir / RUN_CONFIG, data)
    except OSError as error:  # without it the run could not be resumed
        fail(f"{logdir / RUN_CONFIG} not written: {error.strerror or error}")
    if store is not None:
        try:
            store.write_json(RUN_CONFIG, record)
        except OSError as error:
            fail(f"{store.describe(RUN_CONFIG)} not written: {error}")


def write_output(path: Path, data: bytes) -> str | None:
    """Writes one of the run's files (weights, summary); on failure (a full disk) nothing
    of it is left and the reason is returned, said in one line: the run goes on."""
    try:
        write_atomically(path, data)
    except OSError as error:
        reason = f"{path} not written: {error.strerror or error}"
        print(f"launch.py: {reason}", file=sys.stderr, flush=True)
        return reason
    return None


def run_record(config: Config, learner: LearnerStats) -> dict:
    """config.json: the config, and what it ran on (package versions, the git commit, how the
    learner computes)."""
    from importlib import metadata
    packages = ["ray", "tensorflow", "keras", "gymnasium", "ale-py", "numpy", "msgpack"]
    versions = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {**config_to_json(config), "learner": learner.compute(), "versions": versions,
            "git_commit": commit or None, "python": sys.version.split()[0]}


# --- Main ------------------------------------------------------------------------------------

def sitting_seed(seed: int, sitting: int) -> int:
    """The base seed of a sitting's roles: other games each sitting (the stride is odd, so
    2**30 sittings differ), within the base seeds' range that keeps every seed derived from
    it in ALE's (SEED_LIMIT)."""
    return (seed + SITTING_SEED_STRIDE * (sitting - 1)) % SEED_LIMIT


def resolve_logdir(config: Config) -> Path:
    if config.logdir:
        return Path(config.logdir)
    return Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


class Stop(KeyboardInterrupt):
    """A signal asking the run to stop, handled as Ctrl-C is."""


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT), SIGTERM (`ray job stop`, schedulers) and SIGHUP (a closed terminal)
    stop the run: a final checkpoint, weights and summary; the same signal again aborts.
    SIGINT is taken even where it was inherited ignored (a command started with `&` by a
    script); SIGHUP is left ignored where the user asked for that (`nohup`)."""
    def handler(signum, _frame):
        raise Stop(signal.Signals(signum).name)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config.address is None and os.environ.get("RAY_ADDRESS"):
        config = config.replace(address=os.environ["RAY_ADDRESS"])  # as `ray job submit` sets
    try:
        with native_output_hidden(not config.verbose):  # ALE's banner
            env_info = describe_env(config.env, config.max_episode_agent_steps,
                                    config.frame_stack)
    except EnvError as error:
        fail(str(error))
    in_place = config.resume is not None and checkpoints.is_local_root(config.resume)
    logdir = Path(config.resume) if config.resume and in_place else resolve_logdir(config)
    if config.resume:  # in place, or from a checkpoint store's URI into a new run directory
        if not in_place:
            check_new_logdir(logdir)
        store, progress = load_resume_point(config, logdir, env_info.frame_skip)
    else:
        store, progress = new_run_store(config, logdir), Progress(env_info.frame_skip)
    secure_ray_environment(config)
    local_cpus = os.cpu_count() or 1
    check_messages_fit(config, env_info)
    if config.address is None:  # every role will live on this machine
        import psutil
        check_fits_this_machine(config, env_info, local_cpus, psutil.virtual_memory().total)
    dashboard_url = connect_ray(
        config, actor_count(machine_layout(config, local_cpus, local=True)))
    started_ray = dashboard_url is not None
    stop_on_signals()  # after Ray's start, which installs a SIGTERM handler of its own
    import ray
    try:
        cpus = local_cpus if started_ray else int(ray.cluster_resources().get("CPU", 1))
        config = machine_layout(config, cpus, local=started_ray)
        # A local Ray cannot grow: what does not fit now never will (and its memory was
        # checked against the machine's).
        wait_for_room(config, actor_count(config),
                      0.0 if started_ray else config.placement_timeout_s,
                      0 if started_ray else replay_bytes(config, env_info))
        # Each sitting's actors play new games; the saved config keeps the base seed.
        roles_config = config.replace(
            seed=sitting_seed(config.seed, progress.sitting))
        roles = place_roles(roles_config, env_info, actor_count(config), store.root)
        learner, shards = wait_until_serving(roles)
        check_checkpoints_reachable(store, learner)
        progress.learner, progress.learner_answered = learner, time.monotonic()
        progress.replay, progress.replay_answered = ReplayTotals.of(shards), time.monotonic()
        for stats in shards:  # --resume verified the checkpoint; a shard may still refuse it
            if stats.passed_over:
                print(f"replay shard {stats.shard} starts {origin(stats, '')}",
                      file=sys.stderr, flush=True)
        progress.agent_steps_at_start, progress.updates_at_start = (progress.agent_steps,
                                                                    learner.updates)
        if not in_place:
            write_run_config(run_record(config, learner), logdir,
                             None if config.resume or store.local else store)
        resumed = (f" | resumed from {learner.restored_from} at "
                   f"{progress.agent_steps:,} agent steps" if config.resume else "")
        print(f"{config.preset}: {config.env} | {config.num_actors} actors x "
              f"{config.envs_per_actor} envs | {config.replay_shards} replay shard(s) | learner "
              f"on {learner.describe_compute()} | logdir {logdir}" + resumed
              + (f" | dashboard {dashboard_url}" if started_ray else "")
              + (" | INSECURE: no token authentication" if config.insecure else ""), flush=True)
        summary = run(config, env_info, roles, logdir, store, progress)
        print(json.dumps(summary), flush=True)
        return 0 if summary["status"] == "ok" else 1
    except KeyboardInterrupt:  # before training started, or a second signal while stopping
        print("\nlaunch.py: interrupted; no summary written", file=sys.stderr)
        return 130
    finally:
        if started_ray:
            ray.shutdown()


def check_checkpoints_reachable(store: CheckpointStore, learner: LearnerStats) -> None:
    """A local checkpoint directory is written by the learner's machine and committed by this
    one: they must be the same machine (the head of cluster.yaml is both)."""
    import ray
    if store.local and learner.node_ip != ray.util.get_node_ip_address():
        fail(f"--checkpoint-dir {store.root} is a local path, but the learner runs on another "
             f"machine ({learner.node_ip}): run launch.py on the learner's node, or give an "
             f"s3:// or gs:// URI")


def run(config: Config, env_info: EnvInfo, roles: Roles, logdir: Path, store: CheckpointStore,
        progress: Progress) -> dict:
    started = time.monotonic()
    log = ProgressLog(logdir, config, progress, started)
    log.write_hparams(config, env_info)
    evaluations = Evaluations(roles, config, logdir / BEST_WEIGHTS)
    next_checkpoint = started + config.checkpoint_every_s
    status, reason = "ok", None
    try:
        while True:
            time.sleep(config.report_every_s)
            poll(roles, progress, silence_s=config.role_timeout_s)
            log.write(progress, evaluations.poll(progress))
            now = time.monotonic()
            if now >= next_checkpoint:
                write_checkpoint(roles, progress, store, config.keep_checkpoints, now - started)
                next_checkpoint = time.monotonic() + config.checkpoint_every_s
            if limit_reached(config, progress, now - started):
                break
    except KeyboardInterrupt as stop:  # Stop, or a Ray call that re-raised it as a plain one
        name = str(stop) if str(stop) in ("SIGTERM", "SIGHUP") else "Ctrl-C"
        print(f"\n{name}: stopping the roles ({name} again aborts)", flush=True)
    except RunFailed as failure:
        status, reason = "failed", str(failure)
        print(f"launch.py: the run cannot go on: {reason}", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    wait_s = STOP_WAIT_S if status == "ok" else FAILED_STOP_WAIT_S
    stop_and_collect(roles, progress, wait_s)
    log.write_episodes(progress)
    write_checkpoint(roles, progress, store, config.keep_checkpoints, elapsed,
                     timeout_s=CHECKPOINT_WAIT_S if status == "ok" else wait_s)
    summary = make_summary(config, env_info, progress, elapsed, len(roles.actors))
    weights = wait_all([roles.learner.weights_h5.remote()], wait_s)[0]
    if weights is not None:
        unwritten = write_output(logdir / FINAL_WEIGHTS, weights)
        if unwritten is None:
            summary["weights"] = str(logdir / FINAL_WEIGHTS)
        elif status == "ok":  # the run's product is missing: it did not end well
            status, reason = "failed", unwritten
    if (logdir / BEST_WEIGHTS).is_file():
        summary["best_weights"] = str(logdir / BEST_WEIGHTS)
    summary.update(status=status, reason=reason)
    unwritten = write_output(logdir / "summary.json",
                             (json.dumps(summary, indent=2) + "\n").encode())
    if unwritten is not None and status == "ok":  # what stdout shows, and the exit code
        summary.update(status="failed", reason=unwritten)
    return summary


def limit_reached(config: Config, progress: Progress, sitting_s: float) -> bool:
    if config.max_seconds is not None and sitting_s >= config.max_seconds:
        return True
    if config.total_agent_steps is not None and progress.agent_steps >= config.total_agent_steps:
        return True
    mean = progress.mean_return_100
    if (config.target_mean_return is not None and len(progress.returns) == 100
            and mean is not None and mean >= config.target_mean_return):
        print(f"mean return of the last 100 episodes reached {config.target_mean_return}",
              flush=True)
        return True
    return False


def stop_in_order(roles: Roles, wait_s: float
                  ) -> tuple[list[ActorReport | None], LearnerStats | None]:
    """Stop in data-flow order: actors first, so the learner sees no new data, then the
    learner; each wait is bounded by `wait_s`, and a role that does not answer is skipped.
    Returns the actors' last reports and the learner's last stats (None where silent)."""
    reports = wait_all([actor.stop.remote() for actor in roles.actors], wait_s)
    return reports, wait_all([roles.learner.stop.remote()], wait_s)[0]


def stop_and_collect(roles: Roles, progress: Progress, wait_s: float = STOP_WAIT_S) -> None:
    """Stop the roles in order and take in their last figures."""
    reports, learner = stop_in_order(roles, wait_s)
    for index, report in enumerate(reports):
        if report is not None:
            progress.absorb_actor(index, report)
    if learner is not None:
        progress.learner = learner
    shards = wait_all([shard.stats.remote() for shard in roles.shards], wait_s)
    answered = [stats for stats in shards if stats is not None]
    if len(answered) == len(shards):
        progress.replay = ReplayTotals.of(answered)


def make_summary(config: Config, env_info: EnvInfo, progress: Progress, elapsed_s: float,
                 num_actors: int) -> dict:
    """This sitting's rates; totals over the whole run (all sittings)."""
    (learner, replay), steps = progress.latest(), progress.agent_steps
    updates = learner.updates
    sitting_steps = steps - progress.agent_steps_at_start
    sitting_updates = updates - progress.updates_at_start
    return {
        "preset": config.preset, "env": config.env, "seconds": round(elapsed_s, 2),
        "run_seconds": round(progress.elapsed_before_s + elapsed_s, 2),
        "sitting": progress.sitting,
        "num_actors": num_actors, "envs_per_actor": config.envs_per_actor,
        **learner.compute(), **progress.actors_compute(),
        "agent_steps": steps, "env_frames": steps * env_info.frame_skip, "updates": updates,
        "weight_version": learner.weight_version, "target_syncs": learner.target_syncs,
        "episodes": progress.episodes, "mean_return_100": progress.mean_return_100,
        "agent_steps_per_s": round(sitting_steps / elapsed_s, 2),
        "env_frames_per_s": round(sitting_steps * env_info.frame_skip / elapsed_s, 2),
        "updates_per_s": round(sitting_updates / elapsed_s, 2),
        "learner_starved_s": round(learner.starved_s, 2), "replay_size": replay.size,
        "samples_per_insert": round(replay.samples_per_insert, 3),
        "restarts": progress.restarts,
        # What rebuilds the network for the weights file, without guessing.
        "network": network_description(config, env_info),
        "eval_return_mean": {key: {name: record[name] for name in EVAL_SUMMARY_FIELDS}
                             for key, record in progress.evals.items()},
    }


EVAL_SUMMARY_FIELDS = ("mean", "std", "agent_steps", "weight_version", "episodes")


def network_description(config: Config, env_info: EnvInfo) -> dict:
    return {"env": config.env, "obs_shape": list(env_info.obs_shape),
            "num_actions": env_info.num_actions, "dueling": config.dueling,
            "mlp_hidden_units": list(config.mlp_hidden_units),
            "kind": "nature_cnn" if len(env_info.obs_shape) == 3 else "mlp"}


if __name__ == "__main__":
    sys.exit(main())
