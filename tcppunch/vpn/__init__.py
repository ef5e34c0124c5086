"""``tcppunch vpn``: IP packets between two peers over their session, on TUN interfaces.

Building blocks: :mod:`~tcppunch.vpn.tun` (the TUN device), :mod:`~tcppunch.vpn.iface` (addresses and
routes with ``ip``), :mod:`~tcppunch.vpn.packets` (framing and the drop queue, sans-I/O),
:mod:`~tcppunch.vpn.link` (the asyncio pump between a TUN device and a stream).
"""
