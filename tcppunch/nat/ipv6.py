"""Does IPv6 work for direct connections from this host? A global address, and a TCP exchange with the
server over IPv6 in which the server sees that very address (no NAT66).

With no NAT on the IPv6 path, a peer's own address and port are its public endpoint, so IPv6 is the
direct path whatever the IPv4 NAT does (behind at most a stateful firewall, RFC 6092). This probe runs
beside the IPv4 measurement: it uses its own socket and nothing of it crosses the IPv4 NAT.
"""

from __future__ import annotations

from tcppunch.nat.local import LocalNetwork
from tcppunch.nat.retry import ConnectBudget
from tcppunch.nat.tcp_tests import StunTcpError, TcpStunConnection, mapped_endpoint
from tcppunch.wire.endpoint import Endpoint
from tcppunch.wire.natreport import Ipv6Support


async def probe_ipv6(network: LocalNetwork, server: Endpoint | None, timeout: float) -> Ipv6Support:
    """Check IPv6 against ``server`` (an IPv6 STUN-over-TCP endpoint; None: only look at the addresses)."""
    addresses = network.global_ipv6()
    if not addresses:
        return Ipv6Support(None, False, "this host has no global IPv6 address")
    address = addresses[0]
    if server is None:
        return Ipv6Support(address, None, "not tested: no IPv6 server endpoint (give --ipv6-server)")
    try:
        # An optional side probe: its lost SYNs are retried only within ``timeout``, not the full budget.
        budget = ConnectBudget(budget=timeout, first_timeout=min(1.0, timeout))
        connection = await TcpStunConnection.open(Endpoint(address, 0), server, budget)
        try:
            mapped = mapped_endpoint(await connection.request((), timeout))
        finally:
            connection.close()
    except StunTcpError as exc:
        return Ipv6Support(address, False, f"no TCP over IPv6 to {server}: {exc}")
    if mapped.ip != address:
        return Ipv6Support(address, False, f"the server saw {mapped.ip}, not {address}: translated (NAT66)")
    return Ipv6Support(address, True, f"TCP over IPv6 to {server} works and the server sees this host's own "
                                      "address (no NAT66)")
