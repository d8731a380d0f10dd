"""One Ray session for all integration tests (ray.init costs ~5 s), on loopback only."""
import errno
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import keep_local_ray_on_loopback

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keep_local_ray_on_loopback()  # every Ray the tests start, as a local launch.py run's


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, what: str, timeout: float, every: float) -> None:
    """Polls `condition` every `every` s until it holds; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)


@pytest.fixture(scope="session")
def ray_address():
    """Address of a local Ray that `launch.py --address` joins; metrics report every 0.5 s."""
    import ray

    from launch import LEARNER_HOST
    context = ray.init(num_cpus=6, resources={LEARNER_HOST: 1}, include_dashboard=False,
                       _system_config={"metrics_report_interval_ms": 500})
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """An S3-compatible bucket on loopback (tests/buckets.py) for the whole session."""
    from tests.buckets import Bucket
    with Bucket() as bucket:
        yield bucket


@pytest.fixture
def prerequisites():
    """What hosts in network namespaces need (tests/hosts.py): skipped without it, failed in
    CI."""
    from tests.hosts import missing_prerequisite
    problem = missing_prerequisite()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {problem}")
        pytest.skip(problem)


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


# --- Full disks: a real small filesystem -------------------------------------------------------

PAGE = 4096  # tmpfs counts whole pages


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size_kib, inodes=None)`: a tmpfs of that size (and inode count) mounted on a new
    folder under tmp_path, unmounted at the end (also when the test fails)."""
    mounted = []

    def mount(size_kib: int, inodes: int | None = None) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size_kib}k" + (f",nr_inodes={inodes}" if inodes else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            reason = (f"a full disk needs a tmpfs mount, which is not permitted here "
                      f"(root and CAP_SYS_ADMIN): {result.stderr.strip()}")
            if os.environ.get("CI"):
                pytest.fail(f"CI is set but {reason}")
            pytest.skip(reason)
        mounted.append(folder)
        return folder

    if os.geteuid() != 0:
        reason = "a full disk needs a tmpfs mount, which only root may make"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


def fill(disk: Path, leave_bytes: int) -> None:
    """Fills `disk` until only `leave_bytes` (whole pages) are free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    assert free >= leave_bytes, (free, leave_bytes)
    with open(disk / "filler", "ab") as filler:
        filler.write(b"\0" * (free - leave_bytes))
    stats = os.statvfs(disk)
    assert stats.f_bavail * stats.f_frsize == leave_bytes


def fill_inodes(disk: Path) -> None:
    """Uses up `disk`'s inodes: no file or folder can be made any more."""
    for i in itertools.count():
        try:
            (disk / f"inode-{i}").touch()
        except OSError as error:
            assert error.errno == errno.ENOSPC
            return


def leftovers(disk: Path) -> list[str]:
    """Anything a failed write may leave: temporary files, staging folders."""
    return sorted(str(path.relative_to(disk)) for path in disk.rglob("*")
                  if ".tmp" in path.name or path.name.startswith("dqn-"))
