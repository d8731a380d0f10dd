"""The single-process baseline: DQN on Breakout as the keras.io example "Deep Q-Learning for
Atari Breakout" runs it, one process, one env, timed.

    python benchmarks/single_process.py [seconds=60] [random_agent_steps=50000]

Everything follows that example, on purpose untuned, because it is what a user of it runs and
so what the distributed system is compared against (benchmarks/throughput.py):
- one gymnasium env (`BreakoutNoFrameskip-v4`, `AtariPreprocessing`, 4-frame
  `FrameStackObservation`), reset with seed 42;
- one eager forward pass of the Nature CNN per greedy step (batch of one), epsilon falling
  from 1.0 to 0.1 over 1M agent steps after the random phase;
- replay in Python lists of whole stacked states (state and next state both kept), 100,000
  long, the oldest dropped with `del list[:1]`;
- every 4th agent step once more than 32 transitions are stored: a uniform batch of 32 built
  with `np.array` over list items, the target network's `predict`, a Huber/Adam step
  (learning rate 0.00025, clipnorm 1) under a `GradientTape`; the example's target of -1 at
  terminal steps included;
- the target network copied every 10,000 agent steps.

It stops after `seconds` and prints one JSON line: agent_steps_per_s and updates_per_s over
the whole time, and the counts they came from.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ale_py
import gymnasium as gym
import keras
import numpy as np
import tensorflow as tf
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation
from keras import layers

SEED = 42
GAMMA = 0.99
EPSILON_MIN, EPSILON_MAX = 0.1, 1.0
EPSILON_GREEDY_AGENT_STEPS = 1_000_000
BATCH_SIZE = 32
MAX_STEPS_PER_EPISODE = 10_000
MAX_MEMORY_LENGTH = 100_000
UPDATE_EVERY_AGENT_STEPS = 4
TARGET_SYNC_AGENT_STEPS = 10_000
NUM_ACTIONS = 4


def make_env() -> gym.Env:
    gym.register_envs(ale_py)
    env = gym.make("BreakoutNoFrameskip-v4")
    env = FrameStackObservation(AtariPreprocessing(env), 4)
    env.reset(seed=SEED)
    return env


def create_q_model() -> keras.Model:
    """The example's Nature CNN: stacks arrive (4, 84, 84) and are transposed channels-last."""
    return keras.Sequential([
        keras.Input(shape=(4, 84, 84)),
        layers.Lambda(lambda x: keras.ops.transpose(x, [0, 2, 3, 1]), output_shape=(84, 84, 4)),
        layers.Conv2D(32, 8, strides=4, activation="relu"),
        layers.Conv2D(64, 4, strides=2, activation="relu"),
        layers.Conv2D(64, 3, strides=1, activation="relu"),
        layers.Flatten(),
        layers.Dense(512, activation="relu"),
        layers.Dense(NUM_ACTIONS, activation="linear"),
    ])


class ListReplay:
    """The example's replay: five parallel Python lists, oldest item dropped past the cap."""

    def __init__(self):
        self.actions, self.states, self.next_states, self.rewards, self.dones = [], [], [], [], []

    def __len__(self) -> int:
        return len(self.dones)

    def add(self, state, action, reward, next_state, done) -> None:
        self.actions.append(action)
        self.states.append(state)
        self.next_states.append(next_state)
        self.dones.append(done)
        self.rewards.append(reward)
        if len(self.rewards) > MAX_MEMORY_LENGTH:
            for items in (self.rewards, self.states, self.next_states, self.actions, self.dones):
                del items[:1]

    def sample(self):
        indices = np.random.choice(range(len(self.dones)), size=BATCH_SIZE)
        return (np.array([self.states[i] for i in indices]),
                np.array([self.next_states[i] for i in indices]),
                [self.rewards[i] for i in indices],
                [self.actions[i] for i in indices],
                keras.ops.convert_to_tensor([float(self.dones[i]) for i in indices]))


def train_step(model, model_target, optimizer, loss_function, replay: ListReplay) -> None:
    states, next_states, rewards, actions, dones = replay.sample()
    future_rewards = model_target.predict(next_states, verbose=0)
    targets = rewards + GAMMA * keras.ops.amax(future_rewards, axis=1)
    targets = targets * (1 - dones) - dones  # the example's -1 at terminal steps
    masks = keras.ops.one_hot(actions, NUM_ACTIONS)
    with tf.GradientTape() as tape:
        q_values = model(states)
        q_action = keras.ops.sum(keras.ops.multiply(q_values, masks), axis=1)
        loss = loss_function(targets, q_action)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))


def run(seconds: float, random_agent_steps: int) -> dict:
    env = make_env()
    model, model_target = create_q_model(), create_q_model()
    optimizer = keras.optimizers.Adam(learning_rate=0.00025, clipnorm=1.0)
    loss_function = keras.losses.Huber()
    replay = ListReplay()
    epsilon = EPSILON_MAX
    agent_steps = updates = episodes = 0
    started = time.time()
    while time.time() - started < seconds:
        observation, _ = env.reset()
        state = np.array(observation)
        for _ in range(1, MAX_STEPS_PER_EPISODE):
            agent_steps += 1
            if agent_steps < random_agent_steps or epsilon > np.random.rand(1)[0]:
                action = np.random.choice(NUM_ACTIONS)
            else:
                state_tensor = keras.ops.expand_dims(keras.ops.convert_to_tensor(state), 0)
                action = keras.ops.argmax(model(state_tensor, training=False)[0]).numpy()
            epsilon = max(epsilon - (EPSILON_MAX - EPSILON_MIN) / EPSILON_GREEDY_AGENT_STEPS,
                          EPSILON_MIN)
            next_observation, reward, done, _, _ = env.step(action)
            next_state = np.array(next_observation)
            replay.add(state, action, reward, next_state, done)
            state = next_state
            if agent_steps % UPDATE_EVERY_AGENT_STEPS == 0 and len(replay) > BATCH_SIZE:
                train_step(model, model_target, optimizer, loss_function, replay)
                updates += 1
            if agent_steps % TARGET_SYNC_AGENT_STEPS == 0:
                model_target.set_weights(model.get_weights())
            if done or time.time() - started >= seconds:
                break
        episodes += 1
    elapsed = time.time() - started
    env.close()
    return {"agent_steps_per_s": round(agent_steps / elapsed, 2),
            "updates_per_s": round(updates / elapsed, 3),
            "agent_steps": agent_steps, "updates": updates, "episodes": episodes,
            "seconds": round(elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seconds", nargs="?", type=float, default=60.0,
                        help="How long to run (default: 60).")
    parser.add_argument("random_agent_steps", nargs="?", type=int, default=50_000,
                        help="Agent steps of uniformly random play before epsilon-greedy "
                             "(the example's 50,000; 0 times the training phase at once).")
    args = parser.parse_args(argv)
    if not args.seconds > 0 or args.random_agent_steps < 0:
        parser.error("seconds must be positive and random_agent_steps >= 0")
    print(json.dumps(run(args.seconds, args.random_agent_steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
