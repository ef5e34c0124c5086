"""The NAT laboratory: real Linux NAT (nftables + conntrack) in network namespaces."""
