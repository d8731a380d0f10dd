"""The DQN learner without Ray: online and target networks, the Huber/Adam update, weights out.

The update, written as the equation:
    y      = r + discount * Q_target(s', a*)     a* = argmax_a' Q_target(s', a')    (DQN)
                                                 a* = argmax_a' Q(s', a')           (double DQN)
    loss   = mean_i  w_i * Huber(y_i - Q(s_i, a_i))      (delta 1; w_i = 1 under uniform replay)
where r is the n-step return and discount = gamma^n, or 0 where the episode terminated. The
seed's quirk of a -1 target at terminal steps is not copied: a terminal step bootstraps with
zero, as in the DQN paper. |y - Q(s, a)| goes back to prioritized replay as the new priority.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from common.checkpoints import CheckpointError
from common.config import Config
from common.env_info import EnvInfo
from common.networks import build_q_network, keras, resolve_precision, tf, weights_h5_bytes
from common.timing import calls_per_second_in_turns

BATCH_FIELDS = ("obs", "action", "reward", "discount", "next_obs", "weight")


@dataclass(frozen=True)
class UpdateResult:
    """What one `DQNLearner.step` (k updates) reports."""
    loss: float  # of the last update
    # The online network's mean Q(s, a) over the last batch's taken actions: the figure that
    # shows values growing (or diverging) long before returns move.
    q_mean: float
    td_error: np.ndarray  # [k, batch_size]: y - Q(s, a), the new priorities' source


# Seconds of train steps `choose_compile_mode` times each way, after its compile.
COMPILE_PROBE_S = 1.5


def synthetic_batch(env_info: EnvInfo, batch_size: int, k: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """k random batches stacked, of the shapes and dtypes replay samples."""
    shape = (k, batch_size)
    obs: np.ndarray
    next_obs: np.ndarray
    if env_info.obs_dtype == "uint8":
        obs, next_obs = (rng.integers(0, 256, shape + env_info.obs_shape, dtype=np.uint8)
                         for _ in range(2))
    else:
        obs, next_obs = (rng.normal(size=shape + env_info.obs_shape).astype(np.float32)
                         for _ in range(2))
    return {"obs": obs, "next_obs": next_obs,
            "action": rng.integers(0, env_info.num_actions, shape).astype(np.int32),
            "reward": rng.normal(size=shape).astype(np.float32),
            "discount": np.where(rng.random(shape) < 0.1, 0.0, 0.99).astype(np.float32),
            "weight": np.ones(shape, np.float32)}


def last_loss(train_steps, args: list) -> float:
    """A compiled train step's last loss: reading it waits until the device is done."""
    return float(train_steps(*args)[0][-1])


class DQNLearner:
    """`config.learner_precision` is resolved here (`precision`). `config.xla` "on" and "off"
    are taken as they are; "auto" compiles with XLA until `choose_compile_mode` (which
    LearnerService calls) has timed both ways."""

    def __init__(self, config: Config, env_info: EnvInfo):
        self.config, self.env_info = config, env_info
        keras.utils.set_random_seed(config.seed)
        self.precision = resolve_precision(config.learner_precision, env_info.obs_shape)
        build = lambda: build_q_network(env_info.obs_shape, env_info.num_actions,  # noqa: E731
                                        config.mlp_hidden_units, config.dueling,
                                        self.precision)
        self.online = build()
        self.target = build()
        clip = ({"global_clipnorm": config.grad_clip_norm} if config.grad_clip_global
                else {"clipnorm": config.grad_clip_norm})
        # Checkpoints hold this Adam alone, so they restore into every precision; a float16
        # learner wraps it in a loss scale (float16 gradients underflow unless the loss is
        # scaled up; bfloat16 has float32's range), which starts afresh at each restore.
        self.adam = keras.optimizers.Adam(learning_rate=config.learning_rate, **clip)
        self.optimizer = (keras.optimizers.LossScaleOptimizer(self.adam)
                          if self.precision == "float16" else self.adam)
        self.optimizer.build(self.online.trainable_variables)
        # Per-item losses, weighted and averaged here: Keras's own sample_weight reduction
        # divides by the sum of the weights, which would undo the importance weights' scale.
        self.huber = keras.losses.Huber(reduction=None)
        self.updates = 0
        self.target_syncs = 0
        self.sync_target()
        self.target_syncs = 0  # the initial copy is not a scheduled sync
        # Updates/s of each compile mode ("xla", "plain") once `choose_compile_mode` timed them.
        self.compile_rates: dict[str, float] | None = None
        xla = config.xla != "off"
        self._use_compile_mode(xla, tf.function(self._train_steps_body, jit_compile=xla))

    def _use_compile_mode(self, xla: bool, train_steps) -> None:
        self.xla = xla
        self._train_steps = train_steps
        self._td_error = tf.function(self._td_error_body, jit_compile=xla)

    def choose_compile_mode(self, seconds_each: float = COMPILE_PROBE_S) -> None:
        """Times the train step compiled with XLA and as a plain tf.function on a synthetic
        batch of the run's shapes, each after its compile and a warm-up call, for about
        `seconds_each` of steps each, taking turns (`calls_per_second_in_turns`); keeps the
        faster. The networks and the optimizer
        are left as they were."""
        batch = synthetic_batch(self.env_info, self.config.batch_size,
                                self.config.learner_batches_per_call, np.random.default_rng(0))
        args = [batch[name] for name in BATCH_FIELDS]
        saved = [variable.numpy() for variable in self._state_variables()]
        ways = {xla: tf.function(self._train_steps_body, jit_compile=xla)
                for xla in (True, False)}
        for way in ways.values():
            for _ in range(2):  # compile, warm up
                last_loss(way, args)
        calls = calls_per_second_in_turns(
            {xla: functools.partial(last_loss, way, args) for xla, way in ways.items()},
            seconds_each)
        for variable, value in zip(self._state_variables(), saved):
            variable.assign(value)
        rate = {xla: round(calls[xla] * self.config.learner_batches_per_call, 2)
                for xla in ways}
        self.compile_rates = {"xla": rate[True], "plain": rate[False]}
        faster = rate[True] >= rate[False]  # as reported
        self._use_compile_mode(faster, ways[faster])

    def _state_variables(self) -> list:
        """Everything an update changes: both networks, the optimizer's slots and step."""
        return [*self.online.weights, *self.target.weights, *self.optimizer.variables]

    def _target(self, reward, discount, next_obs):
        next_q = self.target(next_obs, training=False)
        if self.config.double_dqn:
            next_action = tf.argmax(self.online(next_obs, training=False), axis=1,
                                    output_type=tf.int32)
            next_value = tf.gather(next_q, next_action, axis=1, batch_dims=1)
        else:
            next_value = tf.reduce_max(next_q, axis=1)
        return reward + discount * next_value

    def _update(self, obs, action, reward, discount, next_obs, weight):
        y = self._target(reward, discount, next_obs)
        with tf.GradientTape() as tape:
            q = self.online(obs, training=True)
            q_taken = tf.gather(q, action, axis=1, batch_dims=1)
            loss = tf.reduce_mean(weight * self.huber(tf.stop_gradient(y)[:, None],
                                                      q_taken[:, None]))
            # Keras's hook: the identity for plain Adam; under mixed precision the loss-scaling
            # optimizer scales here, unscales the gradients, and skips a step that overflowed.
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.online.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.online.trainable_variables))
        return loss, y - q_taken, tf.reduce_mean(q_taken)

    def _train_steps_body(self, obs, action, reward, discount, next_obs, weight):
        """k sequential updates on k stacked batches in one call (k is static: unrolled)."""
        losses, tds, q_means = [], [], []
        for i in range(obs.shape[0]):
            loss, td, q_mean = self._update(obs[i], action[i], reward[i], discount[i],
                                            next_obs[i], weight[i])
            losses.append(loss)
            tds.append(td)
            q_means.append(q_mean)
        return tf.stack(losses), tf.stack(tds), tf.stack(q_means)

    def _td_error_body(self, obs, action, reward, discount, next_obs):
        y = self._target(reward, discount, next_obs)
        return y - tf.gather(self.online(obs, training=False), action, axis=1, batch_dims=1)

    def step(self, batches: dict[str, np.ndarray]) -> UpdateResult:
        """One update per batch of `batches` (arrays shaped [k, batch_size, ...]); syncs the
        target network when its period comes round (periods are multiples of k)."""
        losses, td, q_means = self._train_steps(*(batches[name] for name in BATCH_FIELDS))
        self.updates += len(losses)
        if self.updates % self.config.target_sync_updates == 0:
            self.sync_target()
        return UpdateResult(float(losses[-1]), float(q_means[-1]), td.numpy())

    def td_error(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """TD errors of one unstacked batch under the current networks (no update)."""
        return self._td_error(*(batch[name] for name in BATCH_FIELDS[:-1])).numpy()

    def sync_target(self) -> None:
        for target_var, online_var in zip(self.target.weights, self.online.weights):
            target_var.assign(online_var)
        self.target_syncs += 1

    # Save and restore: TensorFlow's own checkpoint format (an index and tensor data, no code),
    # holding both networks, the optimizer's slots and step, and the counters.
    def save(self, prefix: str, counters: dict[str, int]) -> None:
        """Writes `prefix.index` and `prefix.data-*`: the whole training state, with
        `counters` (the caller's, e.g. the weight version) saved beside the learner's own."""
        self._checkpoint({"updates": self.updates, "target_syncs": self.target_syncs,
                          **counters}).write(prefix)

    def restore(self, prefix: str, counter_names: tuple[str, ...] = ()) -> dict[str, int]:
        """Loads what `save` wrote, checked: every saved value must find its variable and
        every variable a saved value of its shape, and all must be finite. Returns the
        caller's counters. A bad checkpoint raises CheckpointError naming it; this learner
        is then unusable (build a new one)."""
        counters = {name: tf.Variable(-1, dtype=tf.int64)
                    for name in ("updates", "target_syncs", *counter_names)}
        try:
            self._checkpoint(counters).read(prefix).assert_consumed()
        except Exception as error:  # TF's reader raises many kinds for a damaged file
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise CheckpointError(f"{prefix}: not a learner checkpoint for this network "
                                  f"({first})") from None
        if not self.state_finite():
            raise CheckpointError(f"{prefix}: holds non-finite weights")
        values = {name: int(variable.numpy()) for name, variable in counters.items()}
        if min(values.values()) < 0:
            raise CheckpointError(f"{prefix}: negative counters {values}")
        self.updates, self.target_syncs = values.pop("updates"), values.pop("target_syncs")
        return values

    def state_finite(self, online_only: bool = False) -> bool:
        """Whether every float of the networks (and the optimizer's slots) is finite: an
        update can overflow the weights while the loss it reports, computed before it, is
        still finite."""
        variables = self.online.weights if online_only else self._state_variables()
        return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables
                   if tf.as_dtype(v.dtype).is_floating)

    def _checkpoint(self, counters: dict) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(
            online=self.online, target=self.target, optimizer=self.adam,
            counters={name: value if isinstance(value, tf.Variable)
                      else tf.Variable(value, dtype=tf.int64)
                      for name, value in counters.items()})

    def get_weights(self) -> list[np.ndarray]:
        return self.online.get_weights()

    def weights_h5_bytes(self) -> bytes:
        """The online network as a Keras `.weights.h5` file's bytes."""
        return weights_h5_bytes(self.online)

