"""The IPv6 side of a lab router: an RFC 6092 simple-security firewall, no NAT66.

What RFC 6092 asks of a home gateway for TCP, and what this rule set does:

* REC-31/REC-32: outbound connections are tracked, and packets of tracked connections get back in
  (``ct state established,related accept``). A SYN that arrives while our own SYN for the same 4-tuple is
  out is a reply to it in conntrack's eyes, so a simultaneous open passes (REC-31 says it MUST);
* REC-33/REC-36: an unsolicited inbound SYN is dropped, or answered with a TCP RST under the lab's
  ``rst`` policy (the same :class:`SynPolicy` as the router's IPv4 side);
* ICMPv6 is let through (REC-8ff.: neighbour discovery on the WAN link, errors of tracked flows);
* anything else unsolicited from the WAN is dropped.

The table lives beside the router's IPv4 NAT table (``table ip6 tcppunch_fw6``) and is loaded after it.
"""

from __future__ import annotations

from tcppunch.lab.nat_types import SynPolicy

TABLE = "tcppunch_fw6"


def firewall6_ruleset(policy: SynPolicy, *, wan_if: str) -> str:
    """The nftables rule set of one router's IPv6 firewall (WAN interface ``wan_if``)."""
    tcp_verdict = "drop" if policy is SynPolicy.DROP else "reject with tcp reset"
    wan = f'iifname "{wan_if}"'
    chains = []
    for hook in ("input", "forward"):
        chains += [
            f"  chain {hook} {{ type filter hook {hook} priority filter; policy accept;",
            f"    {wan} ct state established,related accept",
            f"    {wan} meta l4proto ipv6-icmp accept",
            f"    {wan} meta l4proto tcp {tcp_verdict}",
            f"    {wan} drop",
            "  }",
        ]
    return "\n".join([f"table ip6 {TABLE} {{", *chains, "}", ""])
