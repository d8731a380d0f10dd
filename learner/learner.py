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

from dataclasses import dataclass

import numpy as np

from common.checkpoints import CheckpointError
from common.config import Config
from common.env_info import EnvInfo
from common.networks import build_q_network, keras, tf, weights_h5_bytes

BATCH_FIELDS = ("obs", "action", "reward", "discount", "next_obs", "weight")


@dataclass(frozen=True)
class UpdateResult:
    """What one `DQNLearner.step` (k updates) reports."""
    loss: float  # of the last update
    # The online network's mean Q(s, a) over the last batch's taken actions: the figure that
    # shows values growing (or diverging) long before returns move.
    q_mean: float
    td_error: np.ndarray  # [k, batch_size]: y - Q(s, a), the new priorities' source


def tensor_cores_present() -> bool:
    """A GPU of compute capability 7.0 or newer, where float16 runs on tensor cores."""
    for gpu in tf.config.list_physical_devices("GPU"):
        if tf.config.experimental.get_device_details(gpu).get("compute_capability",
                                                              (0, 0)) >= (7, 0):
            return True
    return False


class DQNLearner:
    def __init__(self, config: Config, env_info: EnvInfo):
        self.config = config
        keras.utils.set_random_seed(config.seed)
        self.mixed_precision = (tensor_cores_present() if config.mixed_precision is None
                                else config.mixed_precision)
        build = lambda: build_q_network(env_info.obs_shape, env_info.num_actions,  # noqa: E731
                                        config.mlp_hidden_units, config.dueling,
                                        self.mixed_precision)
        self.online = build()
        self.target = build()
        clip = ({"global_clipnorm": config.grad_clip_norm} if config.grad_clip_global
                else {"clipnorm": config.grad_clip_norm})
        self.optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate, **clip)
        if self.mixed_precision:  # float16 gradients underflow unless the loss is scaled up
            self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(self.online.trainable_variables)
        # Per-item losses, weighted and averaged here: Keras's own sample_weight reduction
        # divides by the sum of the weights, which would undo the importance weights' scale.
        self.huber = keras.losses.Huber(reduction=None)
        self.updates = 0
        self.target_syncs = 0
        self.sync_target()
        self.target_syncs = 0  # the initial copy is not a scheduled sync
        self._train_steps = tf.function(self._train_steps_body, jit_compile=config.xla)
        self._td_error = tf.function(self._td_error_body, jit_compile=config.xla)

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
        variables = self.online.weights if online_only else [
            *self.online.weights, *self.target.weights, *self.optimizer.variables]
        return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables
                   if tf.as_dtype(v.dtype).is_floating)

    def _checkpoint(self, counters: dict) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(
            online=self.online, target=self.target, optimizer=self.optimizer,
            counters={name: value if isinstance(value, tf.Variable)
                      else tf.Variable(value, dtype=tf.int64)
                      for name, value in counters.items()})

    def get_weights(self) -> list[np.ndarray]:
        return self.online.get_weights()

    def weights_h5_bytes(self) -> bytes:
        """The online network as a Keras `.weights.h5` file's bytes."""
        return weights_h5_bytes(self.online)

