"""Port mapping on the home router: PCP (RFC 6887), NAT-PMP (RFC 6886) and UPnP-IGD.

Sans-I/O codecs (:mod:`.pcp`, :mod:`.natpmp`, :mod:`.upnp`). It sits beside the NAT layer (it uses
:mod:`tcppunch.nat.report`'s vocabulary) and below the punch.
"""

from tcppunch.nat.report import PortMapping, PortMappingProtocol, PortMappingSupport

__all__ = ["PortMapping", "PortMappingProtocol", "PortMappingSupport"]
