"""The Q-network builder shared by actors and learner, so their weights always line up."""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from keras import layers  # noqa: E402


def build_q_network(obs_shape: tuple[int, ...], num_actions: int,
                    mlp_hidden_units: tuple[int, ...] = (256, 256)) -> keras.Model:
    """Nature CNN (Mnih et al. 2015, as in the keras.io seed) for stacked frames (C, H, W) of
    uint8; an MLP for vector observations. Frames are scaled to [0, 1] inside the model, so
    uint8 travels everywhere and the float copy exists only on the device."""
    if len(obs_shape) == 3:
        return keras.Sequential([
            keras.Input(shape=obs_shape, dtype="uint8"),
            layers.Rescaling(1.0 / 255.0),
            layers.Permute((2, 3, 1)),  # stacks arrive channels-first; Conv2D wants last
            layers.Conv2D(32, 8, strides=4, activation="relu"),
            layers.Conv2D(64, 4, strides=2, activation="relu"),
            layers.Conv2D(64, 3, strides=1, activation="relu"),
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dense(num_actions, activation="linear", dtype="float32"),
        ], name="nature_cnn")
    if len(obs_shape) == 1:
        hidden = [layers.Dense(units, activation="relu") for units in mlp_hidden_units]
        return keras.Sequential([
            keras.Input(shape=obs_shape, dtype="float32"), *hidden,
            layers.Dense(num_actions, activation="linear", dtype="float32"),
        ], name="mlp")
    raise ValueError(f"no Q-network for observations of shape {obs_shape}; "
                     "expected (stack, height, width) frames or a flat vector")


def configure_cpu_threads(num_threads: int) -> None:
    """Call before the first TensorFlow op: several processes share few cores, and TF's
    default of one pool per core each makes them fight."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(num_threads)
