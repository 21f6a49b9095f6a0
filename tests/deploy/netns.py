"""Processes in a private network namespace that has only a loopback interface: what the deploy
tests run (Ray nodes, `engram` commands) can bind any port, and nothing they open is reachable from
outside. Needs util-linux's unshare and nsenter, iproute2's ip, and root or unprivileged user
namespaces."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

READY_S = 180


class Network:
    """A network namespace with only loopback, held open by a sleeping process; `enter(argv)` is
    argv run inside it."""

    def __init__(self):
        rootless = os.geteuid() != 0
        unshare = ["unshare", "--user", "--map-root-user", "--net"] if rootless else ["unshare", "--net"]
        self.holder = subprocess.Popen(unshare + ["bash", "-c", "ip link set lo up && exec sleep infinity"],
                                       start_new_session=True)
        self.prefix = ["nsenter", "-t", str(self.holder.pid)]
        self.prefix += ["--user", "--net", "--preserve-credentials"] if rootless else ["--net"]
        deadline = time.monotonic() + 30
        while not self._loopback_up():
            assert self.holder.poll() is None and time.monotonic() < deadline, \
                "could not set up a network namespace (unshare, nsenter and ip are needed)"
            time.sleep(0.2)

    def _loopback_up(self) -> bool:
        shown = subprocess.run(self.enter(["ip", "link", "show", "lo", "up"]), capture_output=True)
        return b"UP" in shown.stdout

    def enter(self, argv: list[str]) -> list[str]:
        return [*self.prefix, "--", *argv]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=10)


class Processes:
    """Processes started inside the network, each in a session of its own, all ended by their ids
    at the end."""

    def __init__(self, network: Network, logs: Path, env: dict[str, str]):
        self.network, self.logs, self.env, self.procs = network, logs, env, []

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(self.network.enter(argv), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**self.env, **(extra_env or {})})
        self.procs.append((name, proc))

    def run(self, argv: list[str], timeout: float = 180, **env) -> subprocess.CompletedProcess:
        return subprocess.run(self.network.enter(argv), capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **env})

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def get(self, name: str) -> subprocess.Popen:
        return dict(self.procs)[name]

    def owner_of(self, pid: int) -> str:
        """The name of the started process whose session `pid` belongs to (a pod's processes)."""
        sid = _session(Path(f"/proc/{pid}/stat"))
        (name,) = [name for name, proc in self.procs if proc.pid == sid]
        return name

    def kill(self, name: str) -> None:
        """SIGKILL every process of `name`'s session at once, as a node dies."""
        _signal_session(self.get(name).pid, signal.SIGKILL)
        self.get(name).wait(timeout=20)

    def stop(self) -> None:
        """SIGTERM each session, newest first (the tables' driver before Ray), then SIGKILL
        whatever is left of those sessions, found by session id."""
        for _, proc in reversed(self.procs):
            _signal_session(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs:
            _signal_session(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _session(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[3])  # field 6 of /proc/<pid>/stat
    except (OSError, IndexError):
        return None


def _signal_session(sid: int, sig: int) -> None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if _session(stat) == sid:
            try:
                os.kill(int(stat.parent.name), sig)
            except ProcessLookupError:
                pass


def wait_for(check, what: str, procs: Processes, timeout: float = READY_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1)
    logs = "\n".join(f"--- {name}\n{procs.log(name)[-3000:]}" for name, _ in procs.procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")
