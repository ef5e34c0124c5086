"""Build, use and tear down a NAT laboratory: namespaces, veths, bridges, nftables, link shapers.

>>> with Lab(LabSpec([RouterSpec("a", NatType.PORT_RESTRICTED)])) as lab:
...     lab.host("a").run(["ip", "addr"])

Every namespace is named ``<prefix>-<node>`` with a per-run prefix (``tp`` + 6 hex digits), so runs
never collide and teardown finds everything by name, even after a crash (``tcppunch lab down --all``).
Nothing is ever added to the namespace the lab is started from.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from tcppunch.lab import netns as ns
from tcppunch.lab import portmap
from tcppunch.lab.daemon import start_daemon
from tcppunch.lab.firewall6 import firewall6_ruleset
from tcppunch.lab.nat_types import NatType, SynPolicy, router_ruleset
from tcppunch.lab.topology import (
    CORE_ROUTER6,
    INTERNET_PREFIXLEN,
    PREFIXLEN6,
    SERVER_ADDRESSES,
    SERVER_ADDRESSES6,
    LabSpec,
    LinkShape,
    RouterSpec,
    carrier_address,
    carrier_address6,
    lan_address,
    lan_address6,
    lan_gateway,
    lan_gateway6,
    lan_prefix6,
    lan_subnet,
    public_host_address,
    public_host_address6,
    wan_address,
    wan_address6,
)
from tcppunch.portmap import natpmp
from tcppunch.wire.stun import StunParseError, binding_request, encode_message, parse_message

T = TypeVar("T")
log = structlog.get_logger("tcppunch.lab")

STATE_DIR = Path(os.environ.get("TCPPUNCH_LAB_STATE", "/run/tcppunch-lab"))
PREFIX_RE = re.compile(r"^tp[0-9a-f]{6}$")
_SHAPER_READY_S = 10.0
_DAEMON_READY_S = 15.0


class NetnsLoop:
    """An asyncio event loop running in a thread that lives in one namespace.

    Coroutines submitted with :meth:`run` create their sockets in that namespace, which is how tests and
    users drive the asyncio API of a program "on" a lab host without a subprocess.
    """

    def __init__(self, netns: str) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(netns,), name=f"netns-{netns}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            raise ns.LabError(f"event loop thread for {netns} did not start")
        if self._error is not None:
            raise ns.LabError(f"cannot enter {netns}: {self._error}")

    def _main(self, netns: str) -> None:
        try:
            ns.call_in_netns(netns, lambda: None)
        except BaseException as exc:  # reported to the creator, not lost in the thread
            self._error = exc
            self._ready.set()
            return
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coro`` on this loop and wait (bounded) for its result."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on this loop without waiting."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)


@dataclass
class LabHost:
    """A host in the lab: a namespace with an address, maybe behind a NAT router.

    ``address6``: its global IPv6 address in a lab built with ``ipv6`` (no NAT66: also its public one).
    """

    name: str
    netns: str
    address: str
    public_address: str
    nat: NatType
    syn_policy: SynPolicy
    router: str | None = None
    address6: str | None = None
    _children: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argument list that runs ``argv`` on this host."""
        return ns.in_netns(self.netns, argv)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process on this host (``subprocess.Popen`` keyword arguments apply)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv), **kwargs)
        self._children.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float = 30.0, check: bool = False, **kwargs: Any
            ) -> subprocess.CompletedProcess[str]:
        """Run a command on this host and wait (bounded) for it; output is captured as text."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), timeout=timeout, check=check, **kwargs)

    def python(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start this interpreter (``python ARGS``) on this host."""
        return self.popen([sys.executable, *args], **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        """Run ``fn(*args)`` in a fresh thread that joined this host's namespace; return its result."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(ns.call_in_netns, self.netns, lambda: fn(*args)).result(timeout)

    @contextlib.contextmanager
    def event_loop(self) -> Iterator[NetnsLoop]:
        """An asyncio loop in a thread on this host, closed on exit."""
        loop = NetnsLoop(self.netns)
        try:
            yield loop
        finally:
            loop.close()

    def stop_children(self) -> None:
        for proc in self._children:
            _stop_process(proc.pid, proc)
        self._children.clear()


@dataclass
class LabRouter:
    """A NAT router (for cgnat: the home router, with the carrier router in ``outer_netns``)."""

    name: str
    index: int
    spec: RouterSpec
    netns: str | None
    wan_address: str
    outer_netns: str | None = None
    wan_address6: str | None = None


class Lab:
    """A running NAT laboratory. Use as a context manager, or call :meth:`up` and :meth:`down`."""

    def __init__(self, spec: LabSpec, prefix: str | None = None) -> None:
        self.spec = spec
        self.prefix = prefix or "tp" + secrets.token_hex(3)
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"lab prefix must look like tp1a2b3c, got {self.prefix!r}")
        self.inet = f"{self.prefix}-inet"
        self.server = LabHost("srv", f"{self.prefix}-srv", SERVER_ADDRESSES[0], SERVER_ADDRESSES[0],
                              NatType.NONE, SynPolicy.DROP, address6=SERVER_ADDRESSES6[0] if spec.ipv6 else None)
        self.routers: dict[str, LabRouter] = {}
        self.hosts: dict[str, LabHost] = {}
        self._shapers: list[subprocess.Popen[str]] = []
        self._miniupnpd: dict[str, subprocess.Popen[str]] = {}
        self._plan()

    # ----------------------------------------------------------------- naming
    def _plan(self) -> None:
        v6 = self.spec.ipv6
        for index, r in enumerate(self.spec.routers):
            if r.nat is NatType.NONE:
                router = LabRouter(r.name, index, r, None, public_host_address(index, 0))
            else:
                outer = f"{self.prefix}-{r.name}-cgn" if r.nat is NatType.CGNAT else None
                router = LabRouter(r.name, index, r, f"{self.prefix}-{r.name}", wan_address(index), outer,
                                   wan_address6(index) if v6 else None)
            self.routers[r.name] = router
            for j in range(r.hosts):
                hname = f"{r.name}{j + 1}"
                if r.nat is NatType.NONE:
                    addr = public_host_address(index, j)
                    public = addr
                    addr6 = public_host_address6(index, j)
                else:
                    addr, public = lan_address(index, j), wan_address(index)
                    addr6 = lan_address6(index, j)
                self.hosts[hname] = LabHost(hname, f"{self.prefix}-{hname}", addr, public, r.nat, r.syn_policy,
                                            router=r.name, address6=addr6 if v6 else None)

    @property
    def namespaces(self) -> list[str]:
        names = [self.inet, self.server.netns]
        for router in self.routers.values():
            names += [n for n in (router.outer_netns, router.netns) if n]
        names += [h.netns for h in self.hosts.values()]
        return names

    def host(self, router: str, index: int = 0) -> LabHost:
        """Host number ``index`` (0-based) behind router ``router``."""
        try:
            return self.hosts[f"{router}{index + 1}"]
        except KeyError:
            raise KeyError(f"no host {index} behind router {router!r} in this lab") from None

    # ----------------------------------------------------------------- life cycle
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        """Build everything; on any failure, remove what was built and raise."""
        ns.check_supported()
        started = time.monotonic()
        try:
            self._write_state()
            self._build_internet()
            self._build_server()
            if any(r.port_mapping for r in self.spec.routers):
                self._start_stun_server()
            for router in self.routers.values():
                self._build_router(router)
            # all at once: behind cgnat each one spends ~9 s on STUN answers that never come
            mapping = [(r, self._start_miniupnpd(r)) for r in self.routers.values() if r.spec.port_mapping]
            for router, proc in mapping:
                self._wait_miniupnpd(router, proc)
            self._write_state()
        except BaseException:
            self.down()
            raise
        log.info("lab.up", prefix=self.prefix, namespaces=len(self.namespaces),
                 seconds=round(time.monotonic() - started, 2))
        return self

    def down(self) -> None:
        """Stop every process in the lab's namespaces and delete them. Safe to call twice."""
        for host in [self.server, *self.hosts.values()]:
            host.stop_children()
        for proc in self._shapers:
            _stop_process(proc.pid, proc)
        self._shapers.clear()
        self._miniupnpd.clear()
        remove_namespaces(self.prefix)
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{self.prefix}.json").unlink()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    @property
    def log_dir(self) -> Path:
        """Where the lab's background processes write their diagnostics (removed by :meth:`down`)."""
        return STATE_DIR / self.prefix

    def leave_running(self) -> None:
        """Let the lab outlive this handle (``tcppunch lab up``): forget its processes here; ``down``
        still finds and stops them by PID, since they live in the lab's namespaces."""
        self._shapers.clear()
        self._miniupnpd.clear()
        for host in [self.server, *self.hosts.values()]:
            host._children.clear()

    # ----------------------------------------------------------------- building
    def _new_ns(self, name: str, *, router: bool = False) -> None:
        """A namespace; without ``spec.ipv6`` IPv6 is off in it. With it, duplicate address detection is
        off (lab addresses are unique by plan, and DAD would hold each address back for a second or more)
        and a ``router`` forwards IPv6."""
        ns.add_netns(name)
        if not self.spec.ipv6:
            ns.sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
            ns.sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")
            return
        for conf in ("all", "default"):
            ns.sysctl(name, f"net.ipv6.conf.{conf}.accept_dad", "0")
            ns.sysctl(name, f"net.ipv6.conf.{conf}.dad_transmits", "0")
            ns.sysctl(name, f"net.ipv6.conf.{conf}.accept_ra", "0")
        if router:
            ns.sysctl(name, "net.ipv6.conf.all.forwarding", "1")

    def _add6(self, netns: str, address: str, dev: str) -> None:
        ns.ip("-6", "addr", "add", f"{address}/{PREFIXLEN6}", "dev", dev, "nodad", netns=netns)

    def _build_internet(self) -> None:
        self._new_ns(self.inet, router=True)
        ns.ip("link", "add", "br0", "type", "bridge", netns=self.inet)
        ns.ip("link", "set", "br0", "up", netns=self.inet)
        if self.spec.ipv6:  # the core router: one hop that knows every LAN
            self._add6(self.inet, CORE_ROUTER6, "br0")

    def _route6_default(self, netns: str) -> None:
        if self.spec.ipv6:
            ns.ip("-6", "route", "add", "default", "via", CORE_ROUTER6, netns=netns)

    def _attach_to_internet(self, netns: str, dev: str, port: str, link: LinkShape) -> None:
        """Wire ``dev`` in ``netns`` to the internet bridge through port ``port``, shaped if asked."""
        ns.ip("link", "add", dev, "netns", netns, "type", "veth", "peer", "name", port, "netns", self.inet)
        ns.ip("link", "set", dev, "up", netns=netns)
        if not link.is_shaped:
            ns.ip("link", "set", port, "master", "br0", netns=self.inet)
            ns.ip("link", "set", port, "up", netns=self.inet)
            return
        near, far = f"{port}b", f"{port}c"
        ns.ip("link", "add", near, "type", "veth", "peer", "name", far, netns=self.inet)
        ns.ip("link", "set", far, "master", "br0", netns=self.inet)
        for name in (port, near, far):
            ns.ip("link", "set", name, "up", netns=self.inet)
            ns.disable_offloads(self.inet, name)
        ns.disable_offloads(netns, dev)
        self._start_shaper(port, near, link)

    def _start_shaper(self, a: str, b: str, link: LinkShape) -> None:
        argv = [sys.executable, "-m", "tcppunch.lab.link", a, b, "--delay-ms", str(link.delay_ms),
                "--jitter-ms", str(link.jitter_ms), "--loss", str(link.loss)]
        proc = start_daemon(self.inet, argv, log_path=self.log_dir / f"shaper-{a}.log", ready="ready",
                            ready_timeout=_SHAPER_READY_S)
        self._shapers.append(proc)

    def _build_server(self) -> None:
        self._new_ns(self.server.netns)
        self._attach_to_internet(self.server.netns, "eth0", "srv", self.spec.server_link)
        for addr in SERVER_ADDRESSES:
            ns.ip("addr", "add", f"{addr}/{INTERNET_PREFIXLEN}", "dev", "eth0", netns=self.server.netns)
        if self.spec.ipv6:
            for addr in SERVER_ADDRESSES6:
                self._add6(self.server.netns, addr, "eth0")
            self._route6_default(self.server.netns)

    def _build_router(self, router: LabRouter) -> None:
        spec, k = router.spec, router.index
        if spec.nat is NatType.NONE:
            for j in range(spec.hosts):
                host = self.hosts[f"{spec.name}{j + 1}"]
                self._new_ns(host.netns)
                self._attach_to_internet(host.netns, "eth0", f"p{k}h{j}", spec.link)
                ns.ip("addr", "add", f"{host.address}/{INTERNET_PREFIXLEN}", "dev", "eth0", netns=host.netns)
                if host.address6 is not None:
                    self._add6(host.netns, host.address6, "eth0")
                    self._route6_default(host.netns)
            return
        assert router.netns is not None
        home = router.netns
        stun = (*SERVER_ADDRESSES, portmap.STUN_PORT) if spec.port_mapping else None
        self._new_ns(home, router=True)
        ns.sysctl(home, "net.ipv4.ip_forward", "1")
        if router.outer_netns is None:
            self._attach_to_internet(home, "wan", f"r{k}", spec.link)
            ns.ip("addr", "add", f"{router.wan_address}/{INTERNET_PREFIXLEN}", "dev", "wan", netns=home)
            ns.nft_load(home, router_ruleset(spec.nat, spec.syn_policy, wan_if="wan", wan_ip=router.wan_address,
                                             stun_server=stun))
        else:
            carrier = router.outer_netns
            self._new_ns(carrier, router=True)
            ns.sysctl(carrier, "net.ipv4.ip_forward", "1")
            self._attach_to_internet(carrier, "wan", f"r{k}", spec.link)
            ns.ip("addr", "add", f"{router.wan_address}/{INTERNET_PREFIXLEN}", "dev", "wan", netns=carrier)
            ns.ip("link", "add", "home", "netns", carrier, "type", "veth", "peer", "name", "wan", "netns", home)
            ns.ip("addr", "add", f"{carrier_address(k, home=False)}/24", "dev", "home", netns=carrier)
            ns.ip("link", "set", "home", "up", netns=carrier)
            ns.ip("addr", "add", f"{carrier_address(k, home=True)}/24", "dev", "wan", netns=home)
            ns.ip("link", "set", "wan", "up", netns=home)
            ns.ip("route", "add", "default", "via", carrier_address(k, home=False), netns=home)
            ns.nft_load(carrier, router_ruleset(spec.nat, spec.syn_policy, wan_if="wan", wan_ip=router.wan_address))
            ns.nft_load(home, router_ruleset(spec.nat, spec.syn_policy, wan_if="wan",
                                             wan_ip=carrier_address(k, home=True), stun_server=stun))
        ns.ip("link", "add", "lan", "type", "bridge", netns=home)
        ns.ip("addr", "add", f"{lan_gateway(k)}/24", "dev", "lan", netns=home)
        ns.ip("link", "set", "lan", "up", netns=home)
        self._build_router6(router)
        for j in range(spec.hosts):
            host = self.hosts[f"{spec.name}{j + 1}"]
            self._new_ns(host.netns)
            ns.ip("link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", f"h{j}", "netns", home)
            ns.ip("link", "set", f"h{j}", "master", "lan", netns=home)
            ns.ip("link", "set", f"h{j}", "up", netns=home)
            ns.ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
            ns.ip("link", "set", "eth0", "up", netns=host.netns)
            ns.ip("route", "add", "default", "via", lan_gateway(k), netns=host.netns)
            if host.address6 is not None:
                self._add6(host.netns, host.address6, "eth0")
                ns.ip("-6", "route", "add", "default", "via", lan_gateway6(k), netns=host.netns)

    def _start_stun_server(self) -> None:
        """coturn on both server addresses: the RFC 5780 STUN server miniupnpd checks its WAN with."""
        state = self.log_dir / "coturn"
        state.mkdir(parents=True, exist_ok=True)
        proc = start_daemon(self.server.netns, portmap.coturn_argv(SERVER_ADDRESSES, state),
                            log_path=self.log_dir / "coturn.log")
        self._shapers.append(proc)
        if not _answers_within(self.server.netns, proc, _stun_answers, SERVER_ADDRESSES[1], portmap.STUN_PORT + 1):
            raise ns.LabError(f"coturn did not answer STUN (log: {self.log_dir / 'coturn.log'})")

    def _start_miniupnpd(self, router: LabRouter) -> subprocess.Popen[str]:
        """miniupnpd on the (home) router: its nftables chains, its config, and the wait until it listens."""
        assert router.netns is not None
        ns.nft_load(router.netns, portmap.upnp_ruleset(fresh=router.name in self._miniupnpd))
        config = self.log_dir / f"miniupnpd-{router.name}.conf"
        config.write_text(portmap.miniupnpd_config(wan_if="wan", lan_if="lan", lan_subnet=lan_subnet(router.index),
                                                   stun_host=SERVER_ADDRESSES[0]))
        log_path = self.log_dir / f"miniupnpd-{router.name}.log"
        proc = start_daemon(router.netns, portmap.miniupnpd_argv(config, self.log_dir / f"miniupnpd-{router.name}.pid"),
                            log_path=log_path)
        self._shapers.append(proc)
        self._miniupnpd[router.name] = proc
        return proc

    def reboot_miniupnpd(self, router: str) -> None:
        """What a router reboot does to port mapping: miniupnpd stops (by PID), its rules are gone, and a
        new one starts with a new epoch; returns once it answers again."""
        self.stop_miniupnpd(router)
        self.start_miniupnpd(router)

    def stop_miniupnpd(self, router: str) -> None:
        """Stop ``router``'s miniupnpd (by PID) and wipe its chains, as a reboot would (miniupnpd leaves its
        rules behind when it stops). Until :meth:`start_miniupnpd`, the router answers no port-mapping
        request and forwards no mapped port (a gateway that is down)."""
        proc = self._miniupnpd.get(router)
        if proc is None or proc not in self._shapers:
            raise ns.LabError(f"router {router} runs no miniupnpd")
        _stop_process(proc.pid, proc)
        self._shapers.remove(proc)
        netns = self.routers[router].netns
        assert netns is not None
        ns.nft_load(netns, portmap.upnp_ruleset(fresh=True))

    def start_miniupnpd(self, router: str) -> None:
        """Start ``router``'s miniupnpd again after :meth:`stop_miniupnpd` (a new epoch); returns once it
        answers."""
        proc = self._miniupnpd.get(router)
        if proc is None:
            raise ns.LabError(f"router {router} runs no miniupnpd")
        if proc in self._shapers:
            raise ns.LabError(f"miniupnpd on router {router} is running already")
        lab_router = self.routers[router]
        self._wait_miniupnpd(lab_router, self._start_miniupnpd(lab_router))

    def _wait_miniupnpd(self, router: LabRouter, proc: subprocess.Popen[str]) -> None:
        assert router.netns is not None
        log_path = self.log_dir / f"miniupnpd-{router.name}.log"
        # miniupnpd answers NAT-PMP only after its STUN check (a few ms here, up to 3 s per missing answer)
        if not _answers_within(router.netns, proc, _natpmp_answers, lan_gateway(router.index)):
            raise ns.LabError(f"miniupnpd on router {router.name} did not start (log: {log_path})")

    def miniupnpd_log(self, router: str) -> str:
        """What miniupnpd on ``router`` has logged so far ('' if it runs none)."""
        return _read_text(self.log_dir / f"miniupnpd-{router}.log")

    def _build_router6(self, router: LabRouter) -> None:
        """IPv6 on a router: WAN and LAN addresses, routes, and the RFC 6092 firewall on the home router
        (a cgnat's carrier router only routes: carriers hand out IPv6 without NAT or filtering)."""
        if router.wan_address6 is None:
            return
        k, home, policy = router.index, router.netns, router.spec.syn_policy
        assert home is not None
        edge = router.outer_netns or home  # the namespace on the internet bridge
        self._add6(edge, router.wan_address6, "wan")
        ns.ip("-6", "route", "add", "default", "via", CORE_ROUTER6, netns=edge)
        ns.ip("-6", "route", "add", lan_prefix6(k), "via", router.wan_address6, netns=self.inet)
        if router.outer_netns is not None:
            self._add6(edge, carrier_address6(k, home=False), "home")
            self._add6(home, carrier_address6(k, home=True), "wan")
            ns.ip("-6", "route", "add", "default", "via", carrier_address6(k, home=False), netns=home)
            ns.ip("-6", "route", "add", lan_prefix6(k), "via", carrier_address6(k, home=True), netns=edge)
        self._add6(home, lan_gateway6(k), "lan")
        ns.nft_load(home, firewall6_ruleset(policy, wan_if="wan"))

    # ----------------------------------------------------------------- state (for the CLI)
    def describe(self) -> dict[str, Any]:
        """A JSON-able description: what the CLI's ``status`` shows and ``down`` needs."""
        return {
            "prefix": self.prefix,
            "ipv6": self.spec.ipv6,
            "server": {"netns": self.server.netns,
                       "addresses": list(SERVER_ADDRESSES) + (list(SERVER_ADDRESSES6) if self.spec.ipv6 else [])},
            "routers": [
                {"name": r.name, "nat": r.spec.nat.value, "syn_policy": r.spec.syn_policy.value,
                 "hosts": r.spec.hosts, "wan": r.wan_address, "wan6": r.wan_address6,
                 "port_mapping": r.spec.port_mapping,
                 "netns": r.netns, "outer_netns": r.outer_netns,
                 "delay_ms": r.spec.link.delay_ms, "jitter_ms": r.spec.link.jitter_ms, "loss": r.spec.link.loss}
                for r in self.routers.values()
            ],
            "hosts": [
                {"name": h.name, "netns": h.netns, "address": h.address, "public": h.public_address,
                 "address6": h.address6,
                 "router": h.router, "nat": h.nat.value, "syn_policy": h.syn_policy.value}
                for h in self.hosts.values()
            ],
            "namespaces": self.namespaces,
        }

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{self.prefix}.json").write_text(json.dumps(self.describe(), indent=2))

    @classmethod
    def attach(cls, prefix: str) -> Lab:
        """A handle on a lab that ``tcppunch lab up`` left running (from its state file)."""
        path = STATE_DIR / f"{prefix}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ns.LabError(f"no running lab {prefix!r} (no {path})") from None
        routers = [
            RouterSpec(r["name"], NatType(r["nat"]), SynPolicy(r["syn_policy"]), int(r["hosts"]),
                       LinkShape(float(r["delay_ms"]), float(r["jitter_ms"]), float(r["loss"])),
                       port_mapping=bool(r.get("port_mapping", False)))
            for r in data["routers"]
        ]
        return cls(LabSpec(routers, ipv6=bool(data.get("ipv6", False))), prefix=prefix)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _answers_within(netns: str, proc: subprocess.Popen[Any], question: Callable[..., bool], *args: Any) -> bool:
    """Ask ``question(*args)`` (a bounded UDP exchange) from ``netns`` until it says yes, the daemon died, or
    _DAEMON_READY_S passed."""
    deadline = time.monotonic() + _DAEMON_READY_S
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        while proc.poll() is None and time.monotonic() < deadline:
            if pool.submit(ns.call_in_netns, netns, lambda: question(*args)).result(_DAEMON_READY_S):
                return True
    return False


def _udp_answer(address: str, port: int, request: bytes, timeout: float = 0.2) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(request, (address, port))
        try:
            return sock.recv(2048)
        except OSError:
            return None


def _stun_answers(address: str, port: int) -> bool:
    """Whether a STUN Binding request to ``address:port`` (UDP) gets its answer within 0.2 s."""
    request = binding_request(secrets.token_bytes(12))
    data = _udp_answer(address, port, encode_message(request))
    try:
        return data is not None and parse_message(data).transaction_id == request.transaction_id
    except StunParseError:
        return False


def _natpmp_answers(gateway: str) -> bool:
    """Whether the gateway answers a NAT-PMP external-address request within 0.2 s."""
    data = _udp_answer(gateway, natpmp.SERVER_PORT, natpmp.external_address_request())
    try:
        return data is not None and isinstance(natpmp.parse_response(data), natpmp.AddressResponse)
    except natpmp.NatPmpParseError:
        return False


def running_labs() -> list[str]:
    """Prefixes of labs on this machine: from state files and from namespace names."""
    prefixes = {p.stem for p in STATE_DIR.glob("tp*.json") if PREFIX_RE.match(p.stem)}
    prefixes |= {n.split("-", 1)[0] for n in ns.list_netns() if PREFIX_RE.match(n.split("-", 1)[0])}
    return sorted(prefixes)


def remove_namespaces(prefix: str) -> None:
    """Stop every process living in the lab's namespaces (by PID), then delete the namespaces."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a lab prefix: {prefix!r}")
    mine = [n for n in ns.list_netns() if n.startswith(prefix + "-")]
    for name in mine:
        for pid in ns.netns_pids(name):
            _stop_process(pid, None)
    for name in mine:
        ns.delete_netns(name)


def _stop_process(pid: int, proc: subprocess.Popen[Any] | None, grace: float = 2.0) -> None:
    """SIGTERM, wait (bounded), then SIGKILL one process by PID."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not _pid_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child still "exists"; reap it if it is ours
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True
