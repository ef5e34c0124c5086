"""Port mapping on the home router: PCP (RFC 6887), NAT-PMP (RFC 6886) and UPnP-IGD.

Sans-I/O codecs (:mod:`.pcp`, :mod:`.natpmp`, :mod:`.upnp`) and one asyncio driver (:mod:`.client`):
:class:`PortMapper` gets an inbound TCP mapping of a local port, renews it and deletes it on close.
It sits beside the NAT layer (it uses :mod:`tcppunch.wire.natreport`'s vocabulary) and below the punch.
"""

from tcppunch.portmap.client import Gateway, PortMapError, PortMapErrorCode, PortMapper, ProbeResult, probe
from tcppunch.wire.natreport import PortMapping, PortMappingProtocol, PortMappingSupport

__all__ = ["Gateway", "PortMapError", "PortMapErrorCode", "PortMapper", "PortMapping", "PortMappingProtocol",
           "PortMappingSupport", "ProbeResult", "probe"]
