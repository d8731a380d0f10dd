"""An S3-compatible bucket for the tests that keep checkpoints in one: moto's server (PyPI
`moto[server]`), a real HTTP endpoint in a process of its own, reached through pyarrow with the
standard variables (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...) exactly as a cloud bucket is;
nothing inside the tested process is replaced.

    with Bucket("127.0.0.1") as bucket:
        env = {**os.environ, **bucket.env}          # what launch.py and the roles are given
        root = bucket.uri("run-1")                  # s3://dqn-checkpoints/run-1
"""
from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import free_port, wait_until

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))
NAME = "dqn-checkpoints"
START_TIMEOUT = 60  # s: the server answering (it imports boto and Flask first, ~3 s idle)
STOP_TIMEOUT = 10
POLL_S = 0.2


class Bucket:
    """One bucket on a moto server listening on `host` (loopback, or the hosts' bridge so that
    other network namespaces reach it); the server stops when the block ends."""

    def __init__(self, host: str = "127.0.0.1", log: Path | None = None):
        self.host, self.port = host, free_port()
        self.endpoint = f"http://{host}:{self.port}"
        # moto takes any keys; these are what a user's environment would carry.
        self.env = {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "dqn-test",
                    "AWS_SECRET_ACCESS_KEY": "dqn-test-secret", "AWS_REGION": "us-east-1"}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def uri(self, path: str = "") -> str:
        return f"s3://{NAME}/{path}" if path else f"s3://{NAME}"

    def __enter__(self) -> Bucket:
        output = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [MOTO_SERVER, "-H", self.host, "-p", str(self.port)], stdin=subprocess.DEVNULL,
            stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(self._answers, f"moto's S3 server at {self.endpoint}", START_TIMEOUT,
                       every=POLL_S)
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _answers(self) -> bool:
        assert self.process is not None and self.process.poll() is None, \
            f"{MOTO_SERVER} exited with {self.process and self.process.returncode}"
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).close()
        except (urllib.error.URLError, OSError):
            return False
        return True

    def _create(self) -> None:
        from pyarrow import fs
        store = fs.S3FileSystem(access_key=self.env["AWS_ACCESS_KEY_ID"],
                                secret_key=self.env["AWS_SECRET_ACCESS_KEY"],
                                endpoint_override=self.endpoint, region=self.env["AWS_REGION"],
                                allow_bucket_creation=True)
        store.create_dir(NAME)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)

