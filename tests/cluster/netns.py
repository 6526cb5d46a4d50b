"""A multi-host test bed without a container engine: each host is a Linux network namespace
plus, for every process tree started on it (a "container"), its own PID, mount and UTS
namespaces with a private ``/tmp`` and ``/dev/shm`` (tmpfs, as a container's own filesystem).

A network namespace alone is not a host: Ray finds "its" raylet through the process table and
``/tmp/ray``, which a bare ``ip netns exec`` shares with every other namespace, and a process
that cleans stale scratch directories under ``/tmp`` would delete other hosts' live ones. Here
a container's processes see only themselves (``unshare --pid --mount-proc``) and their own
``/tmp``, so a process on one host cannot use or touch another host's Ray node or scratch.
The bed's own files (host directories, volumes, the database) live under ``BASE_ROOT``, outside
``/tmp``, so that the private ``/tmp`` hides none of them.

Network: one bridge in its own switch namespace; each host has one veth into it with an
address in a private /24 and no other route, so nothing reaches past these namespaces (and no
address is ever added to the root namespace). ``/etc/netns/<ns>/hosts`` gives every host the
names of all of them (compose's service names), ``/etc/netns/<ns>/resolv.conf`` no DNS server.

Everything is named ``msc-*``; a run starts by removing what a crashed earlier run left under
that prefix (under a lock, so two runs never fight), and tears everything down in ``close``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

PREFIX = "msc-"
SWITCH = f"{PREFIX}switch"
SUBNET = "10.213.77"
LOCK_FILE = Path("/run/lock/msc-cluster.lock")
ETC_NETNS = Path("/etc/netns")
BASE_ROOT = Path("/var/tmp")  # not /tmp: each container mounts its own /tmp over it
PRIVATE_MOUNTS = "mount -t tmpfs -o mode=1777 tmpfs /tmp; mount -t tmpfs -o mode=1777 tmpfs /dev/shm"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, timeout=timeout, capture_output=True,
                          text=True, **kwargs)


def wait_for(what: str, predicate: Callable[[], T], *, timeout: float, interval: float = 0.5,
             on_timeout: Callable[[], str] = lambda: "",
             alive: Callable[[], bool] = lambda: True) -> T:
    """Poll ``predicate`` until it returns something truthy; bounded in time and count.
    Gives up early when ``alive()`` turns false (the awaited process died)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    for _ in range(int(timeout / interval) + 2):
        if not alive():
            raise RuntimeError(f"{what}: the process exited\n{on_timeout()}")
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - not ready yet
            last_error = error
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last_error!r})" if last_error else "")
                       + (f"\n{on_timeout()}" if on_timeout else ""))


def available() -> str | None:
    """Why this machine cannot run the test bed, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network, PID and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "runuser"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        run(["ip", "netns", "add", probe])
    except (subprocess.CalledProcessError, OSError) as error:
        return f"cannot create a network namespace: {getattr(error, 'stderr', error)}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class Container:
    """One process tree on a host, in its own PID/mount/UTS namespaces; PID 1 is ``argv``."""

    host: "Host"
    argv: list[str]
    popen: subprocess.Popen
    log: Path

    @property
    def init_pid(self) -> int | None:
        """The root-namespace PID of the container's PID 1 (unshare's child)."""
        try:
            children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, timeout: float = 20) -> None:
        """SIGKILL every process of the container at once: unshare runs with --kill-child, so
        its child (PID 1 of the PID namespace) dies with it, and the kernel kills the rest."""
        init = self.init_pid
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if init is not None:
            wait_for(f"PID 1 of {self.host.name} to exit",
                     lambda: not Path(f"/proc/{init}").exists(), timeout=timeout, interval=0.1)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.host.name}: {shlex.join(self.argv)[:200]}\n" + "\n".join(text[-lines:])


@dataclass
class Host:
    name: str
    ip: str
    topology: "Topology"
    containers: list[Container] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.name}"

    @property
    def veth(self) -> str:
        return f"v-{self.name}"[:15]

    @property
    def container(self) -> Container | None:
        alive = [container for container in self.containers if container.alive()]
        return alive[-1] if alive else None

    def container_alive(self) -> bool:
        return self.container is not None

    def start(self, argv: Sequence[str], env: Mapping[str, str], *,
              volumes: Sequence[tuple[Path, str]] = (), workdir: Path | None = None,
              user: str | None = None) -> Container:
        """Start ``argv`` as PID 1 of a new container on this host. ``volumes`` bind host
        directories at container paths (compose volumes)."""
        topology = self.topology
        workdir = workdir or topology.host_dir(self.name)
        lines = ["set -e", f"hostname {shlex.quote(self.name)}", PRIVATE_MOUNTS]
        for source, target in volumes:
            topology.make_mount_point(target)
            lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
        lines.append(f"cd {shlex.quote(str(workdir))}")
        command = list(argv)
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        lines.append('exec "$@"')
        index = len(self.containers)
        log = topology.base / "logs" / f"{self.name}-{index}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.netns,
                 "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount",
                 "--uts", "--propagation", "private",
                 "sh", "-c", "\n".join(lines), "sh", *command],
                env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        container = Container(self, list(argv), popen, log)
        self.containers.append(container)
        return container

    def exec(self, argv: Sequence[str], env: Mapping[str, str], *, timeout: float = 120,
             check: bool = True, workdir: Path | None = None) -> subprocess.CompletedProcess:
        """``docker compose exec``: run ``argv`` inside the host's running container (its
        network, PID, mount and UTS namespaces); without one, in a fresh container."""
        container = self.container
        init = container.init_pid if container is not None else None
        cwd = str(workdir or self.topology.host_dir(self.name))
        if init is None:
            prelude = (f"set -e; {PRIVATE_MOUNTS}; "
                       f"hostname {shlex.quote(self.name)}; cd {shlex.quote(cwd)}; exec \"$@\"")
            full = ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork",
                    "--kill-child", "--mount-proc", "--mount", "--uts", "--propagation",
                    "private", "sh", "-c", prelude, "sh", *argv]
        else:
            full = ["nsenter", "-t", str(init), "-n", "-m", "-u", "-p", f"--wd={cwd}", *argv]
        result = subprocess.run(full, env=dict(env), capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {shlex.join(argv)} exited {result.returncode}\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def kill(self) -> None:
        for container in self.containers:
            container.kill()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the host (e.g. SIGSTOP / SIGCONT)."""
        for pid in run(["ip", "netns", "pids", self.netns], check=False).stdout.split():
            try:
                os.kill(int(pid), signum)
            except ProcessLookupError:
                pass

    def link(self, up: bool) -> None:
        """Plug the host's cable into the switch or pull it out."""
        run(["ip", "-n", SWITCH, "link", "set", self.veth, "up" if up else "down"])

    def drop_to(self, other: "Host", drop: bool = True) -> None:
        """Drop (or stop dropping) every packet this host sends to ``other``: a blackhole
        route to its address (the kernel discards them; open TCP connections stall and
        retransmit, new ones time out), while traffic to every other host flows as before."""
        run(["ip", "-n", self.netns, "route", "add" if drop else "del", "blackhole",
             f"{other.ip}/32"])

    def tail(self, lines: int = 40) -> str:
        return "\n".join(container.tail(lines) for container in self.containers[-2:])


class Topology:
    """Hosts on one switch; use as a context manager (``close`` tears everything down)."""

    def __init__(self, hosts: Mapping[str, int], aliases: Mapping[str, str] | None = None):
        self.hosts = {name: Host(name, f"{SUBNET}.{octet}", self) for name, octet in hosts.items()}
        self.aliases = dict(aliases or {})  # extra name -> host name (compose service names)
        self._lock = None
        self._mount_points: list[Path] = []
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}run-", dir=BASE_ROOT))

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> "Topology":
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ setup

    def open(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_FILE, "w")
        deadline = time.monotonic() + 900
        while True:  # another run of the cluster tests holds the names: wait for it (bounded)
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{LOCK_FILE} held for 15 minutes by another run")
                time.sleep(1)
        clean_stale()
        self.base.chmod(0o755)
        (self.base / "logs").mkdir()
        run(["ip", "netns", "add", SWITCH])
        run(["ip", "-n", SWITCH, "link", "set", "lo", "up"])
        run(["ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", SWITCH, "link", "set", "br0", "up"])
        names = {host.name: host.ip for host in self.hosts.values()}
        names.update({alias: self.hosts[target].ip for alias, target in self.aliases.items()})
        for host in self.hosts.values():
            run(["ip", "netns", "add", host.netns])
            run(["ip", "-n", SWITCH, "link", "add", host.veth, "type", "veth",
                 "peer", "name", "eth0", "netns", host.netns])
            run(["ip", "-n", SWITCH, "link", "set", host.veth, "master", "br0", "up"])
            run(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
            run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            etc = ETC_NETNS / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            hosts_lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
            by_ip: dict[str, list[str]] = {}
            for name, ip in names.items():
                by_ip.setdefault(ip, []).append(name)
            hosts_lines += [f"{ip} {' '.join(aliases)}" for ip, aliases in by_ip.items()]
            (etc / "hosts").write_text("\n".join(hosts_lines) + "\n")
            (etc / "resolv.conf").write_text("# no DNS server: names come from /etc/hosts\n")
            self.host_dir(host.name)

    def host_dir(self, name: str) -> Path:
        """A private working directory for a host (its HOME, its containers' cwd)."""
        path = self.base / "hosts" / name
        path.mkdir(parents=True, exist_ok=True, mode=0o755)
        return path

    def volume(self, name: str) -> Path:
        """The host directory standing for a compose named volume (shared by its users)."""
        path = self.base / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def make_mount_point(self, target: str) -> None:
        """Create a volume's mount point in the root filesystem (the bind itself happens in the
        container's own mount namespace); what this creates is removed in ``close``."""
        path = Path(target)
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:  # another host's container, started at the same time
                continue
            self._mount_points.append(directory)

    def in_netns(self, host: str, fn: Callable[[], T], timeout: float = 300) -> T:
        """Call ``fn`` on a thread that lives in ``host``'s network namespace: sockets it opens
        belong to that host (the test process's own requests, e.g. HTTP to the API)."""
        executor = self._executors.get(host)
        if executor is None:
            netns = self.hosts[host].netns

            def enter() -> None:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns {netns}")
                finally:
                    os.close(fd)

            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{host}",
                                          initializer=enter)
            self._executors[host] = executor
        return executor.submit(fn).result(timeout)

    def partition(self, a: str, b: str, cut: bool = True) -> None:
        """Cut (or heal) the network between hosts ``a`` and ``b`` only, both ways: each
        drops what it sends to the other (:meth:`Host.drop_to`); both still reach every
        other host (:meth:`Host.link` pulls a host's cable: all of its links at once)."""
        for one, other in ((a, b), (b, a)):
            self.hosts[one].drop_to(self.hosts[other], cut)

    def tails(self, *names: str, lines: int = 40) -> str:
        return "\n".join(self.hosts[name].tail(lines) for name in (names or self.hosts))

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        for host in self.hosts.values():
            for container in host.containers:
                try:
                    container.kill(timeout=10)
                except Exception:  # noqa: BLE001 - keep tearing down
                    pass
        clean_stale()
        for directory in reversed(self._mount_points):
            try:
                directory.rmdir()
            except OSError:
                pass
        if os.environ.get("MSC_KEEP") and self.base.exists():
            print(f"cluster test bed files kept in {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def clean_stale() -> None:
    """Remove every ``msc-*`` namespace (killing its processes) and its /etc/netns dir."""
    listed = run(["ip", "netns", "list"], check=False).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    for name in names:
        if not name.startswith(PREFIX):
            continue
        for _ in range(3):
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.2)
        run(["ip", "netns", "del", name], check=False)
    if ETC_NETNS.is_dir():
        for path in ETC_NETNS.glob(f"{PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
    for path in BASE_ROOT.glob(f"{PREFIX}run-*"):
        if _older_than(path, 60) and not os.environ.get("MSC_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False
