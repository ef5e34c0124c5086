"""Wire formats: STUN and the coordinator protocol. Sans-I/O: bytes in, events out; no sockets, no clock."""
