"""What every process of this project sets up before TensorFlow, ALE or Ray print anything,
and how to find one Ray cluster's worker processes on this machine."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

# TensorFlow reads these when it is first imported. TensorFlow turns its oneDNN kernels on only
# for CPUs with AVX-512 VNNI/BF16 or AMX; on AVX2-only CPUs they are off, yet make the learner
# and the actors' forward pass faster there (see benchmarks/throughput.py); set
# TF_ENABLE_ONEDNN_OPTS=0 to opt out.
PROCESS_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
               "TF_ENABLE_ONEDNN_OPTS": "1"}


def configure_process() -> None:
    """The environment TensorFlow and Keras read at import, where the user did not set it.
    `common/__init__.py` calls it, so it runs before any module of this project (which takes
    TensorFlow and Keras from `common.networks`) imports them; Ray workers get PROCESS_ENV
    through their runtime env as well."""
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def native_output_hidden(hide: bool = True) -> Iterator[Callable[[], str]]:
    """Hold back what native code writes straight to file descriptors 1 and 2 inside the block
    (TensorFlow's and CUDA's start-up lines, which no log level stops before absl starts
    logging; ALE's banner). If the block raises, what was held back is written out, so a real
    failure still shows everything. Yields a function that returns what was held so far, for
    a block that wants to read it (e.g. to name a failure it catches)."""
    if not hide:
        yield lambda: ""
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)

        def held_so_far() -> str:  # pread: the writers' shared file offset stays put
            sys.stdout.flush()
            sys.stderr.flush()
            size = os.fstat(held.fileno()).st_size
            return os.pread(held.fileno(), size, 0).decode(errors="replace")

        try:
            yield held_so_far
        except BaseException:
            _restore(saved)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        _restore(saved)


def _restore(saved: list[int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)


def cluster_workers(gcs_address: str) -> list:
    """The worker processes (`psutil.Process`) of the Ray cluster at `gcs_address` on this
    machine: children of a raylet whose command line names that cluster, so never another
    Ray's on the same machine, such as a user's training run beside a test."""
    import psutil
    raylets = {p.pid for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet"
               and f"--gcs-address={gcs_address} " in " ".join(p.info["cmdline"] or []) + " "}
    return [p for p in psutil.process_iter(["ppid"]) if p.info["ppid"] in raylets]
