"""N hosts on this one machine, made as containers would be from what Debian ships.

Each host is a network namespace with its own address on a bridge, its own /tmp, /dev/shm and
/proc (a mount and a PID namespace), its own hostname and /etc/hosts, and Debian's sshd serving
a key this harness generates. The rest of the filesystem (/work, ...) is shared, as an
NFS-mount would be. The SSH user's home (/root, which holds the Python install) is an overlay:
each host reads the machine's, and what it writes there (`ray up`'s file mounts, a `pip
install` on the node) stays its own, like a disk of its own that survives a crash; without it
a node's `pip install -e` would rewrite the install every other host and the machine use.
The machine's own namespace plays the user's laptop and "the cloud": it holds the bridge's
first address.

    with Hosts(3) as hosts:
        hosts.ssh(hosts[0], "hostname")
        hosts.kill(hosts[1])   # a crash: every process gone, with its /tmp and /dev/shm
                               # (its home's writes stay, as on a disk)
        hosts.restart(hosts[1])
        hosts.cut(hosts[2])    # its cable pulled: its processes run on, unreachable
        hosts.mend(hosts[2])

The subnet exists only on the bridge: hosts have no default route and there is no NAT, so
their traffic stays among them and the bridge address. Each host has its own PID namespace
because `ray stop` (which `ray up` runs) kills every Ray process it can see in /proc: with a
shared /proc it would kill the other hosts' Ray and the machine's own.

Everything is named with PREFIX and torn down on leaving the `with`, also when its body
raises; what a crashed run left is removed when the next one starts. One set of hosts runs on
a machine at a time (a lock file).
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

PREFIX = "dqnh-"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.213.47.0/24"  # unused here; Hosts(subnet=...) takes another
FIRST_HOST = 10  # host i gets the subnet's address 10 + i; the bridge has 1
SSH_USER = "root"
SSH_PORT = 22
# Not under /tmp: each host's own /tmp would hide it from the host's sshd.
WORKDIR_PARENT = Path("/var/tmp")
LOCK = WORKDIR_PARENT / "dqnh.lock"
# Every tool the hosts need, with the Debian package that ships it.
TOOLS = {"ip": "iproute2", "sshd": "openssh-server", "ssh": "openssh-client",
         "ssh-keygen": "openssh-client", "nsenter": "util-linux", "unshare": "util-linux",
         "mount": "mount", "rsync": "rsync"}
INSTALL = "apt-get install openssh-server rsync"
COMMAND_TIMEOUT = 10.0  # s, for each `ip`, `ssh-keygen`, ... the harness runs
DEATH_TIMEOUT = 10.0  # s for a SIGKILLed host's processes to be gone


class HostsError(RuntimeError):
    """The hosts could not be made, changed or torn down (one line: which host, what)."""


class HostsUnavailable(HostsError):
    """This machine cannot make hosts: not root, or a tool is missing."""


def missing_prerequisite() -> str | None:
    """Why this machine cannot make hosts (one line naming the tool and how to install
    it), or None when it can."""
    if os.geteuid() != 0:
        return "hosts in network namespaces need root (network and mount namespaces, a bridge)"
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            how = INSTALL if package in INSTALL.split() else f"apt-get install {package}"
            return f"`{tool}` is not on PATH; the hosts need it (Debian: {how})"
    return None


@dataclass
class Host:
    name: str  # also its network namespace and its hostname
    address: str
    link: str  # the bridge's end of its cable
    process: subprocess.Popen[bytes] | None = None  # `unshare`, parent of the host's PID 1
    init_pid: int | None = None  # the host's PID 1 (its sshd) as this machine numbers it

    @property
    def namespace(self) -> str:
        return self.name

    @property
    def up(self) -> bool:
        return self.process is not None


class Hosts:
    """`count` hosts, each reachable over SSH as `user` with the private key at `key`."""

    def __init__(self, count: int, subnet: str = SUBNET, ready_timeout: float = 30.0):
        self.network = ipaddress.ip_network(subnet)
        if not 1 <= count <= self.network.num_addresses - FIRST_HOST - 1:
            raise ValueError(f"{count} hosts do not fit in {subnet}")
        self.bridge_address = str(self.network[1])
        self.hosts = [Host(f"{PREFIX}h{i}", str(self.network[FIRST_HOST + i]),
                           f"{PREFIX}h{i}-link") for i in range(count)]
        self.user = SSH_USER
        self.ready_timeout = ready_timeout
        self.workdir: Path | None = None
        self._lock: IO[str] | None = None

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    @property
    def key(self) -> Path:
        """The SSH private key every host accepts for `user`."""
        assert self.workdir is not None, "the hosts are not up"
        return self.workdir / "id_ed25519"

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> Hosts:
        problem = missing_prerequisite()
        if problem:
            raise HostsUnavailable(problem)
        self._lock = take_lock()
        try:
            remove_all()  # what a crashed run left
            check_subnet_is_free(self.network)
            self.workdir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=WORKDIR_PARENT))
            self._make_files()
            self._make_network()
            for host in self.hosts:  # all start, then all are waited for
                self._start(host)
            for host in self.hosts:
                self._wait_for_ssh(host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Kills every process of every host, deletes namespaces, links, bridge and the
        harness's directory."""
        try:
            for host in self.hosts:
                self._stop(host)
            remove_all()
        finally:
            for host in self.hosts:
                self._forget(host)
            self.workdir = None
            if self._lock is not None:
                self._lock.close()  # releases the lock
                self._lock = None

    # --- what the tests do to hosts ------------------------------------------------------

    def kill(self, host: Host) -> None:
        """The host dies as a crashed machine does: every process SIGKILLed, its /tmp and
        /dev/shm gone (they live only as long as its processes). Its address and what it
        wrote to its home stay, as a disk would."""
        self._stop(host)
        kill_namespace(host.namespace)  # anything that entered its network another way
        self._forget(host)

    def restart(self, host: Host) -> None:
        """The host boots again (killed first if it is up) with empty /tmp and /dev/shm, its
        home as it was, and serves SSH (a cut host does not: mend it first)."""
        if host.up:
            self.kill(host)
        self._start(host)
        self._wait_for_ssh(host)

    def cut(self, host: Host) -> None:
        """Its cable is pulled: packets are dropped both ways, its processes run on."""
        run(["ip", "link", "set", host.link, "down"])

    def mend(self, host: Host) -> None:
        run(["ip", "link", "set", host.link, "up"])

    # --- running commands on hosts -------------------------------------------------------

    def ssh_argv(self, host: Host, command: str, connect_timeout: float = 5) -> list[str]:
        """`ssh` running `command` (a shell line) on `host` as a user would, with the key;
        no user config, no known_hosts, never a prompt."""
        return ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={connect_timeout:g}", "-p", str(SSH_PORT),
                f"{self.user}@{host.address}", command]

    def ssh(self, host: Host, command: str, timeout: float = 30, check: bool = True,
            connect_timeout: float = 5) -> subprocess.CompletedProcess[str]:
        """Runs `command` on `host` over SSH; its output captured. `check`: a non-zero exit
        raises HostsError."""
        return run(self.ssh_argv(host, command, connect_timeout), timeout, check,
                   f"{host.name}: `{command}`")

    def inside_argv(self, host: Host, command: str) -> list[str]:
        """`command` (a shell line) run directly in the host's namespaces (network, mount,
        PID, hostname), without SSH: for setting up and inspecting tests."""
        if host.init_pid is None:
            raise HostsError(f"{host.name} is down")
        return ["nsenter", "-t", str(host.init_pid), "-n", "-m", "-p", "-u", "--",
                "sh", "-c", command]

    def inside(self, host: Host, command: str, timeout: float = 30,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(self.inside_argv(host, command), timeout, check, f"{host.name}: `{command}`")

    def pids(self, host: Host) -> set[int]:
        """This machine's numbers of every process in the host."""
        return namespace_pids(host.namespace)

    # --- making them ---------------------------------------------------------------------

    def _make_files(self) -> None:
        """Keys, each host's sshd config, /etc/hosts and the layers of its home."""
        assert self.workdir is not None
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        run([*keygen, "-C", f"{PREFIX}user", "-f", str(self.key)])
        (self.workdir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        names = "".join(f"{host.address} {host.name}\n" for host in self.hosts)
        for host in self.hosts:
            folder = self.workdir / host.name
            folder.mkdir()
            (folder / "home").mkdir()
            (folder / "home-work").mkdir()  # overlayfs's scratch space
            run([*keygen, "-C", host.name, "-f", str(folder / "ssh_host_ed25519_key")])
            (folder / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            (folder / "sshd_config").write_text(self._sshd_config(host, folder))

    def _sshd_config(self, host: Host, folder: Path) -> str:
        assert self.workdir is not None
        return "\n".join([
            f"ListenAddress {host.address}:{SSH_PORT}",
            f"HostKey {folder / 'ssh_host_ed25519_key'}",
            f"PidFile {folder / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "StrictModes no",  # the key file lies under /var/tmp, which all may write
            "PrintMotd no",
            # `ray up` opens many sessions at once; the defaults (10) would drop some.
            "MaxStartups 100",
            "MaxSessions 100",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            ""])

    def _make_network(self) -> None:
        run(["ip", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0"])
        run(["ip", "address", "add", f"{self.bridge_address}/{self.network.prefixlen}",
             "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        for host in self.hosts:
            run(["ip", "netns", "add", host.namespace])
            run(["ip", "link", "add", host.link, "type", "veth", "peer", "name", "eth0",
                 "netns", host.namespace])
            run(["ip", "link", "set", host.link, "master", BRIDGE, "up"])
            inside = ["ip", "-n", host.namespace]
            run([*inside, "address", "add", f"{host.address}/{self.network.prefixlen}",
                 "dev", "eth0"])
            run([*inside, "link", "set", "eth0", "up"])
            run([*inside, "link", "set", "lo", "up"])

    def _start(self, host: Host) -> None:
        """sshd as PID 1 of new mount, PID and hostname namespaces inside the host's network
        namespace, over fresh tmpfs /tmp and /dev/shm: what SSH starts there inherits them,
        and they last until the host's last process dies."""
        assert self.workdir is not None
        folder = self.workdir / host.name
        home = pwd.getpwnam(self.user).pw_dir
        quoted = shlex.quote
        script = "; ".join([
            "set -e",
            "mount -t overlay overlay -o " + quoted(
                f"lowerdir={home},upperdir={folder / 'home'},workdir={folder / 'home-work'}")
            + f" {quoted(home)}",
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp",
            "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm",
            f"mount --bind {quoted(str(folder / 'hosts'))} /etc/hosts",
            f"hostname {quoted(host.name)}",
            "mkdir -p /run/sshd",  # sshd's privilege separation directory (shared /run)
            f"exec {quoted(str(shutil.which('sshd')))} -D -e -f "
            f"{quoted(str(folder / 'sshd_config'))}"])
        with open(self.workdir / f"{host.name}.log", "ab") as log:
            host.process = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, "unshare", "--mount",
                 "--propagation", "private", "--uts", "--pid", "--fork", "--kill-child",
                 "--mount-proc", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # a Ctrl-C reaches the tests, not the hosts
        host.init_pid = self._init_pid(host)

    def _init_pid(self, host: Host) -> int:
        assert host.process is not None
        children = Path(f"/proc/{host.process.pid}/task/{host.process.pid}/children")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while time.monotonic() < deadline:
            if host.process.poll() is not None:
                raise HostsError(f"{host.name}: its namespaces could not be made "
                                 f"(exit {host.process.returncode}): {self._log_tail(host)}")
            try:
                pids = children.read_text().split()
            except FileNotFoundError:
                pids = []
            if pids:
                return int(pids[0])
            time.sleep(0.01)
        raise HostsError(f"{host.name}: unshare started no process in {COMMAND_TIMEOUT:g} s")

    def _wait_for_ssh(self, host: Host) -> None:
        """Until sshd accepts a connection on the host's address and a command runs."""
        assert host.process is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if host.process.poll() is not None:
                raise HostsError(f"{host.name}: sshd exited (code {host.process.returncode}):"
                                 f" {self._log_tail(host)}")
            try:
                socket.create_connection((host.address, SSH_PORT), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise HostsError(f"{host.name}: sshd on {host.address}:{SSH_PORT} accepted "
                                 f"no connection in {self.ready_timeout:g} s: "
                                 f"{self._log_tail(host)}")
            time.sleep(0.05)
        self.ssh(host, "true", timeout=max(1.0, deadline - time.monotonic()))

    def _log_tail(self, host: Host) -> str:
        assert self.workdir is not None
        lines = (self.workdir / f"{host.name}.log").read_text(errors="replace").splitlines()
        return lines[-1].strip() if lines else "(sshd logged nothing)"

    def _stop(self, host: Host) -> None:
        """SIGKILLs the host's PID 1, which takes every process of its PID namespace along;
        `unshare` reaps it and exits (killed together, PID 1 would be left a zombie)."""
        if host.process is None:
            return
        if host.init_pid is not None:
            try:
                os.kill(host.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            host.process.wait(timeout=DEATH_TIMEOUT)
        except subprocess.TimeoutExpired:
            host.process.kill()
            host.process.wait(timeout=DEATH_TIMEOUT)

    def _forget(self, host: Host) -> None:
        if host.process is not None and host.process.poll() is None:
            host.process.kill()  # its --kill-child ends the host's PID 1
            host.process.wait(timeout=DEATH_TIMEOUT)
        host.process = None
        host.init_pid = None


# --- the machine's namespaces and links ---------------------------------------------------

def run(argv: list[str], timeout: float = COMMAND_TIMEOUT, check: bool = True,
        name: str | None = None) -> subprocess.CompletedProcess[str]:
    """`argv`, its output captured; a timeout (or, with `check`, a non-zero exit) raises
    HostsError naming it as `name` (default: the command line)."""
    name = name or f"`{shlex.join(argv)}`"
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HostsError(f"{name} did not finish in {timeout:g} s") from None
    if check and result.returncode != 0:
        raise HostsError(f"{name} exited {result.returncode}: {last_line(result.stderr)}")
    return result


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def take_lock() -> IO[str]:
    lock = open(LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        raise HostsError(f"another set of hosts is up on this machine (process {owner} holds "
                         f"{LOCK}); one at a time") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def namespaces() -> list[str]:
    listed = run(["ip", "-j", "netns", "list"]).stdout.strip()
    return [item["name"] for item in json.loads(listed or "[]")
            if item["name"].startswith(PREFIX)]


def links() -> list[str]:
    listed = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
    return [item["ifname"] for item in listed if item["ifname"].startswith(PREFIX)]


def namespace_pids(namespace: str) -> set[int]:
    return {int(pid) for pid in run(["ip", "netns", "pids", namespace]).stdout.split()}


def kill_namespace(namespace: str) -> None:
    """SIGKILLs every process in the network namespace; returns once they are gone."""
    deadline = time.monotonic() + DEATH_TIMEOUT
    while pids := namespace_pids(namespace):
        if time.monotonic() > deadline:
            raise HostsError(f"{namespace}: processes {sorted(pids)} still alive "
                             f"{DEATH_TIMEOUT:g} s after SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def remove_all() -> None:
    """Every process, namespace, link and directory named with PREFIX, gone (ours or what a
    crashed run left)."""
    for namespace in namespaces():
        kill_namespace(namespace)
    for link in links():  # a veth's end goes with its peer: the list may be stale
        if link != BRIDGE:
            run(["ip", "link", "del", link], check=False)
    run(["ip", "link", "del", BRIDGE], check=False)
    for namespace in namespaces():
        run(["ip", "netns", "del", namespace])
    for folder in WORKDIR_PARENT.glob(f"{PREFIX}*"):
        shutil.rmtree(folder)
    if left := links():
        raise HostsError(f"links {left} are still there after deleting them")


def check_subnet_is_free(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    routes = json.loads(run(["ip", "-j", "route", "show", "table", "all"]).stdout or "[]")
    for route in routes:
        if route["dst"] == "default" or ":" in route["dst"]:
            continue
        taken = ipaddress.ip_network(route["dst"], strict=False)
        if taken.overlaps(network):
            raise HostsError(f"subnet {network} is already in use on this machine "
                             f"({route['dst']} on {route.get('dev', '?')}); "
                             f"pass another to Hosts(subnet=...)")
