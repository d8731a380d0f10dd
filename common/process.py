"""What every process of this project sets up before TensorFlow, ALE or Ray print anything."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator


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
