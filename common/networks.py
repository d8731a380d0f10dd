"""The Q-network builder shared by actors and learner, so their weights always line up; and
the one place the project imports TensorFlow and Keras from (after `common` set their
environment)."""
from __future__ import annotations

import os
import tempfile

import keras
import tensorflow as tf
from keras import layers

# The Keras dtype policy of the hidden layers for each learner precision (None: float32).
MIXED_POLICIES = {"float32": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
# CPU flags of fast bfloat16 matrix math: x86's AVX512-BF16 and AMX-BF16, Arm's BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def auto_precision(gpu_capability: tuple[int, int] | None, cpu_info: str,
                   convolutional: bool = True) -> str:
    """What a precision of "auto" picks for a network (`convolutional`: the Nature CNN;
    else the MLP of vector observations) on a GPU of `gpu_capability` (None: a CPU, whose
    /proc/cpuinfo text is `cpu_info`). bfloat16 needs no loss scale, so it comes first
    wherever the hardware computes it natively: GPUs from Ampere (8.0) on, CPUs with
    BF16_CPU_FLAGS (elsewhere it is emulated, slower than float32). Volta and Turing (7.x)
    have float16 tensor cores only. An MLP of a few hundred units is too small to gain: its
    step is the casts and the calls around the math (CartPole's: 1,540 updates/s in bfloat16,
    1,834 in float32 on an AVX512-BF16 CPU), so it stays float32."""
    if not convolutional:
        return "float32"
    if gpu_capability is not None:
        if gpu_capability >= (8, 0):
            return "bfloat16"
        return "float16" if gpu_capability >= (7, 0) else "float32"
    flags: set[str] = set()
    for line in cpu_info.splitlines():
        key, _, values = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            flags.update(values.split())
    return "bfloat16" if flags & BF16_CPU_FLAGS else "float32"


def resolve_precision(setting: str, obs_shape: tuple[int, ...]) -> str:
    """`setting`, or for "auto" `auto_precision` of the network for `obs_shape` on this
    process's device (its first GPU, where TensorFlow places the networks)."""
    if setting != "auto":
        return setting
    convolutional = len(obs_shape) == 3  # as build_q_network decides
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return auto_precision(tuple(details.get("compute_capability", (0, 0))), "",
                              convolutional)
    try:
        with open("/proc/cpuinfo") as file:
            cpu_info = file.read()
    except OSError:  # not Linux: no flags to read, no claim of bfloat16
        cpu_info = ""
    return auto_precision(None, cpu_info, convolutional)


def build_q_network(obs_shape: tuple[int, ...], num_actions: int,
                    mlp_hidden_units: tuple[int, ...] = (256, 256),
                    dueling: bool = False, precision: str = "float32") -> keras.Model:
    """Nature CNN (Mnih et al. 2015, as in the keras.io seed) for stacked frames (C, H, W) of
    uint8; an MLP for vector observations. Frames are scaled to [0, 1] inside the model, so
    uint8 travels everywhere and the float copy exists only on the device. With `dueling`
    (Wang et al. 2016) the last hidden layer splits into a value and an advantage stream,
    Q = V + A - mean(A). With `precision` "bfloat16" or "float16" the hidden layers compute
    in it on float32 weights (Keras mixed precision); Q-values always come out float32."""
    dtype = MIXED_POLICIES[precision]
    head_units: tuple[int, ...]
    if len(obs_shape) == 3:
        inputs = keras.Input(shape=obs_shape, dtype="uint8")
        x = layers.Rescaling(1.0 / 255.0, dtype=dtype)(inputs)
        x = layers.Permute((2, 3, 1), dtype=dtype)(x)  # stacks arrive channels-first
        x = layers.Conv2D(32, 8, strides=4, activation="relu", dtype=dtype)(x)
        x = layers.Conv2D(64, 4, strides=2, activation="relu", dtype=dtype)(x)
        x = layers.Conv2D(64, 3, strides=1, activation="relu", dtype=dtype)(x)
        features, head_units, name = layers.Flatten(dtype=dtype)(x), (512,), "nature_cnn"
    elif len(obs_shape) == 1:
        inputs = keras.Input(shape=obs_shape, dtype="float32")
        features, head_units, name = inputs, tuple(mlp_hidden_units), "mlp"
    else:
        raise ValueError(f"no Q-network for observations of shape {obs_shape}; "
                         "expected (stack, height, width) frames or a flat vector")
    if not dueling:
        return keras.Model(inputs, _head(features, head_units, num_actions, dtype), name=name)
    value = _head(features, head_units, 1, dtype)
    advantage = _head(features, head_units, num_actions, dtype)
    q = DuelingCombine(dtype="float32")([value, advantage])
    return keras.Model(inputs, q, name=f"dueling_{name}")


def _head(x, hidden_units: tuple[int, ...], outputs: int, dtype: str | None):
    for units in hidden_units:
        x = layers.Dense(units, activation="relu", dtype=dtype)(x)
    return layers.Dense(outputs, activation="linear", dtype="float32")(x)


@keras.saving.register_keras_serializable(package="dqn")
class DuelingCombine(layers.Layer):
    """Q = V + A - mean_a(A): the mean keeps V and A identifiable."""

    def call(self, inputs):
        value, advantage = inputs
        return value + advantage - keras.ops.mean(advantage, axis=1, keepdims=True)


def weights_h5_bytes(model: keras.Model) -> bytes:
    """The model's weights as a Keras `.weights.h5` file's bytes (no pickle, no code)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q_network.weights.h5")
        model.save_weights(path)
        with open(path, "rb") as f:
            return f.read()


def configure_cpu_threads(num_threads: int) -> None:
    """Call before the first TensorFlow op: several processes share few cores, and TF's
    default of one pool per core each makes them fight."""
    tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(num_threads)
