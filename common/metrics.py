"""Names, descriptions, kinds and tags of the custom metrics every role exports.

Ray serves them at each node's metrics export port as `ray_<name>`: counters end in `_total`,
histograms come as `_bucket`, `_sum` and `_count`, gauges keep the bare name
(`prometheus_names()` lists them all; `dashboards/dqn.json` charts them in Grafana).

Every series is tagged by the role that updates it: `role` ("actor", "learner", "replay",
"evaluator"), plus the actor's index as `actor` and the replay shard's as `shard`. A role
owns its names (`ROLES`), so each name has one set of tag keys in every process, and queries
read `sum by (actor) (rate(ray_dqn_agent_steps_total[1m]))` or
`max(ray_dqn_weight_version) - min(ray_dqn_actor_weight_version)` (the policy lag).
The objects are made inside the process that updates them (`for_role`):
`ray.util.metrics` needs a worker.
"""
from __future__ import annotations

from typing import Any

# Actors.
AGENT_STEPS = "dqn_agent_steps"
ENV_FRAMES = "dqn_env_frames"
EPISODES = "dqn_episodes"
EPISODE_RETURN = "dqn_episode_return"
EPSILON = "dqn_epsilon"
ACTOR_WEIGHT_VERSION = "dqn_actor_weight_version"
# The learner.
UPDATES = "dqn_updates"
TARGET_SYNCS = "dqn_target_syncs"
WEIGHT_VERSION = "dqn_weight_version"
LEARNER_STARVED = "dqn_learner_starved_seconds"
LOSS = "dqn_loss"
Q_MEAN = "dqn_q_mean"
# Replay shards.
REPLAY_SIZE = "dqn_replay_size"
REPLAY_INSERTS = "dqn_replay_inserted_transitions"
REPLAY_SAMPLES = "dqn_replay_sampled_transitions"
REPLAY_SAMPLES_PER_INSERT = "dqn_replay_samples_per_insert"
REPLAY_REJECTED = "dqn_replay_rejected_messages"
# The evaluator.
EVAL_RETURN_MEAN = "dqn_eval_return_mean"

DESCRIPTIONS = {
    AGENT_STEPS: "Actions taken by the actor.",
    ENV_FRAMES: "Emulator frames played (agent steps x frame skip).",
    EPISODES: "Episodes finished.",
    EPISODE_RETURN: "Undiscounted game score of each finished episode.",
    EPSILON: "The actor's probability of a random action, mean over its envs.",
    ACTOR_WEIGHT_VERSION: "Version of the weights the actor plays with (-1 before the first).",
    UPDATES: "Learner gradient updates.",
    TARGET_SYNCS: "Target-network syncs.",
    WEIGHT_VERSION: "Version of the newest weights the learner published.",
    LEARNER_STARVED: "Seconds the learner waited for a batch after its first update (held by "
                     "the rate limiter when samples per insert sits at its target).",
    LOSS: "Learner loss of the latest update.",
    Q_MEAN: "Online network's mean Q(s, a) over the latest batch's taken actions.",
    REPLAY_SIZE: "Transitions held by the replay shard.",
    REPLAY_INSERTS: "Transitions inserted into replay.",
    REPLAY_SAMPLES: "Transitions sampled from replay.",
    REPLAY_SAMPLES_PER_INSERT: "Transitions sampled per transition inserted, since the start.",
    REPLAY_REJECTED: "Messages (inserts, priority updates) refused as malformed.",
    EVAL_RETURN_MEAN: "Mean game score of the latest evaluation of the greedy policy.",
}
COUNTERS = {AGENT_STEPS, ENV_FRAMES, EPISODES, UPDATES, TARGET_SYNCS, LEARNER_STARVED,
            REPLAY_INSERTS, REPLAY_SAMPLES, REPLAY_REJECTED}
# Bucket upper bounds (Ray wants them positive: scores at or below 1, Pong's negative ones
# too, land in the first bucket; the mean from _sum/_count stays exact). Roughly log-spaced
# up to CartPole's 500, with room around its 195 goal; Atari scores past 500 go to +Inf.
EPISODE_RETURN_BOUNDARIES = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 400, 500)
HISTOGRAMS = {EPISODE_RETURN: EPISODE_RETURN_BOUNDARIES}

ACTOR, LEARNER, REPLAY, EVALUATOR = "actor", "learner", "replay", "evaluator"
ROLES = {
    ACTOR: (AGENT_STEPS, ENV_FRAMES, EPISODES, EPISODE_RETURN, EPSILON, ACTOR_WEIGHT_VERSION),
    LEARNER: (UPDATES, TARGET_SYNCS, WEIGHT_VERSION, LEARNER_STARVED, LOSS, Q_MEAN),
    REPLAY: (REPLAY_SIZE, REPLAY_INSERTS, REPLAY_SAMPLES, REPLAY_SAMPLES_PER_INSERT,
             REPLAY_REJECTED),
    EVALUATOR: (EVAL_RETURN_MEAN,),
}
ROLE_TAG = "role"
INDEX_TAGS = {ACTOR: "actor", REPLAY: "shard"}  # the tag that tells a role's members apart


def role_tags(role: str, index: int | None = None) -> dict[str, str]:
    """The tags of `role`'s series: {"role": role} and, for actors and shards, the index."""
    tags = {ROLE_TAG: role}
    if role in INDEX_TAGS:
        if index is None:
            raise ValueError(f"a {role}'s metrics need its index")
        tags[INDEX_TAGS[role]] = str(index)
    return tags


def for_role(role: str, index: int | None = None) -> dict[str, Any]:
    """All of `role`'s metric objects, keyed by name, tagged with `role_tags`; call inside a
    Ray worker."""
    return make(*ROLES[role], tags=role_tags(role, index))


def make(*names: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Ray metric objects for `names`, keyed by name, labelled with `tags`; call inside a Ray
    worker. (Typed Any: each is a Counter, Gauge or Histogram, as its name says.)"""
    from ray.util.metrics import Counter, Gauge, Histogram
    made: dict[str, Any] = {}
    for name in names:
        description, tag_keys = DESCRIPTIONS[name], tuple(tags or ())
        if name in HISTOGRAMS:
            made[name] = Histogram(name, description, list(HISTOGRAMS[name]), tag_keys)
        elif name in COUNTERS:
            made[name] = Counter(name, description, tag_keys)
        else:
            made[name] = Gauge(name, description, tag_keys)
        if tags:
            made[name].set_default_tags(tags)
    return made


def prometheus_names() -> set[str]:
    """Every series name Ray exports for these metrics (what dashboards may query)."""
    names = set()
    for name in DESCRIPTIONS:
        if name in COUNTERS:
            names.add(f"ray_{name}_total")
        elif name in HISTOGRAMS:
            names.update(f"ray_{name}_{part}" for part in ("bucket", "sum", "count"))
        else:
            names.add(f"ray_{name}")
    return names
