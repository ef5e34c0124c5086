"""A small BitTorrent-like swarm on tcppunch: one file cut into SHA-256-checked pieces, peers that find
each other through the coordinator's peer listing and trade pieces over direct or relayed connections.

Modules: :mod:`.metainfo` (the .torrent-like JSON), :mod:`.wire` (the piece protocol codec, sans-I/O),
:mod:`.picker` (which piece to ask whom for, sans-I/O), :mod:`.storage` (pieces on disk),
:mod:`.client` (the asyncio peer on :class:`tcppunch.peer.Peer`), :mod:`.demo` (the NAT-lab run).
``python -m examples.swarm --help`` from the repository root.
"""
