"""TUN devices in lab namespaces (never the host's own), joined by the packet link over a local socket
pair: the kernel's own ping and a TCP transfer cross between two namespaces through our code only."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcppunch.lab import Lab, LabHost, LabSpec, NatType, RouterSpec
from tcppunch.vpn import iface
from tcppunch.vpn.link import LinkStats, carry
from tcppunch.vpn.packets import DropQueue
from tcppunch.vpn.tun import Tun, TunError

NAME = "tpvtest0"
MTU = 1400


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(LabSpec([RouterSpec("a", NatType.NONE), RouterSpec("b", NatType.NONE)])) as the_lab:
        yield the_lab


def _open(host: LabHost, address: str) -> Tun:
    """A configured TUN device in ``host``'s namespace (the device stays there for the fd's life)."""

    def make() -> Tun:
        tun = Tun(NAME)
        try:
            iface.configure(tun.name, ipaddress.ip_interface(address), MTU)
        except BaseException:
            tun.close()
            raise
        return tun

    return host.call(make)


def _close(host: LabHost, tun: Tun) -> None:
    tun.close()
    host.call(iface.delete, NAME)  # by name, in case it outlived its descriptor


@pytest.fixture
def linked(lab: Lab) -> Iterator[tuple[LabHost, LabHost, Tun, Tun]]:
    a, b = lab.host("a"), lab.host("b")
    tun_a = _open(a, "10.99.0.1/24")
    try:
        tun_b = _open(b, "10.99.0.2/24")
    except BaseException:
        _close(a, tun_a)
        raise
    try:
        yield a, b, tun_a, tun_b
    finally:
        _close(a, tun_a)
        _close(b, tun_b)
    assert b"tpvtest0" not in subprocess.run(a.command(["ip", "link"]), capture_output=True).stdout


async def _with_link(tun_a: Tun, tun_b: Tun, work: asyncio.Future[subprocess.CompletedProcess[str]],
                     stats: LinkStats) -> subprocess.CompletedProcess[str]:
    left, right = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=left)
    rb, wb = await asyncio.open_connection(sock=right)
    links = [asyncio.ensure_future(carry(tun_a, ra, wa, stats=stats)),
             asyncio.ensure_future(carry(tun_b, rb, wb, queue=DropQueue()))]
    try:
        return await work
    finally:
        wa.close()
        wb.close()
        await asyncio.gather(*links, return_exceptions=True)


def test_tun_name_is_checked_and_failure_is_clear() -> None:
    with pytest.raises(ValueError):
        Tun("bad name with spaces")
    if os.geteuid() != 0:
        with pytest.raises(TunError):
            Tun("tpvx0")


def test_ping_crosses_two_namespaces_through_the_link(linked: tuple[LabHost, LabHost, Tun, Tun]) -> None:
    a, _, tun_a, tun_b = linked
    stats = LinkStats()

    async def main() -> subprocess.CompletedProcess[str]:
        ping = asyncio.ensure_future(asyncio.to_thread(
            a.run, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "10.99.0.2"], timeout=30))
        return await _with_link(tun_a, tun_b, ping, stats)

    done = asyncio.run(main())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 received" in done.stdout
    assert stats.sent >= 3 and stats.received >= 3


def test_a_tcp_transfer_arrives_intact(linked: tuple[LabHost, LabHost, Tun, Tun], tmp_path: Path) -> None:
    a, b, tun_a, tun_b = linked
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(4_000_000))
    received = tmp_path / "received.bin"
    sink = b.popen(["socat", "-u", "TCP-LISTEN:5001,bind=10.99.0.2,reuseaddr", f"CREATE:{received}"])
    try:
        def transfer() -> subprocess.CompletedProcess[str]:
            sent = a.run(["socat", "-u", f"FILE:{payload}", "TCP:10.99.0.2:5001,retry=50,interval=0.1"], timeout=60)
            sink.wait(30)  # the link must stay up until the receiver has everything
            return sent

        async def main() -> subprocess.CompletedProcess[str]:
            return await _with_link(tun_a, tun_b, asyncio.ensure_future(asyncio.to_thread(transfer)), LinkStats())

        done = asyncio.run(main())
        assert done.returncode == 0, done.stderr
        assert sink.returncode == 0
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)
    assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(payload.read_bytes()).digest()
