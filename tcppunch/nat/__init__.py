"""NAT measurement: local interfaces, the classic UDP label, TCP mapping/filtering tests -> NatReport."""
