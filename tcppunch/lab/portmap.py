"""Port mapping on lab routers: miniupnpd (UPnP-IGD, NAT-PMP and PCP on the LAN) and the STUN server it
needs on the lab server.

miniupnpd (Debian ``miniupnpd-nftables``) writes its rules into an ``inet`` table, so a router with port
mapping gets one ``table inet filter`` whose forward, prerouting and postrouting base chains jump to
miniupnpd's own (empty) chains, one priority step ahead of the router's NAT table. Its DNAT then wins the
prerouting hook, and the router's forward chain already admits DNAT-ed connections.

miniupnpd refuses to map while its WAN address is in a reserved range (198.51.100.0/24 is), unless STUN
says the address is reachable: ``ext_perform_stun`` sends four Binding requests with CHANGE-REQUEST to a
server with two addresses and grants mappings only if all four answers come back (no filtering NAT
beyond). coturn serves that on the lab server (:func:`coturn_argv`, ports :data:`STUN_PORT` and +1,
apart from the coordinator's 3478); the router's input chain admits the server's answers (see
``router_ruleset(..., stun_server=...)``). Behind cgnat the carrier layer filters the changed-address
answers, so the home router's miniupnpd turns port forwarding off: a carrier's NAT cannot be mapped.
"""

from __future__ import annotations

from pathlib import Path

STUN_PORT = 3490  # coturn's primary port on both server addresses; the RFC 5780 alternate is +1
MINIUPNPD_READY = "Listening for NAT-PMP/PCP traffic"
FORWARDING_ENABLED = "Port forwarding is now enabled"
FORWARDING_DISABLED = "Port forwarding is now disabled"
# Renewals in tests should not wait two minutes: accept lifetimes down to this many seconds.
MIN_LIFETIME_S = 4

_UPNP_TABLE = """table inet filter {
  chain miniupnpd { }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
  chain forward { type filter hook forward priority filter - 1; policy accept; jump miniupnpd; }
  chain prerouting { type nat hook prerouting priority dstnat - 1; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; jump postrouting_miniupnpd; }
}
"""


def upnp_ruleset(*, fresh: bool = False) -> str:
    """The router's ``table inet filter`` for miniupnpd; ``fresh``: replace an existing one (its rules gone,
    as after a reboot)."""
    return ("table inet filter { }\ndelete table inet filter\n" if fresh else "") + _UPNP_TABLE


def miniupnpd_config(*, wan_if: str, lan_if: str, lan_subnet: str, stun_host: str) -> str:
    """miniupnpd.conf for a lab router: all three protocols on the LAN, mappings only for LAN hosts and
    only of their own address (secure mode), STUN against the lab server."""
    return "\n".join([
        f"ext_ifname={wan_if}",
        f"listening_ip={lan_if}",
        "http_port=5000",
        "enable_natpmp=yes",  # NAT-PMP and PCP both ride on this switch (UDP 5351)
        "enable_upnp=yes",
        "secure_mode=yes",
        "system_uptime=no",  # the epoch starts with the daemon, so a restart looks like a reboot to clients
        f"min_lifetime={MIN_LIFETIME_S}",
        "max_lifetime=86400",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_host}",
        f"ext_stun_port={STUN_PORT}",
        "upnp_table_name=filter",
        "upnp_nat_table_name=filter",
        "upnp_forward_chain=miniupnpd",
        "upnp_nat_chain=prerouting_miniupnpd",
        "upnp_nat_postrouting_chain=postrouting_miniupnpd",
        "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b",
        f"allow 1024-65535 {lan_subnet} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ])


def miniupnpd_argv(config: Path, pid_file: Path) -> list[str]:
    """Foreground (``-d``: logs to stderr, which the lab sends to a file) with its own pid file."""
    return ["miniupnpd", "-f", str(config), "-d", "-P", str(pid_file)]


def coturn_argv(addresses: tuple[str, str], state: Path) -> list[str]:
    """coturn as a bare RFC 5780 STUN server on both lab server addresses (no TURN auth, no TLS, no CLI)."""
    return ["turnserver", "-c", "/dev/null", "-L", addresses[0], "-L", addresses[1], "-p", str(STUN_PORT),
            "--alt-listening-port", str(STUN_PORT + 1), "--no-tls", "--no-dtls", "-z", "--no-cli",
            "--userdb", str(state / "turndb"), "--pidfile", str(state / "turnserver.pid"),
            "--log-file", "stdout", "--simple-log"]
