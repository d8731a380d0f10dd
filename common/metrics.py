"""Names of the custom metrics every role exports to the Ray dashboard.

Ray serves them at each node's metrics export port as `ray_<name>` (counters end in `_total`).
The objects are made inside the process that updates them: `ray.util.metrics` needs a worker.
"""
from __future__ import annotations

AGENT_STEPS = "dqn_agent_steps"
ENV_FRAMES = "dqn_env_frames"
EPISODES = "dqn_episodes"
EPISODE_RETURN = "dqn_episode_return"
UPDATES = "dqn_updates"
TARGET_SYNCS = "dqn_target_syncs"
WEIGHT_VERSION = "dqn_weight_version"
LEARNER_STARVED = "dqn_learner_starved_seconds"
REPLAY_SIZE = "dqn_replay_size"
REPLAY_INSERTS = "dqn_replay_inserted_transitions"
REPLAY_SAMPLES = "dqn_replay_sampled_transitions"
REPLAY_REJECTED = "dqn_replay_rejected_messages"
EVAL_RETURN_MEAN = "dqn_eval_return_mean"

DESCRIPTIONS = {
    AGENT_STEPS: "Actions taken by all actors.",
    ENV_FRAMES: "Emulator frames played (agent steps x frame skip).",
    EPISODES: "Episodes finished.",
    EPISODE_RETURN: "Undiscounted game score of the latest finished episode.",
    UPDATES: "Learner gradient updates.",
    TARGET_SYNCS: "Target-network syncs.",
    WEIGHT_VERSION: "Version of the newest weights the learner published.",
    LEARNER_STARVED: "Seconds the learner waited for a batch after its first update.",
    REPLAY_SIZE: "Transitions held by the replay service.",
    REPLAY_INSERTS: "Transitions inserted into replay.",
    REPLAY_SAMPLES: "Transitions sampled from replay.",
    REPLAY_REJECTED: "Messages (inserts, priority updates) refused as malformed.",
    EVAL_RETURN_MEAN: "Mean game score of the latest evaluation of the greedy policy.",
}
COUNTERS = {AGENT_STEPS, ENV_FRAMES, EPISODES, UPDATES, TARGET_SYNCS, LEARNER_STARVED,
            REPLAY_INSERTS, REPLAY_SAMPLES, REPLAY_REJECTED}


def make(*names: str, tags: dict[str, str] | None = None) -> dict:
    """Ray metric objects for `names`, keyed by name, labelled with `tags` (e.g. the replay
    shard); call inside a Ray worker."""
    from ray.util.metrics import Counter, Gauge
    made = {}
    for name in names:
        kind = Counter if name in COUNTERS else Gauge
        made[name] = kind(name, description=DESCRIPTIONS[name], tag_keys=tuple(tags or ()))
        if tags:
            made[name].set_default_tags(tags)
    return made
