"""Lab specs and rule sets, without building anything."""

from __future__ import annotations

import pytest

from tcppunch.lab import LabSpec, LinkShape, NatType, RouterSpec, SynPolicy
from tcppunch.lab.nat_types import router_ruleset
from tcppunch.wire.natreport import SynResponse


def test_router_spec_parses_type_policy_and_hosts() -> None:
    r = RouterSpec.parse("a=symmetric-seq:rst x3")
    assert (r.name, r.nat, r.syn_policy, r.hosts) == ("a", NatType.SYMMETRIC_SEQ, SynPolicy.RST, 3)
    assert RouterSpec.parse("b=cgnat").syn_policy is SynPolicy.DROP
    assert not RouterSpec.parse("b=cgnat").port_mapping


def test_router_spec_parses_port_mapping() -> None:
    r = RouterSpec.parse("c=symmetric-random+upnp:rst x2")
    assert (r.nat, r.syn_policy, r.hosts, r.port_mapping) == (NatType.SYMMETRIC_RANDOM, SynPolicy.RST, 2, True)
    with pytest.raises(ValueError, match="no router"):
        RouterSpec.parse("p=none+upnp")


def test_port_mapping_router_admits_stun_answers_only_when_asked() -> None:
    plain = router_ruleset(NatType.SYMMETRIC_RANDOM, SynPolicy.DROP, wan_if="wan", wan_ip="198.51.100.101")
    mapped = router_ruleset(NatType.SYMMETRIC_RANDOM, SynPolicy.DROP, wan_if="wan", wan_ip="198.51.100.101",
                            stun_server=("198.51.100.10", "198.51.100.11", 3490))
    rule = 'iifname "wan" ip saddr 198.51.100.10-198.51.100.11 udp sport 3490-3491 accept'
    assert rule not in plain and rule in mapped
    assert mapped.index(rule) < mapped.index("ct state new meta l4proto udp drop")


@pytest.mark.parametrize("text", ["noequals", "a=wormhole", "a=full-cone:maybe", "Bad=none", "a=none x9"])
def test_router_spec_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        RouterSpec.parse(text)


def test_lab_spec_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        LabSpec([RouterSpec("a"), RouterSpec("a")])


@pytest.mark.parametrize(("delay", "loss"), [(-1.0, 0.0), (0.0, 1.0), (0.0, -0.1)])
def test_link_shape_bounds(delay: float, loss: float) -> None:
    with pytest.raises(ValueError):
        LinkShape(delay_ms=delay, loss=loss)


def test_every_type_has_one_router_each() -> None:
    assert [r.nat for r in LabSpec.every_type().routers] == list(NatType)


def test_rulesets_differ_where_the_behaviour_does() -> None:
    rules = {t: router_ruleset(t, SynPolicy.DROP, wan_if="wan", wan_ip="198.51.100.101")
             for t in NatType if t is not NatType.NONE}
    assert "numgen inc" in rules[NatType.SYMMETRIC_SEQ]
    assert "fully-random" in rules[NatType.SYMMETRIC_RANDOM]
    assert "@contacted" in rules[NatType.RESTRICTED] and "@contacted" not in rules[NatType.FULL_CONE]
    assert "dnat ip to" not in rules[NatType.PORT_RESTRICTED]
    assert "reject with tcp reset" in router_ruleset(NatType.PORT_RESTRICTED, SynPolicy.RST, wan_if="wan",
                                                     wan_ip="198.51.100.101")


def test_none_has_no_router() -> None:
    with pytest.raises(ValueError):
        router_ruleset(NatType.NONE, SynPolicy.DROP, wan_if="wan", wan_ip="198.51.100.101")


def test_full_cone_lets_strangers_in_whatever_the_policy() -> None:
    assert NatType.FULL_CONE.unsolicited_syn(SynPolicy.RST) is SynResponse.ACCEPT
    assert NatType.PORT_RESTRICTED.unsolicited_syn(SynPolicy.RST) is SynResponse.RST
