"""The hosts harness (tests/hosts.py) makes hosts as separate as containers: each reached over
real SSH with the harness's key, with its own address, /tmp, /dev/shm and processes, no way
out of the subnet; a killed host loses everything, a cut one keeps running unreachable, and
nothing of them is left afterwards, also when the body raised or an earlier run crashed."""
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.hosts import (
    LOCK,
    PREFIX,
    TOOLS,
    WORKDIR_PARENT,
    Host,
    Hosts,
    HostsError,
    HostsUnavailable,
)

pytestmark = pytest.mark.cluster

PYTHON = shlex.quote(sys.executable)  # the shared install, as on an NFS-mounted home
PORT = 8000
# Connects to each ADDRESS:PORT argument; prints one line each: "ok" or the errno's name,
# and the seconds it took.
PROBE = """
import errno, socket, sys, time
timeout = float(sys.argv[1])
for target in sys.argv[2:]:
    address, port = target.rsplit(":", 1)
    start = time.monotonic()
    try:
        socket.create_connection((address, int(port)), timeout=timeout).close()
        result = "ok"
    except OSError as error:
        result = errno.errorcode.get(error.errno or 0, type(error).__name__)
    print(result, round(time.monotonic() - start, 3))
"""


@pytest.fixture
def hosts(prerequisites):
    with Hosts(2) as hosts:
        yield hosts


def probe(hosts: Hosts, host: Host, *targets: str, timeout: float = 1) -> list[tuple[str, float]]:
    """What connecting from `host` to each target gives: ("ok" or errno name, seconds)."""
    command = f"{PYTHON} -c {shlex.quote(PROBE)} {timeout} {' '.join(targets)}"
    lines = hosts.ssh(host, command).stdout.splitlines()
    return [(result, float(seconds)) for result, seconds in map(str.split, lines)]


def answers(address: str, port: int = PORT, timeout: float = 1) -> bool:
    """Whether a connection from this machine's namespace (the laptop) to address:port opens."""
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def serve(hosts: Hosts, host: Host) -> None:
    """An HTTP server on the host's address, started over SSH and left running; its PID (as
    the host numbers it) in /tmp/server.pid."""
    hosts.ssh(host, f"cd /tmp; nohup {PYTHON} -m http.server {PORT} --bind {host.address} "
                    ">/tmp/server.log 2>&1 </dev/null & echo $! >/tmp/server.pid")
    wait_until(lambda: answers(host.address), f"the server on {host.name}", 10, every=0.05)


def server_alive(hosts: Hosts, host: Host) -> bool:
    return hosts.inside(host, "kill -0 $(cat /tmp/server.pid)", check=False).returncode == 0


def machine_address() -> str | None:
    """This machine's address on its real network, if it has one."""
    route = subprocess.run(["ip", "-o", "route", "get", "1.1.1.1"], capture_output=True,
                           text=True, timeout=10).stdout.split()
    return route[route.index("src") + 1] if "src" in route else None


def prefixed_names(*argv: str) -> list[str]:
    output = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    return [word for word in output.split() if word.startswith(PREFIX)]


def running(pids: set[int]) -> list[int]:
    """Those of `pids` still running (a zombie only waits for its parent to reap it)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def assert_nothing_left(workdir: Path, pids: set[int]) -> None:
    assert prefixed_names("ip", "netns", "list") == []
    assert prefixed_names("ip", "-o", "link") == []
    assert not workdir.exists() and list(WORKDIR_PARENT.glob(f"{PREFIX}*")) == []
    found = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True,
                           timeout=10)
    assert found.stdout == "", found.stdout  # no sshd of theirs
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


# --- each host is a machine of its own ------------------------------------------------------

def test_each_host_runs_commands_over_ssh_with_its_own_address_name_and_processes(hosts):
    for host in hosts:
        name, addresses, processes = hosts.ssh(
            host, "hostname; hostname -I; cat /proc/[0-9]*/comm | sort -u | tr '\\n' ' '"
        ).stdout.splitlines()
        assert name == host.name
        assert addresses.split() == [host.address]
        # Its own /proc: sshd is its PID 1 and no process of the machine or another host
        # shows (`ray stop` kills every Ray process it sees).
        assert set(processes.split()) <= {"sshd", "bash", "sh", "cat", "sort", "tr"}, processes
        assert hosts.inside(host, "cat /proc/1/comm").stdout.strip() == "sshd"
        # Ray finds a host's address through its name when it has no route out.
        assert hosts.ssh(host, f"getent hosts {host.name}").stdout.split()[0] == host.address


def test_only_the_harness_key_logs_in(hosts):
    argv = hosts.ssh_argv(hosts[0], "true")
    key = argv.index("-i")
    del argv[key:key + 2]  # the default keys of whoever runs this
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 255 and "Permission denied" in result.stderr, result


def test_each_host_has_its_own_tmp_dev_shm_and_home(hosts):
    mark = f"mark-{uuid.uuid4().hex}"
    first, second = hosts
    hosts.ssh(first, f"for d in /tmp /dev/shm ~; do echo {first.name} >$d/{mark}; done")
    # What SSH started wrote where the host's later processes see it...
    assert hosts.ssh(first, f"cat /tmp/{mark} /dev/shm/{mark} ~/{mark}").stdout.split() == [
        first.name] * 3
    assert hosts.inside(first, f"cat /tmp/{mark}").stdout.strip() == first.name
    # ... and neither another host nor the machine does.
    assert hosts.ssh(second, f"ls -A /tmp /dev/shm ~ | grep -c {mark}",
                     check=False).stdout.strip() == "0"
    home = Path.home()
    assert not any(Path(folder, mark).exists() for folder in ("/tmp", "/dev/shm", home))
    # The home reads as the machine's: its Python install runs there.
    listed = hosts.ssh(first, f"ls -A ~ && {PYTHON} -c 'import ray'").stdout.split()
    assert set(listed) == {path.name for path in home.iterdir()} | {mark}


# --- the network: only the subnet ------------------------------------------------------------

def test_a_server_on_one_host_answers_the_other_and_the_laptop(hosts):
    first, second = hosts
    serve(hosts, first)
    assert probe(hosts, second, f"{first.address}:{PORT}")[0][0] == "ok"
    fetched = hosts.ssh(second, f"{PYTHON} -c 'import urllib.request; print(urllib.request."
                                f"urlopen(\"http://{first.address}:{PORT}/\").status)'")
    assert fetched.stdout.strip() == "200"
    with socket.create_server((hosts.bridge_address, 0)) as laptop:  # e.g. the S3 bucket
        port = laptop.getsockname()[1]
        assert probe(hosts, second, f"{hosts.bridge_address}:{port}")[0][0] == "ok"


def test_a_host_reaches_nothing_outside_the_subnet(hosts):
    assert "default" not in hosts.ssh(hosts[0], "ip route").stdout
    outside = ["1.1.1.1:53"] + ([f"{address}:22"] if (address := machine_address()) else [])
    for result, seconds in probe(hosts, hosts[0], *outside):
        assert result == "ENETUNREACH" and seconds < 0.5, (outside, result, seconds)


# --- faults -----------------------------------------------------------------------------------

def test_a_killed_host_loses_every_process_and_its_tmp_and_restarts_empty(hosts):
    first, second = hosts
    serve(hosts, first)
    hosts.inside(first, "sleep 600 >/dev/null 2>&1 </dev/null & echo x >/dev/shm/mark")
    hosts.ssh(first, "echo kept >~/disk-mark")
    before = hosts.pids(first)
    assert len(before) >= 3  # sshd, the server, sleep
    hosts.kill(first)
    assert hosts.pids(first) == set()
    assert [pid for pid in before if Path(f"/proc/{pid}").exists()] == []
    assert not answers(first.address)
    start = time.monotonic()
    refused = hosts.ssh(first, "true", check=False, connect_timeout=3)
    assert refused.returncode == 255 and time.monotonic() - start < 5, refused
    assert hosts.ssh(second, "hostname").stdout.strip() == second.name  # the others live
    hosts.restart(first)
    assert hosts.ssh(first, "ls -A /tmp /dev/shm").stdout.split() == ["/dev/shm:", "/tmp:"]
    assert hosts.ssh(first, "cat ~/disk-mark").stdout.strip() == "kept"  # its disk
    assert probe(hosts, second, f"{first.address}:22")[0][0] == "ok"


def test_a_cut_host_is_unreachable_while_its_processes_run_on_and_mend_brings_it_back(hosts):
    first, second = hosts
    serve(hosts, first)
    hosts.cut(first)
    assert not answers(first.address)
    assert probe(hosts, second, f"{first.address}:{PORT}")[0][0] != "ok"
    assert server_alive(hosts, first)
    own = hosts.inside(first, f"{PYTHON} -c {shlex.quote(PROBE)} 1 {first.address}:{PORT}")
    assert own.stdout.split()[0] == "ok"  # its processes still talk to each other
    hosts.mend(first)
    wait_until(lambda: answers(first.address), f"{first.name} after mend", 10, every=0.05)
    assert probe(hosts, second, f"{first.address}:{PORT}")[0][0] == "ok"
    assert hosts.ssh(first, "hostname").stdout.strip() == first.name


# --- nothing left ------------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["returns", "raises"])
def test_teardown_leaves_nothing(prerequisites, body):
    with pytest.raises(RuntimeError) if body == "raises" else nullcontext():
        with Hosts(2) as hosts:
            workdir = hosts.workdir
            assert workdir is not None
            hosts.ssh(hosts[0], "nohup sleep 600 >/dev/null 2>&1 </dev/null &")
            pids = hosts.pids(hosts[0]) | hosts.pids(hosts[1])
            if body == "raises":
                raise RuntimeError("the test failed")
    assert_nothing_left(workdir, pids)


def test_leftovers_of_a_crashed_run_are_removed_at_start(prerequisites):
    crashed = Hosts(2).__enter__()  # never left: as if its process had been SIGKILLed
    assert crashed._lock is not None and crashed.workdir is not None
    crashed._lock.close()  # a dead process holds no lock
    workdir, pids = crashed.workdir, crashed.pids(crashed[0]) | crashed.pids(crashed[1])
    with Hosts(1) as hosts:
        assert not workdir.exists() and running(pids) == []
        assert prefixed_names("ip", "netns", "list") == [hosts[0].namespace]
        assert hosts.ssh(hosts[0], "hostname").stdout.strip() == hosts[0].name
        last = hosts.workdir
        assert last is not None
    for host in crashed:
        assert host.process is not None
        host.process.wait(timeout=10)  # reaps what the next run killed
    assert_nothing_left(last, set())


def test_a_second_set_of_hosts_is_refused_while_one_is_up(hosts):
    with pytest.raises(HostsError, match=f"another set of hosts is up.*{LOCK}"):
        Hosts(1).__enter__()
    assert hosts.ssh(hosts[0], "hostname").stdout.strip() == hosts[0].name  # left alone


def test_a_subnet_in_use_is_refused(prerequisites):
    with pytest.raises(HostsError, match=r"subnet 127\.0\.0\.0/24 is already in use"):
        Hosts(1, subnet="127.0.0.0/24").__enter__()
    assert list(WORKDIR_PARENT.glob(f"{PREFIX}*")) == []


def test_a_missing_tool_is_named_with_how_to_install_it(prerequisites, tmp_path, monkeypatch):
    for tool in TOOLS:
        if tool != "sshd":
            (tmp_path / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HostsUnavailable,
                       match=r"`sshd` is not on PATH.*apt-get install openssh-server rsync"):
        Hosts(1).__enter__()
