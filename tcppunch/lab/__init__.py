"""The NAT laboratory: real Linux NAT (nftables + conntrack) in network namespaces.

Public API: :class:`Lab`, :class:`LabSpec`, :class:`RouterSpec`, :class:`LinkShape`, :class:`NatType`,
:class:`SynPolicy`, :class:`LabHost`, :class:`LabError`. See docs/lab.md.
"""

from tcppunch.lab.lab import Lab, LabHost, NetnsLoop, running_labs
from tcppunch.lab.nat_types import NatType, SynPolicy
from tcppunch.lab.netns import LabError
from tcppunch.lab.topology import LabSpec, LinkShape, RouterSpec

__all__ = [
    "Lab",
    "LabError",
    "LabHost",
    "LabSpec",
    "LinkShape",
    "NatType",
    "NetnsLoop",
    "RouterSpec",
    "SynPolicy",
    "running_labs",
]
