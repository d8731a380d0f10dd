"""One Ray session for all integration tests (ray.init costs ~5 s), on loopback only."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import keep_local_ray_on_loopback

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keep_local_ray_on_loopback()  # every Ray the tests start, as a local launch.py run's


@pytest.fixture(scope="session")
def ray_address():
    """Address of a local Ray that `launch.py --address` joins; metrics report every 0.5 s."""
    import ray

    from launch import LEARNER_HOST
    context = ray.init(num_cpus=6, resources={LEARNER_HOST: 1}, include_dashboard=False,
                       _system_config={"metrics_report_interval_ms": 500})
    yield context.address_info["gcs_address"]
    ray.shutdown()


def tensorboard_scalars(logdir, name: str) -> list[tuple[int, float]]:
    """(step, value) of every scalar `name` in the TensorBoard events under `logdir`."""
    import tensorflow as tf
    values = []
    for events in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == name:
                    values.append((event.step, float(tf.make_ndarray(value.tensor))))
    return sorted(values)


def evaluate(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python evaluate.py ARGS` as a user runs it, its output captured."""
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
