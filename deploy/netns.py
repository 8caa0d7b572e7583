"""Linux network namespaces for drills: each site on its own network, cut on demand, removed after.

Layout, for sites 0..N-1 of one run (names start with ``fa-<pid>-``; interface names fit
Linux's 15 characters)::

    host:  bridge fa-<pid>-br  10.231.X.1/24   <- the coordinator listens here
             |-- fa-<pid>-h0 ==veth== fa-<pid>-n0  10.231.X.10/24  in namespace fa-<pid>-s0
             |-- fa-<pid>-h1 ==veth== fa-<pid>-n1  10.231.X.11/24  in namespace fa-<pid>-s1
             ...

A site's process runs inside its namespace (``ip netns exec``), where the only way out is its
veth pair; ``cut`` pulls the host end down, as a cable pulled out. Everything is removed when
the block ends, however it ends (failure, Ctrl-C, SIGTERM); what a killed run left behind
(its pid is gone) is removed by the next run. Needs root (``CAP_SYS_ADMIN``, ``CAP_NET_ADMIN``)
and iproute2's ``ip``; :func:`netns_problem` says why not when they are missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psutil

from shared.errors import FedadaptError

log = logging.getLogger(__name__)

SUBNETS = ipaddress.IPv4Network("10.231.0.0/16")  # one /24 of it per run
IFNAMSIZ = 15  # longest interface name Linux accepts
OURS = re.compile(r"^fa-(\d+)-")


class NetnsError(FedadaptError, RuntimeError):
    """An ``ip`` command failed; the message quotes it and what it said."""


@dataclass(frozen=True)
class SiteLink:
    """One site's network: its namespace, its veth pair and its address."""

    namespace: str
    host_link: str  # the end on the host, in the bridge (``cut`` pulls it down)
    site_link: str  # the end inside the namespace
    address: str


@dataclass
class Network:
    """The networks of one run: a bridge on the host and one namespace per site."""

    prefix: str
    bridge: str
    host_address: str  # on the bridge: what the coordinator listens on
    sites: dict[str, SiteLink] = field(default_factory=dict)
    # Processes the clean-up found still running in a namespace, and killed (should be none).
    strays: list[str] = field(default_factory=list)

    def exec_in(self, site: str) -> list[str]:
        """The command prefix that runs a command inside ``site``'s namespace."""
        return [_ip_path(), "netns", "exec", self.sites[site].namespace]

    def cut(self, site: str) -> None:
        """Cut ``site`` off the network: its veth pair goes down (the site sees no carrier)."""
        _ip("link", "set", self.sites[site].host_link, "down")
        log.info("cut site %s off the network (%s down)", site, self.sites[site].host_link)


def _ip_path() -> str:
    return shutil.which("ip") or "ip"


def _ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS``; its output, or :class:`NetnsError` with what it said."""
    cmd = [_ip_path(), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetnsError(f"{' '.join(cmd)}: {err}") from None
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def netns_problem() -> str | None:
    """Why this machine cannot run sites in network namespaces, or ``None`` if it can.

    It tries for real: a namespace and a veth pair are made and removed at once.

    Returns
    -------
    str or None
        A sentence for people (what is missing), or ``None``.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces are a Linux feature (this is {sys.platform})"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    prefix = f"fa-{os.getpid()}-"
    ns, link = f"{prefix}probe", f"{prefix}p"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", link, "type", "veth", "peer", "name", f"{prefix}q", "netns", ns)
    except NetnsError as err:
        who = "" if os.geteuid() == 0 else "not root: "
        return f"{who}cannot create a network namespace with a veth pair ({err})"
    finally:
        _ip("link", "delete", link, check=False)
        _ip("netns", "delete", ns, check=False)
    return None


def leftovers(prefix: str) -> list[str]:
    """Namespaces and network interfaces whose name starts with ``prefix``."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).splitlines()
             if line.strip()]
    names += _links()
    return sorted(n for n in names if n.startswith(prefix))


def _links() -> list[str]:
    """Names of this namespace's network interfaces (``fa-1-h0``, not ``fa-1-h0@if3``)."""
    return [line.split(":")[1].strip().split("@")[0]
            for line in _ip("-o", "link", "show", check=False).splitlines() if ":" in line]


def _sweep_stale() -> None:
    """Remove what runs that are gone (killed) left behind: ``fa-<pid>-`` of a dead pid."""
    for name in leftovers("fa-"):
        match = OURS.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and psutil.pid_exists(pid):
            continue  # a run still going
        log.warning("removing %s, left behind by an earlier run (pid %d)", name, pid)
        if name in _links():
            _ip("link", "delete", name, check=False)
        else:
            _kill_inside(name)
            _ip("netns", "delete", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of ``SUBNETS`` that no address or specific route of this machine touches."""
    addresses: list[ipaddress.IPv4Address] = []
    routes: list[ipaddress.IPv4Network] = []
    for line in _ip("-o", "-4", "addr", "show", check=False).splitlines():
        words = line.split()
        if "inet" in words:
            addresses.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).ip)
    for line in _ip("-4", "route", "show", "table", "all", check=False).splitlines():
        for word in line.split()[:2]:  # "10.0.0.0/8 dev ..." or "local 10.1.2.3 dev ..."
            with contextlib.suppress(ValueError):
                routes.append(ipaddress.IPv4Network(word, strict=False))
    candidates = list(SUBNETS.subnets(new_prefix=24))
    start = os.getpid() % len(candidates)  # concurrent runs start at different places
    for net in candidates[start:] + candidates[:start]:
        if not any(a in net for a in addresses) and not any(
                r.prefixlen >= net.prefixlen and r.overlaps(net) for r in routes):
            return net
    raise NetnsError(f"no free /24 left in {SUBNETS} on this machine")


def _kill_inside(namespace: str) -> list[str]:
    """Kill what still runs inside ``namespace`` (only this module starts processes there).

    Returns
    -------
    list of str
        ``name (pid)`` of each process killed.
    """
    pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).split() if p.isdigit()]
    procs, killed = [], []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            log.warning("killing %s (pid %d), still running in %s", proc.name(), pid, namespace)
            killed.append(f"{proc.name()} (pid {pid})")
            proc.kill()
            procs.append(proc)
    psutil.wait_procs(procs, timeout=10)
    return killed


def _teardown(net: Network) -> list[str]:
    """Remove the run's namespaces, veth pairs and bridge; return what could not be removed."""
    for site in net.sites.values():
        net.strays += _kill_inside(site.namespace)
        # Deleting one end deletes the pair at once (a namespace's own links go asynchronously).
        _ip("link", "delete", site.host_link, check=False)
        _ip("netns", "delete", site.namespace, check=False)
    _ip("link", "delete", net.bridge, check=False)
    deadline = time.monotonic() + 10.0
    left = leftovers(net.prefix)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftovers(net.prefix)
    return left


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt (so ``finally`` runs), unless handled already.

    ``fedadapt`` handles SIGTERM itself; a program that leaves it at the default (a test, a
    script) would otherwise die at once and leave the namespaces behind.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up is not interrupted
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def site_networks(site_names: list[str]) -> Iterator[Network]:
    """One namespace and veth pair per site, behind a bridge on the host; removed on exit.

    Parameters
    ----------
    site_names : list of str
        The sites, in order (site ``i`` gets address ``.10 + i``).

    Yields
    ------
    Network
        Where the coordinator listens (``host_address``) and each site's namespace.

    Raises
    ------
    NetnsError
        An ``ip`` command failed (after removing what was made).
    """
    prefix = f"fa-{os.getpid()}-"
    if len(f"{prefix}h{len(site_names)}") > IFNAMSIZ or len(site_names) > 200:
        raise NetnsError(f"too many sites for interface names ({len(site_names)})")
    with _sigterm_interrupts():
        _sweep_stale()
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        net = Network(prefix=prefix, bridge=f"{prefix}br", host_address=str(hosts[0]))
        try:
            _ip("link", "add", net.bridge, "type", "bridge")
            _ip("addr", "add", f"{net.host_address}/{subnet.prefixlen}", "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
            for i, name in enumerate(site_names):
                site = SiteLink(namespace=f"{prefix}s{i}", host_link=f"{prefix}h{i}",
                                site_link=f"{prefix}n{i}", address=str(hosts[9 + i]))
                net.sites[name] = site  # before it exists: the clean-up removes what was made
                _ip("netns", "add", site.namespace)
                _ip("link", "add", site.host_link, "type", "veth", "peer", "name",
                    site.site_link, "netns", site.namespace)
                _ip("link", "set", site.host_link, "master", net.bridge, "up")
                _ip("-n", site.namespace, "link", "set", "lo", "up")
                _ip("-n", site.namespace, "addr", "add", f"{site.address}/{subnet.prefixlen}",
                    "dev", site.site_link)
                _ip("-n", site.namespace, "link", "set", site.site_link, "up")
            log.info("site networks: %s on %s, sites %s", net.bridge, net.host_address,
                     ", ".join(f"{n} {s.address} ({s.namespace})" for n, s in net.sites.items()))
            yield net
        finally:
            left = _teardown(net)
            if left:
                log.error("could not remove %s", ", ".join(left))


def in_namespace(pid: int, namespace: str) -> bool:
    """Whether process ``pid`` runs in the named network namespace (not the host's)."""
    try:
        theirs = Path(f"/proc/{pid}/ns/net").stat().st_ino
        return theirs == Path(f"/run/netns/{namespace}").stat().st_ino
    except OSError:
        return False
