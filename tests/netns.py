"""Hosts for the multi-host tests: Linux network namespaces joined by veth pairs.

A :class:`Network` is a bridge in the root namespace with the first address of a
/24 of its own (10.213.N.1) and, per host, a namespace whose ``eth0`` (one end of a
veth pair, the other end on the bridge) has the next address.  The root namespace
reaches every host through the bridge, and so do the hosts each other.  Names
carry the creating process's id (``zn<pid>...``), so that a later run can remove
what an interrupted one left (:func:`remove_leftovers`) without touching another
run's.  Creating namespaces needs root: :func:`unavailable` says why not, for a skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

PREFIX = "zn"
_NAME = re.compile(rf"^{PREFIX}(\d+)(br|-.*)$")


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests need root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "multi-host tests need the 'ip' command (Debian package iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace here: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_processes(ns: str) -> None:
    """SIGKILL every process left in namespace ``ns``."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def remove_leftovers() -> list[str]:
    """Delete the namespaces (killing what still runs in them) and bridges of
    earlier runs whose process is gone."""
    removed = []
    for name in _ip("netns", "list").stdout.split():
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            kill_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    """N such that 10.213.N.0/24 is used by no address or route of this machine."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    start = os.getpid() % 250
    for k in range(250):
        n = (start + k) % 250 + 1
        if f"10.213.{n}." not in used:
            return n
    raise RuntimeError("no free 10.213.N.0/24 subnet")


class Network:
    """A bridge and the namespaces (hosts) joined to it; :meth:`destroy` removes all."""

    def __init__(self):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.subnet = _free_subnet()
        self.gateway = f"10.213.{self.subnet}.1"
        self.hosts: dict[str, str] = {}      # host name -> its address
        self._links: dict[str, str] = {}     # host name -> root-side veth
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def netns(self, host: str) -> str:
        """The namespace's name."""
        return f"{self.tag}-{host}"

    def add_host(self, host: str) -> str:
        """A new namespace on the bridge; returns its address."""
        ns, i = self.netns(host), len(self.hosts)
        outer, inner = f"{self.tag}v{i}", f"{self.tag}p{i}"
        address = f"10.213.{self.subnet}.{i + 2}"
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", inner, "name", "eth0", netns=ns)
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=ns)
        _ip("link", "set", "eth0", "up", netns=ns)
        _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "set", outer, "master", self.bridge, "up")
        self.hosts[host] = address
        self._links[host] = outer
        return address

    def argv(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host`` (``ip netns exec`` replaces itself by it)."""
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def set_link(self, host: str, up: bool) -> None:
        """Cut ``host`` off the network (its link down), or put it back."""
        _ip("link", "set", self._links[host], "up" if up else "down")

    def destroy(self) -> None:
        """Delete the namespaces (and so their veth pairs) and the bridge, killing any
        process still running in them."""
        for host in list(self.hosts):
            kill_processes(self.netns(host))
            _ip("netns", "del", self.netns(host), check=False)
            _ip("link", "del", self._links[host], check=False)
        _ip("link", "del", self.bridge, check=False)
        self.hosts.clear()
