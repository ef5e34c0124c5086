"""Reuse-port TCP sockets for hole punching, and the few asyncio helpers the engine needs around them.

Every socket of one punch is bound to the same local endpoint (the port whose NAT mapping the coordinator
observed), so all of them carry ``SO_REUSEADDR`` + ``SO_REUSEPORT``: one listener and any number of
connectors share the port. The kernel routes an incoming SYN to the connector whose 4-tuple it matches
(simultaneous open) and otherwise to the listener.

Closing rules, because closing is where "punched but dead" connections come from:

* a connector that never connected (``SYN_SENT``) is simply closed: Linux sends nothing for it;
* nothing here ever sets ``SO_LINGER`` to zero (that turns ``close()`` into a RST, which is harmless on
  a loser's own 4-tuple but is exactly the bug when the 4-tuple is shared with the winner);
* a connected loser is shut down with a FIN by :func:`close_quietly`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import struct

from tcppunch.nat.sockets import family_of, reuse_port_socket
from tcppunch.wire.endpoint import Endpoint

# Linux TCP states as reported by TCP_INFO (include/net/tcp_states.h).
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def sockaddr(endpoint: Endpoint) -> tuple[str, int]:
    """The address tuple that ``connect``/``bind`` take for ``endpoint``."""
    return (endpoint.ip, endpoint.port)


def reuse_socket(local: Endpoint) -> socket.socket:
    """A non-blocking TCP socket bound to ``local`` with SO_REUSEADDR + SO_REUSEPORT.

    Port 0 picks a free port; read it back with ``getsockname()`` and bind the others to it.
    """
    return reuse_port_socket(socket.SOCK_STREAM, local)


def own_port_socket(ip: str) -> socket.socket:
    """A non-blocking TCP socket on a free port of its own (no port sharing): one birthday ticket."""
    sock = socket.socket(family_of(ip), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind((ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def raise_fd_limit(minimum: int) -> int:
    """Raise the soft limit on open files to at least ``minimum`` (never above the hard limit); return the
    soft limit now in force. A birthday punch holds a socket per ticket or guess (up to thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < minimum:
        target = minimum if hard == resource.RLIM_INFINITY else min(minimum, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def reuse_listener(local: Endpoint, backlog: int = 16) -> socket.socket:
    """A listening socket on ``local`` that connectors bound to the same port can share."""
    sock = reuse_socket(local)
    try:
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def get_ttl(sock: socket.socket) -> int:
    """The unicast TTL (IPv4) or hop limit (IPv6) used by ``sock``."""
    if sock.family == socket.AF_INET6:
        return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS)
    return sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)


def set_ttl(sock: socket.socket, ttl: int) -> None:
    """Set the unicast TTL / hop limit of ``sock`` (-1 on IPv6 restores the system default)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


def start_connect(sock: socket.socket, remote: Endpoint, *, first_syn_ttl: int | None = None) -> int:
    """Send the SYN now (non-blocking ``connect``) and return 0 / EINPROGRESS or the immediate errno.

    With ``first_syn_ttl`` the SYN leaves with that TTL and the TTL is restored right after, so every
    later segment (retransmitted SYN, SYN-ACK of a simultaneous open, data) carries the normal TTL: a
    low-TTL SYN opens our own NAT without reaching the peer's (which might answer with a RST).
    The SYN leaves inside the ``connect`` system call, so calling this for several candidates in a row
    sends their SYNs in exactly that order (what sequential port prediction depends on).
    """
    saved = None
    if first_syn_ttl is not None:
        saved = get_ttl(sock)
        set_ttl(sock, first_syn_ttl)
    try:
        return sock.connect_ex(sockaddr(remote))
    finally:
        if saved is not None:
            set_ttl(sock, saved)


async def wait_connected(sock: socket.socket) -> None:
    """Wait until a non-blocking connect finishes; raise its error as :class:`OSError`."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    done: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await done
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def tcp_state(sock: socket.socket) -> int | None:
    """The kernel's TCP state of ``sock`` (TCP_INFO), or None where that is not available."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 8)
    except OSError:
        return None
    return int(struct.unpack_from("B", info)[0]) if info else None


def close_quietly(sock: socket.socket) -> None:
    """Close a socket that lost (or was never used) without ever sending a RST on purpose.

    A connected socket gets ``shutdown(SHUT_WR)`` (FIN) first. Linux still answers with a RST if unread
    data sits in the receive buffer; that RST carries the loser's own 4-tuple, never the winner's,
    because no two of our sockets share one.
    """
    if sock.fileno() < 0:
        return
    try:
        if tcp_state(sock) == TCP_ESTABLISHED:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


# errno values the engine tells apart when a connect attempt ends.
REFUSED_ERRNOS = frozenset({errno.ECONNREFUSED})
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})
BUSY_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EISCONN, errno.EALREADY})
UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})
TIMEOUT_ERRNOS = frozenset({errno.ETIMEDOUT})
